// idem::PostgresStore's transactional inbox against a real PostgreSQL server: handler writes and
// the record commit together, transaction control through the tx is refused, pipelined
// statements, a key held by an open transaction, offsets.

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
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "../src/postgres/connection.hpp"  // kMaxUserStatements
#include "idem/postgres.hpp"
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

  // Consumes key through the inbox on another thread: its handler writes a card, opens
  // started and keeps the transaction open until release opens; then it commits, processed.
  std::thread hold_open(std::string key, Gate& started, Gate& release,
                        std::optional<std::string> response = std::nullopt) {
    return std::thread([this, key, &started, &release, response] {
      IdempotentConsumer consumer(
          store_, [&](const Message& m, PostgresTx& tx) -> std::optional<std::string> {
            tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
                    PostgresBytes{m.key});
            started.open();
            release.wait();
            return response;
          });
      EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, Outcome::processed);
    });
  }

  // A handler that inserts a card and then runs sql: the call throws ConfigError saying why.
  void expect_refused(const std::string& sql, std::string_view why) {
    IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
      tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
              PostgresBytes{m.key});
      tx.exec(sql);
    });
    try {
      consumer.consume({.key = "k-" + sql, .payload = "p"});
      ADD_FAILURE() << "accepted: " << sql;
    } catch (const idem::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
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
                                         "ROLLBACK PREPARED 'x'",
                                         " ; COMMIT"};
  for (const std::string& sql : refused) expect_refused(sql, "would end idem's transaction");
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

TEST_F(PostgresInbox, SessionSettingsAreRefusedThroughTheTxSetLocalIsFine) {
  // They would outlive the message on a pooled connection: reach the next handler, and
  // idem's claims (lock_timeout 0 would let a claim wait for a whole handler).
  for (const std::string sql :
       {"SET lock_timeout = 0", "set session statement_timeout to 0", "SET search_path TO public",
        "RESET ALL", "reset lock_timeout", "SET ROLE NONE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION "
        "ISOLATION LEVEL SERIALIZABLE",
        "SET TIME ZONE 'UTC'", ";SET lock_timeout = 0"}) {
    expect_refused(sql, "would change the session");
  }
  for (const std::string sql :
       {"SET TRANSACTION READ ONLY", "set transaction isolation level serializable"}) {
    expect_refused(sql, "would change idem's transaction");
  }
  // transaction() work gets a PostgresTx too.
  EXPECT_THROW(store_.transaction([](PostgresTx& tx) { tx.exec("SET search_path TO public"); }),
               idem::ConfigError);
  EXPECT_THROW(store_.transaction([](PostgresTx& tx) { tx.exec("DEALLOCATE ALL"); }),
               idem::ConfigError);
  EXPECT_EQ(cards(), 0);
  EXPECT_EQ(records(), 0);
  std::vector<std::string> seen;
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
    seen.emplace_back(tx.query("SELECT current_setting('search_path')").text(0, 0));
    if (m.payload == "set") {
      tx.exec("SET/* mine */LOCAL search_path TO pg_catalog");
      tx.exec("SET CONSTRAINTS ALL DEFERRED");
      seen.emplace_back(tx.query("SELECT current_setting('search_path')").text(0, 0));
    }
  });
  EXPECT_EQ(consumer.consume({.key = "local-1", .payload = "set"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "local-2", .payload = "p"}).outcome, Outcome::processed);
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[1], "pg_catalog");
  EXPECT_EQ(seen[2], seen[0]);  // gone with the commit
}

TEST_F(PostgresInbox, DeallocateAllIsRefusedThroughTheTxAndCostsOnlyOneCallThroughTheRawHandle) {
  // Through the tx: it would drop idem's prepared statements too, so it is refused like COMMIT.
  for (const std::string sql :
       {"DEALLOCATE ALL", "deallocate prepare all", "/* x */ DEALLOCATE ALL"}) {
    expect_refused(sql, "would drop idem's prepared statements");
  }
  EXPECT_EQ(cards(), 0);
  EXPECT_EQ(records(), 0);
  // A handler's own statements are its own to deallocate.
  IdempotentConsumer own(store_, [&](const Message&, PostgresTx& tx) {
    tx.exec("PREPARE mine AS SELECT 1");
    tx.exec("DEALLOCATE mine");
  });
  EXPECT_EQ(own.consume({.key = "own", .payload = "p"}).outcome, Outcome::processed);

  // A handler's EXECUTE of a name of its own that does not exist is its own error: the
  // connection stays (the same backend serves the next call).
  std::vector<std::int64_t> pids;
  IdempotentConsumer typo(store_, [&](const Message& m, PostgresTx& tx) {
    pids.push_back(tx.query("SELECT pg_backend_pid()").int64(0, 0));
    if (m.payload == "typo") tx.exec("EXECUTE no_such_statement");
  });
  EXPECT_EQ(typo.consume({.key = "typo", .payload = "typo"}).outcome, Outcome::failed);
  EXPECT_EQ(typo.consume({.key = "after-typo", .payload = "p"}).outcome, Outcome::processed);
  ASSERT_GE(pids.size(), 2u);
  EXPECT_EQ(pids.front(), pids.back());

  // Through the raw handle idem cannot see it: the next call on that connection finds idem's
  // statements missing, fails as unavailable (nothing recorded, nothing acked) and says why;
  // the connection is closed, and the call after it runs on a fresh one.
  PostgresOptions one = options();
  one.pool_size = 1;
  PostgresStore store(one);
  int runs = 0;
  std::vector<std::int64_t> backends;
  IdempotentConsumer native(store, [&](const Message& m, PostgresTx& tx) {
    ++runs;
    backends.push_back(tx.query("SELECT pg_backend_pid()").int64(0, 0));
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
    if (m.payload == "deallocate") PQclear(PQexec(tx.native_handle(), "DEALLOCATE ALL"));
  });
  EXPECT_EQ(native.consume({.key = "n-1", .payload = "deallocate"}).outcome, Outcome::processed);
  try {
    native.consume({.key = "n-2", .payload = "p"});
    ADD_FAILURE() << "a call without idem's statements succeeded";
  } catch (const idem::StoreUnavailable& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("SQLSTATE 26000"), std::string::npos) << what;
    EXPECT_NE(what.find("DEALLOCATE ALL"), std::string::npos) << what;
    EXPECT_NE(what.find("do not ack"), std::string::npos) << what;
  }
  EXPECT_EQ(records(), 3);  // own, after-typo and n-1
  EXPECT_EQ(native.consume({.key = "n-2", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(records(), 4);
  EXPECT_EQ(cards(), 2);
  EXPECT_EQ(runs, 2);  // the failed call never reached its handler: BEGIN was refused
  ASSERT_EQ(backends.size(), 2u);
  EXPECT_NE(backends.front(), backends.back());
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
  std::thread first = hold_open("held", started, release);
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
  std::thread first = hold_open("held", started, release, "card-9");
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

}  // namespace

// --- The optimistic first attempt and the handlers' prepared statements ----------------------
// (docs/stores/postgres.md, "Batches, savepoints and reruns")

TEST_F(PostgresInbox, AFailingHandlerInABatchRerunsTheOnesBeforeItButNeverItself) {
  std::map<std::string, int> runs;
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
    ++runs[std::string(m.key)];
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
    if (m.key == "b") throw std::runtime_error("card service down");
  });
  std::vector<Message> batch{
      {.key = "a", .payload = "1"}, {.key = "b", .payload = "2"}, {.key = "c", .payload = "3"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  ASSERT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_THROW(std::rethrow_exception(results[1].error), std::runtime_error);
  EXPECT_EQ(results[2].outcome, Outcome::processed);
  // The first attempt ran a and b without savepoints and was rolled back at b's failure; the
  // rerun, with a savepoint per message, ran a again, settled b with its first error, ran c.
  EXPECT_EQ(runs["a"], 2);
  EXPECT_EQ(runs["b"], 1);
  EXPECT_EQ(runs["c"], 1);
  EXPECT_EQ(cards(), 2);
  EXPECT_EQ(records(), 2);
  EXPECT_EQ(store_.inbox_reruns(), 1u);
}

TEST_F(PostgresInbox, ALoneFailingMessageRunsItsHandlerOnceAndLeavesNoRecord) {
  int runs = 0;
  bool fail = true;
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
    ++runs;
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
    if (fail) throw std::runtime_error("card service down");
  });
  const Result failed = consumer.consume({.key = "lone", .payload = "p"});
  EXPECT_EQ(failed.outcome, Outcome::failed);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(store_.inbox_reruns(), 0u);
  EXPECT_EQ(records(), 0);
  EXPECT_EQ(cards(), 0);
  fail = false;
  const Result retried = consumer.consume({.key = "lone", .payload = "p"});
  EXPECT_EQ(retried.outcome, Outcome::processed);
  EXPECT_GT(retried.fencing_token, failed.fencing_token);  // its token never comes back
  EXPECT_EQ(cards(), 1);
}

TEST_F(PostgresInbox, AtMostOnceBatchesNeverRunAHandlerTwice) {
  std::map<std::string, int> runs;
  IdempotentConsumer consumer(
      store_,
      [&](const Message& m, PostgresTx& tx) {
        ++runs[std::string(m.key)];
        tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload,
                PostgresBytes{m.key});
        if (m.key == "b") throw std::runtime_error("card service down");
      },
      idem::Options{.mark = idem::Mark::before_processing});
  std::vector<Message> batch{
      {.key = "a", .payload = "1"}, {.key = "b", .payload = "2"}, {.key = "c", .payload = "3"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  for (const char* key : {"a", "b", "c"}) EXPECT_EQ(runs[key], 1) << key;
  EXPECT_EQ(cards(), 2);
  EXPECT_EQ(records(), 3);  // b's record is kept: at most once
  EXPECT_EQ(store_.inbox_reruns(), 0u);
}

TEST_F(PostgresInbox, HandlerStatementsArePreparedOncePerConnectionAndTypeSignature) {
  std::vector<std::int64_t> prepared;
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
    const std::string insert = "INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)";
    tx.exec(insert, m.payload, PostgresBytes{m.key});
    // The same SQL with a text parameter where the first had bytea: a statement of its own
    // (the server infers other parameter types), not a type mismatch.
    tx.exec(insert, m.payload, std::string("text-") + std::string(m.key));
    PostgresRows rows =
        tx.query("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'idem\\_user\\_%'");
    prepared.push_back(rows.int64(0, 0));
  });
  for (int round = 0; round < 3; ++round) {
    std::vector<std::string> keys;
    for (int i = 0; i < 4; ++i) keys.push_back("prep-" + std::to_string(round * 4 + i));
    std::vector<Message> batch;
    for (const std::string& key : keys) batch.push_back({.key = key, .payload = "p"});
    for (const Result& r : consumer.consume_batch(batch)) EXPECT_EQ(r.outcome, Outcome::processed);
  }
  ASSERT_EQ(prepared.size(), 12u);
  // Two inserts and the query: three statements, prepared with their first use only.
  EXPECT_EQ(prepared.front(), 3);
  EXPECT_EQ(prepared.back(), 3);
  EXPECT_EQ(cards(), 24);
}

TEST_F(PostgresInbox, APreparedStatementThatWentStaleRerunsTheCallAsText) {
  int runs = 0;
  std::vector<std::size_t> widths;
  std::vector<std::int64_t> backends;
  IdempotentConsumer consumer(store_, [&](const Message& m, PostgresTx& tx) {
    ++runs;
    backends.push_back(tx.query("SELECT pg_backend_pid()").int64(0, 0));
    PostgresRows rows = tx.query("SELECT * FROM " + cards_ + " LIMIT 1");
    widths.push_back(static_cast<std::size_t>(rows.columns()));
    tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES($1, $2)", m.payload, PostgresBytes{m.key});
  });
  EXPECT_EQ(consumer.consume({.key = "stale-1", .payload = "p"}).outcome, Outcome::processed);
  raw().exec("ALTER TABLE " + cards_ + " ADD COLUMN extra int");
  // The cached plan of SELECT * no longer fits (0A000): not the handler's error.
  EXPECT_EQ(consumer.consume({.key = "stale-2", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "stale-3", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(widths.back(), 3u);
  EXPECT_EQ(cards(), 3);
  EXPECT_EQ(records(), 3);
  EXPECT_EQ(store_.inbox_reruns(), 1u);
  // The connection that held the stale statement was replaced.
  EXPECT_NE(backends.front(), backends.back());
}

TEST_F(PostgresInbox, AtMost256HandlerStatementsArePreparedPerConnectionTheRestGoAsText) {
  const int distinct = static_cast<int>(idem::detail::pg::Connection::kMaxUserStatements) + 20;
  std::int64_t prepared = -1;
  IdempotentConsumer consumer(store_, [&](const Message&, PostgresTx& tx) {
    for (int i = 0; i < distinct; ++i) tx.exec("SELECT " + std::to_string(i));
    prepared = tx.query(
                     "SELECT count(*) FROM pg_prepared_statements "
                     "WHERE name LIKE 'idem\\_user\\_%'")
                   .int64(0, 0);
  });
  EXPECT_EQ(consumer.consume({.key = "many", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(prepared, static_cast<std::int64_t>(idem::detail::pg::Connection::kMaxUserStatements));
}

// --- Speculative claims (PostgresOptions::speculative_claims) ----------------------------------

class PostgresSpeculativeInbox : public PostgresInbox {
 protected:
  PostgresSpeculativeInbox() : speculative_(speculative_options()) {}
  PostgresOptions speculative_options() {
    PostgresOptions o = options();
    o.speculative_claims = true;
    return o;
  }
  PostgresStore speculative_;
};

TEST_F(PostgresSpeculativeInbox, ANewKeyIsProcessedWithItsTokenAndNoRerun) {
  int runs = 0;
  IdempotentConsumer consumer(speculative_, [&](const Message& m, PostgresTx& tx) -> std::string {
    card_writer(runs, cards_)(m, tx);
    return "card-" + std::string(m.key);
  });
  const Result first = consumer.consume({.key = "s-1", .payload = "p"});
  const Result second = consumer.consume({.key = "s-2", .payload = "p"});
  EXPECT_EQ(first.outcome, Outcome::processed);
  EXPECT_EQ(second.outcome, Outcome::processed);
  EXPECT_GT(first.fencing_token, 0u);
  EXPECT_GT(second.fencing_token, first.fencing_token);
  EXPECT_EQ(speculative_.inbox_reruns(), 0u);
  std::optional<idem::RecordInfo> info = speculative_.inspect("s-1");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
  EXPECT_EQ(info->token, first.fencing_token);
  EXPECT_EQ(consumer.consume({.key = "s-1", .payload = "p"}).response, "card-s-1");
  EXPECT_EQ(runs, 3);
  EXPECT_EQ(cards(), 2);
}

TEST_F(PostgresSpeculativeInbox, ADuplicatesHandlerRunsButNoneOfItsWritesCommit) {
  int runs = 0;
  IdempotentConsumer consumer(speculative_, card_writer(runs, cards_));
  ASSERT_EQ(consumer.consume({.key = "dup", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "dup", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "dup", .payload = "other"}).outcome, Outcome::conflict);
  // The handler ran for the duplicate and the conflict (that is the speculation), the
  // rerun claimed them first and did not run it again; their card inserts were rolled back.
  EXPECT_EQ(runs, 3);
  EXPECT_EQ(speculative_.inbox_reruns(), 2u);
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(records(), 1);
}

TEST_F(PostgresSpeculativeInbox, AFailingHandlerOfANewKeyFailsOnceAndOfADuplicateIsADuplicate) {
  int runs = 0;
  bool fail = true;
  IdempotentConsumer consumer(speculative_, [&](const Message& m, PostgresTx& tx) {
    card_writer(runs, cards_)(m, tx);
    if (fail) throw std::runtime_error("card service down");
  });
  const Result failed = consumer.consume({.key = "f", .payload = "p"});
  EXPECT_EQ(failed.outcome, Outcome::failed);
  ASSERT_TRUE(failed.error);
  EXPECT_THROW(std::rethrow_exception(failed.error), std::runtime_error);
  EXPECT_EQ(runs, 1);  // the rerun settled it failed with the first error
  EXPECT_EQ(records(), 0);
  EXPECT_EQ(cards(), 0);
  fail = false;
  const Result processed = consumer.consume({.key = "f", .payload = "p"});
  EXPECT_EQ(processed.outcome, Outcome::processed);
  EXPECT_GT(processed.fencing_token, failed.fencing_token);
  fail = true;
  // Failing for a key that is already done: the outcome is the key's, not the handler's.
  EXPECT_EQ(consumer.consume({.key = "f", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(runs, 3);
  EXPECT_EQ(cards(), 1);
}

TEST_F(PostgresSpeculativeInbox, AKeyHeldByAnOpenTransactionIsInProgressAndStaysUnwritten) {
  Gate started, release;
  std::thread first = hold_open("held", started, release);
  started.wait();
  int runs = 0;
  IdempotentConsumer second(speculative_, card_writer(runs, cards_));
  EXPECT_EQ(second.consume({.key = "held", .payload = "p"}).outcome, Outcome::in_progress);
  release.open();
  first.join();
  EXPECT_EQ(second.consume({.key = "held", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(cards(), 1);
}

TEST_F(PostgresSpeculativeInbox, AnExpiredRecordIsTakenOverWithALargerToken) {
  int runs = 0;
  IdempotentConsumer consumer(speculative_, card_writer(runs, cards_),
                              idem::Options{.retention = 300ms});
  const Result first = consumer.consume({.key = "old", .payload = "p"});
  ASSERT_EQ(first.outcome, Outcome::processed);
  std::this_thread::sleep_for(500ms);  // the server's clock: retention has passed
  const Result again = consumer.consume({.key = "old", .payload = "p"});
  EXPECT_EQ(again.outcome, Outcome::processed);
  EXPECT_GT(again.fencing_token, first.fencing_token);
  EXPECT_EQ(cards(), 2);  // retention over: a redelivery is new work
  EXPECT_EQ(records(), 1);
}

TEST_F(PostgresSpeculativeInbox, AHandlerThatCatchesTheMissStillCommitsNothing) {
  int runs = 0;
  std::vector<std::int64_t> seen;
  IdempotentConsumer consumer(speculative_, [&](const Message& m, PostgresTx& tx) {
    card_writer(runs, cards_)(m, tx);
    try {
      // Waits for the answers: for a key that is not new this learns the miss.
      seen.push_back(tx.query_int64("SELECT count(*) FROM " + cards_).value_or(-1));
    } catch (...) {
      seen.push_back(-2);
    }
    try {
      tx.exec("INSERT INTO " + cards_ + "(msg, key) VALUES('extra', 'x')");
    } catch (...) {
      seen.push_back(-3);
    }
  });
  EXPECT_EQ(consumer.consume({.key = "q", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "q", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(seen, (std::vector<std::int64_t>{1, -2, -3}));
  EXPECT_EQ(cards(), 2);  // the first run's card and its extra row
}

TEST_F(PostgresSpeculativeInbox, BatchesClaimAsUsual) {
  int runs = 0;
  IdempotentConsumer consumer(speculative_, card_writer(runs, cards_));
  std::vector<Message> batch{{.key = "b-1", .payload = "p"}, {.key = "b-2", .payload = "p"}};
  ASSERT_EQ(consumer.consume({.key = "b-1", .payload = "p"}).outcome, Outcome::processed);
  std::vector<Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(results[0].outcome, Outcome::duplicate);
  EXPECT_EQ(results[1].outcome, Outcome::processed);
  EXPECT_EQ(runs, 2);  // a batch never runs a duplicate's handler
  EXPECT_EQ(speculative_.inbox_reruns(), 0u);
}
