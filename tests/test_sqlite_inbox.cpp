// idem::SqliteStore's transactional inbox: handler writes and the dedup record commit together,
// batches with savepoints, offsets in the same transaction, the operator hooks on an inbox, and
// what happens to offsets and writes when a batch partly fails or SQLite rolls back.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/sqlite.hpp"
#include "support/sanitized.hpp"
#include "support/sqlite_raw_db.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace std::chrono_literals;
using idem::ClaimRequest;
using idem::ClaimStatus;
using idem::IdempotentConsumer;
using idem::Message;
using idem::Outcome;
using idem::Result;
using idem::SqliteBlob;
using idem::SqliteOptions;
using idem::SqliteStore;
using idem::SqliteTx;

using idem::test_support::sqlite::RawDb;
using idem::test_support::sqlite::TempDir;
using idem::testing::kSanitized;

// --- Transactional inbox ---------------------------------------------------------------------

class SqliteInbox : public ::testing::Test {
 protected:
  SqliteInbox() : store_(dir_.file("inbox.db"), options()) {
    store_.transaction(
        [](SqliteTx& tx) { tx.exec("CREATE TABLE cards(msg TEXT NOT NULL, key BLOB NOT NULL)"); });
  }
  SqliteOptions options() { return {.synchronous = idem::SqliteSync::normal, .clock = &clock_}; }
  std::int64_t cards() { return RawDb(dir_.file("inbox.db")).scalar("SELECT count(*) FROM cards"); }
  std::int64_t records() {
    return RawDb(dir_.file("inbox.db")).scalar("SELECT count(*) FROM idem_keys");
  }

  TempDir dir_;
  idem::ManualClock clock_;
  SqliteStore store_;
};

auto card_writer(int& runs) {
  return [&runs](const Message& m, SqliteTx& tx) {
    ++runs;
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
  };
}

TEST_F(SqliteInbox, HandlerWritesAndTheRecordCommitTogether) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "card"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "card"}).outcome, Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "other"}).outcome, Outcome::conflict);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(cards(), 1);
}

TEST_F(SqliteInbox, HandlerThrowingAfterItsInsertLeavesNoTrace) {
  int attempts = 0;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
    if (++attempts == 1) throw std::runtime_error("card printer jammed");
  });
  Result failed = consumer.consume({.key = "pay-2", .payload = "card"});
  EXPECT_EQ(failed.outcome, Outcome::failed);
  ASSERT_TRUE(failed.error);
  EXPECT_THROW(std::rethrow_exception(failed.error), std::runtime_error);
  EXPECT_EQ(cards(), 0);    // the business row was rolled back
  EXPECT_EQ(records(), 0);  // and so was the dedup record
  Result retried = consumer.consume({.key = "pay-2", .payload = "card"});
  EXPECT_EQ(retried.outcome, Outcome::processed);
  EXPECT_GT(retried.fencing_token, failed.fencing_token);  // tokens rise across attempts
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(attempts, 2);
}

TEST_F(SqliteInbox, RethrowOptionLetsTheHandlerErrorOutWithNothingRecorded) {
  IdempotentConsumer consumer(
      store_,
      [](const Message& m, SqliteTx& tx) {
        tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
        throw std::logic_error("bug");
      },
      idem::Options{.rethrow_handler_errors = true});
  EXPECT_THROW(consumer.consume({.key = "k", .payload = "p"}), std::logic_error);
  EXPECT_EQ(cards(), 0);
  EXPECT_EQ(records(), 0);
}

TEST_F(SqliteInbox, ResponseIsReplayedToDuplicates) {
  IdempotentConsumer consumer(store_, [](const Message& m, SqliteTx&) {
    return std::string("card-for-") + std::string(m.key);
  });
  EXPECT_EQ(consumer.consume({.key = "k", .payload = "p"}).response, "card-for-k");
  Result again = consumer.consume({.key = "k", .payload = "p"});
  EXPECT_EQ(again.outcome, Outcome::duplicate);
  EXPECT_EQ(again.response, "card-for-k");
}

TEST_F(SqliteInbox, BinaryKeysWithNulAreDistinct) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  const std::string keys[] = {std::string("a\0b", 3), std::string("a\0c", 3), std::string("a"),
                              std::string("\0", 1), std::string("\xff\x00\xfe", 3)};
  for (const std::string& key : keys) {
    EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, Outcome::processed);
  }
  for (const std::string& key : keys) {
    EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, Outcome::duplicate);
  }
  EXPECT_EQ(runs, 5);
  RawDb raw(dir_.file("inbox.db"));
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM idem_keys WHERE length(key) = 3"), 3);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM idem_keys WHERE typeof(key) = 'blob'"), 5);
}

TEST_F(SqliteInbox, BeforeProcessingKeepsTheRecordButNotTheFailedWrites) {
  IdempotentConsumer consumer(
      store_,
      [](const Message& m, SqliteTx& tx) {
        tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
        if (m.key == "crashy") throw std::runtime_error("crash mid-handler");
      },
      idem::Options{.mark = idem::Mark::before_processing});
  EXPECT_EQ(consumer.consume({.key = "crashy", .payload = "p"}).outcome, Outcome::failed);
  EXPECT_EQ(consumer.consume({.key = "crashy", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "fine", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(records(), 2);
}

TEST_F(SqliteInbox, BatchRollsBackOnlyTheFailingMessage) {
  std::map<std::string, int> runs;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    ++runs[std::string(m.key)];
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
    if (m.key == "bad") throw std::runtime_error("boom");
    return "r-" + std::string(m.key);
  });
  std::vector<Message> batch{{.key = "a", .payload = "1"},
                             {.key = "bad", .payload = "2"},
                             {.key = "c", .payload = "3"},
                             {.key = "a", .payload = "1"},
                             {.key = "c", .payload = "changed"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  ASSERT_EQ(results.size(), 5u);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_TRUE(results[1].error);
  EXPECT_EQ(results[2].outcome, Outcome::processed);
  EXPECT_EQ(results[3].outcome, Outcome::duplicate);
  EXPECT_EQ(results[3].response, "r-a");
  EXPECT_EQ(results[4].outcome, Outcome::conflict);
  EXPECT_EQ(runs["a"], 1);
  RawDb raw(dir_.file("inbox.db"));
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards"), 2);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE key = x'626164'"), 0);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM idem_keys WHERE key = x'626164'"), 0);
  // The failed one is redelivered and processed.
  runs.clear();
  std::vector<Message> retry{{.key = "bad", .payload = "2"}};
  EXPECT_EQ(consumer.consume_batch(retry)[0].outcome, Outcome::failed);
  EXPECT_EQ(runs["bad"], 1);
}

// The message savepoint opens on the handler's first statement. Every way a handler can write
// must still be covered: exec/prepare, a statement stepped through its native handle, the
// connection's native handle, and a sqlite3* kept from an earlier message's handler.
TEST_F(SqliteInbox, EveryWayAHandlerWritesIsRolledBackWhenItFails) {
  sqlite3* kept = nullptr;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    const std::string key(m.key);
    if (key == "quiet") return;  // writes nothing: no savepoint is opened
    if (key == "quiet-fails") throw std::runtime_error("fails before writing");
    if (key.starts_with("stmt")) {
      idem::SqliteStatement insert = tx.prepare("INSERT INTO cards(msg, key) VALUES('stmt', ?1)");
      insert.bind_blob(1, m.key);
      ASSERT_EQ(sqlite3_step(insert.native_handle()), SQLITE_DONE);
    } else if (key.starts_with("raw")) {
      kept = tx.native_handle();
      ASSERT_EQ(sqlite3_exec(kept, "INSERT INTO cards(msg, key) VALUES('raw', x'00')", nullptr,
                             nullptr, nullptr),
                SQLITE_OK);
    } else if (key.starts_with("kept")) {
      // No call on tx at all: the handle of an earlier message's handler.
      ASSERT_EQ(sqlite3_exec(kept, "INSERT INTO cards(msg, key) VALUES('kept', x'01')", nullptr,
                             nullptr, nullptr),
                SQLITE_OK);
    } else {
      tx.exec("INSERT INTO cards(msg, key) VALUES('exec', ?1)", SqliteBlob{m.key});
    }
    if (key.ends_with("-fails")) throw std::runtime_error("fails after writing");
  });
  std::vector<Message> batch{
      {.key = "quiet", .payload = "p"},     {.key = "quiet-fails", .payload = "p"},
      {.key = "exec", .payload = "p"},      {.key = "exec-fails", .payload = "p"},
      {.key = "stmt", .payload = "p"},      {.key = "stmt-fails", .payload = "p"},
      {.key = "raw", .payload = "p"},       {.key = "raw-fails", .payload = "p"},
      {.key = "kept-fails", .payload = "p"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  ASSERT_EQ(results.size(), batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const bool fails = std::string_view(batch[i].key).ends_with("-fails");
    EXPECT_EQ(results[i].outcome, fails ? Outcome::failed : Outcome::processed) << batch[i].key;
  }
  RawDb raw(dir_.file("inbox.db"));
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'exec'"), 1);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'stmt'"), 1);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'raw'"), 1);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'kept'"), 0);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards"), 3);
  EXPECT_EQ(records(), 4);  // quiet, exec, stmt, raw; the failed ones left nothing behind
  // A handler that writes nothing still commits its record.
  EXPECT_EQ(consumer.consume({.key = "quiet", .payload = "p"}).outcome, Outcome::duplicate);
}

TEST_F(SqliteInbox, OffsetsCommitWithTheBatchAndReadBack) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  EXPECT_FALSE(store_.committed_offset("orders", 0).has_value());
  std::vector<Message> batch{{.key = "o-152", .payload = "x"}, {.key = "o-153", .payload = "y"}};
  const std::vector<idem::PartitionOffset> offsets{
      {.topic = "orders", .partition = 1, .next_offset = 154},
      {.topic = "orders", .partition = 0, .next_offset = 7}};
  for (const Result& r : idem::consume_batch_with_offsets(consumer, batch, offsets)) {
    EXPECT_EQ(r.outcome, Outcome::processed);
  }
  EXPECT_EQ(store_.committed_offset("orders", 1), 154);
  EXPECT_EQ(store_.committed_offset("orders", 0), 7);
  EXPECT_FALSE(store_.committed_offset("orders", 2).has_value());
  store_.save_offsets(
      std::vector<idem::PartitionOffset>{{.topic = "audit", .partition = 3, .next_offset = 1}});
  {
    SqliteStore reopened(dir_.file("inbox.db"), options());
    std::vector<idem::PartitionOffset> all = reopened.committed_offsets();
    ASSERT_EQ(all.size(), 3u);
    EXPECT_EQ(all[0].topic, "audit");
    EXPECT_EQ(all[1].topic, "orders");
    EXPECT_EQ(all[1].partition, 0);
    EXPECT_EQ(all[2].partition, 1);
    EXPECT_EQ(all[2].next_offset, 154);
    reopened.transaction([](SqliteTx& tx) {
      EXPECT_EQ(tx.committed_offset("orders", 1), 154);
      tx.save_offset("orders", 1, 160);
    });
  }
  EXPECT_EQ(store_.committed_offset("orders", 1), 160);
  EXPECT_EQ(runs, 2);
}

TEST_F(SqliteInbox, ConfigErrorWhenTheHandlerReentersTheStoreOrEndsTheTransaction) {
  // Misuse is not a handler failure: the ConfigError escapes and nothing commits.
  IdempotentConsumer reenter(store_,
                             [&](const Message& m, SqliteTx&) { store_.claim({.key = m.key}); });
  EXPECT_THROW(reenter.consume({.key = "k1", .payload = "p"}), idem::ConfigError);
  EXPECT_FALSE(store_.inspect("k1").has_value());

  IdempotentConsumer commits(store_, [](const Message&, SqliteTx& tx) {
    sqlite3_exec(tx.native_handle(), "COMMIT", nullptr, nullptr, nullptr);
  });
  EXPECT_THROW(commits.consume({.key = "k2", .payload = "p"}), idem::ConfigError);
  EXPECT_FALSE(store_.inspect("k2").has_value());

  // Through the helper, every spelling of ending the transaction is refused before it runs.
  for (const char* sql : {"COMMIT", "ROLLBACK", "END", "BEGIN", "commit transaction",
                          "RELEASE idem_message", "ROLLBACK TO idem_message"}) {
    IdempotentConsumer helper(store_, [&](const Message&, SqliteTx& tx) {
      tx.exec("INSERT INTO cards(msg, key) VALUES('x', ?1)", SqliteBlob{"k3"});
      tx.exec(sql);
    });
    EXPECT_THROW(helper.consume({.key = "k3", .payload = "p"}), idem::ConfigError) << sql;
    EXPECT_FALSE(store_.inspect("k3").has_value()) << sql;
  }
  store_.transaction([](SqliteTx& tx) {
    EXPECT_EQ(tx.query_int64("SELECT count(*) FROM cards WHERE msg = 'x'"), 0);
    EXPECT_THROW(tx.exec("COMMIT"), idem::ConfigError);
  });
  // A savepoint of the handler's own is fine.
  IdempotentConsumer own(store_, [&](const Message&, SqliteTx& tx) {
    tx.exec("SAVEPOINT mine");
    tx.exec("INSERT INTO cards(msg, key) VALUES('y', ?1)", SqliteBlob{"k4"});
    tx.exec("ROLLBACK TO mine");
    tx.exec("RELEASE mine");
  });
  EXPECT_EQ(own.consume({.key = "k4", .payload = "p"}).outcome, Outcome::processed);
}

TEST_F(SqliteInbox, StatementHelpersReportBadSqlClearly) {
  store_.transaction([](SqliteTx& tx) {
    EXPECT_EQ(tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", "m", SqliteBlob{"k"}), 1);
    EXPECT_EQ(tx.query_int64("SELECT count(*) FROM cards WHERE msg = ?1", std::string("m")), 1);
    EXPECT_EQ(tx.query_int64("SELECT NULL"), std::nullopt);
    idem::SqliteStatement s = tx.prepare("SELECT msg, key FROM cards");
    ASSERT_TRUE(s.step());
    EXPECT_EQ(s.column_text(0), "m");
    EXPECT_EQ(s.column_blob(1), "k");
    EXPECT_FALSE(s.step());
    try {
      tx.exec("INSERT INTO no_such_table VALUES(1)");
      FAIL() << "bad SQL accepted";
    } catch (const idem::SqliteError& e) {
      EXPECT_NE(std::string(e.what()).find("no such table"), std::string::npos) << e.what();
      EXPECT_EQ(e.code(), SQLITE_ERROR);
    }
    EXPECT_THROW(tx.exec("SELECT 1; SELECT 2"), idem::SqliteError);
    // The same SQL twice at once: the second is a private (finalized) copy; moves are fine.
    idem::SqliteStatement first = tx.prepare("SELECT ?1");
    idem::SqliteStatement second = tx.prepare("SELECT ?1");
    first.bind_all(1);
    second.bind_all(2);
    idem::SqliteStatement moved = std::move(second);
    ASSERT_TRUE(first.step());
    ASSERT_TRUE(moved.step());
    EXPECT_EQ(first.column_int64(0), 1);
    EXPECT_EQ(moved.column_int64(0), 2);
  });
}

TEST_F(SqliteInbox, OperatorHooksInspectCountAndPurge) {
  idem::Claim held = store_.claim({.key = "held", .lease = 10s});
  ASSERT_EQ(held.status, ClaimStatus::acquired);
  idem::Claim done = store_.claim({.key = "done"});
  ASSERT_TRUE(
      store_.complete({.key = "done", .token = done.token, .response = "r", .retention = 60s}));
  std::optional<idem::RecordInfo> info = store_.inspect("done");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
  EXPECT_EQ(info->token, done.token);
  EXPECT_EQ(info->expires_in_ms, 60'000);
  EXPECT_EQ(info->response, "r");
  EXPECT_EQ(store_.inspect("held")->state, idem::RecordInfo::State::in_progress);
  EXPECT_FALSE(store_.inspect("absent").has_value());
  idem::StoreStats stats = store_.stats();
  EXPECT_EQ(stats.records, 2u);
  EXPECT_EQ(stats.in_progress, 1u);
  EXPECT_EQ(stats.done, 1u);
  EXPECT_GT(stats.bytes, 0u);
  clock_.advance(20'000);  // the lease has ended
  EXPECT_EQ(store_.stats().in_progress, 0u);
  EXPECT_EQ(store_.purge_expired(100), 1u);
  EXPECT_EQ(store_.stats().records, 1u);
}

TEST_F(SqliteInbox, DoneRecordsSurviveReopening) {
  int runs = 0;
  {
    IdempotentConsumer consumer(store_, card_writer(runs));
    consumer.consume({.key = "persist", .payload = "p"});
  }
  SqliteStore reopened(dir_.file("inbox.db"), options());
  IdempotentConsumer consumer(reopened, card_writer(runs));
  EXPECT_EQ(consumer.consume({.key = "persist", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(runs, 1);
}

// --- Offsets of partly failed batches, transactions SQLite rolled back ------------------------

TEST_F(SqliteInbox, OffsetsStayPutWhenAMessageOfTheBatchIsNotAcked) {
  bool fail_bad = true;
  std::map<std::string, int> runs;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    ++runs[std::string(m.key)];
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
    if (m.key == "bad" && fail_bad) throw std::runtime_error("boom");
  });
  using idem::PartitionOffset;
  store_.save_offsets(
      std::vector<PartitionOffset>{{.topic = "t", .partition = 0, .next_offset = 100}});
  const std::vector<Message> batch{{.key = "ok1", .payload = "1"},
                                   {.key = "bad", .payload = "2"},
                                   {.key = "ok2", .payload = "3"}};
  const std::vector<PartitionOffset> offsets{{.topic = "t", .partition = 0, .next_offset = 103}};
  bool saved = true;
  std::vector<Result> results = idem::consume_batch_with_offsets(consumer, batch, offsets, &saved);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_EQ(results[2].outcome, Outcome::processed);
  EXPECT_FALSE(saved);
  // Not moved past "bad": a consumer restarting here replays the batch and loses nothing.
  EXPECT_EQ(store_.committed_offset("t", 0), 100);
  EXPECT_EQ(cards(), 2);  // the processed ones are committed all the same

  fail_bad = false;  // the replay after a restart
  results = idem::consume_batch_with_offsets(consumer, batch, offsets, &saved);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].outcome, Outcome::duplicate);
  EXPECT_EQ(results[1].outcome, Outcome::processed);
  EXPECT_EQ(results[2].outcome, Outcome::duplicate);
  EXPECT_TRUE(saved);
  EXPECT_EQ(store_.committed_offset("t", 0), 103);
  EXPECT_EQ(cards(), 3);
  EXPECT_EQ(runs["ok1"], 1);
  EXPECT_EQ(runs["bad"], 2);
  EXPECT_EQ(runs["ok2"], 1);

  // A conflict (dead-letter) and an in_progress key are not ackable either.
  const std::vector<PartitionOffset> later{{.topic = "t", .partition = 0, .next_offset = 105}};
  const std::vector<Message> conflicting{{.key = "ok3", .payload = "4"},
                                         {.key = "ok1", .payload = "changed"}};
  results = idem::consume_batch_with_offsets(consumer, conflicting, later, &saved);
  EXPECT_EQ(results[1].outcome, Outcome::conflict);
  EXPECT_FALSE(saved);
  EXPECT_EQ(store_.committed_offset("t", 0), 103);
  ASSERT_EQ(store_.claim({.key = "held"}).status, ClaimStatus::acquired);
  const std::vector<Message> held{{.key = "held", .payload = "5"}};
  results = idem::consume_batch_with_offsets(consumer, held, later, &saved);
  EXPECT_EQ(results[0].outcome, Outcome::in_progress);
  EXPECT_FALSE(saved);
  EXPECT_EQ(store_.committed_offset("t", 0), 103);
}

TEST_F(SqliteInbox, WritesAfterSqliteRolledBackTheTransactionNeverCommitOnTheirOwn) {
  for (const bool through_native : {false, true}) {
    SCOPED_TRACE(through_native ? "native_handle()" : "SqliteTx");
    const std::string key = through_native ? "native" : "tx";
    IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
      tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
      sqlite3* db = tx.native_handle();
      // An interrupt makes SQLite roll the whole transaction back (as FULL, IOERR, NOMEM do).
      sqlite3_progress_handler(
          db, 1, [](void*) { return 1; }, nullptr);
      int rc = sqlite3_exec(db, "INSERT INTO cards(msg, key) VALUES('interrupted', x'00')", nullptr,
                            nullptr, nullptr);
      sqlite3_progress_handler(db, 0, nullptr, nullptr);
      EXPECT_EQ(rc & 0xff, SQLITE_INTERRUPT);
      EXPECT_NE(sqlite3_get_autocommit(db), 0);  // the transaction is gone
      // The handler swallows the error and writes on.
      if (through_native) {
        rc = sqlite3_exec(db, "INSERT INTO cards(msg, key) VALUES('after', x'01')", nullptr,
                          nullptr, nullptr);
        EXPECT_NE(rc, SQLITE_OK);  // vetoed: it would have committed on its own
      } else {
        try {
          tx.exec("INSERT INTO cards(msg, key) VALUES('after', x'01')");
          ADD_FAILURE() << "a statement ran outside the transaction";
        } catch (const idem::StoreUnavailable& e) {
          EXPECT_NE(std::string(e.what()).find("transaction is gone"), std::string::npos)
              << e.what();
        }
        EXPECT_THROW(tx.prepare("SELECT 1"), idem::StoreUnavailable);
      }
    });
    if (through_native) {
      EXPECT_THROW(consumer.consume({.key = key, .payload = "p"}), idem::Error);
    } else {
      EXPECT_THROW(consumer.consume({.key = key, .payload = "p"}), idem::StoreUnavailable);
    }
    EXPECT_EQ(cards(), 0);    // no write committed on its own
    EXPECT_EQ(records(), 0);  // and nothing is recorded as done
  }
  // Once SQLite is well again, the message is processed.
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  EXPECT_EQ(consumer.consume({.key = "tx", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(records(), 1);
}

}  // namespace
