// The RabbitMQ consumer against a real rabbitmq-server: acks by outcome, crashes, lost
// connections, attempt counting and holds.

#include "support/rabbitmq_fixture.hpp"

namespace {

using namespace idem_rabbitmq_test;  // NOLINT(google-build-using-namespace): the fixture

TEST_F(RabbitMqAdapter, KilledAfterProcessingBeforeAckIsRedeliveredAsDuplicate) {
  admin_->declare_queue("killed");
  publish("killed", 1, "order-");
  idem::MemoryStore store;  // outlives the "process", as a Redis or SQLite store would
  Effects effects;
  idem::IdempotentConsumer idem_consumer(store,
                                         [&](const idem::Message& m) { effects.add(m.key); });
  {
    idem::rabbitmq::Consumer* self = nullptr;
    auto opts = options("killed");
    opts.on_result = [&](const idem::rabbitmq::Delivery&, const idem::Result& r) {
      // Dies between the handler's effect and the ack: the broker sees the socket go away.
      if (r.outcome == idem::Outcome::processed) ::shutdown(self->native_socket(), SHUT_RDWR);
    };
    idem::rabbitmq::Consumer first(connection(), idem_consumer, opts);
    self = &first;
    ASSERT_TRUE(poll_until([&] { return effects.total == 1; }, first));
    EXPECT_EQ(first.stats().acked, 0u);
    EXPECT_EQ(
        errors_.count("rabbitmq consumer: connection to 127.0.0.1:" +
                      std::to_string(server->port()) + " lost: basic.ack failed: socket error: "),
        1u);
  }
  std::atomic<int> duplicates{0};
  auto opts = options("killed");
  opts.on_result = [&](const idem::rabbitmq::Delivery& d, const idem::Result& r) {
    EXPECT_TRUE(d.redelivered);
    if (r.outcome == idem::Outcome::duplicate) ++duplicates;
  };
  idem::rabbitmq::Consumer second(connection(), idem_consumer, opts);
  ASSERT_TRUE(poll_until([&] { return second.stats().acked == 1; }, second));
  EXPECT_EQ(duplicates, 1);
  EXPECT_EQ(effects.total, 1);
  second.close();
  EXPECT_EQ(admin_->depth("killed"), 0u);
}

TEST_F(RabbitMqAdapter, ConnectionDroppedMidStreamLosesAndDoublesNothing) {
  admin_->declare_queue("stream");
  constexpr int n = 300;
  publish("stream", n, "pay-");
  idem::MemoryStore store;
  Effects effects;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    std::this_thread::sleep_for(200us);
    effects.add(m.key);
  });
  idem::rabbitmq::Consumer consumer(connection(), idem_consumer, options("stream"));
  std::atomic<bool> stop{false};
  std::jthread loop([&] { consumer.run(stop); });
  struct StopOnExit {
    std::atomic<bool>& stop;
    ~StopOnExit() { stop = true; }
  } stop_on_exit{stop};
  while (effects.total < n / 3) std::this_thread::sleep_for(1ms);
  ASSERT_NO_THROW(server->ctl({"close_all_connections", "idem test: dropped mid-stream"}));
  admin_ = std::make_unique<Admin>(server->port());  // closed too
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (effects.total < n && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  // Give redeliveries of processed-but-unacked messages time to be acked as duplicates.
  for (int i = 0; i < 100 && admin_->depth("stream") > 0; ++i) std::this_thread::sleep_for(20ms);
  stop = true;
  loop.join();
  const auto stats = consumer.stats();
  RecordProperty("deliveries", static_cast<int>(stats.deliveries));
  EXPECT_EQ(effects.total, n) << "deliveries " << stats.deliveries << " acked " << stats.acked
                              << " reconnects " << stats.reconnects;
  EXPECT_EQ(effects.distinct(), static_cast<std::size_t>(n));
  EXPECT_GE(consumer.stats().reconnects, 1u);
  EXPECT_EQ(count(idem::Counter::reconnects), consumer.stats().reconnects);
  EXPECT_EQ(admin_->depth("stream"), 0u);
  EXPECT_GE(errors_.count("lost: the broker closed the connection: 320 CONNECTION_FORCED - idem "
                          "test: dropped mid-stream; reconnecting"),
            1u);
}

TEST_F(RabbitMqAdapter, RequeueModeCountsAttemptsInProcess) {
  auto opts = with_dead_letters("work-requeue");
  opts.retry_mode = idem::rabbitmq::RetryMode::requeue;
  publish("work-requeue", 1, "bad-");
  int calls = 0;
  idem::rabbitmq::Consumer consumer(
      connection(),
      [&](const idem::Message&) -> idem::Result {
        ++calls;
        return {.outcome = idem::Outcome::failed};
      },
      opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_lettered == 1; }, consumer));
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(consumer.stats().requeued, 2u);
  EXPECT_EQ(consumer.stats().republished, 0u);
  auto dead = admin_->get("work-requeue.dlq");
  ASSERT_TRUE(dead.has_value());
  EXPECT_EQ(dead->headers["idem-dlq-reason"], "attempts exhausted: handler failed");
  EXPECT_EQ(dead->headers["idem-dlq-attempts"], "3");
  EXPECT_EQ(dead->headers.count("idem-attempts"), 0u);
}

TEST_F(RabbitMqAdapter, AttemptsSurviveAConsumerRestart) {
  auto opts = with_dead_letters("restart", 3);
  publish("restart", 1, "bad-");
  int calls = 0;
  auto failing = [&](const idem::Message&) -> idem::Result {
    ++calls;
    return {.outcome = idem::Outcome::failed};
  };
  {
    // Fails twice, then stops with the copy in hand (a store outage holds it unacked) and
    // dies: the broker takes the copy back.
    idem::rabbitmq::Consumer first(
        connection(),
        [&](const idem::Message& m) -> idem::Result {
          if (calls == 2) throw idem::StoreUnavailable("stop here");
          return failing(m);
        },
        opts);
    ASSERT_TRUE(poll_until([&] { return first.stats().held == 1; }, first));
    EXPECT_EQ(first.stats().republished, 2u);
    EXPECT_EQ(first.stats().dead_lettered, 0u);
  }  // the "process" restarts: nothing of its memory is left
  EXPECT_EQ(calls, 2);
  std::vector<unsigned> attempts_seen;
  opts.on_result = [&](const idem::rabbitmq::Delivery& d, const idem::Result&) {
    attempts_seen.push_back(d.attempt);
  };
  idem::rabbitmq::Consumer second(connection(), failing, opts);
  ASSERT_TRUE(poll_until([&] { return second.stats().dead_lettered == 1; }, second));
  EXPECT_EQ(calls, 3);  // max_attempts in all, not 3 more
  EXPECT_EQ(attempts_seen, std::vector<unsigned>{3});
  auto dead = admin_->get("restart.dlq");
  ASSERT_TRUE(dead.has_value());
  EXPECT_EQ(dead->headers["idem-dlq-attempts"], "3");
}

TEST_F(RabbitMqAdapter, QuorumQueueDeliveryCountCountsAttemptsAcrossConsumers) {
  const auto t = idem::rabbitmq::declare_queue_with_dead_letters(
      connection(), "quorum-work", {.type = idem::rabbitmq::QueueType::quorum});
  publish("quorum-work", 1, "bad-");
  auto opts = options("quorum-work");
  opts.declare_queue = false;
  opts.dead_letter_exchange = t.dead_letter_exchange;
  opts.max_attempts = 2;
  int calls = 0;
  auto failing = [&](const idem::Message&) -> idem::Result {
    ++calls;
    return {.outcome = idem::Outcome::failed};
  };
  {
    // The first consumer dies right after its handler failed, before it could republish: the
    // broker counts the redelivery (x-delivery-count).
    idem::rabbitmq::Consumer* self = nullptr;
    auto first_opts = opts;
    first_opts.on_result = [&](const idem::rabbitmq::Delivery&, const idem::Result&) {
      ::shutdown(self->native_socket(), SHUT_RDWR);
    };
    idem::rabbitmq::Consumer first(connection(), failing, first_opts);
    self = &first;
    ASSERT_TRUE(poll_until([&] { return calls == 1; }, first));
    EXPECT_EQ(first.stats().republished, 0u);
  }
  std::vector<unsigned> attempts_seen;
  opts.on_result = [&](const idem::rabbitmq::Delivery& d, const idem::Result&) {
    attempts_seen.push_back(d.attempt);
  };
  bool redelivered = false;
  idem::rabbitmq::Consumer second(
      connection(),
      [&](const idem::Message& m) {
        redelivered = m.source.redelivered;
        return failing(m);
      },
      opts);
  ASSERT_TRUE(poll_until([&] { return second.stats().dead_lettered == 1; }, second));
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(redelivered);
  EXPECT_EQ(attempts_seen, std::vector<unsigned>{2});
  auto dead = admin_->get(t.dead_letter_queue);
  ASSERT_TRUE(dead.has_value());
  EXPECT_EQ(dead->headers["idem-dlq-reason"], "attempts exhausted: handler failed");
  EXPECT_EQ(dead->headers["idem-dlq-attempts"], "2");
}

TEST_F(RabbitMqAdapter, InProgressRequeueIsLoggedAtDebugNotAsAnError) {
  admin_->declare_queue("busy");
  publish("busy", 1, "order-");
  RecordingLogger logger;
  auto opts = options("busy");
  opts.logger = &logger;
  int calls = 0;
  idem::rabbitmq::Consumer consumer(
      connection(),
      [&](const idem::Message&) -> idem::Result {
        return {.outcome = ++calls == 1 ? idem::Outcome::in_progress : idem::Outcome::processed};
      },
      opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().acked == 1; }, consumer));
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(consumer.stats().in_progress, 1u);
  EXPECT_EQ(consumer.stats().requeued, 1u);
  EXPECT_EQ(logger.count(idem::LogLevel::debug, "key in progress elsewhere; requeued in"), 1u);
  EXPECT_TRUE(errors_.lines.empty());
}

TEST_F(RabbitMqAdapter, StoreUnavailableHoldsTheMessageWithoutAck) {
  admin_->declare_queue("outage");
  publish("outage", 1, "order-");
  int calls = 0;
  std::vector<idem::Outcome> outcomes;
  idem::rabbitmq::Consumer consumer(
      connection(),
      [&](const idem::Message&) -> idem::Result {
        if (++calls <= 2) throw idem::StoreUnavailable("redis is down");
        return {.outcome = idem::Outcome::processed};
      },
      options("outage"));
  ASSERT_TRUE(poll_until([&] { return consumer.stats().acked == 1; }, consumer));
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(consumer.stats().requeued, 0u);
  EXPECT_EQ(consumer.stats().deliveries, 3u);
  EXPECT_EQ(consumer.stats().held, 2u);
  EXPECT_EQ(errors_.count("unacked: store unavailable: redis is down; retrying in"), 2u);
}

}  // namespace
