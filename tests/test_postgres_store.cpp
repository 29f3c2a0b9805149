// Tests of idem::PostgresStore against a real PostgreSQL server (tests/support/
// postgres_server.hpp: one private server for the whole binary, started on first use; every
// test works in a fresh schema). The shared store conformance suite, then what only this
// store has: the transactional inbox and its pipelining, offsets, purging, bad input, and
// real processes (SIGKILLed consumers, four processes racing, the server crashing).
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
#include "support/postgres_server.hpp"
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
using idem::test_support::PostgresServer;
using idem::testing::kSanitized;

// --- Helpers ---------------------------------------------------------------------------------

std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value ? value : fallback;
}

// A plain libpq connection of the test's own, to look at what the store wrote.
class RawDb {
 public:
  explicit RawDb(const std::string& conninfo) : conn_(PQconnectdb(conninfo.c_str())) {
    if (PQstatus(conn_) != CONNECTION_OK) {
      const std::string error = PQerrorMessage(conn_);
      PQfinish(conn_);
      throw std::runtime_error("test connection failed: " + error);
    }
  }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;
  ~RawDb() { PQfinish(conn_); }

  void exec(const std::string& sql) {
    PGresult* result = PQexec(conn_, sql.c_str());
    const ExecStatusType status = PQresultStatus(result);
    const std::string error = PQresultErrorMessage(result);
    PQclear(result);
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
      throw std::runtime_error(sql + ": " + error);
    }
  }
  std::string text(const std::string& sql) {
    PGresult* result = PQexec(conn_, sql.c_str());
    if (PQresultStatus(result) != PGRES_TUPLES_OK) {
      const std::string error = PQresultErrorMessage(result);
      PQclear(result);
      throw std::runtime_error(sql + ": " + error);
    }
    std::string value =
        PQntuples(result) > 0 && !PQgetisnull(result, 0, 0) ? PQgetvalue(result, 0, 0) : "";
    PQclear(result);
    return value;
  }
  std::int64_t scalar(const std::string& sql) {
    const std::string value = text(sql);
    return value.empty() ? 0 : std::stoll(value);
  }
  // Every row's first column, one per line (EXPLAIN output).
  std::string lines(const std::string& sql) {
    PGresult* result = PQexec(conn_, sql.c_str());
    std::string out = PQresultStatus(result) == PGRES_TUPLES_OK ? "" : PQresultErrorMessage(result);
    for (int row = 0; row < PQntuples(result); ++row) {
      out += std::string(PQgetvalue(result, row, 0)) + "\n";
    }
    PQclear(result);
    return out;
  }
  PGconn* get() const { return conn_; }

 private:
  PGconn* conn_;
};

// The test server, shared by every test of this binary (children get it via IDEM_PG_*).
PostgresServer& server() {
  static PostgresServer instance;
  return instance;
}

// Starts the server from the main thread, before the first test: the postmaster dies with the
// thread that forked it (PR_SET_PDEATHSIG), so no test's worker thread may be the first user.
class ServerEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { (void)server(); }
};
[[maybe_unused]] ::testing::Environment* const kServerEnvironment =
    ::testing::AddGlobalTestEnvironment(new ServerEnvironment);

std::string fresh_schema() {
  static std::atomic<int> counter{0};
  return "t" + std::to_string(::getpid()) + "_" + std::to_string(++counter);
}

PostgresOptions options_for(const std::string& schema) {
  return PostgresOptions{.conninfo = server().conninfo(), .schema = schema};
}

std::int64_t index_of(std::string_view key) {
  return std::stoll(std::string(key.substr(key.find('-') + 1)));
}

// --- Child processes -------------------------------------------------------------------------

void signal_fd(int fd) {
  if (fd >= 0) {
    const char byte = 'r';
    (void)!::write(fd, &byte, 1);
    ::close(fd);
  }
}

// Consumes msg-0 .. msg-(n-1) through the transactional inbox in batches, one business row
// each, resuming a little before the committed offset (a broker redelivers its uncommitted
// tail).
int crash_child() {
  const std::int64_t n = std::stoll(env_or("IDEM_N", "0"));
  PostgresStore store(
      {.conninfo = env_or("IDEM_PG_CONNINFO", ""), .schema = env_or("IDEM_PG_SCHEMA", "idem")});
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
    const std::int64_t size = std::min<std::int64_t>(end - next, 1 + rng() % 16);
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
  PostgresStore store(
      {.conninfo = env_or("IDEM_PG_CONNINFO", ""), .schema = env_or("IDEM_PG_SCHEMA", "idem")});
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

// Re-executes this binary as a child with the given environment. The environment is built
// before fork(): only async-signal-safe calls happen in the child before exec.
pid_t spawn_child(const std::map<std::string, std::string>& env) {
  std::vector<std::string> entries;
  for (char** e = environ; *e != nullptr; ++e) entries.emplace_back(*e);
  for (const auto& [name, value] : env) entries.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (std::string& entry : entries) envp.push_back(entry.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execve(exe, argv, envp.data());
    ::_exit(127);
  }
  return pid;
}

int wait_exit_code(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

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
struct PostgresInboxFactory {
  using Store = PostgresStore;
  std::unique_ptr<Store> make() {
    auto store = std::make_unique<PostgresStore>(options_for(fresh_schema()));
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
#endif

}  // namespace

namespace idem::testing {
INSTANTIATE_TYPED_TEST_SUITE_P(Postgres, StoreConformance, PostgresStoreFactory);
#ifdef IDEM_TEST_HAVE_INBOX_CONFORMANCE
INSTANTIATE_TYPED_TEST_SUITE_P(Postgres, InboxConformance, PostgresInboxFactory);
#endif
}  // namespace idem::testing

namespace {

// --- Transactional inbox ---------------------------------------------------------------------

class PostgresInbox : public ::testing::Test {
 protected:
  PostgresInbox() : schema_(fresh_schema()), store_(options()) {
    store_.transaction([&](PostgresTx& tx) {
      tx.exec("CREATE TABLE " + cards_ + "(msg text NOT NULL, key bytea NOT NULL)");
    });
  }
  PostgresOptions options() { return options_for(schema_); }
  std::int64_t cards() { return raw().scalar("SELECT count(*) FROM " + cards_); }
  std::int64_t records() { return raw().scalar("SELECT count(*) FROM " + schema_ + ".idem_keys"); }
  RawDb& raw() {
    if (!raw_) raw_ = std::make_unique<RawDb>(server().conninfo());
    return *raw_;
  }

  std::string schema_;
  std::string cards_ = schema_ + ".cards";
  PostgresStore store_;
  std::unique_ptr<RawDb> raw_;
};

auto card_writer(int& runs, const std::string& table) {
  return [&runs, table](const Message& m, PostgresTx& tx) {
    ++runs;
    tx.exec("INSERT INTO " + table + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
  };
}

TEST_F(PostgresInbox, HandlerWritesAndTheRecordCommitTogether) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs, cards_));
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "card"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "card"}).outcome, Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "other"}).outcome, Outcome::conflict);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(cards(), 1);
}

// A one-shot latch between a handler and the test.
class Gate {
 public:
  void open() {
    std::lock_guard lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

TEST_F(PostgresInbox, TransactionControlThroughTheTxIsAConfigErrorAndNothingCommits) {
  const std::vector<std::string> refused{"COMMIT",
                                         "  /* a /* nested */ comment */ commit",
                                         "-- note\n END",
                                         "ROLLBACK",
                                         "rollback work",
                                         "ABORT",
                                         "BEGIN",
                                         "START TRANSACTION",
                                         "RELEASE SAVEPOINT idem_message",
                                         "PREPARE TRANSACTION 'x'",
                                         "COMMIT PREPARED 'x'",
                                         "ROLLBACK PREPARED 'x'"};
  for (const std::string& sql : refused) {
    IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
      tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
              PostgresBytes{m.key});
      tx.exec(sql);
    });
    try {
      consumer.consume({.key = "k-" + sql, .payload = "p"});
      ADD_FAILURE() << "accepted: " << sql;
    } catch (const idem::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("would end idem's transaction"), std::string::npos)
          << e.what();
    }
  }
  IdempotentConsumer querying(store_,
                              [](const Message&, PostgresTx& tx) { (void)tx.query("COMMIT"); });
  EXPECT_THROW(querying.consume({.key = "query", .payload = "p"}), idem::ConfigError);
  EXPECT_EQ(cards(), 0);
  EXPECT_EQ(records(), 0);

  // Savepoints of the handler's own, and rolling back to them, are fine.
  IdempotentConsumer own(store_, [&](const Message& m, PostgresTx& tx) {
    tx.exec("SAVEPOINT mine");
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES('undone', $1)", PostgresBytes{m.key});
    tx.exec("ROLLBACK TO SAVEPOINT mine");
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES('kept', $1)", PostgresBytes{m.key});
  });
  EXPECT_EQ(own.consume({.key = "own", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(raw().text("SELECT msg FROM " + cards_), "kept");
}

TEST_F(PostgresInbox, HandlerEndingTheTransactionThroughNativeHandleIsAConfigError) {
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
    PQclear(PQexec(tx.native_handle(), "ROLLBACK"));
  });
  EXPECT_THROW(consumer.consume({.key = "native", .payload = "p"}), idem::ConfigError);
  EXPECT_EQ(records(), 0);
  EXPECT_EQ(cards(), 0);
  int runs = 0;
  IdempotentConsumer fine(store_, card_writer(runs, cards_));
  EXPECT_EQ(fine.consume({.key = "after", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(cards(), 1);
}

TEST_F(PostgresInbox, QueryAndNativeHandleRunInTheMessagesTransaction) {
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) -> std::string {
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
    const std::int64_t seen =
        tx.query_int64("SELECT count(*) FROM " + cards_ + " WHERE key = $1", PostgresBytes{m.key})
            .value_or(-1);
    PGresult* result = PQexec(tx.native_handle(),
                              ("INSERT INTO " + cards_ + "(msg, key) VALUES('raw', 'r')").c_str());
    EXPECT_EQ(PQresultStatus(result), PGRES_COMMAND_OK) << PQresultErrorMessage(result);
    PQclear(result);
    if (m.key == "q-2") throw std::runtime_error("after writing through the native handle");
    return "seen " + std::to_string(seen);
  });
  std::vector<Message> batch{{.key = "q-1", .payload = "a"}, {.key = "q-2", .payload = "b"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[0].response, "seen 1");
  // The second message's savepoint opened before its handler ran (the native handle was
  // taken): its raw insert was rolled back with it.
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_EQ(cards(), 2);
  EXPECT_EQ(records(), 1);
  EXPECT_EQ(consumer.consume(batch[0]).response, "seen 1");
}

TEST_F(PostgresInbox, HandlerStatementsRunWithTheSessionsOwnTimeouts) {
  // The test server sets neither: the handler sees PostgreSQL's defaults, not idem's 10 s
  // statement_timeout and 200 ms lock_timeout.
  IdempotentConsumer consumer(store_, [](const Message&, PostgresTx& tx) -> std::string {
    PostgresRows rows = tx.query(
        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
        "current_setting('transaction_isolation')");
    return std::string(rows.text(0, 0)) + " " + std::string(rows.text(0, 1)) + " " +
           std::string(rows.text(0, 2));
  });
  EXPECT_EQ(consumer.consume({.key = "t", .payload = "p"}).response, "0 0 read committed");
  std::string seen;
  store_.transaction([&](PostgresTx& tx) {
    seen = tx.query("SELECT current_setting('statement_timeout')").text(0, 0);
  });
  EXPECT_EQ(seen, "0");
}

TEST_F(PostgresInbox, SecondWorkerOnAKeyHeldByAnOpenTransactionGetsInProgress) {
  Gate started, release;
  std::thread first([&] {
    IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
      tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
              PostgresBytes{m.key});
      started.open();
      release.wait();
    });
    EXPECT_EQ(consumer.consume({.key = "held", .payload = "p"}).outcome, Outcome::processed);
  });
  started.wait();
  int runs = 0;
  IdempotentConsumer second(store_, card_writer(runs, cards_));
  // No hang: lock_wait, then in_progress (not acked; the broker redelivers later).
  EXPECT_EQ(second.consume({.key = "held", .payload = "p"}).outcome, Outcome::in_progress);
  std::vector<Message> batch{{.key = "free-1", .payload = "p"},
                             {.key = "held", .payload = "p"},
                             {.key = "free-2", .payload = "p"}};
  std::vector<Result> results = second.consume_batch(batch);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::in_progress);
  EXPECT_EQ(results[2].outcome, Outcome::processed);
  // A claim (DedupStore mode) sees the same.
  EXPECT_EQ(store_.claim(ClaimRequest{.key = "held"}).status, ClaimStatus::in_progress);
  EXPECT_EQ(runs, 2);
  release.open();
  first.join();
  EXPECT_EQ(second.consume({.key = "held", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(runs, 2);
  EXPECT_EQ(cards(), 3);
}

TEST_F(PostgresInbox, WithAWaitASecondWorkerGetsTheFirstOnesResponseOnceItCommits) {
  Gate started, release;
  std::thread first([&] {
    IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
      tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
              PostgresBytes{m.key});
      started.open();
      release.wait();
      return std::string("card-9");
    });
    EXPECT_EQ(consumer.consume({.key = "held", .payload = "p"}).outcome, Outcome::processed);
  });
  started.wait();
  int runs = 0;
  IdempotentConsumer second(
      store_,
      [&](const Message& m, PostgresTx& tx) {
        ++runs;
        tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
                PostgresBytes{m.key});
      },
      idem::Options{.in_progress_wait = 60s});
  std::thread releaser([&] {
    std::this_thread::sleep_for(500ms);  // past lock_wait: the second has asked at least twice
    release.open();
  });
  Result r = second.consume({.key = "held", .payload = "p"});
  EXPECT_EQ(r.outcome, Outcome::duplicate);
  EXPECT_EQ(r.response, "card-9");
  releaser.join();
  first.join();
  EXPECT_EQ(runs, 0);
  EXPECT_EQ(cards(), 1);
}

TEST_F(PostgresInbox, AFailedPipelinedStatementRerunsTheBatchWithEachStatementAwaited) {
  store_.transaction([&](PostgresTx& tx) {
    tx.exec("CREATE UNIQUE INDEX ON " + cards_ + "(msg)");
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES('taken', 'x')");
  });
  std::map<std::string, int> runs;
  std::vector<std::string> seen_errors;
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
    ++runs[std::string(m.key)];
    try {
      tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
              PostgresBytes{m.key});
    } catch (const idem::PostgresError& e) {
      seen_errors.push_back(e.sqlstate());
      throw;
    }
  });
  std::vector<Message> batch{
      {.key = "a", .payload = "1"}, {.key = "b", .payload = "taken"}, {.key = "c", .payload = "3"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_EQ(results[2].outcome, Outcome::processed);
  // The pipelined run found the unique violation only at its commit: it was rolled back and
  // the batch ran again statement by statement, where b's handler saw the error itself.
  EXPECT_EQ(seen_errors, std::vector<std::string>{"23505"});
  EXPECT_EQ(runs["a"], 2);
  EXPECT_EQ(runs["b"], 2);
  EXPECT_EQ(runs["c"], 2);
  EXPECT_EQ(cards(), 3);  // taken, 1, 3: every effect once
  EXPECT_EQ(records(), 2);
  EXPECT_EQ(consumer.consume({.key = "b", .payload = "2"}).outcome, Outcome::processed);
}

TEST_F(PostgresInbox, HandlerSwallowingItsFailedStatementFailsTheCall) {
  // Awaited (query) and pipelined (exec, found at the commit, then awaited in the rerun).
  IdempotentConsumer querying(store_, [&](const Message& m, PostgresTx& tx) {
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
    try {
      (void)tx.query("SELECT 1/0");
    } catch (const idem::PostgresError& e) {
      EXPECT_EQ(e.sqlstate(), "22012");
    }
  });
  EXPECT_THROW(querying.consume({.key = "swallow-q", .payload = "p"}), idem::StoreUnavailable);
  IdempotentConsumer executing(store_, [&](const Message&, PostgresTx& tx) {
    try {
      tx.exec("SELECT 1/0");
    } catch (const idem::PostgresError&) {
    }
  });
  EXPECT_THROW(executing.consume({.key = "swallow-e", .payload = "p"}), idem::StoreUnavailable);
  EXPECT_EQ(records(), 0);
  EXPECT_EQ(cards(), 0);
}

TEST_F(PostgresInbox, OffsetsCommitWithTheBatch) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs, cards_));
  std::vector<Message> batch{{.key = "o-1", .payload = "p"}, {.key = "o-2", .payload = "p"}};
  const std::vector<idem::PartitionOffset> offsets{
      {.topic = "orders", .partition = 3, .next_offset = 154},
      {.topic = "orders", .partition = 4, .next_offset = 9},
      {.topic = "orders", .partition = 3, .next_offset = 155}};
  bool saved = false;
  consumer.consume_batch_with_offsets(batch, offsets, &saved);
  EXPECT_TRUE(saved);
  EXPECT_EQ(store_.committed_offset("orders", 3), 155);  // the last one given wins
  EXPECT_EQ(store_.committed_offset("orders", 4), 9);
  EXPECT_EQ(store_.committed_offset("orders", 5), std::nullopt);
  store_.transaction([](PostgresTx& tx) { tx.save_offset("payments", 0, 7); });
  const std::vector<idem::PartitionOffset> all = store_.committed_offsets();
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[2], (idem::PartitionOffset{.topic = "payments", .partition = 0, .next_offset = 7}));
  store_.save_offsets(std::vector<idem::PartitionOffset>{{.topic = "payments", .next_offset = 8}});
  EXPECT_EQ(store_.committed_offset("payments", 0), 8);
}

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
  EXPECT_EQ(store.stats_summary().records, 26u);
  other.exec("SELECT pg_advisory_unlock" + lock);

  EXPECT_EQ(store.purge_expired(5), 5u);
  EXPECT_EQ(store.purge_expired(), 20u);  // steps of purge_batch = 10
  EXPECT_EQ(store.purge_expired_records(100), 0u);
  const idem::StoreStats stats = store.stats_summary();
  EXPECT_EQ(stats.records, 1u);
  EXPECT_EQ(stats.in_progress, 1u);
}

TEST(PostgresPurge, AutomaticStepRidesOnWritesEveryIntervalAndCatchesUp) {
  PostgresOptions options = options_for(fresh_schema());
  options.purge_interval = 600ms;
  options.purge_batch = 4;
  PostgresStore store(options);
  for (int i = 0; i < 10; ++i) store.claim(expiring("first-" + std::to_string(i), 1ms));
  std::this_thread::sleep_for(650ms);
  // The interval has passed: a write purges a step of 4; a full step makes the next write
  // purge again, until a step comes back short.
  store.claim(expiring("trigger-1", 60s));
  EXPECT_EQ(store.stats_summary().records, 7u);
  store.claim(expiring("trigger-2", 60s));
  EXPECT_EQ(store.stats_summary().records, 4u);
  store.claim(expiring("trigger-3", 60s));
  EXPECT_EQ(store.stats_summary().records, 3u);
  // Caught up, and within the interval: no purge.
  for (int i = 0; i < 5; ++i) store.claim(expiring("second-" + std::to_string(i), 1ms));
  std::this_thread::sleep_for(20ms);
  store.claim(expiring("trigger-4", 60s));
  EXPECT_EQ(store.stats_summary().records, 9u);
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
  const idem::StoreStats stats = store.stats_summary();
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
  while (store.stats().waiting < n) {
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
  const idem::PostgresStoreStats stats = store.stats();
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
  EXPECT_EQ(store.stats().waits_woken, 1u);
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
  EXPECT_EQ(store.stats().waits_settled, 3u);
  EXPECT_EQ(store.stats().waits_woken, 0u);
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
  const idem::PostgresStoreStats stats = store.stats();
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
  const idem::PostgresStoreStats stats = store.stats();
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
  EXPECT_EQ(store.stats().waits_woken, 2u);
  EXPECT_EQ(store.stats().wait_fallbacks, 0u);
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
  EXPECT_EQ(store.stats().waits_woken, 1u);
  EXPECT_EQ(store.stats().waits_timed_out, 0u);
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
  EXPECT_EQ(store.stats().wait_fallbacks, 0u);
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

TEST(PostgresProcesses, FourProcessesOfFourThreadsRunEachHandlerOnce) {
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

}  // namespace
