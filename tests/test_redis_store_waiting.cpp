// RedisStore::await_change (Options::in_progress_wait): waiters woken by sharded pub/sub
// notifications, in one process and across processes, and the fallbacks when there are none.

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "idem/redis.hpp"
#include "support/redis_server.hpp"
#include "support/redis_store_helpers.hpp"
#include "support/sanitized.hpp"

namespace {

using namespace std::chrono_literals;
using namespace idem::test_support::redis;
using idem::ClaimStatus;
using idem::Message;
using idem::Outcome;
using idem::RedisOptions;
using idem::RedisStore;
using idem::test_support::RedisServer;
using idem::testing::kSanitized;

TEST(RedisStoreWait, CompletionReleaseAndForgetWakeTheWaiterByNotification) {
  RedisStore store(options_for(shared_server().port(), "wake"));
  const idem::Claim done = store.claim(request("w-done"));
  const idem::Claim released = store.claim(request("w-released"));
  const idem::Claim forgotten = store.claim(request("w-forgotten"));
  ASSERT_EQ(done.status, ClaimStatus::acquired);
  std::vector<std::thread> waiters;
  for (const char* key : {"w-done", "w-released", "w-forgotten"}) {
    waiters.emplace_back([&store, key] { store.await_change(key, kLongWait); });
  }
  wait_for_waiters(store, 3);
  EXPECT_EQ(channel_subscribers(store, "w-done"), 1) << "one connection for all waiters";
  EXPECT_TRUE(store.complete({.key = "w-done", .token = done.token, .response = "r-1"}));
  EXPECT_TRUE(store.release("w-released", released.token));
  EXPECT_TRUE(store.forget("w-forgotten"));
  for (std::thread& t : waiters) t.join();
  const idem::RedisStoreStats stats = store.counters();
  EXPECT_EQ(stats.waits_woken, 3u);
  EXPECT_EQ(stats.waits_timed_out, 0u);
  EXPECT_EQ(stats.wait_fallbacks, 0u);
  EXPECT_GE(stats.notifications, 3u);
  EXPECT_EQ(stats.waiting, 0u);
  EXPECT_EQ(store.claim(request("w-done")).response, "r-1");
  EXPECT_EQ(store.claim(request("w-released")).status, ClaimStatus::acquired);
  (void)forgotten;
}

TEST(RedisStoreWait, AKeyAlreadySettledIsSeenOnceSubscribed) {
  RedisStore store(options_for(shared_server().port(), "settled"));
  const idem::Claim c = store.claim(request("s-1"));
  ASSERT_TRUE(store.complete({.key = "s-1", .token = c.token}));
  store.await_change("s-1", kLongWait);     // done
  store.await_change("absent", kLongWait);  // no record
  const idem::Claim expired = store.claim(request("s-2", 50ms));
  ASSERT_EQ(expired.status, ClaimStatus::acquired);
  std::this_thread::sleep_for(100ms);
  store.await_change("s-2", kLongWait);  // lease over: the next claim takes it over
  EXPECT_EQ(store.counters().waits_settled, 3u);
  EXPECT_EQ(store.counters().waits_woken, 0u);
}

TEST(RedisStoreWait, AWaitingConsumerGetsTheCompletedResponseAsADuplicate) {
  RedisStore store(options_for(shared_server().port(), "dup"));
  const idem::Claim holder = store.claim(request("d-1"));
  std::atomic<int> runs{0};
  idem::IdempotentConsumer second(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = kLongWait});
  idem::Result result;
  std::thread waiter([&] { result = second.consume({.key = "d-1", .payload = "p"}); });
  wait_for_waiters(store, 1);
  EXPECT_TRUE(store.complete({.key = "d-1", .token = holder.token, .response = "card-7"}));
  waiter.join();
  EXPECT_EQ(result.outcome, Outcome::duplicate);
  EXPECT_EQ(result.response, "card-7");
  EXPECT_EQ(runs, 0);
}

TEST(RedisStoreWait, AWaitingConsumerProcessesAKeyItsHolderReleased) {
  RedisStore store(options_for(shared_server().port(), "rel"));
  const idem::Claim holder = store.claim(request("r-1"));
  std::atomic<int> runs{0};
  idem::IdempotentConsumer second(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = kLongWait});
  idem::Result result;
  std::thread waiter([&] { result = second.consume({.key = "r-1", .payload = "p"}); });
  wait_for_waiters(store, 1);
  EXPECT_TRUE(store.release("r-1", holder.token));  // its handler failed
  waiter.join();
  EXPECT_EQ(result.outcome, Outcome::processed);
  EXPECT_GT(result.fencing_token, holder.token);
  EXPECT_EQ(runs, 1);
}

TEST(RedisStoreWait, TheWaitRunsOutCleanly) {
  RedisStore store(options_for(shared_server().port(), "out"));
  ASSERT_EQ(store.claim(request("o-1")).status, ClaimStatus::acquired);  // never completed
  std::atomic<int> runs{0};
  idem::IdempotentConsumer second(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = 300ms});
  EXPECT_EQ(second.consume({.key = "o-1", .payload = "p"}).outcome, Outcome::in_progress);
  EXPECT_EQ(runs, 0);
  const idem::RedisStoreStats stats = store.counters();
  EXPECT_GE(stats.waits_timed_out, 1u);
  EXPECT_EQ(stats.waits_woken, 0u);
  EXPECT_EQ(stats.wait_fallbacks, 0u);
  EXPECT_EQ(stats.waiting, 0u);
  // The last waiter unsubscribed: the server sends that channel to nobody any more.
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (channel_subscribers(store, "o-1") != 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(channel_subscribers(store, "o-1"), 0);
}

// A user who may not publish or subscribe on the store's channels still completes (the
// scripts publish with redis.pcall); its waiters only pause.
TEST(RedisStoreWait, WithoutChannelPermissionsCompletionsWorkAndWaitsPause) {
  RedisServer server;
  ASSERT_NE(server.cli("ACL SETUSER nochan on '>pw' '~*' '+@all' resetchannels").find("OK"),
            std::string::npos);
  RedisOptions o = options_for(server.port(), "acl");
  o.user = "nochan";
  o.password = "pw";
  RedisStore store(o);
  const idem::Claim c = store.claim(request("a-1"));
  ASSERT_EQ(c.status, ClaimStatus::acquired);
  store.await_change("a-1", 50ms);
  EXPECT_EQ(store.counters().wait_fallbacks, 1u);
  EXPECT_TRUE(store.complete({.key = "a-1", .token = c.token, .response = "r"}));
  EXPECT_EQ(store.claim(request("a-1")).response, "r");
  const idem::Claim other = store.claim(request("a-2"));
  EXPECT_TRUE(store.release("a-2", other.token));
  EXPECT_FALSE(store.forget("a-2"));
  EXPECT_TRUE(store.forget("a-1"));
}

// The change races the subscription (the waiter does not wait to be subscribed first): a
// change before the subscription is found by the check, a later one is announced. None is
// missed: no wait runs out its long max_wait.
TEST(RedisStoreWait, AChangeRacingTheSubscriptionIsNeverMissed) {
  RedisStore store(options_for(shared_server().port(), "race"));
  const int rounds = kSanitized ? 60 : 300;
  for (int i = 0; i < rounds; ++i) {
    const std::string key = "race-" + std::to_string(i);
    const idem::Claim c = store.claim(request(key));
    ASSERT_EQ(c.status, ClaimStatus::acquired);
    std::thread waiter([&] { store.await_change(key, kLongWait); });
    if (i % 3 == 2) std::this_thread::sleep_for(std::chrono::microseconds(50 * (i % 7)));
    if (i % 2 == 0) {
      ASSERT_TRUE(store.complete({.key = key, .token = c.token}));
    } else {
      ASSERT_TRUE(store.release(key, c.token));
    }
    waiter.join();
  }
  const idem::RedisStoreStats stats = store.counters();
  EXPECT_EQ(stats.waits_timed_out, 0u);
  EXPECT_EQ(stats.wait_fallbacks, 0u);
  EXPECT_EQ(stats.waits_woken + stats.waits_settled, static_cast<std::uint64_t>(rounds));
  std::printf("[          ] %llu woken by a notification, %llu found settled by the check\n",
              static_cast<unsigned long long>(stats.waits_woken),
              static_cast<unsigned long long>(stats.waits_settled));
}

// The subscriber connection lies idle between waits; a restarted server has closed it. The
// next wait notices before relying on it and subscribes on a fresh one.
TEST(RedisStoreWait, AServerRestartedBetweenWaitsIsNoticedAndWaitsAreWokenAgain) {
  RedisServer server;
  RedisStore store(options_for(server.port(), "restart"));
  auto woken_by_completion = [&](const std::string& key) {
    idem::Claim c;
    for (int attempt = 0; attempt < 50; ++attempt) {  // the pool's first call may fail
      try {
        c = store.claim(request(key));
        break;
      } catch (const idem::StoreUnavailable&) {
        std::this_thread::sleep_for(50ms);
      }
    }
    ASSERT_EQ(c.status, ClaimStatus::acquired);
    std::thread waiter([&] { store.await_change(key, kLongWait); });
    wait_for_waiters(store, 1);
    EXPECT_TRUE(store.complete({.key = key, .token = c.token}));
    waiter.join();
  };
  woken_by_completion("x-1");
  server.stop();
  server.start();
  woken_by_completion("x-2");
  EXPECT_EQ(store.counters().waits_woken, 2u);
  EXPECT_EQ(store.counters().wait_fallbacks, 0u);
}

// Two processes: the holder is another process; the waiter hears of its completion.
TEST(RedisStoreWait, AWaiterInAnotherProcessIsWokenByTheHoldersCompletion) {
  const std::string prefix = unique_prefix("procs");
  // Started before fork(): a server first used in the child would be the child's alone.
  const int port = shared_server().port();
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // the holder: claims both keys, completes each when told to
    int code = 0;
    try {
      RedisStore store(RedisOptions{.port = port, .key_prefix = prefix});
      const idem::Claim a = store.claim(request("p-a"));
      const idem::Claim b = store.claim(request("p-b"));
      if (a.status != ClaimStatus::acquired || b.status != ClaimStatus::acquired) ::_exit(3);
      if (::write(ready[1], "r", 1) != 1) ::_exit(4);
      char byte = 0;
      if (::read(go[0], &byte, 1) != 1) ::_exit(5);
      if (!store.complete({.key = "p-a", .token = a.token, .response = "from-child-a"})) code = 6;
      if (::read(go[0], &byte, 1) != 1) ::_exit(5);
      if (!store.complete({.key = "p-b", .token = b.token, .response = "from-child-b"})) code = 6;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "holder process failed: %s\n", e.what());
      code = 1;
    }
    ::_exit(code);
  }
  ::close(ready[1]);
  ::close(go[0]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the holder process died";
  RedisStore store(RedisOptions{.port = port, .key_prefix = prefix});
  // The store's own wait: the completion in the other process ends it.
  std::thread waiter([&] { store.await_change("p-a", kLongWait); });
  wait_for_waiters(store, 1);
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  waiter.join();
  EXPECT_EQ(store.counters().waits_woken, 1u);
  EXPECT_EQ(store.counters().waits_timed_out, 0u);
  // A consumer's wait: the duplicate carries the other process's response.
  std::atomic<int> runs{0};
  idem::IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = kLongWait});
  idem::Result result;
  std::thread consuming([&] { result = consumer.consume({.key = "p-b", .payload = "p"}); });
  wait_for_waiters(store, 1);
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  consuming.join();
  EXPECT_EQ(result.outcome, Outcome::duplicate);
  EXPECT_EQ(result.response, "from-child-b");
  EXPECT_EQ(runs, 0);
  EXPECT_EQ(store.claim(request("p-a")).response, "from-child-a");
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  ::close(ready[0]);
  ::close(go[1]);
}

// The holder process dies without completing or releasing: nothing is announced, the waiter
// keeps asking and takes the key over once the lease has ended.
TEST(RedisStoreWait, AWaiterTakesOverFromACrashedHolderProcessAfterTheLease) {
  const std::string prefix = unique_prefix("crash");
  // Started before fork(): a server first used in the child would be the child's alone.
  const int port = shared_server().port();
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    RedisStore store(RedisOptions{.port = port, .key_prefix = prefix});
    const bool ok = store.claim(request("c-1", 500ms)).status == ClaimStatus::acquired;
    (void)!::write(ready[1], ok ? "r" : "x", 1);
    ::_exit(0);  // crashes mid-handler, as far as the store can tell
  }
  ::close(ready[1]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  ASSERT_EQ(byte, 'r');
  int status = 0;
  ::waitpid(pid, &status, 0);
  RedisStore store(RedisOptions{.port = port, .key_prefix = prefix});
  std::atomic<int> runs{0};
  idem::IdempotentConsumer consumer(
      store, [&](const Message&) -> std::string { return "taken-over-" + std::to_string(++runs); },
      idem::Options{.lease = 500ms, .in_progress_wait = kLongWait});
  const idem::Result result = consumer.consume({.key = "c-1", .payload = "p"});
  EXPECT_EQ(result.outcome, Outcome::processed);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(store.claim(request("c-1")).response, "taken-over-1");
  EXPECT_EQ(store.counters().wait_fallbacks, 0u);
  ::close(ready[0]);
}

}  // namespace
