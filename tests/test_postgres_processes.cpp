// idem::PostgresStore shared by real processes, and waiting for held keys: SIGKILLed consumers,
// four processes racing, the server crashing, waiters woken by LISTEN/NOTIFY in this process and
// in others.
//
// Child processes are this binary re-executed with IDEM_PG_CHILD set: the static initializer
// below runs the child's work and _exits before GoogleTest starts (a store must not be used
// across fork(), so children open their own).

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/postgres.hpp"
#include "support/child_process.hpp"
#include "support/free_port.hpp"
#include "support/postgres_server.hpp"
#include "support/postgres_test_store.hpp"
#include "support/sanitized.hpp"

namespace {

using namespace std::chrono_literals;
using idem::ClaimRequest;
using idem::ClaimStatus;
using idem::IdempotentConsumer;
using idem::Message;
using idem::Outcome;
using idem::PostgresBytes;
using idem::PostgresOptions;
using idem::PostgresRows;
using idem::PostgresStore;
using idem::PostgresTx;
using idem::Result;
using idem::test_support::env_or;
using idem::test_support::PostgresServer;
using idem::test_support::signal_fd;
using idem::test_support::spawn_child;
using idem::test_support::wait_exit_code;
using idem::testing::kSanitized;
using namespace idem::test_support::postgres;

std::int64_t index_of(std::string_view key) {
  return std::stoll(std::string(key.substr(key.find('-') + 1)));
}

// --- Child processes -------------------------------------------------------------------------

// Consumes msg-0 .. msg-(n-1) through the transactional inbox in batches, one business row
// each, resuming a little before the committed offset (a broker redelivers its uncommitted
// tail).
// With IDEM_PG_SPECULATIVE=1, PostgresOptions::speculative_claims, and every other call a
// lone message (which is what it speeds up).
PostgresOptions child_options() {
  return {.conninfo = env_or("IDEM_PG_CONNINFO", ""),
          .schema = env_or("IDEM_PG_SCHEMA", "idem"),
          .speculative_claims = env_or("IDEM_PG_SPECULATIVE", "0") == "1"};
}

int crash_child() {
  const std::int64_t n = std::stoll(env_or("IDEM_N", "0"));
  PostgresStore store(child_options());
  const bool lone_often = store.options().speculative_claims;
  const std::string insert =
      "INSERT INTO " + env_or("IDEM_PG_SCHEMA", "idem") + ".crash_rows(msg, key) VALUES($1, $2)";
  IdempotentConsumer consumer(store, [&](const Message& m, PostgresTx& tx) {
    tx.exec(insert, index_of(m.key), PostgresBytes{m.key});
  });
  const std::int64_t committed = store.committed_offset("crash", 0).value_or(0);
  const std::int64_t start = std::max<std::int64_t>(0, committed - 25);
  signal_fd(std::stoi(env_or("IDEM_READY_FD", "-1")));
  const std::int64_t end = n;
  std::mt19937 rng(static_cast<unsigned>(::getpid()));
  std::int64_t next = start;
  while (next < end) {
    const std::int64_t size =
        std::min<std::int64_t>(end - next, lone_often && rng() % 2 == 0 ? 1 : 1 + rng() % 16);
    std::vector<std::string> keys;
    for (std::int64_t k = next; k < next + size; ++k) keys.push_back("msg-" + std::to_string(k));
    std::vector<Message> batch;
    for (const std::string& key : keys) batch.push_back({.key = key, .payload = "p"});
    const std::vector<idem::PartitionOffset> offsets{
        {.topic = "crash", .partition = 0, .next_offset = next + size}};
    // A key a killed predecessor's transaction still held (until the server noticed) comes
    // back in_progress: redeliver the batch, as a broker would.
    bool saved = false;
    for (int attempt = 0; !saved; ++attempt) {
      if (attempt == 1000) return 4;
      if (attempt > 0) std::this_thread::sleep_for(5ms);
      consumer.consume_batch_with_offsets(batch, offsets, &saved);
    }
    next += size;
  }
  return 0;
}

// Four threads consuming every key of race-0 .. race-(n-1) through the inbox, each from a
// different start, redelivering in_progress ones until acked.
int race_child() {
  const std::size_t keys = std::stoul(env_or("IDEM_N", "0"));
  PostgresStore store(child_options());
  const std::string insert =
      "INSERT INTO " + env_or("IDEM_PG_SCHEMA", "idem") + ".race_rows(msg, pid) VALUES($1, $2)";
  IdempotentConsumer consumer(store, [&](const Message& m, PostgresTx& tx) {
    tx.exec(insert, index_of(m.key), ::getpid());
  });
  signal_fd(std::stoi(env_or("IDEM_READY_FD", "-1")));
  char go = 0;
  if (::read(std::stoi(env_or("IDEM_GO_FD", "-1")), &go, 1) != 1) return 5;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (std::size_t n = 0; n < keys; ++n) {
        const std::string key = "race-" + std::to_string((n + t * keys / 4) % keys);
        for (;;) {
          const Outcome outcome = consumer.consume({.key = key, .payload = "p"}).outcome;
          if (idem::should_ack(outcome)) break;
          if (outcome != Outcome::in_progress) {
            ++errors;
            break;
          }
          std::this_thread::sleep_for(1ms);  // another worker holds it: redeliver later
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return errors == 0 ? 0 : 6;
}

// Claims IDEM_KEYS (comma-separated) with a lease of IDEM_LEASE_MS, signals IDEM_READY_FD, then
// either exits at once without completing (IDEM_HOLD=crash: a holder that died) or completes
// each key with the response "from-child-<key>" when a byte arrives on IDEM_GO_FD.
int hold_child() {
  PostgresStore store(
      {.conninfo = env_or("IDEM_PG_CONNINFO", ""), .schema = env_or("IDEM_PG_SCHEMA", "idem")});
  const std::chrono::milliseconds lease{std::stoll(env_or("IDEM_LEASE_MS", "30000"))};
  std::vector<std::string> keys;
  std::stringstream list(env_or("IDEM_KEYS", ""));
  for (std::string key; std::getline(list, key, ',');) keys.push_back(key);
  std::vector<idem::Claim> claims;
  for (const std::string& key : keys) {
    claims.push_back(store.claim(ClaimRequest{.key = key, .lease = lease}));
    if (claims.back().status != ClaimStatus::acquired) return 7;
  }
  signal_fd(std::stoi(env_or("IDEM_READY_FD", "-1")));
  if (env_or("IDEM_HOLD", "") == "crash") return 0;
  const int go = std::stoi(env_or("IDEM_GO_FD", "-1"));
  for (std::size_t i = 0; i < keys.size(); ++i) {
    char byte = 0;
    if (::read(go, &byte, 1) != 1) return 5;
    if (!store.complete(
            {.key = keys[i], .token = claims[i].token, .response = "from-child-" + keys[i]})) {
      return 6;
    }
  }
  return 0;
}

const bool kIsChild = [] {
  const char* mode = std::getenv("IDEM_PG_CHILD");
  if (mode == nullptr) return false;
  int code = 1;
  try {
    const std::string m = mode;
    code = m == "crash" ? crash_child() : m == "hold" ? hold_child() : race_child();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "child %s: %s\n", mode, e.what());
    code = 2;
  }
  std::fflush(nullptr);
  ::_exit(code);
}();

// --- The server crashing -----------------------------------------------------------------------

TEST(PostgresServerCrash, UnavailableMeanwhileNothingAckedWithoutARecordAndRecoversByItself) {
  const std::string schema = fresh_schema();
  PostgresOptions options = options_for(schema);
  options.connect_timeout = 1s;
  options.reconnect_backoff = 50ms;
  PostgresStore store(options);
  store.transaction([&](PostgresTx& tx) {
    tx.exec("CREATE TABLE " + schema + ".crash_rows(msg bigint NOT NULL)");
  });
  const int keys = kSanitized ? 200 : 400;
  std::atomic<int> acked{0}, unavailable{0}, backed_off{0};
  std::vector<char> claim_acked(static_cast<std::size_t>(keys), 0);
  auto consume_all = [&](auto& consumer, const std::string& prefix, std::vector<char>* marks) {
    for (int i = 0; i < keys; ++i) {
      const std::string key = prefix + std::to_string(i);
      for (;;) {
        try {
          if (consumer.consume({.key = key, .payload = "p"}).should_ack()) break;
        } catch (const idem::StoreUnavailable& e) {
          ++unavailable;
          if (std::string(e.what()).find("next connection attempt") != std::string::npos) {
            ++backed_off;
          }
        }
        std::this_thread::sleep_for(5ms);
      }
      if (marks != nullptr) (*marks)[static_cast<std::size_t>(i)] = 1;
      ++acked;
    }
  };
  std::thread inbox_thread([&] {
    IdempotentConsumer inbox(store, [&](const Message& m, PostgresTx& tx) {
      tx.exec("INSERT INTO " + schema + ".crash_rows(msg) VALUES($1)", index_of(m.key));
    });
    consume_all(inbox, "inbox-", nullptr);
  });
  std::thread claim_thread([&] {
    // A claim that committed while its answer was lost in the crash stays in progress until
    // its lease ends (then a redelivery takes it over): a short lease keeps this test short.
    IdempotentConsumer claims(
        store, [](const Message&) {}, idem::Options{.lease = 1s});
    consume_all(claims, "claim-", &claim_acked);
  });
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (acked < keys / 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(2ms);
  }
  server().crash();
  std::this_thread::sleep_for(500ms);
  server().start();
  inbox_thread.join();
  claim_thread.join();

  EXPECT_GT(unavailable.load(), 0);
  EXPECT_GT(backed_off.load(), 0);  // between attempts, calls failed at once
  RawDb raw(server().conninfo());
  // Inbox: exactly one business row per key, none lost.
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM " + schema + ".crash_rows"), keys);
  EXPECT_EQ(raw.scalar("SELECT count(DISTINCT msg) FROM " + schema + ".crash_rows"), keys);
  // Every acked key (both modes) has a committed done record.
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM " + schema + ".idem_keys WHERE state = 1"), 2 * keys);
  EXPECT_EQ(std::count(claim_acked.begin(), claim_acked.end(), 1), keys);
}

// --- Waiting for a held key (Options::in_progress_wait, await_change) --------------------------

// Waits until `n` threads of the store wait for a notification (registered, record checked):
// a change made from now on can only reach them as a notification.
void wait_for_waiters(const PostgresStore& store, std::uint64_t n) {
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  while (store.counters().waiting < n) {
    if (std::chrono::steady_clock::now() > give_up) {
      ADD_FAILURE() << "no waiter registered within 30 s";
      return;
    }
    std::this_thread::sleep_for(1ms);
  }
}

// The waiters' registrations (shared advisory locks of idem's wait class) on the server.
std::int64_t wait_locks(RawDb& raw) {
  return raw.scalar(
      "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1768187246");
}

// A wait longer than any test: only a notification ends it in time. The counters, not the
// clock, tell which ended it.
constexpr auto kLongWait = 60s;

TEST(PostgresWait, CompletionReleaseAndForgetWakeTheWaiterByNotification) {
  PostgresStore store(options_for(fresh_schema()));
  const idem::Claim done = store.claim(ClaimRequest{.key = "w-done"});
  const idem::Claim released = store.claim(ClaimRequest{.key = "w-released"});
  ASSERT_EQ(store.claim(ClaimRequest{.key = "w-forgotten"}).status, ClaimStatus::acquired);
  std::vector<std::thread> waiters;
  for (const char* key : {"w-done", "w-released", "w-forgotten"}) {
    waiters.emplace_back([&store, key] { store.await_change(key, kLongWait); });
  }
  wait_for_waiters(store, 3);
  RawDb raw(server().conninfo());
  EXPECT_EQ(wait_locks(raw), 3);
  EXPECT_TRUE(store.complete({.key = "w-done", .token = done.token, .response = "r-1"}));
  EXPECT_TRUE(store.release("w-released", released.token));
  EXPECT_TRUE(store.forget("w-forgotten"));
  for (std::thread& t : waiters) t.join();
  const idem::PostgresStoreStats stats = store.counters();
  EXPECT_EQ(stats.waits_woken, 3u);
  EXPECT_EQ(stats.waits_timed_out, 0u);
  EXPECT_EQ(stats.wait_fallbacks, 0u);
  EXPECT_EQ(stats.notifications, 3u);
  EXPECT_EQ(stats.waiting, 0u);
  EXPECT_EQ(wait_locks(raw), 0) << "the last waiter of a key drops its registration";
  EXPECT_EQ(store.claim(ClaimRequest{.key = "w-done"}).response, "r-1");
  EXPECT_EQ(store.claim(ClaimRequest{.key = "w-released"}).status, ClaimStatus::acquired);
}

// Commits NOTIFY only while someone waits for the key: a plain LISTEN on the channel hears
// nothing of the completions nobody waits for.
TEST(PostgresWait, OnlyKeysAWaiterRegisteredForAreAnnounced) {
  const std::string schema = fresh_schema();
  PostgresStore store(options_for(schema));
  RawDb listener(server().conninfo());
  listener.exec("LISTEN \"idem_wait_" + schema + "\"");
  auto heard = [&] {
    int n = 0;
    PQconsumeInput(listener.get());
    while (PGnotify* note = PQnotifies(listener.get())) {
      ++n;
      PQfreemem(note);
    }
    return n;
  };
  for (int i = 0; i < 20; ++i) {
    const std::string key = "quiet-" + std::to_string(i);
    const idem::Claim c = store.claim(ClaimRequest{.key = key});
    ASSERT_TRUE(i % 2 == 0 ? store.complete({.key = key, .token = c.token})
                           : store.release(key, c.token));
  }
  ASSERT_TRUE(store.forget("quiet-0"));
  RawDb raw(server().conninfo());
  (void)raw.scalar("SELECT 1");  // a round trip after the commits: their NOTIFYs would be in
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(heard(), 0);
  const idem::Claim waited = store.claim(ClaimRequest{.key = "loud"});
  std::thread waiter([&] { store.await_change("loud", kLongWait); });
  wait_for_waiters(store, 1);
  ASSERT_TRUE(store.complete({.key = "loud", .token = waited.token}));
  waiter.join();
  pollfd fd{PQsocket(listener.get()), POLLIN, 0};
  ASSERT_EQ(::poll(&fd, 1, 30'000), 1);
  EXPECT_EQ(heard(), 1);
  EXPECT_EQ(store.counters().waits_woken, 1u);
}

TEST(PostgresWait, AKeyAlreadySettledIsSeenOnceRegistered) {
  PostgresStore store(options_for(fresh_schema()));
  const idem::Claim c = store.claim(ClaimRequest{.key = "s-1"});
  ASSERT_TRUE(store.complete({.key = "s-1", .token = c.token}));
  store.await_change("s-1", kLongWait);     // done
  store.await_change("absent", kLongWait);  // no record
  ASSERT_EQ(store.claim(ClaimRequest{.key = "s-2", .lease = 50ms}).status, ClaimStatus::acquired);
  std::this_thread::sleep_for(100ms);
  store.await_change("s-2", kLongWait);  // lease over: the next claim takes it over
  EXPECT_EQ(store.counters().waits_settled, 3u);
  EXPECT_EQ(store.counters().waits_woken, 0u);
}

TEST(PostgresWait, AWaitingConsumerGetsTheCompletedResponseAsADuplicate) {
  PostgresStore store(options_for(fresh_schema()));
  const idem::Claim holder = store.claim(ClaimRequest{.key = "d-1"});
  std::atomic<int> runs{0};
  IdempotentConsumer second(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = kLongWait});
  Result result;
  std::thread waiter([&] { result = second.consume({.key = "d-1", .payload = "p"}); });
  wait_for_waiters(store, 1);
  EXPECT_TRUE(store.complete({.key = "d-1", .token = holder.token, .response = "card-7"}));
  waiter.join();
  EXPECT_EQ(result.outcome, Outcome::duplicate);
  EXPECT_EQ(result.response, "card-7");
  EXPECT_EQ(runs, 0);
}

TEST(PostgresWait, AWaitingConsumerProcessesAKeyItsHolderReleased) {
  PostgresStore store(options_for(fresh_schema()));
  const idem::Claim holder = store.claim(ClaimRequest{.key = "r-1"});
  std::atomic<int> runs{0};
  IdempotentConsumer second(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = kLongWait});
  Result result;
  std::thread waiter([&] { result = second.consume({.key = "r-1", .payload = "p"}); });
  wait_for_waiters(store, 1);
  EXPECT_TRUE(store.release("r-1", holder.token));  // its handler failed
  waiter.join();
  EXPECT_EQ(result.outcome, Outcome::processed);
  EXPECT_GT(result.fencing_token, holder.token);
  EXPECT_EQ(runs, 1);
}

TEST(PostgresWait, TheWaitRunsOutCleanly) {
  PostgresStore store(options_for(fresh_schema()));
  ASSERT_EQ(store.claim(ClaimRequest{.key = "o-1"}).status, ClaimStatus::acquired);
  std::atomic<int> runs{0};
  IdempotentConsumer second(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = 300ms});
  EXPECT_EQ(second.consume({.key = "o-1", .payload = "p"}).outcome, Outcome::in_progress);
  EXPECT_EQ(runs, 0);
  const idem::PostgresStoreStats stats = store.counters();
  EXPECT_GE(stats.waits_timed_out, 1u);
  EXPECT_EQ(stats.waits_woken, 0u);
  EXPECT_EQ(stats.wait_fallbacks, 0u);
  EXPECT_EQ(stats.waiting, 0u);
  RawDb raw(server().conninfo());
  EXPECT_EQ(wait_locks(raw), 0);
}

// The change races the registration (the waiter does not wait to be registered first): a
// change whose probe ran before the registration is found by the check (FOR SHARE waits for
// its commit), a later one is announced. None is missed: no wait runs out its long max_wait.
TEST(PostgresWait, AChangeRacingTheRegistrationIsNeverMissed) {
  PostgresStore store(options_for(fresh_schema()));
  const int rounds = kSanitized ? 40 : 150;
  for (int i = 0; i < rounds; ++i) {
    const std::string key = "race-" + std::to_string(i);
    const idem::Claim c = store.claim(ClaimRequest{.key = key});
    ASSERT_EQ(c.status, ClaimStatus::acquired);
    std::thread waiter([&] { store.await_change(key, kLongWait); });
    if (i % 3 == 2) std::this_thread::sleep_for(std::chrono::microseconds(100 * (i % 7)));
    if (i % 2 == 0) {
      ASSERT_TRUE(store.complete({.key = key, .token = c.token}));
    } else {
      ASSERT_TRUE(store.release(key, c.token));
    }
    waiter.join();
  }
  const idem::PostgresStoreStats stats = store.counters();
  EXPECT_EQ(stats.waits_timed_out, 0u);
  EXPECT_EQ(stats.wait_fallbacks, 0u);
  EXPECT_EQ(stats.waits_woken + stats.waits_settled, static_cast<std::uint64_t>(rounds));
  std::printf("[          ] %llu woken by a notification, %llu found settled by the check\n",
              static_cast<unsigned long long>(stats.waits_woken),
              static_cast<unsigned long long>(stats.waits_settled));
}

// The listening connection lies idle between waits; one the server closed meanwhile is
// noticed by the next wait, which listens and registers on a fresh one.
TEST(PostgresWait, AListeningConnectionTheServerClosedIsReplaced) {
  PostgresStore store(options_for(fresh_schema()));
  auto woken_by_completion = [&](const std::string& key) {
    const idem::Claim c = store.claim(ClaimRequest{.key = key});
    ASSERT_EQ(c.status, ClaimStatus::acquired);
    std::thread waiter([&] { store.await_change(key, kLongWait); });
    wait_for_waiters(store, 1);
    EXPECT_TRUE(store.complete({.key = key, .token = c.token}));
    waiter.join();
  };
  woken_by_completion("x-1");
  RawDb raw(server().conninfo());
  const std::string listeners =
      "FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE "
      "'%pg_advisory_unlock_shared%'";
  ASSERT_EQ(raw.scalar("SELECT count(*) " + listeners), 1);
  raw.exec("SELECT pg_terminate_backend(pid) " + listeners);
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  while (raw.scalar("SELECT count(*) " + listeners) != 0 &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(5ms);
  }
  woken_by_completion("x-2");
  EXPECT_EQ(store.counters().waits_woken, 2u);
  EXPECT_EQ(store.counters().wait_fallbacks, 0u);
}

// Two processes: the holder is another process; the waiter hears of its completion.
TEST(PostgresWait, AWaiterInAnotherProcessIsWokenByTheHoldersCompletion) {
  const std::string schema = fresh_schema();
  PostgresStore store(options_for(schema));
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = spawn_child({{"IDEM_PG_CHILD", "hold"},
                                 {"IDEM_PG_CONNINFO", server().conninfo()},
                                 {"IDEM_PG_SCHEMA", schema},
                                 {"IDEM_KEYS", "p-a,p-b"},
                                 {"IDEM_READY_FD", std::to_string(ready[1])},
                                 {"IDEM_GO_FD", std::to_string(go[0])}});
  ::close(ready[1]);
  ::close(go[0]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the holder process died";
  // The store's own wait: the completion in the other process ends it.
  std::thread waiter([&] { store.await_change("p-a", kLongWait); });
  wait_for_waiters(store, 1);
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  waiter.join();
  EXPECT_EQ(store.counters().waits_woken, 1u);
  EXPECT_EQ(store.counters().waits_timed_out, 0u);
  // A consumer's wait: the duplicate carries the other process's response.
  std::atomic<int> runs{0};
  IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = kLongWait});
  Result result;
  std::thread consuming([&] { result = consumer.consume({.key = "p-b", .payload = "p"}); });
  wait_for_waiters(store, 1);
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  consuming.join();
  EXPECT_EQ(result.outcome, Outcome::duplicate);
  EXPECT_EQ(result.response, "from-child-p-b");
  EXPECT_EQ(runs, 0);
  EXPECT_EQ(store.claim(ClaimRequest{.key = "p-a"}).response, "from-child-p-a");
  EXPECT_EQ(wait_exit_code(pid), 0);
  ::close(ready[0]);
  ::close(go[1]);
}

// The holder process dies without completing or releasing: nothing is announced, the waiter
// keeps asking and takes the key over once the lease has ended.
TEST(PostgresWait, AWaiterTakesOverFromACrashedHolderProcessAfterTheLease) {
  const std::string schema = fresh_schema();
  PostgresStore store(options_for(schema));
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t pid = spawn_child({{"IDEM_PG_CHILD", "hold"},
                                 {"IDEM_PG_CONNINFO", server().conninfo()},
                                 {"IDEM_PG_SCHEMA", schema},
                                 {"IDEM_KEYS", "c-1"},
                                 {"IDEM_LEASE_MS", "500"},
                                 {"IDEM_HOLD", "crash"},
                                 {"IDEM_READY_FD", std::to_string(ready[1])}});
  ::close(ready[1]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the holder process died before its claim";
  ASSERT_EQ(wait_exit_code(pid), 0);
  std::atomic<int> runs{0};
  IdempotentConsumer consumer(
      store, [&](const Message&) -> std::string { return "taken-over-" + std::to_string(++runs); },
      idem::Options{.lease = 500ms, .in_progress_wait = kLongWait});
  const Result result = consumer.consume({.key = "c-1", .payload = "p"});
  EXPECT_EQ(result.outcome, Outcome::processed);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(store.claim(ClaimRequest{.key = "c-1"}).response, "taken-over-1");
  EXPECT_EQ(store.counters().wait_fallbacks, 0u);
  ::close(ready[0]);
}

// --- Real processes ----------------------------------------------------------------------------

TEST(PostgresProcesses, SigkilledConsumersLoseAndDuplicateNothing) {
  const std::string schema = fresh_schema();
  {
    PostgresStore store(options_for(schema));
    store.transaction([&](PostgresTx& tx) {
      tx.exec("CREATE TABLE " + schema + ".crash_rows(msg bigint NOT NULL, key bytea NOT NULL)");
    });
  }
  const std::map<std::string, std::string> env{{"IDEM_PG_CHILD", "crash"},
                                               {"IDEM_PG_CONNINFO", server().conninfo()},
                                               {"IDEM_PG_SCHEMA", schema}};
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  // Kills land in start-up, claims, handlers and commits alike.
  std::uniform_int_distribution<int> wait_ms(kSanitized ? 60 : 15, kSanitized ? 500 : 120);
  constexpr int kKills = 50;
  for (int kill = 0; kill < kKills; ++kill) {
    auto child_env = env;
    child_env["IDEM_N"] = "100000000";
    // Every other child claims lone messages speculatively: both kinds of transaction die
    // at every step, and each picks up after the other.
    child_env["IDEM_PG_SPECULATIVE"] = kill % 2 == 1 ? "1" : "0";
    const pid_t pid = spawn_child(child_env);
    std::this_thread::sleep_for(std::chrono::milliseconds(wait_ms(rng)));
    ::kill(pid, SIGKILL);
    ASSERT_EQ(wait_exit_code(pid), 128 + SIGKILL) << "the child ended by itself; seed " << seed;
  }
  RawDb raw(server().conninfo());
  const std::int64_t committed =
      raw.scalar("SELECT next_offset FROM " + schema + ".idem_offsets WHERE topic = 'crash'");
  EXPECT_GT(committed, 0) << "no progress in " << kKills << " runs";
  // Committed rows all lie below the committed offset (they commit together); a last run
  // goes to a bound above it.
  const std::int64_t n = committed + 100;
  auto child_env = env;
  child_env["IDEM_N"] = std::to_string(n);
  ASSERT_EQ(wait_exit_code(spawn_child(child_env)), 0);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM " + schema + ".crash_rows"), n) << "seed " << seed;
  EXPECT_EQ(raw.scalar("SELECT count(DISTINCT msg) FROM " + schema + ".crash_rows"), n);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM " + schema +
                       ".crash_rows WHERE msg < 0 OR msg >= " + std::to_string(n)),
            0);
  std::printf("[          ] %d SIGKILLs, %lld messages committed before the last run\n", kKills,
              static_cast<long long>(committed));
}

class PostgresRace : public ::testing::TestWithParam<bool> {};

// Without speculative claims each handler runs once; with them (the parameter) a handler may
// also run for a key another process committed meanwhile, but its writes commit once.
TEST_P(PostgresRace, FourProcessesOfFourThreadsCommitEachHandlersWritesOnce) {
  const std::string schema = fresh_schema();
  {
    PostgresStore store(options_for(schema));
    store.transaction([&](PostgresTx& tx) {
      tx.exec("CREATE TABLE " + schema + ".race_rows(msg bigint NOT NULL, pid integer NOT NULL)");
    });
  }
  const std::size_t keys = kSanitized ? 60 : 200;
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  std::vector<pid_t> children;
  for (int p = 0; p < 4; ++p) {
    children.push_back(spawn_child({{"IDEM_PG_CHILD", "race"},
                                    {"IDEM_PG_CONNINFO", server().conninfo()},
                                    {"IDEM_PG_SCHEMA", schema},
                                    {"IDEM_N", std::to_string(keys)},
                                    {"IDEM_PG_SPECULATIVE", GetParam() ? "1" : "0"},
                                    {"IDEM_READY_FD", std::to_string(ready[1])},
                                    {"IDEM_GO_FD", std::to_string(go[0])}}));
  }
  ::close(ready[1]);
  ::close(go[0]);
  for (int p = 0; p < 4; ++p) {
    char byte = 0;
    ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "a child died before it was ready";
  }
  ASSERT_EQ(::write(go[1], "gggg", 4), 4);
  ::close(go[1]);
  ::close(ready[0]);
  for (pid_t pid : children) EXPECT_EQ(wait_exit_code(pid), 0);
  RawDb raw(server().conninfo());
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM " + schema + ".race_rows"), keys);
  EXPECT_EQ(raw.scalar("SELECT count(DISTINCT msg) FROM " + schema + ".race_rows"), keys);
}

INSTANTIATE_TEST_SUITE_P(Claims, PostgresRace, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& param_info) {
                           return param_info.param ? "Speculative" : "Awaited";
                         });

}  // namespace
