// Consume throughput through the Kafka and RabbitMQ adapters (idem::MemoryStore, a handler that
// only counts) against the same raw client loop without idem, on the same broker in the same
// run: librdkafka's in-process mock cluster, and a real rabbitmq-server started for the run.
// Kafka: steady state after a warm-up, alternating runs, medians (see below). RabbitMQ: each
// iteration times first to last message (filling the queue is not timed).

#include <benchmark/benchmark.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "idem/kafka.hpp"
#include "idem/rabbitmq.hpp"
#include "idem/sqlite.hpp"
#include "support/rabbitmq_server.hpp"

namespace {

using Clock = std::chrono::steady_clock;
// The mock keeps about 5 MB per partition: 8 partitions of 20k 100-byte records fit.
constexpr int kafka_messages = 160'000;
constexpr int rabbit_messages = 20'000;
const std::string payload(100, 'x');

// ---- Kafka -------------------------------------------------------------------------------
//
// Both loops run the same client calls with the same configuration: rd_kafka_consumer_poll with
// a 100 ms timeout on the consumer queue, a fresh group per run. The clock starts at the
// kafka_warmup-th record (group join, first fetches and page faults of the first records are
// left out) and stops at the last one; the thread CPU time of the consuming thread is taken
// over the same window. Raw and idem runs alternate (kafka_rounds pairs) and a summary with
// medians is printed at exit.

struct KafkaBroker {
  KafkaBroker() {
    std::array<char, 256> err{};
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "linger.ms", "5", err.data(), err.size());
    producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err.data(), err.size());
    cluster = rd_kafka_mock_cluster_new(producer, 1);
    rd_kafka_mock_topic_create(cluster, "bench", 8, 1);
    bootstraps = rd_kafka_mock_cluster_bootstraps(cluster);
    rd_kafka_conf_t* pconf = rd_kafka_conf_new();
    rd_kafka_conf_set(pconf, "bootstrap.servers", bootstraps.c_str(), err.data(), err.size());
    rd_kafka_conf_set(pconf, "linger.ms", "5", err.data(), err.size());
    rd_kafka_t* p = rd_kafka_new(RD_KAFKA_PRODUCER, pconf, err.data(), err.size());
    for (int i = 0; i < kafka_messages; ++i) {
      const std::string key = "order-" + std::to_string(i);
      while (rd_kafka_producev(p, RD_KAFKA_V_TOPIC("bench"),
                               RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                               RD_KAFKA_V_KEY(key.data(), key.size()),
                               RD_KAFKA_V_VALUE(const_cast<char*>(payload.data()), payload.size()),
                               RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
        rd_kafka_poll(p, 10);
      }
    }
    if (rd_kafka_flush(p, 60000) != RD_KAFKA_RESP_ERR_NO_ERROR) {
      throw std::runtime_error("could not produce the benchmark's messages");
    }
    rd_kafka_destroy(p);
  }
  ~KafkaBroker() {
    rd_kafka_mock_cluster_destroy(cluster);
    rd_kafka_destroy(producer);
  }
  idem::kafka::Config consumer_config(const std::string& group) const {
    return {
        {"bootstrap.servers", bootstraps},
        {"group.id", group},
        {"auto.offset.reset", "earliest"},
        {"session.timeout.ms", "6000"},
        // librdkafka 2.0 stops fetching once 100,000 records (the default) wait in the
        // consumer queue and only looks again when its broker thread next wakes up (up to
        // ~1 s later): a loop that drains the queue faster than that starves at the tail, and
        // whether it did depended on timing (wall 182-435 ms at ~120 ms of CPU). Room for the
        // whole topic removes the stall for both loops alike.
        {"queued.min.messages", "1000000"},
        {"log_level", std::getenv("IDEM_KAFKA_DEBUG") ? "7" : "0"},
        {"debug", std::getenv("IDEM_KAFKA_DEBUG") ? std::getenv("IDEM_KAFKA_DEBUG") : "generic"}};
  }
  rd_kafka_t* producer;
  rd_kafka_mock_cluster_t* cluster;
  std::string bootstraps;
};

KafkaBroker& kafka() {
  static KafkaBroker broker;
  return broker;
}

int next_group = 0;
constexpr int kafka_warmup = 10'000;
constexpr int kafka_timed = kafka_messages - kafka_warmup;
constexpr int kafka_rounds = 7;

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// Times the window [kafka_warmup-th record, last record] of one run.
struct Window {
  void record(int n) {
    if (n == kafka_warmup) {
      start = Clock::now();
      cpu_start = thread_cpu_seconds();
    } else if (n == kafka_messages) {
      stop = Clock::now();
      cpu_stop = thread_cpu_seconds();
    }
  }
  double seconds() const { return std::chrono::duration<double>(stop - start).count(); }
  double cpu_ns_per_record() const { return (cpu_stop - cpu_start) * 1e9 / kafka_timed; }
  Clock::time_point start{}, stop{};
  double cpu_start = 0, cpu_stop = 0;
};

struct Summary {
  std::vector<double> rate, cpu_ns;
};
std::map<std::string, Summary>& summaries();

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

void finish(benchmark::State& state, const std::string& name, const Window& w) {
  state.SetIterationTime(w.seconds());
  state.counters["cpu_ns_per_record"] = w.cpu_ns_per_record();
  summaries()[name].rate.push_back(kafka_timed / w.seconds());
  summaries()[name].cpu_ns.push_back(w.cpu_ns_per_record());
}

void BM_KafkaRawLoop(benchmark::State& state) {
  for (auto _ : state) {
    std::array<char, 256> err{};
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    for (const auto& [k, v] : kafka().consumer_config("raw-" + std::to_string(next_group++))) {
      rd_kafka_conf_set(conf, k.c_str(), v.c_str(), err.data(), err.size());
    }
    rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err.data(), err.size());
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t* topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, "bench", RD_KAFKA_PARTITION_UA);
    rd_kafka_subscribe(rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    std::size_t bytes = 0;
    int n = 0;
    Window window;
    while (n < kafka_messages) {
      rd_kafka_message_t* m = rd_kafka_consumer_poll(rk, 100);
      if (m == nullptr) continue;
      if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        std::fprintf(stderr, "raw consumer: %s\n", rd_kafka_message_errstr(m));
      } else {
        bytes += m->len;  // the "handler"
        window.record(++n);
      }
      rd_kafka_message_destroy(m);
    }
    finish(state, "kafka raw", window);
    benchmark::DoNotOptimize(bytes);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
  }
  state.SetItemsProcessed(state.iterations() * kafka_timed);
}

void BM_KafkaIdemAdapter(benchmark::State& state) {
  for (auto _ : state) {
    idem::MemoryStore store;
    std::size_t bytes = 0;
    idem::IdempotentConsumer counter(store,
                                     [&](const idem::Message& m) { bytes += m.payload.size(); });
    int n = 0;
    Window window;
    idem::kafka::Consumer consumer(
        kafka().consumer_config("idem-" + std::to_string(next_group++)), counter,
        {.topics = {"bench"}, .on_result = [&](const idem::kafka::Record&, const idem::Result&) {
           window.record(++n);
         }});
    while (n < kafka_messages) consumer.poll(std::chrono::milliseconds{100});
    finish(state, "kafka idem", window);
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(state.iterations() * kafka_timed);
}

// The adapter around a consume function that only counts (no store): what the adapter itself
// costs per record on top of the raw loop.
void BM_KafkaAdapterNoStore(benchmark::State& state) {
  for (auto _ : state) {
    std::size_t bytes = 0;
    int n = 0;
    Window window;
    idem::kafka::Consumer consumer(
        kafka().consumer_config("nostore-" + std::to_string(next_group++)),
        [&](const idem::Message& m) {
          bytes += m.payload.size();
          return idem::Result{.outcome = idem::Outcome::processed};
        },
        {.topics = {"bench"}, .on_result = [&](const idem::kafka::Record&, const idem::Result&) {
           window.record(++n);
         }});
    while (n < kafka_messages) consumer.poll(std::chrono::milliseconds{100});
    finish(state, "adapter, no store", window);
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(state.iterations() * kafka_timed);
}

// The consume step alone, no Kafka: IdempotentConsumer<MemoryStore>::consume on the same keys
// and payloads, as the adapter calls it (fresh store per run, like one adapter run). Each
// record has its own key and payload buffer, as records fetched by librdkafka do.
void BM_ConsumeOnlyMemoryStore(benchmark::State& state) {
  std::vector<std::string> keys;
  std::vector<std::string> payloads;
  keys.reserve(kafka_messages);
  payloads.reserve(kafka_messages);
  for (int i = 0; i < kafka_messages; ++i) {
    keys.push_back("order-" + std::to_string(i));
    payloads.push_back(payload);
  }
  for (auto _ : state) {
    idem::MemoryStore store;
    std::size_t bytes = 0;
    idem::IdempotentConsumer counter(store,
                                     [&](const idem::Message& m) { bytes += m.payload.size(); });
    Window window;
    for (int n = 0; n < kafka_messages;) {
      benchmark::DoNotOptimize(counter.consume({.key = keys[static_cast<std::size_t>(n)],
                                                .payload = payloads[static_cast<std::size_t>(n)]}));
      window.record(++n);
    }
    finish(state, "consume() only", window);
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(state.iterations() * kafka_timed);
}

// ---- Kafka batch mode ----------------------------------------------------------------------
// The adapter's batch mode (batch_size 500) over MemoryStore against the raw loop above; and
// over an SQLite transactional inbox with offsets in the store against a raw loop that, per
// drained poll (up to 500 records), inserts the same rows in one SQLite transaction: the dedup
// key (INSERT OR IGNORE into a key table), the effect row, and the partition's next offset.

constexpr std::size_t kafka_batch = 500;

void BM_KafkaIdemBatch(benchmark::State& state) {
  for (auto _ : state) {
    idem::MemoryStore store;
    std::size_t bytes = 0;
    idem::IdempotentConsumer counter(store,
                                     [&](const idem::Message& m) { bytes += m.payload.size(); });
    int n = 0;
    Window window;
    idem::kafka::Consumer consumer(
        kafka().consumer_config("idem-batch-" + std::to_string(next_group++)), counter,
        {.topics = {"bench"},
         .batch_size = kafka_batch,
         .on_result = [&](const idem::kafka::Record&, const idem::Result&) {
           window.record(++n);
         }});
    while (n < kafka_messages) consumer.poll(std::chrono::milliseconds{100});
    finish(state, "idem batch", window);
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(state.iterations() * kafka_timed);
}

// A fresh database file per run, WAL, synchronous=NORMAL (the inbox's setting below too).
struct BenchDb {
  BenchDb()
      : path("/tmp/idem-bench-kafka-" + std::to_string(::getpid()) + "-" +
             std::to_string(next_group) + ".db") {}
  ~BenchDb() {
    for (const char* suffix : {"", "-wal", "-shm"}) std::remove((path + suffix).c_str());
  }
  std::string path;
};

void BM_KafkaRawSqlite(benchmark::State& state) {
  for (auto _ : state) {
    BenchDb file;
    sqlite3* db = nullptr;
    sqlite3_open(file.path.c_str(), &db);
    sqlite3_exec(db,
                 "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                 "CREATE TABLE seen(key BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID;"
                 "CREATE TABLE effects(key BLOB NOT NULL, bytes INTEGER NOT NULL);"
                 "CREATE TABLE offsets(topic TEXT NOT NULL, partition_id INTEGER NOT NULL, "
                 "next_offset INTEGER NOT NULL, PRIMARY KEY(topic, partition_id)) WITHOUT ROWID;",
                 nullptr, nullptr, nullptr);
    sqlite3_stmt *seen = nullptr, *effect = nullptr, *offset = nullptr;
    sqlite3_prepare_v2(db, "INSERT OR IGNORE INTO seen(key) VALUES(?1)", -1, &seen, nullptr);
    sqlite3_prepare_v2(db, "INSERT INTO effects(key, bytes) VALUES(?1, ?2)", -1, &effect, nullptr);
    sqlite3_prepare_v2(db,
                       "INSERT INTO offsets VALUES(?1, ?2, ?3) ON CONFLICT(topic, partition_id) "
                       "DO UPDATE SET next_offset = excluded.next_offset",
                       -1, &offset, nullptr);
    std::array<char, 256> err{};
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    for (const auto& [k, v] : kafka().consumer_config("rawsql-" + std::to_string(next_group++))) {
      rd_kafka_conf_set(conf, k.c_str(), v.c_str(), err.data(), err.size());
    }
    rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err.data(), err.size());
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t* topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, "bench", RD_KAFKA_PARTITION_UA);
    rd_kafka_subscribe(rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    int n = 0;
    Window window;
    std::vector<rd_kafka_message_t*> polled;
    while (n < kafka_messages) {
      rd_kafka_message_t* m = rd_kafka_consumer_poll(rk, 100);
      while (m != nullptr) {
        polled.push_back(m);
        if (polled.size() == kafka_batch) break;
        m = rd_kafka_consumer_poll(rk, 0);
      }
      if (polled.empty()) continue;
      sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr);
      for (rd_kafka_message_t* r : polled) {
        if (r->err != RD_KAFKA_RESP_ERR_NO_ERROR) continue;
        sqlite3_bind_blob(seen, 1, r->key, static_cast<int>(r->key_len), SQLITE_STATIC);
        sqlite3_step(seen);
        sqlite3_reset(seen);
        if (sqlite3_changes(db) == 1) {
          sqlite3_bind_blob(effect, 1, r->key, static_cast<int>(r->key_len), SQLITE_STATIC);
          sqlite3_bind_int64(effect, 2, static_cast<sqlite3_int64>(r->len));
          sqlite3_step(effect);
          sqlite3_reset(effect);
        }
        sqlite3_bind_text(offset, 1, rd_kafka_topic_name(r->rkt), -1, SQLITE_STATIC);
        sqlite3_bind_int(offset, 2, r->partition);
        sqlite3_bind_int64(offset, 3, r->offset + 1);
        sqlite3_step(offset);
        sqlite3_reset(offset);
      }
      sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr);
      for (rd_kafka_message_t* r : polled) {
        if (r->err == RD_KAFKA_RESP_ERR_NO_ERROR) window.record(++n);
        rd_kafka_message_destroy(r);
      }
      polled.clear();
    }
    finish(state, "kafka raw + sqlite", window);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    sqlite3_finalize(seen);
    sqlite3_finalize(effect);
    sqlite3_finalize(offset);
    sqlite3_close(db);
  }
  state.SetItemsProcessed(state.iterations() * kafka_timed);
}

void BM_KafkaIdemSqliteInbox(benchmark::State& state) {
  for (auto _ : state) {
    BenchDb file;
    idem::SqliteStore store(file.path, {.synchronous = idem::SqliteSync::normal});
    store.transaction([](idem::SqliteTx& tx) {
      tx.exec("CREATE TABLE effects(key BLOB NOT NULL, bytes INTEGER NOT NULL)");
    });
    idem::IdempotentConsumer inbox(store, [](const idem::Message& m, idem::SqliteTx& tx) {
      tx.exec("INSERT INTO effects(key, bytes) VALUES(?1, ?2)", idem::SqliteBlob{m.key},
              static_cast<std::int64_t>(m.payload.size()));
    });
    int n = 0;
    Window window;
    idem::kafka::Consumer consumer(
        kafka().consumer_config("idem-inbox-" + std::to_string(next_group++)), inbox,
        {.topics = {"bench"},
         .batch_size = kafka_batch,
         .offsets_in_store = true,
         .on_result = [&](const idem::kafka::Record&, const idem::Result&) {
           window.record(++n);
         }});
    while (n < kafka_messages) consumer.poll(std::chrono::milliseconds{100});
    finish(state, "idem sqlite inbox", window);
  }
  state.SetItemsProcessed(state.iterations() * kafka_timed);
}

// Raw and idem runs alternate so that both see the same machine load over time.
const bool kafka_registered = [] {
  for (int round = 1; round <= kafka_rounds; ++round) {
    const std::string suffix = "/round:" + std::to_string(round);
    for (auto [name, fn] : {std::pair{"BM_KafkaRawLoop", &BM_KafkaRawLoop},
                            std::pair{"BM_KafkaIdemAdapter", &BM_KafkaIdemAdapter},
                            std::pair{"BM_KafkaAdapterNoStore", &BM_KafkaAdapterNoStore},
                            std::pair{"BM_ConsumeOnlyMemoryStore", &BM_ConsumeOnlyMemoryStore},
                            std::pair{"BM_KafkaIdemBatch", &BM_KafkaIdemBatch},
                            std::pair{"BM_KafkaRawSqlite", &BM_KafkaRawSqlite},
                            std::pair{"BM_KafkaIdemSqliteInbox", &BM_KafkaIdemSqliteInbox}}) {
      benchmark::RegisterBenchmark((name + suffix).c_str(), fn)
          ->UseManualTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
    }
  }
  return true;
}();

// Printed after the benchmarks ran (static destruction, after main returns).
struct PrintSummary {
  std::map<std::string, Summary> runs;
  ~PrintSummary() {
    const auto& s = runs;
    if (s.empty()) return;
    std::printf("\nKafka summary over %d alternating rounds, %d records timed per run:\n",
                kafka_rounds, kafka_timed);
    for (const auto& [name, v] : s) {
      std::printf("  %-16s median %8.0f k records/s  (min %.0f, max %.0f)  CPU %6.0f ns/record\n",
                  name.c_str(), median(v.rate) / 1e3,
                  *std::min_element(v.rate.begin(), v.rate.end()) / 1e3,
                  *std::max_element(v.rate.begin(), v.rate.end()) / 1e3, median(v.cpu_ns));
    }
    auto ratio = [&](const char* idem, const char* raw) {
      if (!s.contains(idem) || !s.contains(raw)) return;
      std::printf("  ratio %s / %s: %.2fx (median rates)\n", idem, raw,
                  median(s.at(idem).rate) / median(s.at(raw).rate));
    };
    ratio("idem batch", "kafka raw");
    ratio("idem sqlite inbox", "kafka raw + sqlite");
    if (s.contains("kafka raw") && s.contains("kafka idem")) {
      std::printf("  ratio idem/raw: %.2fx (median rates), CPU per record %.2fx\n",
                  median(s.at("kafka idem").rate) / median(s.at("kafka raw").rate),
                  median(s.at("kafka idem").cpu_ns) / median(s.at("kafka raw").cpu_ns));
    }
  }
} print_summary;

std::map<std::string, Summary>& summaries() {
  return print_summary.runs;
}

// ---- RabbitMQ ----------------------------------------------------------------------------

idem::test_support::rabbitmq::RabbitMqServer& rabbit() {
  static idem::test_support::rabbitmq::RabbitMqServer server;
  return server;
}

struct RawConnection {
  explicit RawConnection(int port) : conn(amqp_new_connection()) {
    amqp_socket_t* socket = amqp_tcp_socket_new(conn);
    if (amqp_socket_open(socket, "127.0.0.1", port) != 0) throw std::runtime_error("connect");
    amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
    amqp_channel_open(conn, 1);
    amqp_queue_declare(conn, 1, amqp_cstring_bytes("bench"), 0, 1, 0, 0, amqp_empty_table);
  }
  ~RawConnection() {
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
  }
  std::uint32_t depth() {
    return amqp_queue_declare(conn, 1, amqp_cstring_bytes("bench"), 1, 0, 0, 0, amqp_empty_table)
        ->message_count;
  }
  amqp_connection_state_t conn;
};

// Fills the queue (untimed) with messages shaped like idem::rabbitmq::Publisher's.
void fill_queue(int start) {
  RawConnection c(rabbit().port());
  idem::InnerMsgIdGenerator ids;
  for (int i = 0; i < rabbit_messages; ++i) {
    const std::string biz = "order-" + std::to_string(start + i);
    const std::string id = ids.next().to_string();
    amqp_table_entry_t header{};
    header.key = amqp_cstring_bytes("idem-biz-id");
    header.value.kind = AMQP_FIELD_KIND_UTF8;
    header.value.value.bytes = amqp_cstring_bytes(biz.c_str());
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_HEADERS_FLAG;
    props.message_id = amqp_cstring_bytes(id.c_str());
    props.headers = {1, &header};
    amqp_basic_publish(c.conn, 1, amqp_empty_bytes, amqp_cstring_bytes("bench"), 0, 0, &props,
                       amqp_cstring_bytes(payload.c_str()));
  }
  while (c.depth() < static_cast<std::uint32_t>(rabbit_messages)) {
  }
}

int next_batch = 0;

void BM_RabbitRawLoop(benchmark::State& state) {
  for (auto _ : state) {
    fill_queue(rabbit_messages * next_batch++);
    RawConnection c(rabbit().port());
    amqp_basic_qos(c.conn, 1, 0, 64, 0);
    amqp_basic_consume(c.conn, 1, amqp_cstring_bytes("bench"), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    std::size_t bytes = 0;
    const Clock::time_point start = Clock::now();
    for (int n = 0; n < rabbit_messages;) {
      amqp_maybe_release_buffers(c.conn);
      amqp_envelope_t envelope{};
      if (amqp_consume_message(c.conn, &envelope, nullptr, 0).reply_type != AMQP_RESPONSE_NORMAL) {
        continue;
      }
      bytes += envelope.message.body.len;  // the "handler"
      amqp_basic_ack(c.conn, 1, envelope.delivery_tag, 0);
      amqp_destroy_envelope(&envelope);
      ++n;
    }
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - start).count());
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(state.iterations() * rabbit_messages);
}

void BM_RabbitIdemAdapter(benchmark::State& state) {
  for (auto _ : state) {
    fill_queue(rabbit_messages * next_batch++);
    idem::MemoryStore store;
    std::size_t bytes = 0;
    idem::IdempotentConsumer counter(store,
                                     [&](const idem::Message& m) { bytes += m.payload.size(); });
    idem::rabbitmq::Consumer consumer({.port = rabbit().port()}, counter,
                                      {.queue = "bench", .prefetch = 64});
    const Clock::time_point start = Clock::now();
    while (consumer.stats().acked < static_cast<std::uint64_t>(rabbit_messages)) {
      consumer.poll(std::chrono::milliseconds{100});
    }
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - start).count());
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(state.iterations() * rabbit_messages);
}

// RabbitMQ: three iterations each.
BENCHMARK(BM_RabbitRawLoop)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RabbitIdemAdapter)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);

}  // namespace
