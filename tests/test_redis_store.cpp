// RedisStore against a real redis-server started by the test: the conformance suite, leases and
// fencing, the scripts, the operator hooks, options, and many processes racing for keys.

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "idem/redis.hpp"
#include "idem/testing/store_conformance.hpp"
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

struct RedisStoreFactory {
  std::unique_ptr<idem::DedupStore> make() {
    return std::make_unique<RedisStore>(options_for(shared_server().port(), "conf"));
  }
  // Leases and retention run on the server's clock: let real time pass.
  void advance(std::chrono::milliseconds ms) { std::this_thread::sleep_for(ms); }
  static constexpr std::size_t race_keys = kSanitized ? 1'000 : 4'000;
};

}  // namespace

namespace idem::testing {
INSTANTIATE_TYPED_TEST_SUITE_P(Redis, StoreConformance, RedisStoreFactory);
}

namespace {

// --- Leases, fencing, scripts ----------------------------------------------------------------

TEST(RedisStore, ExpiredLeaseIsTakenOverAndTheStaleHoldersCompleteIsRefused) {
  RedisStore store(options_for(shared_server().port(), "lease"));
  idem::Claim stale = store.claim(request("pay-9", 600ms));
  ASSERT_EQ(stale.status, ClaimStatus::acquired);
  EXPECT_FALSE(stale.took_over);
  EXPECT_EQ(store.claim(request("pay-9", 600ms)).status, ClaimStatus::in_progress);
  std::this_thread::sleep_for(800ms);
  idem::Claim fresh = store.claim(request("pay-9", 600ms));
  ASSERT_EQ(fresh.status, ClaimStatus::acquired);
  EXPECT_TRUE(fresh.took_over) << "a takeover within the grace period is reported";
  EXPECT_GT(fresh.token, stale.token);
  EXPECT_FALSE(store.complete({.key = "pay-9", .token = stale.token, .response = "stale"}));
  EXPECT_FALSE(store.release("pay-9", stale.token));
  EXPECT_TRUE(store.complete({.key = "pay-9", .token = fresh.token, .response = "fresh"}));
  idem::Claim done = store.claim(request("pay-9"));
  EXPECT_EQ(done.status, ClaimStatus::done);
  EXPECT_EQ(done.response, "fresh");
}

TEST(RedisStore, StaleConsumerCannotOverwriteItsSuccessor) {
  RedisStore store(options_for(shared_server().port(), "stale"));
  idem::Options slow_options{.lease = 300ms};
  std::atomic<int> runs{0};
  std::atomic<bool> successor_done{false};
  idem::IdempotentConsumer slow(
      store,
      [&](const Message&) -> std::string {
        ++runs;
        while (!successor_done) std::this_thread::sleep_for(5ms);  // outlives its lease
        return "slow";
      },
      slow_options);
  std::thread stale(
      [&] { EXPECT_EQ(slow.consume({.key = "k", .payload = "p"}).outcome, Outcome::processed); });
  while (runs.load() == 0) std::this_thread::sleep_for(1ms);  // the stale holder is in
  std::this_thread::sleep_for(500ms);
  idem::IdempotentConsumer fast(
      store,
      [&](const Message&) -> std::string {
        ++runs;
        return "fast";
      },
      slow_options);
  idem::Result r = fast.consume({.key = "k", .payload = "p"});
  EXPECT_EQ(r.outcome, Outcome::processed);
  successor_done = true;
  stale.join();
  EXPECT_EQ(runs.load(), 2);
  // The stale holder's completion was refused: the successor's response stands.
  EXPECT_EQ(store.claim(request("k")).response, "fast");
}

TEST(RedisStore, TokensKeepIncreasingAfterTheRecordExpires) {
  RedisStore store(options_for(shared_server().port(), "tok"));
  std::uint64_t last = 0;
  for (int i = 0; i < 3; ++i) {
    idem::Claim c = store.claim(request("k"));
    ASSERT_EQ(c.status, ClaimStatus::acquired);
    EXPECT_GT(c.token, last);
    last = c.token;
    ASSERT_TRUE(store.complete({.key = "k", .token = c.token, .retention = 50ms}));
    std::this_thread::sleep_for(100ms);
  }
}

TEST(RedisStore, ScriptCacheFlushIsSurvived) {
  RedisStore store(options_for(shared_server().port(), "flush"));
  ASSERT_EQ(store.claim(request("a")).status, ClaimStatus::acquired);
  EXPECT_NE(shared_server().cli("SCRIPT FLUSH").find("OK"), std::string::npos);
  EXPECT_EQ(store.claim(request("b")).status, ClaimStatus::acquired);
  EXPECT_EQ(store.claim(request("a")).status, ClaimStatus::in_progress);
  EXPECT_GE(store.counters().script_loads, 6u);
}

// A server that lost its script cache refuses the calls with NOSCRIPT; the store reloads the
// scripts and resends them. With wait_replicas, the WAIT must be resent after them: the first
// one answered for writes that had not run yet, at once.
TEST(RedisStore, WaitIsResentAfterScriptsResentForNoscript) {
  RedisServer master({"--repl-diskless-sync-delay", "0"});
  RedisServer replica({"--replicaof", "127.0.0.1", std::to_string(master.port())});
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (master.cli("INFO replication").find("state=online") == std::string::npos) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << master.cli("INFO replication");
    std::this_thread::sleep_for(50ms);
  }
  RedisOptions o = options_for(master.port(), "noscript-wait");
  o.wait_replicas = 1;
  o.wait_timeout = 1s;
  o.command_timeout = 3s;  // WAIT answers after wait_timeout
  RedisStore store(o);
  // Until the fresh replica acknowledges writes, claims fall short; wait for one that does not.
  bool confirmed = false;
  for (int i = 0; !confirmed && std::chrono::steady_clock::now() < deadline; ++i) {
    try {
      confirmed =
          store.claim(request("warm-up-" + std::to_string(i))).status == ClaimStatus::acquired;
    } catch (const idem::StoreUnavailable&) {
      std::this_thread::sleep_for(50ms);
    }
  }
  ASSERT_TRUE(confirmed) << master.cli("INFO replication");
  // A store whose connection has written nothing yet: a WAIT on it is answered at once.
  RedisStore fresh(o);
  fresh.ping();
  // ... once the replica has acknowledged everything up to now (the script loads included).
  auto caught_up = [&] {
    const std::string info = master.cli("INFO replication");
    auto number_after = [&](const std::string& label) {
      const std::size_t at = info.find(label);
      return at == std::string::npos ? -1LL : std::atoll(info.c_str() + at + label.size());
    };
    const long long acked = number_after(",offset=");
    return acked >= 0 && acked >= number_after("master_repl_offset:");
  };
  while (!caught_up()) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << master.cli("INFO replication");
    std::this_thread::sleep_for(50ms);
  }
  // The replica stops acknowledging (its link still looks up), and the master forgets its
  // scripts: the next claim is refused, reloaded and resent, and cannot be confirmed.
  ASSERT_EQ(::kill(replica.pid(), SIGSTOP), 0);
  EXPECT_NE(master.cli("SCRIPT FLUSH").find("OK"), std::string::npos);
  EXPECT_THROW(fresh.claim(request("unconfirmed")), idem::StoreUnavailable);
  EXPECT_GE(fresh.counters().script_loads, 6u) << "the scripts were reloaded";
  ASSERT_EQ(::kill(replica.pid(), SIGCONT), 0);
}

TEST(RedisStore, RecordsLiveUnderThePrefixAndExpireWithPx) {
  RedisStore store(options_for(shared_server().port(), "layout"));
  idem::Claim c = store.claim(request("order-1", 5s));
  std::string value = raw_get(store, store.record_key("order-1"));
  ASSERT_EQ(value.substr(0, 1), "p");
  ASSERT_TRUE(
      store.complete({.key = "order-1", .token = c.token, .response = "ok", .retention = 60s}));
  value = raw_get(store, store.record_key("order-1"));
  EXPECT_EQ(value.substr(0, 1), "r");
  EXPECT_EQ(value.substr(value.size() - 3), ":ok");
  std::string ttl = shared_server().cli("PTTL " + store.record_key("order-1"));
  EXPECT_GT(std::stoll(ttl), 50'000);
  EXPECT_TRUE(store.forget("order-1"));
  EXPECT_EQ(raw_get(store, store.record_key("order-1")), "<nil>");
}

// A stale holder's completion must leave its successor's record exactly as it was: value and
// expiry, whether the successor is still working or done.
TEST(RedisStore, AStaleCompletionPutsTheSuccessorsRecordBackUntouched) {
  RedisStore store(options_for(shared_server().port(), "putback"));
  const std::string rk = store.record_key("k");
  auto pttl = [&] { return std::stoll(shared_server().cli("PTTL " + rk)); };
  idem::Claim stale = store.claim(request("k", 100ms));
  std::this_thread::sleep_for(150ms);  // past the lease (a takeover, or a fresh claim if late)
  idem::Claim successor = store.claim(request("k", 20s));
  ASSERT_EQ(successor.status, ClaimStatus::acquired);
  const std::string in_progress = raw_get(store, rk);
  const long long ttl_before = pttl();
  EXPECT_FALSE(store.complete({.key = "k", .token = stale.token, .response = "stale"}));
  EXPECT_EQ(raw_get(store, rk), in_progress);
  EXPECT_LE(pttl(), ttl_before);
  EXPECT_GT(pttl(), ttl_before - 2'000) << "the successor's expiry, not the stale retention";

  ASSERT_TRUE(
      store.complete({.key = "k", .token = successor.token, .response = "fresh", .retention = 5s}));
  const std::string done = raw_get(store, rk);
  const long long done_ttl = pttl();
  EXPECT_FALSE(store.complete({.key = "k", .token = stale.token, .retention = 24h}));
  EXPECT_EQ(raw_get(store, rk), done);
  EXPECT_LE(pttl(), done_ttl);
  EXPECT_GT(pttl(), done_ttl - 2'000);
  EXPECT_EQ(store.claim(request("k")).response, "fresh");
  // A completion of a key that is gone creates nothing.
  EXPECT_FALSE(store.complete({.key = "never-claimed", .token = 1}));
  EXPECT_EQ(raw_get(store, store.record_key("never-claimed")), "<nil>");
}

// The done record keeps the claim's payload digest (a completion does not carry one), so a
// different payload is still a conflict after completion.
TEST(RedisStore, ACompletionWithoutTheDigestKeepsTheClaimedOne) {
  RedisStore store(options_for(shared_server().port(), "digest"));
  idem::Claim c = store.claim(request("k"));
  ASSERT_TRUE(store.complete({.key = "k", .token = c.token}));
  ClaimRequest other = request("k");
  other.fingerprint = idem::Fingerprint::of("another payload");
  EXPECT_EQ(store.claim(other).status, ClaimStatus::conflict);
  EXPECT_EQ(store.claim(request("k")).status, ClaimStatus::done);
}

// --- Operator hooks (idemctl inspect / stats / purge-expired) --------------------------------

TEST(RedisStoreOperator, InspectReadsAbsentInProgressAndDoneRecords) {
  RedisStore store(options_for(shared_server().port(), "inspect"));
  EXPECT_FALSE(store.inspect("never-seen").has_value());

  const idem::Claim held = store.claim(request("held", 30s));
  ASSERT_EQ(held.status, ClaimStatus::acquired);
  std::optional<idem::RecordInfo> info = store.inspect("held");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::in_progress);
  EXPECT_EQ(info->token, held.token);
  EXPECT_GT(info->expires_in_ms, 25'000) << "the lease, not the record's 2 x lease PTTL";
  EXPECT_LE(info->expires_in_ms, 30'000);
  EXPECT_FALSE(info->response.has_value());

  ASSERT_TRUE(store.complete({.key = "held",
                              .token = held.token,
                              .response = std::string("bin\0resp", 8),
                              .retention = 60s}));
  info = store.inspect("held");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
  EXPECT_EQ(info->token, held.token);
  EXPECT_GT(info->expires_in_ms, 55'000);
  EXPECT_LE(info->expires_in_ms, 60'000);
  EXPECT_EQ(info->response, std::string("bin\0resp", 8));

  const idem::Claim plain = store.claim(request("plain"));
  ASSERT_TRUE(store.complete({.key = "plain", .token = plain.token, .retention = 60s}));
  info = store.inspect("plain");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
  EXPECT_FALSE(info->response.has_value());

  // A released claim is deleted: it reads as absent, like an expired or forgotten one.
  const idem::Claim dropped = store.claim(request("dropped"));
  ASSERT_TRUE(store.release("dropped", dropped.token));
  EXPECT_FALSE(store.inspect("dropped").has_value());

  // A lease that ran out shows as in progress, expired (until the grace deletes it).
  ASSERT_EQ(store.claim(request("lapsed", 50ms)).status, ClaimStatus::acquired);
  std::this_thread::sleep_for(60ms);
  info = store.inspect("lapsed");
  if (info) {
    EXPECT_EQ(info->state, idem::RecordInfo::State::in_progress);
    EXPECT_LE(info->expires_in_ms, 0);
  }
}

TEST(RedisStoreOperator, InspectOfAForeignValueSaysSo) {
  RedisStore store(options_for(shared_server().port(), "foreign"));
  shared_server().cli("SET " + store.record_key("x") + " hello");
  // Not a passing outage: retrying cannot help, so it is not StoreUnavailable.
  try {
    store.inspect("x");
    ADD_FAILURE() << "a foreign value was inspected";
  } catch (const idem::ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("does not hold an idem record"), std::string::npos) << what;
    EXPECT_NE(what.find("key_prefix"), std::string::npos) << what;
  }
}

TEST(RedisStoreOperator, StatsCountRecordsUnderThePrefixOnly) {
  RedisStore store(options_for(shared_server().port(), "stats"));
  RedisStore other(options_for(shared_server().port(), "stats-other"));
  ASSERT_EQ(other.claim(request("elsewhere")).status, ClaimStatus::acquired);
  idem::StoreStats s = store.stats();
  EXPECT_EQ(s.records, 0u);

  // 1 500 done (more than one SCAN batch), 3 in progress, 1 released.
  std::vector<std::string> names;
  for (int i = 0; i < 1'500; ++i) names.push_back("done-" + std::to_string(i));
  std::vector<ClaimRequest> requests;
  for (const std::string& n : names) requests.push_back(request(n));
  std::vector<idem::Claim> claims = store.claim_batch(requests);
  std::vector<idem::Completion> completions;
  for (std::size_t i = 0; i < names.size(); ++i) {
    ASSERT_EQ(claims[i].status, ClaimStatus::acquired);
    completions.push_back({.key = names[i], .token = claims[i].token, .retention = 60s});
  }
  for (bool ok : store.complete_batch(completions)) ASSERT_TRUE(ok);
  for (const char* k : {"p1", "p2", "p3"}) {
    ASSERT_EQ(store.claim(request(k)).status, ClaimStatus::acquired);
  }
  const idem::Claim gone = store.claim(request("released"));
  ASSERT_TRUE(store.release("released", gone.token));

  s = store.stats();
  EXPECT_EQ(s.records, 1'503u);
  EXPECT_EQ(s.done, 1'500u);
  EXPECT_EQ(s.in_progress, 3u);
  EXPECT_GT(s.bytes, 1'503u * 50) << "MEMORY USAGE of every record";
  EXPECT_EQ(s.evictions, 0u);
}

TEST(RedisStoreOperator, PurgeExpiredHasNothingToDo) {
  RedisStore store(options_for(shared_server().port(), "purge"));
  ASSERT_EQ(store.claim(request("brief", 1ms)).status, ClaimStatus::acquired);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(store.purge_expired(1'000), 0u);
  EXPECT_FALSE(store.inspect("brief").has_value()) << "Redis expired it already (PX)";
}

TEST(RedisStore, RejectsUnusableOptions) {
  EXPECT_THROW(RedisStore({.key_prefix = "{app}:"}), idem::ConfigError);
  EXPECT_THROW(RedisStore({.pool_size = 0}), idem::ConfigError);
  EXPECT_THROW(RedisStore({.port = 70000}), idem::ConfigError);
  EXPECT_THROW(RedisStore({.db = 2, .cluster = true}), idem::ConfigError);
}

TEST(RedisStore, UnixSocketAndDatabaseIndex) {
  const std::string socket = "/tmp/idem-test-" + std::to_string(::getpid()) + ".sock";
  RedisServer server({"--unixsocket", socket, "--unixsocketperm", "700"});
  RedisStore store(RedisOptions{.unix_socket = socket, .db = 3, .key_prefix = "sock:"});
  idem::Claim c = store.claim(request("k"));
  ASSERT_EQ(c.status, ClaimStatus::acquired);
  EXPECT_EQ(server.cli("-n 3 EXISTS sock:k:k").substr(0, 1), "1");
  EXPECT_EQ(server.cli("-n 0 EXISTS sock:k:k").substr(0, 1), "0");
  ::unlink(socket.c_str());
}

// --- Many processes --------------------------------------------------------------------------

TEST(RedisStoreRace, FourProcessesOfFourThreadsRunEachHandlerOnce) {
  RedisServer server;
  const std::size_t kKeys = kSanitized ? 8'000 : 50'000;
  constexpr std::size_t kProcesses = 4, kThreads = 4, kWorkers = kProcesses * kThreads;
  std::atomic<int>* runs = shared_array<std::atomic<int>>(kKeys);
  std::atomic<int>* acks = shared_array<std::atomic<int>>(kKeys);
  std::vector<std::string> names;
  for (std::size_t i = 0; i < kKeys; ++i) names.push_back("order-" + std::to_string(i));
  const std::string prefix = unique_prefix("race");

  std::vector<pid_t> children;
  for (std::size_t p = 0; p < kProcesses; ++p) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      int status = 0;
      try {
        RedisStore store(
            RedisOptions{.port = server.port(), .key_prefix = prefix, .pool_size = kThreads});
        idem::IdempotentConsumer consumer(
            store, [&](const Message& m) { runs[std::stoul(std::string(m.key.substr(6)))]++; },
            idem::Options{.lease = 10s});
        std::vector<std::thread> threads;
        for (std::size_t t = 0; t < kThreads; ++t) {
          threads.emplace_back([&, t] {
            drain(consumer, names, worker_stream(kKeys, kWorkers, p * kThreads + t), t % 2 == 1,
                  acks);
          });
        }
        for (std::thread& t : threads) t.join();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "worker process failed: %s\n", e.what());
        status = 1;
      }
      ::_exit(status);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  std::size_t never = 0, twice = 0, deliveries = 0, acked = 0;
  for (std::size_t i = 0; i < kKeys; ++i) {
    never += runs[i] == 0;
    twice += runs[i] > 1;
    acked += static_cast<std::size_t>(acks[i].load());
  }
  for (std::size_t w = 0; w < kWorkers; ++w) deliveries += worker_stream(kKeys, kWorkers, w).size();
  EXPECT_EQ(never, 0u);
  EXPECT_EQ(twice, 0u);
  EXPECT_EQ(acked, deliveries);
  EXPECT_GT(deliveries, kKeys * 12 / 10);
  ::munmap(runs, sizeof(std::atomic<int>) * kKeys);
  ::munmap(acks, sizeof(std::atomic<int>) * kKeys);
}

}  // namespace
