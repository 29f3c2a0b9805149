// RedisStore against real redis-server processes started by the tests (support/redis_server.hpp).

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "idem/redis.hpp"
#include "idem/testing/store_conformance.hpp"
#include "support/redis_server.hpp"
#include "support/sanitized.hpp"

namespace {

using namespace std::chrono_literals;
using idem::ClaimRequest;
using idem::ClaimStatus;
using idem::Message;
using idem::Outcome;
using idem::RedisOptions;
using idem::RedisStore;
using idem::test_support::RedisServer;

using idem::testing::kSanitized;

// One server for the conformance suite and the small tests; each store gets its own prefix.
RedisServer& shared_server() {
  static RedisServer server;
  return server;
}

std::string unique_prefix(const std::string& what) {
  static std::atomic<int> n{0};
  return "t" + std::to_string(::getpid()) + "-" + what + std::to_string(n++) + ":";
}

RedisOptions options_for(int port, const std::string& what) {
  return RedisOptions{.port = port, .key_prefix = unique_prefix(what)};
}

struct RedisStoreFactory {
  std::unique_ptr<idem::DedupStore> make() {
    return std::make_unique<RedisStore>(options_for(shared_server().port(), "conf"));
  }
  // Leases and retention run on the server's clock: let real time pass.
  void advance(std::chrono::milliseconds ms) { std::this_thread::sleep_for(ms); }
  static constexpr std::size_t race_keys = kSanitized ? 1'000 : 4'000;
};

ClaimRequest request(std::string_view key, std::chrono::milliseconds lease = 30s) {
  return ClaimRequest{.key = key, .fingerprint = idem::Fingerprint::of("p"), .lease = lease};
}

// Raw redis command through the store's escape hatch.
std::string raw_get(RedisStore& store, const std::string& key) {
  std::string value = "<nil>";
  store.with_connection(key, [&](redisContext* c) {
    auto* r = static_cast<redisReply*>(redisCommand(c, "GET %b", key.data(), key.size()));
    ASSERT_NE(r, nullptr);
    if (r->type == REDIS_REPLY_STRING) value.assign(r->str, r->len);
    freeReplyObject(r);
  });
  return value;
}

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
  EXPECT_GE(store.stats().script_loads, 6u);
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
  EXPECT_GE(fresh.stats().script_loads, 6u) << "the scripts were reloaded";
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
  EXPECT_THROW(store.inspect("x"), idem::StoreUnavailable);
}

TEST(RedisStoreOperator, StatsCountRecordsUnderThePrefixOnly) {
  RedisStore store(options_for(shared_server().port(), "stats"));
  RedisStore other(options_for(shared_server().port(), "stats-other"));
  ASSERT_EQ(other.claim(request("elsewhere")).status, ClaimStatus::acquired);
  idem::StoreStats s = store.stats_summary();
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

  s = store.stats_summary();
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
  EXPECT_EQ(store.purge_expired_records(1'000), 0u);
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

// --- Bad input -------------------------------------------------------------------------------

template <class F>
std::string unavailable_message(F&& f) {
  try {
    f();
  } catch (const idem::StoreUnavailable& e) {
    return e.what();
  }
  ADD_FAILURE() << "no idem::StoreUnavailable";
  return {};
}

TEST(RedisStoreBadInput, WrongPasswordSaysWhatToFix) {
  RedisServer server({"--requirepass", "s3cret"});
  RedisOptions o = options_for(server.port(), "auth");
  o.password = "wrong";
  RedisStore wrong(o);
  std::string what = unavailable_message([&] { wrong.claim(request("k")); });
  EXPECT_NE(what.find("RedisOptions::password"), std::string::npos) << what;
  EXPECT_NE(what.find("do not ack"), std::string::npos) << what;

  RedisStore none(options_for(server.port(), "auth"));
  what = unavailable_message([&] { none.ping(); });
  EXPECT_NE(what.find("requires authentication"), std::string::npos) << what;

  o.password = "s3cret";
  RedisStore right(o);
  EXPECT_EQ(right.claim(request("k")).status, ClaimStatus::acquired);
}

TEST(RedisStoreBadInput, WrongPortIsRefusedQuickly) {
  RedisOptions o = options_for(idem::test_support::free_port(), "port");
  o.reconnect_backoff_min = 2s;
  o.reconnect_backoff_max = 5s;
  RedisStore store(o);
  const auto start = std::chrono::steady_clock::now();
  std::string what = unavailable_message([&] { store.claim(request("k")); });
  EXPECT_NE(what.find("refused"), std::string::npos) << what;
  EXPECT_NE(what.find("is redis-server running"), std::string::npos) << what;
  // Within the backoff the next call fails at once, saying when it will retry.
  what = unavailable_message([&] { store.claim(request("k")); });
  EXPECT_NE(what.find("next reconnect attempt"), std::string::npos) << what;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

// A TCP listener that is not Redis: answers every connection with `greeting` (or nothing).
class FakeServer {
 public:
  explicit FakeServer(std::string greeting) : greeting_(std::move(greeting)) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    socklen_t len = sizeof addr;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    ::listen(fd_, 16);
    thread_ = std::thread([this] {
      for (;;) {
        int c = ::accept(fd_, nullptr, nullptr);
        if (c < 0) return;
        if (!greeting_.empty()) {
          char buf[256];
          (void)::recv(c, buf, sizeof buf, 0);
          (void)::send(c, greeting_.data(), greeting_.size(), MSG_NOSIGNAL);
        }
        std::lock_guard lock(mutex_);
        clients_.push_back(c);  // held open: a silent server
      }
    });
  }
  ~FakeServer() {
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    thread_.join();
    for (int c : clients_) ::close(c);
  }
  int port() const { return port_; }

 private:
  std::string greeting_;
  int fd_ = -1;
  int port_ = 0;
  std::thread thread_;
  std::mutex mutex_;
  std::vector<int> clients_;
};

TEST(RedisStoreBadInput, ServerAnsweringGarbageIsNotRedis) {
  FakeServer fake("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
  RedisOptions o = options_for(fake.port(), "garbage");
  o.command_timeout = 300ms;
  o.connect_timeout = 300ms;
  RedisStore store(o);
  std::string what = unavailable_message([&] { store.claim(request("k")); });
  EXPECT_NE(what.find("like Redis"), std::string::npos) << what;
}

TEST(RedisStoreBadInput, SilentServerTimesOutWithinTheConfiguredTimeout) {
  FakeServer fake("");
  RedisOptions o = options_for(fake.port(), "silent");
  o.command_timeout = 300ms;
  o.connect_timeout = 300ms;
  RedisStore store(o);
  const auto start = std::chrono::steady_clock::now();
  std::string what = unavailable_message([&] { store.claim(request("k")); });
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_NE(what.find("no reply"), std::string::npos) << what;
  EXPECT_NE(what.find("not a Redis server"), std::string::npos) << what;
  EXPECT_GE(took, 250ms);
  EXPECT_LT(took, 1500ms);
}

TEST(RedisStoreBadInput, BinaryKeysAndA512ByteKeyWork) {
  RedisStore store(options_for(shared_server().port(), "bin"));
  const std::string nul("pay\0ment", 8), crlf("pay\r\nSET x y\r\n"), big(512, '\xab');
  const std::string braces("{tag}and}{more");
  for (const std::string& key : {nul, crlf, big, braces}) {
    idem::Claim c = store.claim(request(key));
    ASSERT_EQ(c.status, ClaimStatus::acquired) << key.size();
    ASSERT_TRUE(store.complete({.key = key, .token = c.token, .response = key}));
    idem::Claim again = store.claim(request(key));
    EXPECT_EQ(again.status, ClaimStatus::done);
    EXPECT_EQ(again.response, key);
    EXPECT_NE(raw_get(store, store.record_key(key)), "<nil>");
  }
  // "pay" is a different key from "pay\0ment", and no injected command ran.
  EXPECT_EQ(store.claim(request("pay")).status, ClaimStatus::acquired);
  EXPECT_EQ(raw_get(store, "x"), "<nil>");
  EXPECT_THROW(store.claim(request(std::string(513, 'k'))), idem::InvalidMessage);
}

// A full Redis (maxmemory with noeviction) refuses writes: new messages get StoreUnavailable
// (not acked), but a redelivery of a done key is still answered, since its claim only reads.
TEST(RedisStoreOutage, FullRedisStillAnswersDuplicatesAndRefusesNewClaimsClearly) {
  RedisServer server({"--maxmemory-policy", "noeviction"});
  RedisStore store(options_for(server.port(), "full"));
  idem::Claim c = store.claim(request("paid"));
  ASSERT_TRUE(store.complete({.key = "paid", .token = c.token, .response = "card-1"}));
  EXPECT_NE(server.cli("CONFIG SET maxmemory 1").find("OK"), std::string::npos);
  idem::Claim again = store.claim(request("paid"));
  EXPECT_EQ(again.status, ClaimStatus::done);
  EXPECT_EQ(again.response, "card-1");
  try {
    store.claim(request("new"));
    ADD_FAILURE() << "a claim that must write succeeded on a full Redis";
  } catch (const idem::StoreUnavailable& e) {
    std::printf("full: %s\n", e.what());
    EXPECT_NE(std::string(e.what()).find("OOM"), std::string::npos) << e.what();
  }
  EXPECT_NE(server.cli("CONFIG SET maxmemory 0").find("OK"), std::string::npos);
  EXPECT_EQ(store.claim(request("new")).status, ClaimStatus::acquired);
}

TEST(RedisStoreOutage, PausedServerTimesOutWithinCommandTimeoutThenRecovers) {
  RedisServer server;
  RedisOptions o = options_for(server.port(), "pause");
  o.command_timeout = 200ms;
  RedisStore store(o);
  ASSERT_EQ(store.claim(request("before")).status, ClaimStatus::acquired);
  // CLIENT PAUSE holds every client's commands: the server is up but does not answer.
  EXPECT_NE(server.cli("CLIENT PAUSE 1500 ALL").find("OK"), std::string::npos);
  const auto start = std::chrono::steady_clock::now();
  std::string what = unavailable_message([&] { store.claim(request("during")); });
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_NE(what.find("no reply"), std::string::npos) << what;
  EXPECT_NE(what.find("command_timeout (200 ms)"), std::string::npos) << what;
  EXPECT_LT(took, 1000ms);
  std::this_thread::sleep_for(1500ms);
  // The timed-out connection was closed; a fresh one works. The timed-out claim may have run
  // once the pause ended: then the key is held (in_progress), never handed out twice.
  ClaimStatus after = store.claim(request("during")).status;
  EXPECT_TRUE(after == ClaimStatus::acquired || after == ClaimStatus::in_progress);
  EXPECT_EQ(store.claim(request("after")).status, ClaimStatus::acquired);
}

TEST(RedisStoreBadInput, ExhaustedPoolSaysWhichOptionToRaise) {
  RedisOptions o = options_for(shared_server().port(), "pool");
  o.pool_size = 1;
  o.pool_wait_timeout = 100ms;
  RedisStore store(o);
  store.with_connection("", [&](redisContext*) {
    std::string what = unavailable_message([&] { store.claim(request("k")); });
    EXPECT_NE(what.find("RedisOptions::pool_size"), std::string::npos) << what;
  });
  EXPECT_EQ(store.claim(request("k")).status, ClaimStatus::acquired);
}

// --- Waiting for a held key (Options::in_progress_wait, await_change) ------------------------

// Waits until `n` threads of the store wait for a notification (subscribed, record checked):
// a change made from now on can only reach them as a notification.
void wait_for_waiters(const RedisStore& store, std::uint64_t n) {
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  while (store.stats().waiting < n) {
    if (std::chrono::steady_clock::now() > give_up) {
      ADD_FAILURE() << "no waiter subscribed within 30 s";
      return;
    }
    std::this_thread::sleep_for(1ms);
  }
}

// Subscribers of the key's notification channel, as the server counts them.
long long channel_subscribers(RedisStore& store, std::string_view key) {
  const std::string channel = store.notification_channel(key);
  long long n = -1;
  store.with_connection(store.record_key(key), [&](redisContext* c) {
    auto* r = static_cast<redisReply*>(
        redisCommand(c, "PUBSUB SHARDNUMSUB %b", channel.data(), channel.size()));
    ASSERT_NE(r, nullptr);
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2) n = r->element[1]->integer;
    freeReplyObject(r);
  });
  return n;
}

// A wait longer than any test: only a notification ends it in time. The counters, not the
// clock, tell which ended it.
constexpr auto kLongWait = 60s;

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
  const idem::RedisStoreStats stats = store.stats();
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
  EXPECT_EQ(store.stats().waits_settled, 3u);
  EXPECT_EQ(store.stats().waits_woken, 0u);
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
  const idem::RedisStoreStats stats = store.stats();
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
  EXPECT_EQ(store.stats().wait_fallbacks, 1u);
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
  const idem::RedisStoreStats stats = store.stats();
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
  EXPECT_EQ(store.stats().waits_woken, 2u);
  EXPECT_EQ(store.stats().wait_fallbacks, 0u);
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
  EXPECT_EQ(store.stats().waits_woken, 1u);
  EXPECT_EQ(store.stats().waits_timed_out, 0u);
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
  EXPECT_EQ(store.stats().wait_fallbacks, 0u);
  ::close(ready[0]);
}

// --- Many processes --------------------------------------------------------------------------

// Shared between forked processes.
template <class T>
T* shared_array(std::size_t n) {
  void* p =
      ::mmap(nullptr, sizeof(T) * n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
  T* a = static_cast<T*>(p);
  for (std::size_t i = 0; i < n; ++i) new (&a[i]) T(0);
  return a;
}

// The deliveries one worker sees: its own keys, plus a redelivery of 30% of its neighbour's
// keys at the same position in the stream, so each duplicate races its original.
std::vector<std::size_t> worker_stream(std::size_t keys, std::size_t workers, std::size_t w) {
  std::vector<std::size_t> stream;
  std::size_t neighbour = (w + workers - 1) % workers;
  for (std::size_t i = 0; i < keys; ++i) {
    if (i % workers == w) stream.push_back(i);
    if (i % workers == neighbour && (i / workers) % 10 < 3) stream.push_back(i);
  }
  return stream;
}

// Consumes the stream until every delivery is acked; in_progress and StoreUnavailable are
// redelivered later. Threads with an odd index use consume_batch.
// With runs and thrown_after_run: marks keys whose handler ran in a call that then failed.
template <class Consumer>
void drain(Consumer& consumer, const std::vector<std::string>& names,
           const std::vector<std::size_t>& stream, bool batched, std::atomic<int>* acks,
           std::atomic<int>* runs = nullptr, std::atomic<int>* thrown_after_run = nullptr) {
  std::deque<std::size_t> queue(stream.begin(), stream.end());
  // A broken store must fail the test, not hang it.
  const auto give_up = std::chrono::steady_clock::now() + 120s;
  std::string last_error = "none";
  while (!queue.empty() && std::chrono::steady_clock::now() < give_up) {
    std::vector<std::size_t> take;
    const std::size_t n = batched ? std::min<std::size_t>(50, queue.size()) : 1;
    for (std::size_t i = 0; i < n; ++i) {
      take.push_back(queue.front());
      queue.pop_front();
    }
    std::vector<Message> batch;
    for (std::size_t i : take) batch.push_back({.key = names[i], .payload = "p"});
    std::vector<idem::Result> results;
    std::vector<int> runs_before;
    if (runs != nullptr) {
      for (std::size_t i : take) runs_before.push_back(runs[i].load());
    }
    try {
      results = batched ? consumer.consume_batch(batch)
                        : std::vector<idem::Result>{consumer.consume(batch[0])};
    } catch (const idem::StoreUnavailable& e) {
      last_error = e.what();
      if (runs != nullptr) {
        for (std::size_t k = 0; k < take.size(); ++k) {
          if (runs[take[k]].load() > runs_before[k]) thrown_after_run[take[k]]++;
        }
      }
      for (std::size_t i : take) queue.push_back(i);
      std::this_thread::sleep_for(20ms);
      continue;
    }
    bool waited = false;
    for (std::size_t k = 0; k < take.size(); ++k) {
      if (results[k].should_ack()) {
        acks[take[k]].fetch_add(1);
      } else {
        if (results[k].error) {
          try {
            std::rethrow_exception(results[k].error);
          } catch (const std::exception& e) {
            last_error = e.what();
          }
        }
        queue.push_back(take[k]);
        if (!waited && queue.size() < 8) {
          std::this_thread::sleep_for(2ms);
          waited = true;
        }
      }
    }
  }
  if (!queue.empty()) {
    std::printf("drain: gave up with %zu deliveries left; last store error: %s\n", queue.size(),
                last_error.c_str());
  }
}

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

// --- Outage ----------------------------------------------------------------------------------

TEST(RedisStoreOutage, KilledAndRestartedServerLosesNothingAndAcksNothingUnprocessed) {
  RedisServer server({"--appendonly", "yes", "--appendfsync", "always"});
  const std::size_t kMessages = kSanitized ? 6'000 : 20'000;
  constexpr std::size_t kThreads = 4;
  std::vector<std::string> names;
  for (std::size_t i = 0; i < kMessages; ++i) names.push_back("m-" + std::to_string(i));
  std::unique_ptr<std::atomic<int>[]> runs(new std::atomic<int>[kMessages]);
  std::unique_ptr<std::atomic<int>[]> processed(new std::atomic<int>[kMessages]);
  std::unique_ptr<std::atomic<int>[]> thrown_after_run(new std::atomic<int>[kMessages]);
  for (std::size_t i = 0; i < kMessages; ++i) runs[i] = processed[i] = thrown_after_run[i] = 0;
  std::atomic<std::size_t> acked{0}, unprocessed_acks{0}, unavailable{0}, acked_while_down{0};
  // Set once redis-server is dead, cleared before it restarts. A call that began and returned
  // inside that span had no server to answer it: it must not be acked. (A reply that arrived
  // just before the kill may be acked a moment after it: that one began before.)
  std::atomic<bool> down{false};

  RedisOptions o = options_for(server.port(), "outage");
  o.command_timeout = 500ms;
  o.connect_timeout = 500ms;
  RedisStore store(o);
  // Whether this thread's last handler ended with Redis dead: its completion then had no
  // server to record it, so its message must not be acked either.
  static thread_local bool ran_down = false;
  idem::IdempotentConsumer consumer(
      store,
      [&](const Message& m) {
        runs[std::stoul(std::string(m.key.substr(2)))]++;
        ran_down = down.load();
      },
      idem::Options{.lease = 1s});

  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::deque<std::size_t> queue;
      for (std::size_t i = t; i < kMessages; i += kThreads) {
        queue.push_back(i);
        if (i % 10 == 0) queue.push_back((i * 7919) % kMessages);  // a redelivery of some key
      }
      while (!queue.empty()) {
        std::size_t i = queue.front();
        queue.pop_front();
        const int runs_before = runs[i].load();
        const bool began_down = down.load();
        ran_down = false;
        try {
          idem::Result r = consumer.consume({.key = names[i], .payload = "p"});
          if (r.should_ack()) {
            if ((began_down || ran_down) && down.load()) acked_while_down++;
            // Acked only if its handler has run at some point (now or earlier).
            if (runs[i].load() == 0) unprocessed_acks++;
            if (r.outcome == Outcome::processed) processed[i]++;
            acked++;
          } else {
            queue.push_back(i);
            std::this_thread::sleep_for(1ms);
          }
        } catch (const idem::StoreUnavailable&) {
          unavailable++;
          if (runs[i].load() > runs_before) thrown_after_run[i]++;
          queue.push_back(i);
          std::this_thread::sleep_for(20ms);
        }
      }
    });
  }
  const auto started = std::chrono::steady_clock::now();
  while (acked.load() < kMessages / 3) std::this_thread::sleep_for(1ms);
  server.kill_hard();
  down = true;
  const auto killed = std::chrono::steady_clock::now();
  const std::size_t acked_at_kill = acked.load();
  std::this_thread::sleep_for(3s);
  down = false;
  server.start();
  const auto restarted = std::chrono::steady_clock::now();
  for (std::thread& t : threads) t.join();
  using ms = std::chrono::milliseconds;
  std::printf(
      "outage: %zu acked before the kill after %lld ms; drained %lld ms after restart\n",
      acked_at_kill,
      static_cast<long long>(std::chrono::duration_cast<ms>(killed - started).count()),
      static_cast<long long>(
          std::chrono::duration_cast<ms>(std::chrono::steady_clock::now() - restarted).count()));

  EXPECT_EQ(acked_while_down.load(), 0u);
  EXPECT_EQ(unprocessed_acks.load(), 0u);
  EXPECT_GT(unavailable.load(), 0u);
  std::size_t never = 0, twice_processed = 0, reruns = 0, unexplained_reruns = 0;
  for (std::size_t i = 0; i < kMessages; ++i) {
    never += runs[i] == 0;
    // processed[i] may be 0: the completion reached Redis but its reply did not, so the
    // redelivery found the key done (a duplicate) - correct, and acked.
    twice_processed += processed[i] > 1;
    if (runs[i] > 1) {
      ++reruns;
      // The only rerun allowed: the handler ran, then Redis died before the completion was
      // recorded, so the message was not acked and its claim expired.
      if (thrown_after_run[i] == 0) ++unexplained_reruns;
    }
  }
  EXPECT_EQ(never, 0u);
  EXPECT_EQ(twice_processed, 0u) << "each message is acked as processed exactly once";
  EXPECT_EQ(unexplained_reruns, 0u);
  EXPECT_LE(reruns, kThreads) << "at most the messages in flight at the crash";
}

// --- Redis Cluster ---------------------------------------------------------------------------

// One admin command over hiredis; the reply flattened to strings (arrays: one per element).
std::vector<std::string> admin(int port, const std::vector<std::string>& args) {
  redisContext* c = redisConnect("127.0.0.1", port);
  if (c == nullptr || c->err) {
    if (c) redisFree(c);
    throw std::runtime_error("cannot connect to cluster node " + std::to_string(port));
  }
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  for (const std::string& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  auto* r = static_cast<redisReply*>(
      redisCommandArgv(c, static_cast<int>(args.size()), argv.data(), lens.data()));
  std::vector<std::string> out;
  if (r == nullptr) {
    redisFree(c);
    throw std::runtime_error("admin command failed on " + std::to_string(port));
  }
  if (r->type == REDIS_REPLY_ARRAY) {
    for (std::size_t i = 0; i < r->elements; ++i) {
      out.emplace_back(r->element[i]->str ? std::string(r->element[i]->str, r->element[i]->len)
                                          : std::to_string(r->element[i]->integer));
    }
  } else if (r->type == REDIS_REPLY_INTEGER) {
    out.push_back(std::to_string(r->integer));
  } else if (r->str != nullptr) {
    out.emplace_back(r->str, r->len);
  }
  const bool failed = r->type == REDIS_REPLY_ERROR;
  freeReplyObject(r);
  redisFree(c);
  if (failed) throw std::runtime_error("admin command " + args[0] + " failed: " + out[0]);
  return out;
}

class RedisCluster {
 public:
  // Three masters on loopback; with replicas, each gets one replica (six servers).
  explicit RedisCluster(bool replicas = false) {
    for (int i = 0; i < (replicas ? 6 : 3); ++i) {
      nodes_.push_back(std::make_unique<RedisServer>(std::vector<std::string>{
          "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
          "--cluster-node-timeout", replicas ? "1000" : "3000", "--appendonly", "no"}));
    }
    std::string create = "--cluster create";
    for (auto& n : nodes_) create += " 127.0.0.1:" + std::to_string(n->port());
    std::string out =
        nodes_[0]->cli(create + " --cluster-replicas " + (replicas ? "1" : "0") + " --cluster-yes");
    if (out.find("All 16384 slots covered") == std::string::npos) {
      throw std::runtime_error("redis-cli --cluster create failed:\n" + out);
    }
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    auto wait_for = [&](std::size_t i, const std::vector<std::string>& cmd, const char* text) {
      while (admin(port(i), cmd)[0].find(text) == std::string::npos) {
        if (std::chrono::steady_clock::now() > deadline) {
          throw std::runtime_error(std::string("the cluster did not reach ") + text);
        }
        std::this_thread::sleep_for(50ms);
      }
    };
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      wait_for(i, {"CLUSTER", "INFO"}, "cluster_state:ok");
      if (replicas) {
        std::string role = admin(port(i), {"INFO", "replication"})[0];
        wait_for(i, {"INFO", "replication"},
                 role.find("role:master") != std::string::npos ? "connected_slaves:1"
                                                               : "master_link_status:up");
      }
    }
  }
  void kill(std::size_t i) { nodes_[i]->kill_hard(); }
  // Waits until node i is a replica of node m with its link up.
  bool replicates(std::size_t i, std::size_t m, std::chrono::milliseconds within) const {
    const auto deadline = std::chrono::steady_clock::now() + within;
    const std::string master_port = "master_port:" + std::to_string(port(m)) + "\r";
    do {
      try {
        std::string info = admin(port(i), {"INFO", "replication"})[0];
        if (info.find("role:slave") != std::string::npos &&
            info.find(master_port) != std::string::npos &&
            info.find("master_link_status:up") != std::string::npos) {
          return true;
        }
      } catch (const std::runtime_error&) {
      }
      std::this_thread::sleep_for(50ms);
    } while (std::chrono::steady_clock::now() < deadline);
    return false;
  }
  // What each running node believes, and the end of its log: for a failure message.
  std::string describe() const {
    std::string out;
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      out += "--- node " + std::to_string(i) + " port " + std::to_string(port(i)) + "\n";
      if (!nodes_[i]->running()) {
        out += "(down)\n";
        continue;
      }
      try {
        out += admin(port(i), {"CLUSTER", "NODES"})[0];
        std::string info = admin(port(i), {"INFO", "replication"})[0];
        out += info.substr(0, std::min<std::size_t>(info.size(), 400)) + "\n";
      } catch (const std::runtime_error& e) {
        out += std::string(e.what()) + "\n";
      }
      out += nodes_[i]->cli("--no-raw PING");  // proves the port answers
      out += idem::test_support::run_output("tail -n 15 " + nodes_[i]->dir() + "/redis.log");
    }
    return out;
  }
  // Restarts a killed node on its port with its nodes.conf: it rejoins as a replica.
  void restart(std::size_t i) { nodes_[i]->start(); }
  int port(std::size_t i) const { return nodes_[i]->port(); }
  std::string id(std::size_t i) const { return admin(port(i), {"CLUSTER", "MYID"})[0]; }
  std::size_t owner(std::uint16_t slot) const {
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      if (!nodes_[i]->running()) continue;
      std::string nodes = admin(port(i), {"CLUSTER", "NODES"})[0];
      // "<id> <ip:port@cport> myself,master - 0 0 1 connected 0-5460 ..."
      std::istringstream lines(nodes);
      for (std::string line; std::getline(lines, line);) {
        if (line.find("myself") == std::string::npos) continue;
        std::istringstream words(line);
        std::vector<std::string> w{std::istream_iterator<std::string>(words), {}};
        for (std::size_t k = 8; k < w.size(); ++k) {
          if (w[k].empty() || w[k][0] == '[') continue;  // [slot->-node] migration markers
          std::size_t dash = w[k].find('-');
          long lo = std::stol(w[k].substr(0, dash));
          long hi = dash == std::string::npos ? lo : std::stol(w[k].substr(dash + 1));
          if (slot >= lo && slot <= hi) return i;
        }
      }
    }
    throw std::runtime_error("no owner for slot " + std::to_string(slot));
  }

  // Moves a slot the way redis-cli --cluster reshard does, key batch by key batch.
  std::size_t migrate(std::uint16_t slot, std::size_t from, std::size_t to) {
    const std::string s = std::to_string(slot);
    admin(port(to), {"CLUSTER", "SETSLOT", s, "IMPORTING", id(from)});
    admin(port(from), {"CLUSTER", "SETSLOT", s, "MIGRATING", id(to)});
    std::size_t moved = 0;
    for (;;) {
      std::vector<std::string> keys = admin(port(from), {"CLUSTER", "GETKEYSINSLOT", s, "50"});
      if (keys.empty()) break;
      std::vector<std::string> cmd{"MIGRATE", "127.0.0.1", std::to_string(port(to)), "", "0",
                                   "5000",    "KEYS"};
      cmd.insert(cmd.end(), keys.begin(), keys.end());
      admin(port(from), cmd);
      moved += keys.size();
      std::this_thread::sleep_for(2ms);  // let the consumers run into the half-moved slot
    }
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      admin(port(i), {"CLUSTER", "SETSLOT", s, "NODE", id(to)});
    }
    return moved;
  }

 private:
  std::vector<std::unique_ptr<RedisServer>> nodes_;
};

// The keys of a cluster run and what happened to each: every tenth carries the {hot} hash tag,
// so they all live in one slot (the one migrated or failed over).
struct ClusterKeys {
  explicit ClusterKeys(std::size_t n)
      : count(n),
        runs(new std::atomic<int>[n]),
        acks(new std::atomic<int>[n]),
        thrown(new std::atomic<int>[n]) {
    for (std::size_t i = 0; i < count; ++i) {
      names.push_back((i % 10 == 0 ? "{hot}order-" : "order-") + std::to_string(i));
      runs[i] = acks[i] = thrown[i] = 0;
    }
  }
  // The handler's bookkeeping: "order-42" and "{hot}order-40" are keys 42 and 40.
  void ran(const Message& m) {
    std::string_view k = m.key;
    runs[std::stoul(std::string(k.substr(k.find('-') + 1)))]++;
  }
  std::size_t acked() const {
    std::size_t a = 0;
    for (std::size_t i = 0; i < count; ++i) a += static_cast<std::size_t>(acks[i].load());
    return a;
  }
  // Deliveries across all workers (30 % of them redeliveries).
  std::size_t deliveries(std::size_t workers) const {
    std::size_t total = 0;
    for (std::size_t w = 0; w < workers; ++w) total += worker_stream(count, workers, w).size();
    return total;
  }
  std::size_t never_ran() const {
    std::size_t n = 0;
    for (std::size_t i = 0; i < count; ++i) n += runs[i] == 0;
    return n;
  }

  std::size_t count;
  std::vector<std::string> names;
  std::unique_ptr<std::atomic<int>[]> runs, acks, thrown;
};

TEST(RedisStoreCluster, ThreeMastersWithASlotMigrationMidRunProcessEachKeyOnce) {
  RedisCluster cluster;
  const std::size_t kKeys = kSanitized ? 6'000 : 20'000;
  constexpr std::size_t kThreads = 4;
  ClusterKeys keys(kKeys);
  const std::vector<std::string>& names = keys.names;

  RedisOptions o = options_for(cluster.port(0), "cluster");
  o.cluster = true;
  RedisStore store(o);
  store.ping();
  const std::uint16_t hot = static_cast<std::uint16_t>(
      std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(names[0])})[0]));
  const std::size_t from = cluster.owner(hot), to = (from + 1) % 3;

  idem::IdempotentConsumer consumer(
      store, [&](const Message& m) { keys.ran(m); }, idem::Options{.lease = 10s});
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      drain(consumer, names, worker_stream(kKeys, kThreads, t), t % 2 == 1, keys.acks.get());
    });
  }
  const std::size_t total = keys.deliveries(kThreads);
  while (keys.acked() < total / 3) std::this_thread::sleep_for(5ms);
  const std::size_t acked_before = keys.acked();
  const std::size_t moved = cluster.migrate(hot, from, to);
  const std::size_t acked_during = keys.acked() - acked_before;
  for (std::thread& t : threads) t.join();
  std::printf(
      "cluster: moved %zu keys of slot %u while %zu deliveries were acked; %llu "
      "redirects followed\n",
      moved, static_cast<unsigned>(hot), acked_during,
      static_cast<unsigned long long>(store.stats().redirects));

  std::size_t twice = 0;
  for (std::size_t i = 0; i < kKeys; ++i) twice += keys.runs[i] > 1;
  EXPECT_EQ(keys.never_ran(), 0u);
  EXPECT_EQ(twice, 0u);
  EXPECT_EQ(keys.acked(), total);
  EXPECT_GT(moved, 0u);
  EXPECT_EQ(cluster.owner(hot), to);
  EXPECT_GT(store.stats().redirects, 0u) << "the consumers met the moved slot";
  // The records of the hot slot, its token counter included, now live on the new owner, and
  // a redelivery there is a duplicate.
  EXPECT_GT(
      std::stoul(admin(cluster.port(to), {"CLUSTER", "COUNTKEYSINSLOT", std::to_string(hot)})[0]),
      kKeys / 10);
  EXPECT_EQ(consumer.consume({.key = names[0], .payload = "p"}).outcome, Outcome::duplicate);
  // The operator hooks see every record on every master, the migrated slot included.
  const idem::StoreStats s = store.stats_summary();
  EXPECT_EQ(s.records, kKeys);
  EXPECT_EQ(s.done, kKeys);
  EXPECT_EQ(s.in_progress, 0u);
  const std::optional<idem::RecordInfo> info = store.inspect(names[0]);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
}

// After a failover the store's slot map still names the old master, now a replica. With
// wait_replicas, that node answers the calls with MOVED and the trailing WAIT with an error;
// the store must follow the MOVED (the calls did not run there), not report the WAIT error
// over and over.
TEST(RedisStoreCluster, WaitStillFollowsRedirectsFromAMasterTurnedReplica) {
  RedisCluster cluster(/*replicas=*/true);
  RedisOptions o = options_for(cluster.port(0), "turned");
  o.cluster = true;
  o.wait_replicas = 1;
  o.wait_timeout = 1s;
  RedisStore store(o);
  const std::string key = "{hot}order-1";
  const std::uint16_t hot = static_cast<std::uint16_t>(
      std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(key)})[0]));
  const std::size_t old_master = cluster.owner(hot);
  ASSERT_EQ(store.claim(request("{hot}warm-up")).status, ClaimStatus::acquired);  // map cached
  // A graceful failover: the old master's replica takes over, the old master becomes a replica.
  std::size_t replica = old_master;
  for (std::size_t i = 0; i < 6; ++i) {
    if (i != old_master && cluster.replicates(i, old_master, 0ms)) replica = i;
  }
  ASSERT_NE(replica, old_master);
  admin(cluster.port(replica), {"CLUSTER", "FAILOVER"});
  const auto started = std::chrono::steady_clock::now();
  bool asked_again = false;
  while ((cluster.owner(hot) != replica || !cluster.replicates(old_master, replica, 0ms)) &&
         std::chrono::steady_clock::now() - started < 30s) {
    // A manual failover gives up after 5 s on a slow machine: ask once more.
    if (!asked_again && cluster.owner(hot) != replica &&
        std::chrono::steady_clock::now() - started > 10s) {
      admin(cluster.port(replica), {"CLUSTER", "FAILOVER"});
      asked_again = true;
    }
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(cluster.replicates(old_master, replica, 0ms)) << cluster.describe();
  idem::Claim c = store.claim(request(key));
  EXPECT_EQ(c.status, ClaimStatus::acquired);
  EXPECT_TRUE(store.complete({.key = key, .token = c.token}));
  EXPECT_GT(store.stats().redirects, 0u);
  EXPECT_EQ(store.claim(request(key)).status, ClaimStatus::done);
}

TEST(RedisStoreCluster, MasterFailoverMidRunWithWaitLosesNothing) {
  RedisCluster cluster(/*replicas=*/true);
  const std::size_t kKeys = kSanitized ? 4'000 : 10'000;
  constexpr std::size_t kThreads = 4;
  ClusterKeys keys(kKeys);
  const std::vector<std::string>& names = keys.names;

  RedisOptions o = options_for(cluster.port(0), "failover");
  o.cluster = true;
  o.wait_replicas = 1;  // a record counts once the replica has it
  o.wait_timeout = 500ms;
  o.command_timeout = 500ms;
  o.connect_timeout = 300ms;
  RedisStore store(o);
  store.ping();
  const std::uint16_t hot = static_cast<std::uint16_t>(
      std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(names[0])})[0]));
  const std::size_t victim = cluster.owner(hot);

  idem::IdempotentConsumer consumer(
      store, [&](const Message& m) { keys.ran(m); }, idem::Options{.lease = 2s});
  std::vector<std::thread> threads;
  const std::size_t total = keys.deliveries(kThreads);
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      drain(consumer, names, worker_stream(kKeys, kThreads, t), t % 2 == 1, keys.acks.get(),
            keys.runs.get(), keys.thrown.get());
    });
  }
  while (keys.acked() < total / 3) std::this_thread::sleep_for(5ms);
  cluster.kill(victim);
  const auto killed = std::chrono::steady_clock::now();
  std::size_t new_owner = victim;
  while (new_owner == victim && std::chrono::steady_clock::now() - killed < 20s) {
    std::this_thread::sleep_for(50ms);
    try {
      new_owner = cluster.owner(hot);
    } catch (const std::runtime_error&) {
    }
  }
  const auto promoted = std::chrono::steady_clock::now();
  // The promoted replica has no replica of its own, so WAIT 1 cannot succeed on it until the
  // old master comes back (as its replica); until then its slots report StoreUnavailable.
  cluster.restart(victim);
  const auto restarted = std::chrono::steady_clock::now();
  // Redis rejoins it as a replica of the promoted node on its own (about 5 s: the diskless
  // sync delay). If it has not within 30 s, say what the cluster looks like and do what an
  // operator would: tell it whom to replicate. That is the cluster's healing, not the store's.
  bool rejoined = cluster.replicates(victim, new_owner, 30s);
  const auto linked = std::chrono::steady_clock::now();
  if (!rejoined) {
    std::printf("failover: the old master did not rejoin on its own:\n%s",
                cluster.describe().c_str());
    try {
      admin(cluster.port(victim), {"CLUSTER", "REPLICATE", cluster.id(new_owner)});
    } catch (const std::runtime_error& e) {
      std::printf("failover: CLUSTER REPLICATE failed: %s\n", e.what());
    }
    rejoined = cluster.replicates(victim, new_owner, 30s);
  }
  for (std::thread& t : threads) t.join();
  using ms = std::chrono::milliseconds;
  std::printf("failover: the old master %s as a replica %lld ms after its restart\n",
              rejoined ? "rejoined" : "had NOT rejoined",
              static_cast<long long>(std::chrono::duration_cast<ms>(linked - restarted).count()));
  if (keys.acked() != total) {
    std::printf("failover: not drained; the cluster now:\n%s", cluster.describe().c_str());
  }
  std::printf(
      "failover: replica on node %zu took slot %u after %lld ms; drained %lld ms later\n",
      new_owner, static_cast<unsigned>(hot),
      static_cast<long long>(std::chrono::duration_cast<ms>(promoted - killed).count()),
      static_cast<long long>(
          std::chrono::duration_cast<ms>(std::chrono::steady_clock::now() - promoted).count()));

  std::size_t unexplained_reruns = 0, reruns = 0;
  for (std::size_t i = 0; i < kKeys; ++i) {
    if (keys.runs[i] > 1) {
      ++reruns;
      if (keys.thrown[i] == 0) ++unexplained_reruns;
    }
  }
  std::printf("failover: %zu handlers re-ran after a completion lost in the crash\n", reruns);
  EXPECT_NE(new_owner, victim) << "no replica was promoted";
  EXPECT_EQ(keys.never_ran(), 0u);
  EXPECT_EQ(keys.acked(), total);
  // Only a handler whose completion failed in the crash may run again (after its lease).
  EXPECT_EQ(unexplained_reruns, 0u);
  EXPECT_LE(reruns, kThreads * 50) << "at most the calls in flight at the crash";
}

// The scripts publish on shard channels of the record's own slot (same slot: allowed in a
// cluster script), and each master's waiters listen on that master.
TEST(RedisStoreCluster, WaitersOnEveryMasterAreWokenByNotification) {
  RedisCluster cluster;
  RedisOptions o = options_for(cluster.port(0), "cluster-wait");
  o.cluster = true;
  RedisStore store(o);
  store.ping();
  std::vector<std::string> keys;
  std::vector<std::size_t> owners;
  for (int i = 0; owners.size() < 3 && i < 1000; ++i) {
    const std::string key = "cw-" + std::to_string(i);
    const auto slot = static_cast<std::uint16_t>(
        std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(key)})[0]));
    const std::size_t owner = cluster.owner(slot);
    if (std::find(owners.begin(), owners.end(), owner) == owners.end()) {
      owners.push_back(owner);
      keys.push_back(key);
    }
  }
  ASSERT_EQ(keys.size(), 3u);
  std::vector<idem::Claim> claims;
  for (const std::string& key : keys) claims.push_back(store.claim(request(key)));
  std::vector<std::thread> waiters;
  for (const std::string& key : keys) {
    waiters.emplace_back([&store, key] { store.await_change(key, kLongWait); });
  }
  wait_for_waiters(store, 3);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    EXPECT_TRUE(store.complete({.key = keys[i], .token = claims[i].token, .response = keys[i]}));
  }
  for (std::thread& t : waiters) t.join();
  EXPECT_EQ(store.stats().waits_woken, 3u);
  EXPECT_EQ(store.stats().wait_fallbacks, 0u);
  for (const std::string& key : keys) EXPECT_EQ(store.claim(request(key)).response, key);
}

}  // namespace
