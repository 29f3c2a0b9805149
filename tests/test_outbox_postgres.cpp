// The PostgreSQL outbox: writes that commit and roll back with the business transaction (a
// plain libpq transaction and an inbox handler's), bytes kept as bytes, bad input refused, and
// the relay's side of the table (lease on the server's clock, order, marks, purge, backlog).
// One private server for the binary (tests/support/postgres_server.hpp).

#include <gtest/gtest.h>
#include <libpq-fe.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/idem.hpp"
#include "idem/outbox/postgres_outbox.hpp"
#include "idem/postgres.hpp"
#include "idem/prometheus_metrics.hpp"
#include "support/postgres_server.hpp"
#include "support/recording_sink.hpp"

using namespace std::chrono_literals;
using idem::test_support::PostgresServer;
using idem::test_support::RecordingSink;

namespace {

PostgresServer& server() {
  static PostgresServer instance;
  return instance;
}

// Starts the server from the main thread (its postmaster dies with the thread that forked it).
class ServerEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { (void)server(); }
};
[[maybe_unused]] ::testing::Environment* const kServerEnvironment =
    ::testing::AddGlobalTestEnvironment(new ServerEnvironment);

struct Conn {
  Conn() : c(PQconnectdb(server().conninfo().c_str())) {
    if (PQstatus(c) != CONNECTION_OK) throw std::runtime_error(PQerrorMessage(c));
  }
  ~Conn() { PQfinish(c); }
  void exec(const std::string& sql) {
    PGresult* r = PQexec(c, sql.c_str());
    const auto st = PQresultStatus(r);
    std::string err = PQresultErrorMessage(r);
    PQclear(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) throw std::runtime_error(sql + ": " + err);
  }
  std::int64_t scalar(const std::string& sql) {
    PGresult* r = PQexec(c, sql.c_str());
    std::int64_t n = PQntuples(r) == 1 ? std::stoll(PQgetvalue(r, 0, 0)) : -1;
    PQclear(r);
    return n;
  }
  PGconn* c;
};

class PostgresOutboxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    schema = "ob" + std::to_string(::getpid()) + "_" + std::to_string(++counter);
    options = {.conninfo = server().conninfo(), .schema = schema, .table = "idem_outbox"};
    db.exec("CREATE SCHEMA " + schema);
    db.exec("CREATE TABLE " + schema + ".charges(payment text PRIMARY KEY)");
  }
  idem::OutboxMessage message(const std::string& key) {
    return {.destination = "payments",
            .routing_key = "cards",
            .key = key,
            .payload = "charged " + key,
            .headers = {{"source", "test"}}};
  }
  idem::InnerMsgId charge(idem::PostgresOutbox& outbox, const std::string& payment,
                          bool commit = true) {
    db.exec("BEGIN");
    db.exec("INSERT INTO " + schema + ".charges VALUES('" + payment + "')");
    const idem::InnerMsgId id = outbox.add(db.c, message(payment));
    db.exec(commit ? "COMMIT" : "ROLLBACK");
    return id;
  }
  std::int64_t outbox_rows(const std::string& where = "true") {
    return db.scalar("SELECT count(*) FROM " + schema + ".idem_outbox WHERE " + where);
  }
  Conn db;
  std::string schema;
  idem::PostgresOutboxOptions options;
};

TEST_F(PostgresOutboxTest, RowsCommitWithTheBusinessTransaction) {
  idem::PostgresOutbox outbox(options);
  const idem::InnerMsgId id = charge(outbox, "p-1");
  idem::PostgresOutboxSource source(options);
  const auto rows = source.fetch_pending(10);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].inner_id, id);
  EXPECT_EQ(rows[0].message.destination, "payments");
  EXPECT_EQ(rows[0].message.routing_key, "cards");
  EXPECT_EQ(rows[0].message.key, "p-1");
  EXPECT_EQ(rows[0].message.payload, "charged p-1");
  ASSERT_EQ(rows[0].message.headers.size(), 1u);
  EXPECT_EQ(rows[0].message.headers[0].second, "test");
  EXPECT_GT(rows[0].created_ms, 1'700'000'000'000);  // the server's clock, in Unix ms
}

TEST_F(PostgresOutboxTest, RowsRollBackWithTheBusinessTransaction) {
  idem::PostgresOutbox outbox(options);
  charge(outbox, "p-1", false);
  charge(outbox, "p-2");
  EXPECT_EQ(db.scalar("SELECT count(*) FROM " + schema + ".charges"), 1);
  EXPECT_EQ(outbox_rows(), 1);
  EXPECT_EQ(outbox_rows("msg_key = 'p-2'::bytea"), 1);
}

TEST_F(PostgresOutboxTest, InboxHandlerRowsCommitWithTheDedupRecord) {
  idem::PostgresStore store({.conninfo = server().conninfo(), .schema = schema + "_inbox"});
  idem::PostgresOutbox outbox(options);
  bool fail = true;
  idem::IdempotentConsumer consumer(store, [&](const idem::Message& m, idem::PostgresTx& tx) {
    outbox.add(tx, message(std::string(m.key)));
    if (fail) throw std::runtime_error("handler fails after writing to the outbox");
  });
  EXPECT_EQ(consumer.consume({.key = "order-1", .payload = "x"}).outcome, idem::Outcome::failed);
  EXPECT_EQ(outbox_rows(), 0);  // rolled back with the failed message
  fail = false;
  EXPECT_EQ(consumer.consume({.key = "order-1", .payload = "x"}).outcome, idem::Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "order-1", .payload = "x"}).outcome, idem::Outcome::duplicate);
  EXPECT_EQ(outbox_rows(), 1);
  // In a batch (the inbox pipelines statements), every processed message has its row.
  std::vector<std::string> keys = {"order-2", "order-3", "order-2"};
  std::vector<idem::Message> batch;
  for (const std::string& k : keys) batch.push_back({.key = k, .payload = "x"});
  consumer.consume_batch(batch);
  EXPECT_EQ(outbox_rows(), 3);
}

TEST_F(PostgresOutboxTest, KeysPayloadsAndHeadersAreBytes) {
  idem::PostgresOutbox outbox(options);
  const std::string key("k\0'\"; DROP TABLE charges;--", 28);
  const std::string payload("\0\1\2\xff", 4);
  db.exec("BEGIN");
  outbox.add(db.c, {.destination = "t",
                    .routing_key = {},
                    .key = key,
                    .payload = payload,
                    .headers = {{std::string("h\0", 2), std::string("\0v", 2)}}});
  db.exec("COMMIT");
  idem::PostgresOutboxSource source(options);
  const auto rows = source.fetch_pending(10);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].message.key, key);
  EXPECT_EQ(rows[0].message.payload, payload);
  EXPECT_EQ(rows[0].message.headers[0].first, std::string("h\0", 2));
  EXPECT_EQ(rows[0].message.headers[0].second, std::string("\0v", 2));
}

TEST_F(PostgresOutboxTest, BadInputIsRefusedWithWhatToDo) {
  idem::PostgresOutbox outbox(options);
  try {
    outbox.add(db.c, message("p-1"));
    ADD_FAILURE() << "an add outside a transaction was accepted";
  } catch (const idem::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("BEGIN"), std::string::npos) << e.what();
  }
  db.exec("BEGIN");
  EXPECT_THROW(outbox.add(db.c, message("")), idem::InvalidMessage);
  PQclear(PQexec(db.c, "SELECT 1/0"));  // the transaction is now aborted
  EXPECT_THROW(outbox.add(db.c, message("p-1")), idem::PostgresError);
  db.exec("ROLLBACK");
  auto bad = options;
  bad.table = "x\"; DROP TABLE charges; --";
  EXPECT_THROW(idem::PostgresOutbox{bad}, idem::ConfigError);
  bad = options;
  bad.schema = "";
  EXPECT_THROW(idem::PostgresOutboxSource{bad}, idem::ConfigError);
  bad = options;
  bad.conninfo = "host=127.0.0.1 port=1 connect_timeout=2";
  EXPECT_THROW(idem::PostgresOutbox{bad}, idem::PostgresUnavailable);
}

TEST_F(PostgresOutboxTest, RelayPublishesInOrderMarksAndPurges) {
  idem::PostgresOutbox outbox(options);
  std::vector<idem::InnerMsgId> ids;
  for (int i = 0; i < 7; ++i) ids.push_back(charge(outbox, "p-" + std::to_string(i)));
  idem::PostgresOutboxSource source(options);
  RecordingSink sink;
  sink.confirm_limit = 2;
  idem::PrometheusMetrics metrics;
  idem::OutboxRelay relay(source, sink,
                          {.holder = "r",
                           .batch_size = 3,
                           .retention = 0ms,
                           .purge_batch = 4,
                           .purge_interval = 0ms,
                           .backlog_interval = 0ms,
                           .metrics = &metrics});
  idem::OutboxRelayStep step = relay.run_once();
  EXPECT_EQ(step.published, 2u);
  EXPECT_EQ(step.unconfirmed, 1u);
  EXPECT_EQ(metrics.value(idem::Gauge::outbox_pending), 5.0);
  sink.confirm_limit = static_cast<std::size_t>(-1);
  EXPECT_TRUE(relay.drain(10s));
  std::vector<idem::InnerMsgId> order;
  for (const idem::OutboxRow& row : sink.published) {
    EXPECT_EQ(row.inner_id, ids[static_cast<std::size_t>(row.seq - 1)]);
    if (order.empty() || order.back() < row.inner_id) order.push_back(row.inner_id);
  }
  EXPECT_EQ(order, ids);  // first copies in insert order; the one retry repeats row 3
  EXPECT_EQ(sink.published.size(), 8u);
  while (relay.run_once().purged > 0) {
  }
  EXPECT_EQ(outbox_rows(), 0);
  EXPECT_EQ(metrics.value(idem::Counter::outbox_purged), 7u);
  EXPECT_EQ(metrics.value(idem::Gauge::outbox_pending), 0.0);
}

TEST_F(PostgresOutboxTest, OneRelayHoldsTheLeaseUntilItExpiresOnTheServerClock) {
  idem::PostgresOutboxSource a(options), b(options);
  EXPECT_TRUE(a.acquire_lease("a", 400ms));
  EXPECT_TRUE(a.acquire_lease("a", 400ms));  // renewal
  EXPECT_FALSE(b.acquire_lease("b", 400ms));
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (!b.acquire_lease("b", 60s) && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_FALSE(a.acquire_lease("a", 400ms));  // b has it now
  b.release_lease("b");
  EXPECT_TRUE(a.acquire_lease("a", 400ms));
}

TEST_F(PostgresOutboxTest, TwoRelaysPublishNoRowTwiceWhileBothAreHealthy) {
  idem::PostgresOutbox outbox(options);
  for (int i = 0; i < 200; ++i) charge(outbox, "p-" + std::to_string(i));
  idem::PostgresOutboxSource source_a(options), source_b(options);
  RecordingSink sink_a, sink_b;
  idem::OutboxRelay a(source_a, sink_a, {.holder = "a", .lease = 5s, .batch_size = 7});
  idem::OutboxRelay b(source_b, sink_b, {.holder = "b", .lease = 5s, .batch_size = 7});
  for (int round = 0; round < 100; ++round) {  // interleaved, as two processes would be
    a.run_once();
    b.run_once();
  }
  EXPECT_EQ(sink_a.published.size() + sink_b.published.size(), 200u);
  EXPECT_EQ(outbox_rows("sent_at IS NULL"), 0);
}

}  // namespace
