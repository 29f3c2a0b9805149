// Tests of idem::PostgresStore against a real PostgreSQL server (support/postgres_test_store.hpp:
// one private server for the whole binary, started on first use; every test works in a fresh
// schema): the shared store and inbox conformance suites, tokens, purging, the operator hooks,
// the schema, bad input, the pool and timeouts, and the query plans. The transactional inbox is
// in test_postgres_inbox.cpp, real processes and waiting in test_postgres_processes.cpp.

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
#if __has_include("idem/testing/store_conformance.hpp")
#include "idem/testing/store_conformance.hpp"
#else
#include "store_conformance.hpp"
#endif
#if __has_include("idem/testing/inbox_conformance.hpp")
#include "idem/testing/inbox_conformance.hpp"
#define IDEM_TEST_HAVE_INBOX_CONFORMANCE 1
#endif
#include "../src/postgres/statements.hpp"  // the statements' text, for the plan test
#include "support/free_port.hpp"
#include "support/gate.hpp"
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
using idem::test_support::Gate;
using idem::test_support::PostgresServer;
using idem::testing::kSanitized;
using namespace idem::test_support::postgres;

// --- Conformance -----------------------------------------------------------------------------

struct PostgresStoreFactory {
  std::unique_ptr<idem::DedupStore> make() {
    PostgresOptions options = options_for(fresh_schema());
    options.pool_size = 8;  // the race runs 8 threads
    return std::make_unique<PostgresStore>(options);
  }
  // Leases and retention run on the server's clock: let the time pass.
  void advance(std::chrono::milliseconds ms) { std::this_thread::sleep_for(ms); }
  static constexpr std::size_t race_keys = kSanitized ? 300 : 2'000;
};

#ifdef IDEM_TEST_HAVE_INBOX_CONFORMANCE
template <bool Speculative>
struct PostgresInboxFactoryOf {
  using Store = PostgresStore;
  static constexpr bool speculative = Speculative;
  std::unique_ptr<Store> make() {
    PostgresOptions options = options_for(fresh_schema());
    options.speculative_claims = Speculative;
    auto store = std::make_unique<PostgresStore>(options);
    store->transaction([](PostgresTx& tx) {
      tx.exec("CREATE TABLE IF NOT EXISTS public.inbox_effects(key bytea NOT NULL)");
      tx.exec("TRUNCATE public.inbox_effects");
    });
    return store;
  }
  void advance(std::chrono::milliseconds ms) { std::this_thread::sleep_for(ms); }
  static void write_effect(Store::Transaction& tx, std::string_view key) {
    tx.exec("INSERT INTO public.inbox_effects(key) VALUES($1)", PostgresBytes{key});
  }
  std::int64_t effects(Store& store, std::string_view key) {
    std::int64_t n = 0;
    store.transaction([&](PostgresTx& tx) {
      n = tx.query_int64("SELECT count(*) FROM public.inbox_effects WHERE key = $1",
                         PostgresBytes{key})
              .value_or(0);
    });
    return n;
  }
};
using PostgresInboxFactory = PostgresInboxFactoryOf<false>;
// The same contract with PostgresOptions::speculative_claims (lone messages in one round trip).
using PostgresSpeculativeInboxFactory = PostgresInboxFactoryOf<true>;
#endif

}  // namespace

namespace idem::testing {
INSTANTIATE_TYPED_TEST_SUITE_P(Postgres, StoreConformance, PostgresStoreFactory);
#ifdef IDEM_TEST_HAVE_INBOX_CONFORMANCE
INSTANTIATE_TYPED_TEST_SUITE_P(Postgres, InboxConformance, PostgresInboxFactory);
INSTANTIATE_TYPED_TEST_SUITE_P(PostgresSpeculative, InboxConformance,
                               PostgresSpeculativeInboxFactory);
#endif
}  // namespace idem::testing

namespace {

// --- Tokens, purging, operators ----------------------------------------------------------------

TEST(PostgresTokens, StrictlyIncreaseAcrossLeaseExpiryRetentionPurgesAndALateCompletion) {
  PostgresStore store(options_for(fresh_schema()));
  constexpr auto kLease = 1s, kRetention = 2s;
  const idem::Options options{.lease = kLease, .retention = kRetention};
  // Worker A claims K and stalls past its lease; a purge deletes the expired claim.
  const idem::Claim a = store.claim(ClaimRequest{.key = "K",
                                                 .fingerprint = idem::Fingerprint::of("p"),
                                                 .lease = kLease,
                                                 .retention = kRetention});
  ASSERT_EQ(a.status, ClaimStatus::acquired);
  std::this_thread::sleep_for(kLease + 200ms);
  EXPECT_EQ(store.purge_expired(), 1u);
  // Worker B consumes K.
  IdempotentConsumer b(
      store, [](const Message&) {}, options);
  const Result consumed = b.consume({.key = "K", .payload = "p"});
  ASSERT_EQ(consumed.outcome, Outcome::processed);
  EXPECT_GT(consumed.fencing_token, a.token);
  // B's record outlives its retention and is purged; A's late completion comes in (accepted or
  // refused, either is fine), is purged in turn; K is consumed again.
  std::this_thread::sleep_for(kRetention + 200ms);
  EXPECT_EQ(store.purge_expired(), 1u);
  // This store records a late completion of a purged key (A's work is done), with A's token.
  EXPECT_TRUE(store.complete({.key = "K", .token = a.token, .retention = kRetention}));
  EXPECT_EQ(store.inspect("K")->token, a.token);
  // A token the sequence never handed out is refused.
  EXPECT_FALSE(store.complete({.key = "never", .token = std::uint64_t{1} << 62}));
  std::this_thread::sleep_for(kRetention + 200ms);
  store.purge_expired();
  const Result again = b.consume({.key = "K", .payload = "p"});
  ASSERT_EQ(again.outcome, Outcome::processed);
  EXPECT_GT(again.fencing_token, consumed.fencing_token);
}

ClaimRequest expiring(const std::string& key, std::chrono::milliseconds lease) {
  return ClaimRequest{.key = key, .lease = lease};
}

TEST(PostgresPurge, DeletesExpiredRecordsInBoundedStepsOnePurgerAtATime) {
  const std::string schema = fresh_schema();
  PostgresOptions options = options_for(schema);
  options.purge_batch = 10;
  options.purge_interval = 0ms;
  PostgresStore store(options);
  std::vector<std::string> keys;
  for (int i = 0; i < 25; ++i) keys.push_back("expired-" + std::to_string(i));
  for (const std::string& key : keys) {
    ASSERT_EQ(store.claim(expiring(key, 1ms)).status, ClaimStatus::acquired);
  }
  ASSERT_EQ(store.claim(expiring("live", 60s)).status, ClaimStatus::acquired);
  std::this_thread::sleep_for(20ms);

  RawDb other(server().conninfo());  // another instance's purger, holding the lock
  const std::string lock = "(1768187245, hashtext('" + schema + "'))";
  other.exec("SELECT pg_advisory_lock" + lock);
  EXPECT_EQ(store.purge_expired(), 0u);
  EXPECT_EQ(store.stats().records, 26u);
  other.exec("SELECT pg_advisory_unlock" + lock);

  EXPECT_EQ(store.purge_expired(5), 5u);
  EXPECT_EQ(store.purge_expired(), 20u);  // steps of purge_batch = 10
  EXPECT_EQ(store.purge_expired(100), 0u);
  const idem::StoreStats stats = store.stats();
  EXPECT_EQ(stats.records, 1u);
  EXPECT_EQ(stats.in_progress, 1u);
}

TEST(PostgresPurge, AutomaticStepRidesOnWritesEveryIntervalAndCatchesUp) {
  PostgresOptions options = options_for(fresh_schema());
  // Long enough that the first ten claims (slow under sanitizers on a loaded machine) and the
  // five after the catch-up fit in one interval.
  options.purge_interval = 1500ms;
  options.purge_batch = 4;
  PostgresStore store(options);
  for (int i = 0; i < 10; ++i) store.claim(expiring("first-" + std::to_string(i), 1ms));
  std::this_thread::sleep_for(1550ms);
  // The interval has passed: a write purges a step of 4; a full step makes the next write
  // purge again, until a step comes back short.
  store.claim(expiring("trigger-1", 60s));
  EXPECT_EQ(store.stats().records, 7u);
  store.claim(expiring("trigger-2", 60s));
  EXPECT_EQ(store.stats().records, 4u);
  store.claim(expiring("trigger-3", 60s));
  EXPECT_EQ(store.stats().records, 3u);
  // Caught up, and within the interval: no purge.
  for (int i = 0; i < 5; ++i) store.claim(expiring("second-" + std::to_string(i), 1ms));
  std::this_thread::sleep_for(20ms);
  store.claim(expiring("trigger-4", 60s));
  EXPECT_EQ(store.stats().records, 9u);
}

TEST(PostgresOperators, InspectStatsAndForget) {
  PostgresStore store(options_for(fresh_schema()));
  EXPECT_EQ(store.inspect("k"), std::nullopt);
  const idem::Claim claim = store.claim(ClaimRequest{.key = "k", .lease = 30s});
  std::optional<idem::RecordInfo> info = store.inspect("k");
  ASSERT_TRUE(info);
  EXPECT_EQ(info->state, idem::RecordInfo::State::in_progress);
  EXPECT_EQ(info->token, claim.token);
  EXPECT_GT(info->expires_in_ms, 0);
  EXPECT_LE(info->expires_in_ms, 30'000);
  ASSERT_TRUE(store.complete(
      {.key = "k", .token = claim.token, .response = std::string("r\0r", 3), .retention = 1h}));
  info = store.inspect("k");
  ASSERT_TRUE(info);
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
  EXPECT_EQ(info->response, std::string("r\0r", 3));
  EXPECT_GT(info->expires_in_ms, 3'500'000);
  store.claim(ClaimRequest{.key = "other", .lease = 30s});
  const idem::StoreStats stats = store.stats();
  EXPECT_EQ(stats.records, 2u);
  EXPECT_EQ(stats.done, 1u);
  EXPECT_EQ(stats.in_progress, 1u);
  EXPECT_GT(stats.bytes, 0u);
  EXPECT_TRUE(store.forget("k"));
  EXPECT_FALSE(store.forget("k"));
  EXPECT_EQ(store.inspect("k"), std::nullopt);
  EXPECT_EQ(store.name(), "postgres");
}

// --- Schema -----------------------------------------------------------------------------------

TEST(PostgresSchema, InvalidSchemaNamesAndOptionsAreAConfigError) {
  const std::vector<std::string> names{
      "",           "1abc", "bad-name",           "a\"b",
      "pg_catalog", "a b",  std::string(64, 'a'), "idem; DROP TABLE x",
      "caf\xc3\xa9"};
  for (const std::string& name : names) {
    // Refused before connecting: port 1 has no server.
    EXPECT_THROW(PostgresStore({.conninfo = "host=127.0.0.1 port=1", .schema = name}),
                 idem::ConfigError)
        << name;
  }
  PostgresStore longest(options_for(std::string(63, 'S')));  // case and length kept
  EXPECT_EQ(RawDb(server().conninfo())
                .scalar("SELECT count(*) FROM pg_namespace WHERE nspname = '" +
                        std::string(63, 'S') + "'"),
            1);
  auto bad = [](auto change) {
    PostgresOptions options = options_for("idem_options");
    change(options);
    return options;
  };
  EXPECT_THROW(PostgresStore(bad([](PostgresOptions& o) { o.pool_size = 0; })), idem::ConfigError);
  EXPECT_THROW(PostgresStore(bad([](PostgresOptions& o) { o.lock_wait = 0ms; })),
               idem::ConfigError);
  EXPECT_THROW(PostgresStore(bad([](PostgresOptions& o) { o.connect_timeout = 0ms; })),
               idem::ConfigError);
  EXPECT_THROW(PostgresStore(bad([](PostgresOptions& o) { o.purge_batch = 0; })),
               idem::ConfigError);
  EXPECT_THROW(PostgresStore(bad([](PostgresOptions& o) { o.statement_timeout = -1ms; })),
               idem::ConfigError);
}

TEST(PostgresSchema, ANewerVersionOrAForeignIdemKeysTableIsAConfigError) {
  const std::string newer = fresh_schema();
  { PostgresStore store(options_for(newer)); }
  RawDb raw(server().conninfo());
  raw.exec("UPDATE " + newer + ".idem_meta SET value = 2 WHERE name = 'schema_version'");
  try {
    PostgresStore store(options_for(newer));
    ADD_FAILURE() << "a newer schema was accepted";
  } catch (const idem::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("version 2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("upgrade idem"), std::string::npos) << e.what();
  }
  const std::string foreign = fresh_schema();
  raw.exec("CREATE SCHEMA " + foreign);
  raw.exec("CREATE TABLE " + foreign + ".idem_keys(key text PRIMARY KEY, seen_at timestamptz)");
  try {
    PostgresStore store(options_for(foreign));
    ADD_FAILURE() << "a foreign idem_keys was accepted";
  } catch (const idem::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("key text, seen_at timestamp with time zone"),
              std::string::npos)
        << e.what();
  }
}

TEST(PostgresSchema, ExistingTablesNeedNoCreatePrivilegeMissingOnesAreAConfigError) {
  const std::string schema = fresh_schema();
  { PostgresStore owner(options_for(schema)); }
  const std::string role = "dml_" + schema;
  server().admin(
      {"CREATE ROLE " + role + " LOGIN PASSWORD 'dml-only-pw'",
       "GRANT USAGE ON SCHEMA " + schema + " TO " + role,
       "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA " + schema + " TO " + role,
       "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA " + schema + " TO " + role},
      PostgresServer::kDatabase);
  const std::string conninfo = "host=127.0.0.1 port=" + std::to_string(server().port()) +
                               " dbname=" + PostgresServer::kDatabase + " user=" + role +
                               " password=dml-only-pw";
  PostgresStore store({.conninfo = conninfo, .schema = schema});
  const idem::Claim claim = store.claim(ClaimRequest{.key = "k"});
  ASSERT_EQ(claim.status, ClaimStatus::acquired);
  EXPECT_TRUE(store.complete({.key = "k", .token = claim.token}));
  EXPECT_EQ(store.purge_expired(), 0u);
  try {
    PostgresStore elsewhere({.conninfo = conninfo, .schema = fresh_schema()});
    ADD_FAILURE() << "created tables without the privilege";
  } catch (const idem::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("may not create"), std::string::npos) << e.what();
  }
}

TEST(PostgresSchema, ConcurrentCreatorsAllSucceed) {
  const std::string schema = fresh_schema();
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      try {
        PostgresStore store(options_for(schema));
        if (store.claim(ClaimRequest{.key = "k"}).status == ClaimStatus::conflict) ++failures;
      } catch (const std::exception& e) {
        ADD_FAILURE() << e.what();
        ++failures;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(RawDb(server().conninfo()).scalar("SELECT count(*) FROM " + schema + ".idem_meta"), 1);
}

// --- Bad input ----------------------------------------------------------------------------------

// A TCP server on a free port that is not PostgreSQL: it answers every connection with an HTTP
// error (garbage to libpq), or says nothing at all.
class FakeServer {
 public:
  explicit FakeServer(bool silent) : port_(idem::test_support::free_port()) {
    listener_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<std::uint16_t>(port_));
    if (::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listener_, 16) != 0) {
      throw std::runtime_error("fake server: bind/listen failed");
    }
    thread_ = std::thread([this, silent] {
      std::vector<int> open;
      while (!stop_) {
        pollfd fd{listener_, POLLIN, 0};
        if (::poll(&fd, 1, 20) <= 0) continue;
        const int client = ::accept(listener_, nullptr, nullptr);
        if (client < 0) continue;
        if (silent) {
          open.push_back(client);
          continue;
        }
        const std::string garbage = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        (void)!::send(client, garbage.data(), garbage.size(), MSG_NOSIGNAL);
        ::close(client);
      }
      for (int fd : open) ::close(fd);
    });
  }
  ~FakeServer() {
    stop_ = true;
    thread_.join();
    ::close(listener_);
  }
  int port() const { return port_; }

 private:
  int port_;
  int listener_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Runs make(), expecting PostgresUnavailable; returns its message.
template <class F>
std::string unavailable_message(F make) {
  try {
    make();
  } catch (const idem::PostgresUnavailable& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not PostgresUnavailable: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no exception";
  return {};
}

// Another instance creating the tables holds the creation lock (advisory class 1768187244, see
// src/postgres/schema.cpp): a creator waits for it past lock_wait, up to statement_timeout.
TEST(PostgresSchema, ACreatorWaitsForAnotherPastLockWaitUpToStatementTimeout) {
  RawDb holder(server().conninfo());
  auto lock = [&](const std::string& schema, const char* how) {
    holder.exec(std::string("SELECT pg_advisory_") + how + "(1768187244, hashtext('" + schema +
                "'))");
  };
  const std::string slow = fresh_schema();
  lock(slow, "lock");
  std::thread release([&] {
    std::this_thread::sleep_for(700ms);  // lock_wait is 200 ms
    lock(slow, "unlock");
  });
  const auto start = std::chrono::steady_clock::now();
  try {
    PostgresStore store(options_for(slow));
    EXPECT_GE(std::chrono::steady_clock::now() - start, 600ms);
    EXPECT_EQ(store.claim(ClaimRequest{.key = "k"}).status, ClaimStatus::acquired);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  release.join();

  const std::string stuck = fresh_schema();
  lock(stuck, "lock");
  PostgresOptions options = options_for(stuck);
  options.statement_timeout = 1s;
  const std::string message = unavailable_message([&] { PostgresStore store(options); });
  EXPECT_NE(message.find("waiting for the table-creation lock"), std::string::npos) << message;
  EXPECT_NE(message.find("another instance kept creating"), std::string::npos) << message;
  lock(stuck, "unlock");
  PostgresStore store(options);  // free again
}

TEST(PostgresConnect, WrongPortWrongPasswordUnknownDatabaseAreClearAndNeverShowThePassword) {
  const std::string port = std::to_string(server().port());
  const auto start = std::chrono::steady_clock::now();
  auto open = [](std::string conninfo) {
    return [conninfo] {
      PostgresStore store({.conninfo = conninfo, .schema = "idem", .connect_timeout = 2s});
    };
  };
  const std::string refused = unavailable_message(
      open("host=127.0.0.1 port=" + std::to_string(idem::test_support::free_port()) +
           " dbname=idem_test user=idem_app password=hunter2-refused"));
  EXPECT_NE(refused.find("cannot connect"), std::string::npos) << refused;
  EXPECT_EQ(refused.find("hunter2"), std::string::npos) << refused;

  const std::string wrong = unavailable_message(open(
      "host=127.0.0.1 port=" + port + " dbname=idem_test user=idem_app password=hunter2-wrong"));
  EXPECT_NE(wrong.find("password authentication failed"), std::string::npos) << wrong;
  EXPECT_NE(wrong.find("127.0.0.1:" + port + "/idem_test (user idem_app"), std::string::npos)
      << wrong;
  EXPECT_EQ(wrong.find("hunter2"), std::string::npos) << wrong;

  const std::string uri = unavailable_message(
      open("postgresql://idem_app:hunter2%2Duri@127.0.0.1:" + port + "/idem_test"));
  EXPECT_NE(uri.find("password authentication failed"), std::string::npos) << uri;
  EXPECT_EQ(uri.find("hunter2"), std::string::npos) << uri;

  const std::string database = unavailable_message(
      open("host=127.0.0.1 port=" + port +
           " dbname=no_such_db user=idem_app password=" + PostgresServer::kPassword));
  EXPECT_NE(database.find("does not exist"), std::string::npos) << database;
  EXPECT_EQ(database.find(PostgresServer::kPassword), std::string::npos) << database;

  // A string libpq cannot parse: its complaint quotes the string, never the password.
  try {
    PostgresStore store({.conninfo = "postgresql://u:hunter2%zz@127.0.0.1:" + port + "/db"});
    ADD_FAILURE() << "accepted";
  } catch (const idem::ConfigError& e) {
    EXPECT_EQ(std::string(e.what()).find("hunter2"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
}

TEST(PostgresConnect, AServerThatIsNotPostgresIsUnavailableWithinTheTimeout) {
  FakeServer garbage(/*silent=*/false);
  const std::string message = unavailable_message([&] {
    PostgresStore store(
        {.conninfo = "host=127.0.0.1 port=" + std::to_string(garbage.port()) + " dbname=x user=x",
         .connect_timeout = 2s});
  });
  EXPECT_NE(message.find("cannot connect"), std::string::npos) << message;
  FakeServer silent(/*silent=*/true);
  const auto start = std::chrono::steady_clock::now();
  const std::string quiet = unavailable_message([&] {
    PostgresStore store(
        {.conninfo = "host=127.0.0.1 port=" + std::to_string(silent.port()) + " dbname=x user=x",
         .connect_timeout = 300ms});
  });
  EXPECT_NE(quiet.find("connect_timeout"), std::string::npos) << quiet;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
}

TEST(PostgresKeys, BinaryLongAndSqlLookingKeysAreStoredVerbatim) {
  const std::string schema = fresh_schema();
  PostgresStore store(options_for(schema));
  store.transaction(
      [&](PostgresTx& tx) { tx.exec("CREATE TABLE " + schema + ".effects(key bytea NOT NULL)"); });
  const std::vector<std::string> keys{
      std::string("a\0b", 3),         "\r\n",       "line\nfeed", std::string(512, '\xff'),
      "'); DROP TABLE idem_keys; --", "$1 \\x41 %s"};
  int runs = 0;
  IdempotentConsumer claims(store, [&](const Message&) { ++runs; });
  IdempotentConsumer inbox(store, [&](const Message& m, PostgresTx& tx) {
    tx.exec("INSERT INTO " + schema + ".effects(key) VALUES($1)", PostgresBytes{m.key});
  });
  for (const std::string& key : keys) {
    EXPECT_EQ(claims.consume({.key = key, .payload = "p"}).outcome, Outcome::processed);
    EXPECT_EQ(claims.consume({.key = key, .payload = "p"}).outcome, Outcome::duplicate);
    std::string inbox_key = key;  // another key of the same length
    inbox_key[0] = static_cast<char>(inbox_key[0] ^ 1);
    EXPECT_EQ(inbox.consume({.key = inbox_key, .payload = "p"}).outcome, Outcome::processed);
    EXPECT_EQ(inbox.consume({.key = inbox_key, .payload = "p"}).outcome, Outcome::duplicate);
    ASSERT_TRUE(store.inspect(key)) << key.size();
  }
  EXPECT_EQ(runs, static_cast<int>(keys.size()));
  RawDb raw(server().conninfo());
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM " + schema + ".idem_keys"), 2 * keys.size());
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM " + schema + ".effects"), keys.size());
  EXPECT_EQ(raw.scalar("SELECT max(length(key)) FROM " + schema + ".idem_keys"), 512);
  EXPECT_EQ(
      raw.scalar("SELECT count(*) FROM " + schema +
                 ".idem_keys WHERE key = convert_to('''); DROP TABLE idem_keys; --', 'UTF8')"),
      1);
  EXPECT_THROW(claims.consume({.key = std::string(513, 'k'), .payload = "p"}),
               idem::InvalidMessage);
}

// --- Pool and timeouts ---------------------------------------------------------------------------

TEST(PostgresPool, AllConnectionsBusyIsUnavailableAfterConnectTimeout) {
  const std::string schema = fresh_schema();
  PostgresOptions options = options_for(schema);
  options.pool_size = 1;
  options.connect_timeout = 300ms;
  PostgresStore store(options);
  Gate started, release;
  std::thread holder([&] {
    IdempotentConsumer consumer(store, [&](const Message&, PostgresTx&) {
      started.open();
      release.wait();
    });
    EXPECT_EQ(consumer.consume({.key = "holding", .payload = "p"}).outcome, Outcome::processed);
  });
  started.wait();
  const std::string message =
      unavailable_message([&] { store.claim(ClaimRequest{.key = "waiting"}); });
  EXPECT_NE(message.find("pool_size"), std::string::npos) << message;
  release.open();
  holder.join();
  EXPECT_EQ(store.claim(ClaimRequest{.key = "waiting"}).status, ClaimStatus::acquired);
}

TEST(PostgresPool, AConnectionTheServerClosedIsReplacedWithoutFailingACall) {
  const std::string app = "idem_terminated_" + std::to_string(::getpid());
  PostgresOptions options = options_for(fresh_schema());
  options.conninfo += " application_name=" + app;
  options.pool_size = 1;
  PostgresStore store(options);
  ASSERT_EQ(store.claim(ClaimRequest{.key = "before"}).status, ClaimStatus::acquired);
  RawDb admin(server().admin_conninfo());
  EXPECT_EQ(admin.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                         "application_name = '" +
                         app + "'"),
            1);
  std::this_thread::sleep_for(100ms);  // the backend sends its FATAL and closes the socket
  EXPECT_EQ(store.claim(ClaimRequest{.key = "after"}).status, ClaimStatus::acquired);
}

TEST(PostgresTimeouts, AServerThatStopsAnsweringIsUnavailableAfterStatementTimeout) {
  const std::string app = "idem_hang_" + std::to_string(::getpid());
  PostgresOptions options = options_for(fresh_schema());
  options.conninfo += " application_name=" + app;
  options.pool_size = 1;
  options.statement_timeout = 300ms;
  PostgresStore store(options);
  ASSERT_EQ(store.claim(ClaimRequest{.key = "warm"}).status, ClaimStatus::acquired);
  const auto backend = static_cast<pid_t>(
      RawDb(server().conninfo())
          .scalar("SELECT pid FROM pg_stat_activity WHERE application_name = '" + app + "'"));
  ASSERT_GT(backend, 0);
  ASSERT_EQ(::kill(backend, SIGSTOP), 0);
  struct Resume {
    pid_t pid;
    ~Resume() { ::kill(pid, SIGCONT); }
  } resume{backend};
  const auto start = std::chrono::steady_clock::now();
  const std::string message =
      unavailable_message([&] { store.claim(ClaimRequest{.key = "stuck"}); });
  EXPECT_NE(message.find("no answer from the server"), std::string::npos) << message;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 15s);
  ::kill(backend, SIGCONT);
  // The connection was given up; the next call opens another.
  EXPECT_EQ(store.claim(ClaimRequest{.key = "after"}).status, ClaimStatus::acquired);
}

// --- Plans --------------------------------------------------------------------------------------

TEST(PostgresPlans, ClaimsGoThroughThePrimaryKeyAndPurgesThroughTheExpiryIndex) {
  const std::string schema = fresh_schema();
  { PostgresStore store(options_for(schema)); }
  RawDb raw(server().conninfo());
  // Half the records expired and not purged yet: a claim must not walk them.
  raw.exec("INSERT INTO " + schema +
           ".idem_keys SELECT ('k' || g)::bytea, 1, g, statement_timestamp() + CASE WHEN g % 2 "
           "= 0 THEN interval '1 day' ELSE interval '-1 day' END, NULL, NULL FROM "
           "generate_series(1, 100000) g");
  raw.exec("ANALYZE " + schema + ".idem_keys");
  const idem::detail::pg::Statements statements(schema);
  raw.exec("PREPARE claim AS " + std::string(statements.text(idem::detail::pg::Sql::claim)));
  raw.exec("PREPARE purge AS " + std::string(statements.text(idem::detail::pg::Sql::purge_step)));
  for (const char* mode : {"force_generic_plan", "force_custom_plan"}) {
    raw.exec(std::string("SET plan_cache_mode = ") + mode);
    const std::string claim = raw.lines(
        "EXPLAIN EXECUTE claim('{k1,k2,new}'::bytea[], '{1,1,1}'::int2[], "
        "'{1000,1000,1000}'::int8[], '{NULL,NULL,NULL}'::int8[])");
    EXPECT_NE(claim.find("idem_keys_pkey"), std::string::npos) << mode << "\n" << claim;
    EXPECT_EQ(claim.find("idem_keys_expires_at"), std::string::npos) << mode << "\n" << claim;
    EXPECT_EQ(claim.find("Seq Scan on idem_keys"), std::string::npos) << mode << "\n" << claim;
    const std::string purge = raw.lines("EXPLAIN EXECUTE purge(1000)");
    EXPECT_NE(purge.find("Index Scan using idem_keys_expires_at"), std::string::npos)
        << mode << "\n"
        << purge;
    EXPECT_NE(purge.find("Limit"), std::string::npos) << purge;
  }
}

}  // namespace
