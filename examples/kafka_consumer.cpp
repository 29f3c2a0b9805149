// A payments service consuming Kafka through idem: each payment's effect happens once, however
// often Kafka redelivers it (restarts, rebalances, producer retries).
// Usage: kafka_consumer <bootstrap.servers> [topic] [group]
#include <csignal>
#include <cstdio>
#include <string>

#include "idem/kafka.hpp"

namespace {
idem::kafka::Consumer* running = nullptr;
extern "C" void on_signal(int) {
  if (running != nullptr) running->request_stop();  // async-signal-safe: one atomic store
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <bootstrap.servers> [topic] [group]\n", argv[0]);
    return 2;
  }
  const std::string topic = argc > 2 ? argv[2] : "payments";
  // In production: idem::SqliteStore or idem::RedisStore, so dedup survives restarts.
  idem::MemoryStore store({.max_keys = 1'000'000});
  idem::IdempotentConsumer payments(store, [](const idem::Message& m) {
    std::printf("charging %.*s (inner id %.*s)\n", static_cast<int>(m.key.size()), m.key.data(),
                static_cast<int>(m.inner_id.size()), m.inner_id.data());
    // ... call the ledger; an exception here means "retry later" ...
  });

  idem::kafka::Consumer consumer(
      {{"bootstrap.servers", argv[1]},
       {"group.id", argc > 3 ? argv[3] : "payments-service"},
       {"auto.offset.reset", "earliest"}},
      payments,
      {.topics = {topic},
       .key_source = idem::kafka::KeySource::header,  // the producer's idem-biz-id header
       .max_attempts = 5,
       .dead_letter_topic = topic + ".dlq",
       .on_error = [](std::string_view e) {
         std::fprintf(stderr, "kafka: %.*s\n", static_cast<int>(e.size()), e.data());
       }});
  running = &consumer;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  consumer.run();  // returns after a signal, having committed what was settled
  const auto s = consumer.stats();
  std::printf("records %llu acked %llu retries %llu dead-lettered %llu\n",
              static_cast<unsigned long long>(s.records), static_cast<unsigned long long>(s.acked),
              static_cast<unsigned long long>(s.retries),
              static_cast<unsigned long long>(s.dead_lettered));
}
