// Outbox relay throughput against a raw loop, in one run, on the same table and brokers:
//   Relay/<broker>  idem::OutboxRelay over SqliteOutboxSource and kafka::OutboxSink /
//                   rabbitmq::OutboxSink, run_once() until nothing is pending;
//   Raw/<broker>    a hand loop doing the same work with no relay: SELECT the same columns of
//                   the same pending rows in the same batches (raw sqlite3), send each with the
//                   same producer / publisher (idem::kafka::Producer, idem::rabbitmq::Publisher:
//                   inner id and biz-id headers, confirms awaited per batch), then mark the
//                   batch sent in one transaction.
// Every iteration publishes kRows rows (100-byte payloads) in batches of 256; the table is
// reset to pending between iterations (not timed). Kafka is librdkafka's mock cluster in this
// process; RabbitMQ a private rabbitmq-server (tests/support/rabbitmq_server.hpp), started on
// first use. Reported: rows/s (items_per_second).

#include <benchmark/benchmark.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <sqlite3.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include "idem/kafka.hpp"
#include "idem/outbox/kafka_outbox_sink.hpp"
#include "idem/outbox/rabbitmq_outbox_sink.hpp"
#include "idem/outbox/sqlite_outbox.hpp"
#include "idem/rabbitmq.hpp"
#include "support/rabbitmq_server.hpp"
#include "support/temp_dir.hpp"

namespace {

constexpr int kRows = 5000;
constexpr std::size_t kBatch = 256;
constexpr const char* kTopic = "bench-outbox";

struct Kafka {
  Kafka() {
    char err[256];
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    owner = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    cluster = rd_kafka_mock_cluster_new(owner, 1);
    rd_kafka_mock_topic_create(cluster, kTopic, 3, 1);
    bootstrap = rd_kafka_mock_cluster_bootstraps(cluster);
  }
  ~Kafka() {
    rd_kafka_mock_cluster_destroy(cluster);
    rd_kafka_destroy(owner);
  }
  idem::kafka::Config config() const {
    return {{"bootstrap.servers", bootstrap}, {"linger.ms", "1"}, {"log_level", "0"}};
  }
  rd_kafka_t* owner;
  rd_kafka_mock_cluster_t* cluster;
  std::string bootstrap;
};

Kafka& kafka() {
  static Kafka k;
  return k;
}

idem::test_support::rabbitmq::RabbitMqServer& rabbitmq() {
  static idem::test_support::rabbitmq::RabbitMqServer server;
  return server;
}

// The outbox file with kRows rows, reset to pending before each iteration.
struct Table {
  explicit Table(bool rabbit) {
    path = dir.file("outbox.db");
    idem::SqliteOutbox outbox(path);
    sqlite3_open(path.c_str(), &db);
    sqlite3_busy_timeout(db, 5000);
    exec("BEGIN");
    const std::string payload(100, 'x');
    for (int i = 0; i < kRows; ++i) {
      outbox.add(db, {.destination = rabbit ? "" : kTopic,
                      .routing_key = rabbit ? kTopic : "",
                      .key = "pay-" + std::to_string(i),
                      .payload = payload,
                      .headers = {}});
    }
    exec("COMMIT");
  }
  ~Table() { sqlite3_close(db); }
  void exec(const char* sql) {
    if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) {
      throw std::runtime_error(sqlite3_errmsg(db));
    }
  }
  void reset() { exec("UPDATE idem_outbox SET sent_ms = NULL"); }
  idem::testing::TempDir dir{"bench-outbox"};
  std::string path;
  sqlite3* db = nullptr;
};

void relay(benchmark::State& state, idem::OutboxSink& sink, Table& table) {
  idem::SqliteOutboxSource source(table.path);
  idem::OutboxRelay relay(
      source, sink,
      {.holder = "bench", .batch_size = kBatch, .purge_interval = std::chrono::hours{1}});
  for (auto _ : state) {
    state.PauseTiming();
    table.reset();
    state.ResumeTiming();
    std::size_t published = 0;
    for (;;) {
      const idem::OutboxRelayStep step = relay.run_once();
      if (step.failed) state.SkipWithError("relay round failed");
      if (step.published == 0 || step.failed) break;
      published += step.published;
    }
    if (published != kRows) state.SkipWithError("not every row was published");
  }
  state.SetItemsProcessed(state.iterations() * kRows);
}

// The raw loop: read a batch, send it, await confirms, mark it.
template <class SendBatch>
void raw(benchmark::State& state, Table& table, SendBatch send_batch) {
  sqlite3* db = nullptr;
  sqlite3_open(table.path.c_str(), &db);
  sqlite3_busy_timeout(db, 5000);
  sqlite3_exec(db, "PRAGMA synchronous=NORMAL", nullptr, nullptr, nullptr);
  sqlite3_stmt *select = nullptr, *mark = nullptr;
  sqlite3_prepare_v2(db,
                     "SELECT seq, inner_id, destination, routing_key, msg_key, payload, headers "
                     "FROM idem_outbox WHERE sent_ms IS NULL ORDER BY seq LIMIT ?1",
                     -1, &select, nullptr);
  sqlite3_prepare_v2(db, "UPDATE idem_outbox SET sent_ms = 1 WHERE seq = ?1", -1, &mark, nullptr);
  struct Row {
    std::int64_t seq;
    idem::InnerMsgId id;
    std::string destination, routing_key, key, payload;
  };
  auto text = [&](int i) {
    return std::string(static_cast<const char*>(sqlite3_column_blob(select, i)),
                       static_cast<std::size_t>(sqlite3_column_bytes(select, i)));
  };
  std::vector<Row> rows;
  for (auto _ : state) {
    state.PauseTiming();
    table.reset();
    state.ResumeTiming();
    std::size_t published = 0;
    for (;;) {
      rows.clear();
      sqlite3_bind_int64(select, 1, kBatch);
      while (sqlite3_step(select) == SQLITE_ROW) {
        rows.push_back({sqlite3_column_int64(select, 0), *idem::InnerMsgId::parse(text(1)), text(2),
                        text(3), text(4), text(5)});
      }
      sqlite3_reset(select);
      if (rows.empty()) break;
      send_batch(rows);
      sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr);
      for (const Row& row : rows) {
        sqlite3_bind_int64(mark, 1, row.seq);
        sqlite3_step(mark);
        sqlite3_reset(mark);
      }
      sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr);
      published += rows.size();
    }
    if (published != kRows) state.SkipWithError("not every row was published");
  }
  state.SetItemsProcessed(state.iterations() * kRows);
  sqlite3_finalize(select);
  sqlite3_finalize(mark);
  sqlite3_close(db);
}

void BM_Relay_Kafka(benchmark::State& state) {
  Table table(false);
  idem::kafka::OutboxSink sink(kafka().config());
  relay(state, sink, table);
}

void BM_Raw_Kafka(benchmark::State& state) {
  Table table(false);
  std::size_t delivered = 0;
  idem::kafka::Producer producer(
      kafka().config(),
      {.on_delivery = [&](const idem::kafka::Delivery& d) { delivered += d.ok(); }});
  raw(state, table, [&](auto& rows) {
    delivered = 0;
    for (auto& row : rows) {
      producer.send({.topic = std::move(row.destination),
                     .biz_id = std::move(row.key),
                     .payload = std::move(row.payload),
                     .inner_id = row.id});
    }
    producer.flush(std::chrono::seconds{10});
    if (delivered != rows.size()) throw std::runtime_error("a delivery failed");
  });
}

void BM_Relay_RabbitMq(benchmark::State& state) {
  Table table(true);
  idem::rabbitmq::declare_queue_with_dead_letters({.port = rabbitmq().port()}, kTopic);
  idem::rabbitmq::OutboxSink sink({.port = rabbitmq().port()});
  relay(state, sink, table);
}

void BM_Raw_RabbitMq(benchmark::State& state) {
  Table table(true);
  idem::rabbitmq::declare_queue_with_dead_letters({.port = rabbitmq().port()}, kTopic);
  idem::rabbitmq::Publisher publisher({.port = rabbitmq().port()});
  raw(state, table, [&](auto& rows) {
    for (auto& row : rows) {
      publisher.send({.exchange = std::move(row.destination),
                      .routing_key = std::move(row.routing_key),
                      .biz_id = std::move(row.key),
                      .body = std::move(row.payload),
                      .inner_id = row.id});
    }
    publisher.flush();
  });
}

// Raw and relay alternate so drift in the broker (queue length, mock state) hits both alike.
BENCHMARK(BM_Raw_Kafka)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Relay_Kafka)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Raw_RabbitMq)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Relay_RabbitMq)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
