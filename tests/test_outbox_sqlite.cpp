// The SQLite outbox: writes that commit and roll back with the business transaction (a plain
// transaction and an inbox handler's), the relay's side of the table (lease, order, marks,
// purge) and the relay's own policy, against a recording sink.

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <chrono>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/idem.hpp"
#include "idem/outbox/sqlite_outbox.hpp"
#include "idem/prometheus_metrics.hpp"
#include "idem/sqlite.hpp"
#include "support/recording_sink.hpp"
#include "support/temp_dir.hpp"

using namespace std::chrono_literals;

namespace {

using idem::test_support::RecordingLogger;
using idem::test_support::RecordingSink;

struct Db {
  explicit Db(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db) != SQLITE_OK) throw std::runtime_error("open");
    sqlite3_busy_timeout(db, 5000);
    exec("CREATE TABLE IF NOT EXISTS charges(payment TEXT PRIMARY KEY)");
  }
  ~Db() { sqlite3_close(db); }
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string what = err ? err : "?";
      sqlite3_free(err);
      throw std::runtime_error(sql + ": " + what);
    }
  }
  std::int64_t count(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    sqlite3_prepare_v2(db, sql.c_str(), -1, &s, nullptr);
    std::int64_t n = -1;
    if (sqlite3_step(s) == SQLITE_ROW) n = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return n;
  }
  sqlite3* db = nullptr;
};

idem::OutboxMessage message(const std::string& key) {
  return {.destination = "payments",
          .routing_key = "cards",
          .key = key,
          .payload = "charged " + key,
          .headers = {{"source", "test"}}};
}

// Charges a payment and writes its notification in one transaction, or rolls both back.
idem::InnerMsgId charge(Db& db, idem::SqliteOutbox& outbox, const std::string& payment,
                        bool commit = true) {
  db.exec("BEGIN IMMEDIATE");
  db.exec("INSERT INTO charges(payment) VALUES('" + payment + "')");
  const idem::InnerMsgId id = outbox.add(db.db, message(payment));
  db.exec(commit ? "COMMIT" : "ROLLBACK");
  return id;
}

class SqliteOutboxTest : public ::testing::Test {
 protected:
  idem::testing::TempDir dir{"outbox-sqlite"};
  std::string path = dir.file("app.db");
};

TEST_F(SqliteOutboxTest, RowsCommitWithTheBusinessTransaction) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  const idem::InnerMsgId id = charge(db, outbox, "p-1");
  EXPECT_EQ(db.count("SELECT count(*) FROM charges"), 1);
  idem::SqliteOutboxSource source(path);
  const auto rows = source.fetch_pending(10);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].inner_id, id);  // assigned once, at insert
  EXPECT_EQ(rows[0].message.destination, "payments");
  EXPECT_EQ(rows[0].message.routing_key, "cards");
  EXPECT_EQ(rows[0].message.key, "p-1");
  EXPECT_EQ(rows[0].message.payload, "charged p-1");
  ASSERT_EQ(rows[0].message.headers.size(), 1u);
  EXPECT_EQ(rows[0].message.headers[0].first, "source");
  EXPECT_EQ(rows[0].message.headers[0].second, "test");
}

TEST_F(SqliteOutboxTest, RowsRollBackWithTheBusinessTransaction) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  charge(db, outbox, "p-1", false);
  charge(db, outbox, "p-2", true);
  EXPECT_EQ(db.count("SELECT count(*) FROM charges"), 1);
  idem::SqliteOutboxSource source(path);
  const auto rows = source.fetch_pending(10);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].message.key, "p-2");
}

TEST_F(SqliteOutboxTest, InboxHandlerRowsCommitWithTheDedupRecord) {
  idem::SqliteStore store(path);
  idem::SqliteOutbox outbox(path);
  bool fail = true;
  idem::IdempotentConsumer consumer(store, [&](const idem::Message& m, idem::SqliteTx& tx) {
    outbox.add(tx, message(std::string(m.key)));
    if (fail) throw std::runtime_error("handler fails after writing to the outbox");
  });
  EXPECT_EQ(consumer.consume({.key = "order-1", .payload = "x"}).outcome, idem::Outcome::failed);
  idem::SqliteOutboxSource source(path);
  EXPECT_TRUE(source.fetch_pending(10).empty());  // rolled back with the failed message
  fail = false;
  EXPECT_EQ(consumer.consume({.key = "order-1", .payload = "x"}).outcome, idem::Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "order-1", .payload = "x"}).outcome, idem::Outcome::duplicate);
  const auto rows = source.fetch_pending(10);
  ASSERT_EQ(rows.size(), 1u);  // one row: the duplicate did not run the handler
  EXPECT_EQ(rows[0].message.key, "order-1");
}

TEST_F(SqliteOutboxTest, KeysPayloadsAndHeadersAreBytes) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  const std::string key("k\0'\"; DROP TABLE charges;--", 28);
  const std::string payload("\0\1\2\xff", 4);
  db.exec("BEGIN");
  outbox.add(db.db, {.destination = "t",
                     .routing_key = {},
                     .key = key,
                     .payload = payload,
                     .headers = {{std::string("h\0", 2), std::string("\0v", 2)}}});
  db.exec("COMMIT");
  idem::SqliteOutboxSource source(path);
  const auto rows = source.fetch_pending(10);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].message.key, key);
  EXPECT_EQ(rows[0].message.payload, payload);
  EXPECT_EQ(rows[0].message.headers[0].first, std::string("h\0", 2));
  EXPECT_EQ(rows[0].message.headers[0].second, std::string("\0v", 2));
}

TEST_F(SqliteOutboxTest, BadInputIsRefusedWithWhatToDo) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  try {
    outbox.add(db.db, message("p-1"));
    ADD_FAILURE() << "an add outside a transaction was accepted";
  } catch (const idem::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("BEGIN"), std::string::npos) << e.what();
  }
  db.exec("BEGIN");
  EXPECT_THROW(outbox.add(db.db, message("")), idem::InvalidMessage);
  db.exec("ROLLBACK");
  EXPECT_THROW(idem::SqliteOutbox(path, {.table = "outbox\"; DROP TABLE charges; --"}),
               idem::ConfigError);
  EXPECT_THROW(idem::SqliteOutboxSource(path, {.table = ""}), idem::ConfigError);
  EXPECT_THROW(idem::SqliteOutbox(path, {.table = "9lives"}), idem::ConfigError);
  EXPECT_EQ(db.count("SELECT count(*) FROM charges"), 0);
}

TEST_F(SqliteOutboxTest, TablesAreNamedByTheOptions) {
  Db db(path);
  idem::SqliteOutbox a(path, {.table = "outbox_a"});
  idem::SqliteOutbox b(path, {.table = "outbox_b"});
  db.exec("BEGIN");
  a.add(db.db, message("1"));
  b.add(db.db, message("2"));
  b.add(db.db, message("3"));
  db.exec("COMMIT");
  EXPECT_EQ(db.count("SELECT count(*) FROM outbox_a"), 1);
  EXPECT_EQ(db.count("SELECT count(*) FROM outbox_b"), 2);
  EXPECT_EQ(db.count("SELECT count(*) FROM outbox_b_lease"), 0);
}

TEST_F(SqliteOutboxTest, RelayPublishesInOrderAndMarksOnlyTheConfirmedPrefix) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  std::vector<idem::InnerMsgId> ids;
  for (int i = 0; i < 10; ++i) ids.push_back(charge(db, outbox, "p-" + std::to_string(i)));
  idem::SqliteOutboxSource source(path);
  RecordingSink sink;
  sink.confirm_limit = 3;  // the 4th row of each batch goes unconfirmed
  idem::OutboxRelay relay(source, sink, {.holder = "r1", .batch_size = 5});
  idem::OutboxRelayStep step = relay.run_once();
  EXPECT_TRUE(step.active);
  EXPECT_EQ(step.published, 3u);
  EXPECT_EQ(step.unconfirmed, 2u);
  EXPECT_TRUE(step.failed);
  sink.confirm_limit = static_cast<std::size_t>(-1);
  EXPECT_TRUE(relay.drain(10s));
  // Rows 3 and 4 went out twice, with the same inner id; every first copy is in order.
  ASSERT_EQ(sink.published.size(), 12u);
  std::vector<idem::InnerMsgId> first;
  std::set<idem::InnerMsgId> seen;
  for (const idem::OutboxRow& row : sink.published) {
    EXPECT_EQ(row.inner_id, ids[static_cast<std::size_t>(row.seq - 1)]);
    if (seen.insert(row.inner_id).second) first.push_back(row.inner_id);
  }
  EXPECT_EQ(first, ids);
  EXPECT_EQ(sink.published[5].inner_id, ids[3]);  // the second batch starts at the first unmarked
  EXPECT_TRUE(source.fetch_pending(10).empty());
}

TEST_F(SqliteOutboxTest, OneRelayIsActiveAndAStandbyTakesOverWhenTheLeaseExpires) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  for (int i = 0; i < 4; ++i) charge(db, outbox, "p-" + std::to_string(i));
  idem::SqliteOutboxSource source_a(path), source_b(path);
  RecordingSink sink_a, sink_b;
  auto relay_a = std::make_unique<idem::OutboxRelay>(
      source_a, sink_a, idem::OutboxRelayOptions{.holder = "a", .lease = 300ms, .batch_size = 2});
  idem::OutboxRelay relay_b(source_b, sink_b, {.holder = "b", .lease = 300ms, .batch_size = 2});
  EXPECT_TRUE(relay_a->run_once().active);
  EXPECT_FALSE(relay_b.run_once().active);  // a holds the lease
  EXPECT_TRUE(sink_b.published.empty());
  // a dies without a word: its lease stays until it expires (the destructor would have
  // released it, so the row is written back as a crash leaves it).
  relay_a.reset();
  ASSERT_TRUE(source_a.acquire_lease("a", 300ms));
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (!relay_b.run_once().active && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(relay_b.drain(10s));
  EXPECT_EQ(sink_a.published.size(), 2u);
  EXPECT_EQ(sink_b.published.size(), 2u);  // b went on from where a's marks ended
  EXPECT_EQ(relay_b.stats().leases_taken, 1u);
}

TEST_F(SqliteOutboxTest, ReleasedLeaseIsTakenAtOnce) {
  idem::SqliteOutboxSource source(path);
  EXPECT_TRUE(source.acquire_lease("a", 60s));
  EXPECT_TRUE(source.acquire_lease("a", 60s));  // renewal
  EXPECT_FALSE(source.acquire_lease("b", 60s));
  source.release_lease("a");
  EXPECT_TRUE(source.acquire_lease("b", 60s));
}

TEST_F(SqliteOutboxTest, SentRowsArePurgedAfterRetentionInBoundedSteps) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  for (int i = 0; i < 25; ++i) charge(db, outbox, "p-" + std::to_string(i));
  idem::SqliteOutboxSource source(path);
  RecordingSink sink;
  idem::OutboxRelay relay(source, sink,
                          {.holder = "r",
                           .batch_size = 100,
                           .retention = 0ms,
                           .purge_batch = 10,
                           .purge_interval = 0ms});
  idem::OutboxRelayStep step = relay.run_once();
  EXPECT_EQ(step.published, 25u);
  EXPECT_EQ(step.purged, 10u);  // one bounded step per round
  EXPECT_EQ(relay.run_once().purged, 10u);
  EXPECT_EQ(relay.run_once().purged, 5u);
  EXPECT_EQ(db.count("SELECT count(*) FROM idem_outbox"), 0);
  // A long retention keeps them.
  for (int i = 25; i < 30; ++i) charge(db, outbox, "p-" + std::to_string(i));
  idem::OutboxRelay keeper(source, sink, {.holder = "r", .retention = 1h, .purge_interval = 0ms});
  EXPECT_EQ(keeper.run_once().purged, 0u);
  EXPECT_EQ(db.count("SELECT count(*) FROM idem_outbox WHERE sent_ms IS NOT NULL"), 5);
}

TEST_F(SqliteOutboxTest, BrokerDownIsLoggedCountedAndRetriedWithTheSameIds) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  const idem::InnerMsgId id = charge(db, outbox, "p-1");
  idem::SqliteOutboxSource source(path);
  RecordingSink sink;
  sink.down = true;
  idem::PrometheusMetrics metrics;
  RecordingLogger logger;
  idem::OutboxRelay relay(
      source, sink,
      {.holder = "r", .backlog_interval = 0ms, .metrics = &metrics, .logger = &logger});
  idem::OutboxRelayStep step = relay.run_once();
  EXPECT_TRUE(step.failed);
  EXPECT_EQ(step.unconfirmed, 1u);
  EXPECT_EQ(metrics.value(idem::Counter::outbox_publish_failed), 1u);
  EXPECT_EQ(metrics.value(idem::Counter::store_errors), 0u);  // the broker failed, not the db
  ASSERT_FALSE(logger.lines.empty());
  EXPECT_NE(logger.lines.back().find("broker down (test)"), std::string::npos);
  EXPECT_EQ(metrics.value(idem::Gauge::outbox_pending), 0.0);  // not read in a failed round
  sink.down = false;
  EXPECT_EQ(relay.run_once().published, 1u);
  ASSERT_EQ(sink.published.size(), 1u);
  EXPECT_EQ(sink.published[0].inner_id, id);
  EXPECT_EQ(metrics.value(idem::Counter::outbox_published), 1u);
  EXPECT_EQ(metrics.histogram(idem::Timing::outbox_publish).count, 1u);
  const std::string text = metrics.render();
  EXPECT_NE(text.find("idem_outbox_published_total 1"), std::string::npos) << text;
  EXPECT_NE(text.find("idem_outbox_pending 0"), std::string::npos) << text;
}

TEST_F(SqliteOutboxTest, DatabaseFailureIsLoggedCountedAndRetried) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  charge(db, outbox, "p-1");
  RecordingSink sink;
  idem::PrometheusMetrics metrics;
  RecordingLogger logger;
  idem::SqliteOutboxSource blocked(path, {.busy_timeout = 0ms});
  db.exec("BEGIN EXCLUSIVE");  // another connection holds the write lock: the lease cannot be taken
  idem::OutboxRelay stuck(blocked, sink, {.holder = "s", .metrics = &metrics, .logger = &logger});
  const idem::OutboxRelayStep step = stuck.run_once();
  EXPECT_TRUE(step.failed);
  EXPECT_EQ(metrics.value(idem::Counter::store_errors), 1u);
  ASSERT_FALSE(logger.lines.empty());
  EXPECT_NE(logger.lines.back().find("lease"), std::string::npos) << logger.lines.back();
  db.exec("COMMIT");
  EXPECT_EQ(stuck.run_once().published, 1u);  // the next round goes through
  EXPECT_EQ(sink.published.size(), 1u);
}

TEST_F(SqliteOutboxTest, BacklogGaugesShowPendingRowsAndTheOldestAge) {
  Db db(path);
  idem::SqliteOutbox outbox(path);
  for (int i = 0; i < 3; ++i) charge(db, outbox, "p-" + std::to_string(i));
  db.exec("UPDATE idem_outbox SET created_ms = created_ms - 60000 WHERE seq = 1");
  idem::SqliteOutboxSource source(path);
  RecordingSink sink;
  sink.confirm_limit = 0;
  idem::PrometheusMetrics metrics;
  idem::OutboxRelay relay(source, sink,
                          {.holder = "r", .backlog_interval = 0ms, .metrics = &metrics});
  relay.run_once();
  EXPECT_EQ(metrics.value(idem::Gauge::outbox_pending), 3.0);
  EXPECT_GE(metrics.value(idem::Gauge::outbox_oldest_pending_seconds), 60.0);
  EXPECT_LT(metrics.value(idem::Gauge::outbox_oldest_pending_seconds), 3600.0);
}

TEST_F(SqliteOutboxTest, RelayOptionsAreChecked) {
  idem::SqliteOutboxSource source(path);
  RecordingSink sink;
  EXPECT_THROW(idem::OutboxRelay(source, sink, {.lease = 0ms}), idem::ConfigError);
  EXPECT_THROW(idem::OutboxRelay(source, sink, {.batch_size = 0}), idem::ConfigError);
}

}  // namespace
