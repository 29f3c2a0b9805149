// An order-shipping worker consuming RabbitMQ through idem: a redelivered order (consumer
// crash before the ack, dropped connection, publisher resend) ships once.
// Usage: rabbitmq_consumer <host> [port] [queue]
#include <csignal>
#include <cstdio>
#include <string>

#include "idem/rabbitmq.hpp"

namespace {
idem::rabbitmq::Consumer* running = nullptr;
extern "C" void on_signal(int) {
  if (running != nullptr) running->request_stop();  // async-signal-safe: one atomic store
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <host> [port] [queue]\n", argv[0]);
    return 2;
  }
  // In production: idem::RedisStore shared by every worker of the queue.
  idem::MemoryStore store({.max_keys = 1'000'000});
  idem::IdempotentConsumer shipping(store, [](const idem::Message& m) -> std::string {
    std::printf("shipping order %.*s\n", static_cast<int>(m.key.size()), m.key.data());
    return "label-" + std::string(m.key);  // stored; a duplicate replays it
  });

  idem::rabbitmq::Consumer consumer(
      {.host = argv[1], .port = argc > 2 ? std::stoi(argv[2]) : 5672}, shipping,
      {.queue = argc > 3 ? argv[3] : "orders",
       .dead_letter_exchange = "orders.dlx",  // after max_attempts failures
       .prefetch = 32,
       .key_source = idem::rabbitmq::KeySource::header,  // idem-biz-id, set by the Publisher
       .max_attempts = 5,
       .on_error = [](std::string_view e) {
         std::fprintf(stderr, "rabbitmq: %.*s\n", static_cast<int>(e.size()), e.data());
       }});
  running = &consumer;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  consumer.run();  // reconnects by itself; returns after a signal
  const auto s = consumer.stats();
  std::printf("deliveries %llu acked %llu requeued %llu dead-lettered %llu reconnects %llu\n",
              static_cast<unsigned long long>(s.deliveries),
              static_cast<unsigned long long>(s.acked), static_cast<unsigned long long>(s.requeued),
              static_cast<unsigned long long>(s.dead_lettered),
              static_cast<unsigned long long>(s.reconnects));
}
