// Consume throughput through the Kafka and RabbitMQ adapters (idem::MemoryStore, a handler that
// only counts) against the same raw client loop without idem, on the same broker in the same
// run: librdkafka's in-process mock cluster, and a real rabbitmq-server started for the run.
// Each iteration times first to last message (group joins and publishing are not timed).

#include <benchmark/benchmark.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include "idem/kafka.hpp"
#include "idem/rabbitmq.hpp"
#include "support/rabbitmq_server.hpp"

namespace {

using Clock = std::chrono::steady_clock;
// The mock keeps about 5 MB per partition: 8 partitions of 20k 100-byte records fit.
constexpr int kafka_messages = 160'000;
constexpr int rabbit_messages = 20'000;
const std::string payload(100, 'x');

// ---- Kafka -------------------------------------------------------------------------------

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
    Clock::time_point start{};
    while (n < kafka_messages) {
      rd_kafka_message_t* m = rd_kafka_consumer_poll(rk, 100);
      if (m == nullptr) continue;
      if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        std::fprintf(stderr, "raw consumer: %s\n", rd_kafka_message_errstr(m));
      } else {
        if (n++ == 0) start = Clock::now();
        bytes += m->len;  // the "handler"
      }
      rd_kafka_message_destroy(m);
    }
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - start).count());
    benchmark::DoNotOptimize(bytes);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
  }
  state.SetItemsProcessed(state.iterations() * kafka_messages);
}

void BM_KafkaIdemAdapter(benchmark::State& state) {
  for (auto _ : state) {
    idem::MemoryStore store;
    std::size_t bytes = 0;
    idem::IdempotentConsumer counter(store,
                                     [&](const idem::Message& m) { bytes += m.payload.size(); });
    int n = 0;
    Clock::time_point start{};
    idem::kafka::Consumer consumer(
        kafka().consumer_config("idem-" + std::to_string(next_group++)), counter,
        {.topics = {"bench"}, .on_result = [&](const idem::kafka::Record&, const idem::Result&) {
           if (n++ == 0) start = Clock::now();
         }});
    while (n < kafka_messages) consumer.poll(std::chrono::milliseconds{100});
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - start).count());
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(state.iterations() * kafka_messages);
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

// Interleaved so that both loops see the same broker state; three rounds each.
BENCHMARK(BM_KafkaRawLoop)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_KafkaIdemAdapter)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RabbitRawLoop)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RabbitIdemAdapter)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);

}  // namespace
