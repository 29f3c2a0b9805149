#pragma once
// Brokers of the outbox end-to-end tests: one real rabbitmq-server per test binary (started
// by a GoogleTest Environment), librdkafka's mock cluster per test (in this process; child
// processes reach it over loopback TCP), and a read-back of every copy the broker holds
// through idem's own consumer adapters. Include in exactly one file of a test binary.

#include <gtest/gtest.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <chrono>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "card_purchase_services.hpp"
#include "support/rabbitmq_server.hpp"

namespace outbox_test {

inline std::unique_ptr<idem::test_support::rabbitmq::RabbitMqServer> rabbitmq;
inline std::string rabbitmq_error;

class RabbitMqEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    try {
      rabbitmq = std::make_unique<idem::test_support::rabbitmq::RabbitMqServer>();
    } catch (const std::exception& e) {
      rabbitmq_error = e.what();
    }
  }
  void TearDown() override { rabbitmq.reset(); }
};
inline const auto* const kRabbitMqEnvironment =
    ::testing::AddGlobalTestEnvironment(new RabbitMqEnvironment);

/// "rabbitmq=127.0.0.1:<port>" of the test broker; fails the test when it did not start.
inline std::string rabbitmq_broker() {
  if (!rabbitmq) throw std::runtime_error("rabbitmq-server did not start: " + rabbitmq_error);
  return "rabbitmq=127.0.0.1:" + std::to_string(rabbitmq->port());
}

/// librdkafka's mock cluster with the notifications topic (3 partitions).
class MockCluster {
 public:
  MockCluster() {
    char err[256];
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    owner_ = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (owner_ == nullptr) throw std::runtime_error(err);
    cluster_ = rd_kafka_mock_cluster_new(owner_, 1);
    if (cluster_ == nullptr) throw std::runtime_error("rd_kafka_mock_cluster_new failed");
    rd_kafka_mock_topic_create(cluster_, card_purchase::kDestination, 3, 1);
  }
  ~MockCluster() {
    rd_kafka_mock_cluster_destroy(cluster_);
    rd_kafka_destroy(owner_);
  }
  MockCluster(const MockCluster&) = delete;
  MockCluster& operator=(const MockCluster&) = delete;
  std::string broker() const {
    return std::string("kafka=") + rd_kafka_mock_cluster_bootstraps(cluster_);
  }

 private:
  rd_kafka_t* owner_ = nullptr;
  rd_kafka_mock_cluster_t* cluster_ = nullptr;
};

/// Every copy the broker holds, and what an idem consumer did with them.
struct ReadBack {
  std::map<std::string, std::vector<std::string>> inner_ids_by_key;  // one entry per copy
  std::map<std::string, int> effects_by_inner_id;
  std::size_t copies = 0;
};

/// Consumes the notifications until `expect` effects happened and the broker has been quiet
/// for a while, through idem (MemoryStore, biz-id = key) so duplicates have no effect.
inline ReadBack read_back(const std::string& broker_arg, std::size_t expect,
                          const std::string& group) {
  const card_purchase::Broker broker = card_purchase::parse_broker(broker_arg);
  ReadBack out;
  idem::MemoryStore store;
  idem::IdempotentConsumer effect(
      store, [&](const idem::Message& m) { ++out.effects_by_inner_id[std::string(m.inner_id)]; });
  auto consume = [&](const idem::Message& m) {
    ++out.copies;
    out.inner_ids_by_key[std::string(m.key)].emplace_back(m.inner_id);
    return effect.consume(m);
  };
  auto drain = [&](auto& consumer) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds{60};
    int quiet = 0;
    while (std::chrono::steady_clock::now() < give_up && quiet < 10) {
      const std::size_t n = consumer.poll(std::chrono::milliseconds{100});
      quiet = (n == 0 && out.effects_by_inner_id.size() >= expect) ? quiet + 1 : 0;
    }
  };
  if (broker.kafka()) {
    idem::kafka::Consumer consumer({{"bootstrap.servers", broker.kafka_bootstrap},
                                    {"group.id", group},
                                    {"auto.offset.reset", "earliest"},
                                    {"fetch.wait.max.ms", "10"},
                                    {"log_level", "0"}},
                                   consume, {.topics = {card_purchase::kDestination}});
    drain(consumer);
    consumer.close();
  } else {
    const auto topology = card_purchase::declare_queue(broker);
    idem::rabbitmq::Consumer consumer({.host = broker.host, .port = broker.rabbitmq_port}, consume,
                                      {.queue = topology.queue,
                                       .declare_queue = false,
                                       .dead_letter_exchange = topology.dead_letter_exchange});
    drain(consumer);
  }
  return out;
}

}  // namespace outbox_test
