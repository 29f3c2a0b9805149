// An order-shipping worker consuming RabbitMQ through idem: a redelivered order (consumer
// crash before the ack, dropped connection, publisher resend) ships once; an order that cannot
// be shipped ends in the dead-letter queue with header idem-dlq-reason saying why.
// Usage: rabbitmq_consumer <host> [port] [queue]
#include <csignal>
#include <cstdio>
#include <string>
#include <string_view>

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
  const idem::rabbitmq::ConnectionOptions broker{.host = argv[1],
                                                 .port = argc > 2 ? std::stoi(argv[2]) : 5672};
  // The queue, its dead-letter exchange "<queue>.dlx" and dead-letter queue "<queue>.dlq".
  const auto orders = idem::rabbitmq::declare_queue_with_dead_letters(
      broker, argc > 3 ? argv[3] : "orders", {.type = idem::rabbitmq::QueueType::quorum});

  // In production: idem::RedisStore shared by every worker of the queue.
  idem::MemoryStore store({.max_keys = 1'000'000});
  idem::IdempotentConsumer shipping(store, [](const idem::Message& m) -> std::string {
    std::printf("shipping order %.*s\n", static_cast<int>(m.key.size()), m.key.data());
    return "label-" + std::string(m.key);  // stored; a duplicate replays it
  });

  idem::rabbitmq::Consumer consumer(
      broker, shipping,
      {.queue = orders.queue,
       .declare_queue = false,  // declared above (quorum)
       .dead_letter_exchange = orders.dead_letter_exchange,
       .prefetch = 32,
       .max_attempts = 5,  // counted in the message (idem-attempts): survives restarts
       // One line per retry, dead-letter (with its reason), hold and lost connection. Or
       // .logger = an idem::StderrLogger (target idem::log), with levels.
       .on_error = [](std::string_view e) {
         std::fprintf(stderr, "rabbitmq: %.*s\n", static_cast<int>(e.size()), e.data());
       }});
  running = &consumer;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  consumer.run();  // reconnects by itself; returns after a signal
  const auto s = consumer.stats();
  std::printf(
      "deliveries %llu acked %llu requeued %llu dead-lettered %llu (missing key %llu, "
      "conflicts %llu, attempts exhausted %llu) dead-letter failures %llu reconnects %llu\n",
      static_cast<unsigned long long>(s.deliveries), static_cast<unsigned long long>(s.acked),
      static_cast<unsigned long long>(s.requeued), static_cast<unsigned long long>(s.dead_lettered),
      static_cast<unsigned long long>(s.missing_key), static_cast<unsigned long long>(s.conflicts),
      static_cast<unsigned long long>(s.attempts_exhausted),
      static_cast<unsigned long long>(s.dead_letter_failures),
      static_cast<unsigned long long>(s.reconnects));
}
