// RabbitMQ dead-lettering against a real rabbitmq-server: every path reports, counts and
// carries its reason; the topology helper.

#include "support/rabbitmq_fixture.hpp"

namespace {

using namespace idem_rabbitmq_test;  // NOLINT(google-build-using-namespace): the fixture

TEST_F(RabbitMqAdapter, FailingMessageIsRetriedThenDeadLetteredWithItsReason) {
  admin_->declare_fanout("idem.test.dlx", "dead");
  admin_->declare_queue("work", "idem.test.dlx");
  std::string bad_id;
  {
    idem::rabbitmq::Publisher publisher(connection());
    bad_id = publisher
                 .publish({.routing_key = "work",
                           .biz_id = "bad-0",
                           .body = "unparseable",
                           .headers = {{"trace", "t-1"}}})
                 .to_string();
  }
  publish("work", 1, "good-");
  idem::MemoryStore store;
  Effects effects;
  int bad_calls = 0;
  std::vector<unsigned> attempts_seen;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    EXPECT_EQ(m.source.exchange, "");  // the default exchange, also for republished copies
    EXPECT_EQ(m.source.routing_key, "work");
    EXPECT_NE(m.source.delivery_tag, 0u);
    EXPECT_FALSE(m.source.redelivered);
    if (m.key.starts_with("bad-")) {
      ++bad_calls;
      throw std::runtime_error("cannot parse");
    }
    effects.add(m.key);
  });
  auto opts = options("work");
  opts.dead_letter_exchange = "idem.test.dlx";
  opts.max_attempts = 3;
  opts.on_result = [&](const idem::rabbitmq::Delivery& d, const idem::Result&) {
    if (d.message_id == bad_id) attempts_seen.push_back(d.attempt);
  };
  idem::rabbitmq::Consumer consumer(connection(), idem_consumer, opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_lettered == 1 && effects.total == 1; },
                         consumer));
  EXPECT_EQ(bad_calls, 3);
  EXPECT_EQ(attempts_seen, (std::vector<unsigned>{1, 2, 3}));
  const auto stats = consumer.stats();
  EXPECT_EQ(stats.requeued, 2u);
  EXPECT_EQ(stats.republished, 2u);
  EXPECT_EQ(stats.attempts_exhausted, 1u);
  EXPECT_EQ(stats.dead_letter_failures, 0u);
  // ... and counted: two retries, each a republished copy, then one dead-letter.
  EXPECT_EQ(count(idem::Counter::retries), 2u);
  EXPECT_EQ(count(idem::Counter::redeliveries), 2u);
  EXPECT_EQ(count(idem::Counter::dead_letters_exhausted), 1u);
  EXPECT_EQ(count(idem::Counter::dead_letter_failures), 0u);
  // Each retry and the dead-letter said why.
  EXPECT_EQ(errors_.count("failed (attempt 1 of 3): handler failed; republished"), 1u);
  EXPECT_EQ(errors_.count("failed (attempt 2 of 3): handler failed; republished"), 1u);
  EXPECT_EQ(errors_.count("dead-lettered message " + bad_id), 1u);
  auto dead = admin_->get("dead");
  ASSERT_TRUE(dead.has_value());
  EXPECT_EQ(dead->message_id, bad_id);  // the same InnerMsgId through both republishes
  EXPECT_EQ(dead->body, "unparseable");
  EXPECT_EQ(dead->headers["idem-dlq-reason"], "attempts exhausted: handler failed");
  EXPECT_EQ(dead->headers["idem-dlq-attempts"], "3");
  EXPECT_EQ(dead->headers["idem-dlq-queue"], "work");
  EXPECT_EQ(dead->headers["idem-biz-id"], "bad-0");
  EXPECT_EQ(dead->headers["trace"], "t-1");
  EXPECT_EQ(dead->headers["idem-attempts"], "2");  // as the last copy carried it
  EXPECT_EQ(dead->routing_key, "work");            // the delivery's own, by default
  consumer.close();
  EXPECT_EQ(admin_->depth("work"), 0u);
}

TEST_F(RabbitMqAdapter, MissingBizIdIsDeadLetteredWithItsReason) {
  auto opts = with_dead_letters("no-key");
  admin_->publish_raw("no-key", "no header at all");
  admin_->publish_raw("no-key", "numeric biz-id", {}, std::pair{std::string("idem-biz-id"), 42});
  int calls = 0;
  idem::rabbitmq::Consumer consumer(
      connection(),
      [&](const idem::Message&) -> idem::Result {
        ++calls;
        return {.outcome = idem::Outcome::processed};
      },
      opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_lettered == 2; }, consumer));
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(consumer.stats().missing_key, 2u);
  EXPECT_EQ(count(idem::Counter::dead_letters_missing_key), 2u);
  EXPECT_EQ(consumer.stats().deliveries, 0u);
  EXPECT_EQ(errors_.count("dead-lettered message raw-message"), 2u);
  EXPECT_EQ(errors_.count("missing biz-id header idem-biz-id"), 1u);
  auto first = admin_->get("no-key.dlq");
  auto second = admin_->get("no-key.dlq");
  ASSERT_TRUE(first.has_value() && second.has_value());
  EXPECT_EQ(first->headers["idem-dlq-reason"], "missing biz-id header idem-biz-id");
  EXPECT_EQ(first->body, "no header at all");
  EXPECT_EQ(first->headers.count("idem-dlq-attempts"), 0u);
  EXPECT_EQ(second->headers["idem-dlq-reason"],
            "biz-id header idem-biz-id is integer, not a string");
}

TEST_F(RabbitMqAdapter, EmptyBizIdIsDeadLetteredAsInvalidWithoutExpirationOrUserId) {
  auto opts = with_dead_letters("empty-key");
  opts.dead_letter_routing_key = "invalid.keys";
  admin_->publish_raw("empty-key", "empty biz-id", {{"idem-biz-id", ""}}, {}, true);
  idem::MemoryStore store;
  int calls = 0;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message&) { ++calls; });
  idem::rabbitmq::Consumer consumer(connection(), idem_consumer, opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_lettered == 1; }, consumer));
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(consumer.stats().invalid, 1u);
  EXPECT_EQ(count(idem::Counter::dead_letters_invalid), 1u);
  EXPECT_EQ(consumer.stats().deliveries, 1u);  // the consume step saw it and refused it
  auto dead = admin_->get("empty-key.dlq");
  ASSERT_TRUE(dead.has_value());
  EXPECT_TRUE(dead->headers["idem-dlq-reason"].starts_with("invalid message: "))
      << dead->headers["idem-dlq-reason"];
  EXPECT_EQ(dead->routing_key, "invalid.keys");
  // As the broker's own dead-lettering: the copy does not expire again; user_id is the
  // original publisher's, which the broker would check against the consumer's user.
  EXPECT_FALSE(dead->has_expiration);
  EXPECT_FALSE(dead->has_user_id);
}

TEST_F(RabbitMqAdapter, UnconfirmedDeadLetterIsRequeuedAndReportedUntilTheBrokerConfirms) {
  auto opts = with_dead_letters("alarm");
  opts.publish_timeout = 300ms;
  admin_->publish_raw("alarm", "no biz-id");
  publish("alarm", 1, "bad-");  // its handler fails: it must be republished
  // A memory alarm: the broker blocks every connection that publishes, so no confirm comes.
  ASSERT_NO_THROW(server->ctl({"set_vm_memory_high_watermark", "0"}));
  struct Restore {
    ~Restore() {
      try {
        server->ctl({"set_vm_memory_high_watermark", "0.4"});
      } catch (...) {  // NOLINT(bugprone-empty-catch): already restored
      }
    }
  } restore;
  int calls = 0;
  idem::rabbitmq::Consumer consumer(
      connection(),
      [&](const idem::Message&) -> idem::Result {
        ++calls;
        return {.outcome = idem::Outcome::failed};
      },
      opts);
  ASSERT_TRUE(poll_until(
      [&] {
        return consumer.stats().dead_letter_failures >= 1 &&
               errors_.count("for another attempt: no confirm within publish_timeout") >= 1;
      },
      consumer));
  EXPECT_EQ(consumer.stats().dead_lettered, 0u);
  EXPECT_EQ(consumer.stats().republished, 0u);
  EXPECT_GE(count(idem::Counter::dead_letter_failures), 1u);
  EXPECT_GE(count(idem::Counter::redeliveries), 1u);  // the basic.nack
  EXPECT_GE(errors_.count("no confirm within publish_timeout (300 ms); requeued in"), 1u);
  EXPECT_GE(errors_.count("requeued with basic.nack instead (this failure is not counted)"), 1u);
  EXPECT_GE(calls, 1);
  ASSERT_NO_THROW(server->ctl({"set_vm_memory_high_watermark", "0.4"}));
  // The publish that meets the alarm may still be taken by the broker (it blocks the
  // connection after reading it): an unconfirmed copy can exist besides the requeued
  // original, each then counting its own attempts. So: both reasons arrive, eventually.
  std::set<std::string> reasons;
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (reasons.size() < 2 && std::chrono::steady_clock::now() < deadline) {
    consumer.poll(20ms);
    if (consumer.stats().dead_lettered == 0) continue;
    if (auto dead = admin_->get("alarm.dlq", 1)) {
      reasons.insert(dead->headers["idem-dlq-reason"]);
      if (dead->headers["idem-dlq-reason"] == "attempts exhausted: handler failed") {
        EXPECT_EQ(dead->headers["idem-dlq-attempts"], "3");
      }
    }
  }
  EXPECT_EQ(reasons, (std::set<std::string>{"attempts exhausted: handler failed",
                                            "missing biz-id header idem-biz-id"}));
}

TEST_F(RabbitMqAdapter, ConflictingPayloadIsDeadLetteredWithItsReason) {
  auto opts = with_dead_letters("conflict");
  {
    idem::rabbitmq::Publisher publisher(connection());
    publisher.publish({.routing_key = "conflict", .biz_id = "order-1", .body = "amount=10"});
    publisher.publish({.routing_key = "conflict", .biz_id = "order-1", .body = "amount=99"});
  }
  idem::MemoryStore store;
  Effects effects;
  idem::IdempotentConsumer idem_consumer(store,
                                         [&](const idem::Message& m) { effects.add(m.key); });
  idem::rabbitmq::Consumer consumer(connection(), idem_consumer, opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_lettered == 1; }, consumer));
  EXPECT_EQ(effects.total, 1);
  EXPECT_EQ(consumer.stats().conflicts, 1u);
  EXPECT_EQ(count(idem::Counter::dead_letters_conflict), 1u);
  auto dead = admin_->get("conflict.dlq");
  ASSERT_TRUE(dead.has_value());
  EXPECT_EQ(dead->body, "amount=99");
  EXPECT_TRUE(dead->headers["idem-dlq-reason"].starts_with("payload conflict"))
      << dead->headers["idem-dlq-reason"];
}

TEST_F(RabbitMqAdapter, WithoutDeadLetterExchangeTheMessageStaysAndIsReported) {
  admin_->declare_queue("no-dlx");
  admin_->publish_raw("no-dlx", "no biz-id");
  idem::rabbitmq::Consumer consumer(
      connection(), [](const idem::Message&) -> idem::Result { return {}; }, options("no-dlx"));
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_letter_failures >= 2; }, consumer));
  EXPECT_EQ(consumer.stats().dead_lettered, 0u);
  EXPECT_GE(consumer.stats().requeued, 1u);
  EXPECT_GE(count(idem::Counter::dead_letter_failures), 2u);
  EXPECT_EQ(count(idem::Counter::dead_letters_missing_key), 0u);
  EXPECT_GE(errors_.count("must be dead-lettered (missing biz-id header idem-biz-id) but "
                          "dead_letter_exchange is not set"),
            2u);
  consumer.close();
  EXPECT_EQ(admin_->depth("no-dlx"), 1u);  // never dropped
}

TEST_F(RabbitMqAdapter, DeadLetterExchangeRoutingNowhereIsReportedNotDropped) {
  admin_->declare_queue("to-nowhere");
  auto opts = options("to-nowhere");
  // An exchange with no queue bound: the broker would drop what it is given (and its own
  // dead-lettering through x-dead-letter-exchange would lose the message silently).
  opts.declare_queue = false;
  opts.dead_letter_exchange = "amq.fanout";  // exists on every broker; nothing bound here
  admin_->publish_raw("to-nowhere", "no biz-id");
  idem::rabbitmq::Consumer consumer(
      connection(), [](const idem::Message&) -> idem::Result { return {}; }, opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_letter_failures >= 2; }, consumer));
  EXPECT_EQ(consumer.stats().dead_lettered, 0u);
  EXPECT_GE(errors_.count("(missing biz-id header idem-biz-id) to exchange 'amq.fanout': the "
                          "broker routed it to no queue: 312 NO_ROUTE"),
            2u);
  EXPECT_EQ(errors_.count("could not dead-letter message raw-message"), errors_.lines.size());
  consumer.close();
  EXPECT_EQ(admin_->depth("to-nowhere"), 1u);
}

TEST_F(RabbitMqAdapter, DeclareQueueWithDeadLettersIsIdempotentAndRoutesDeadLetters) {
  using idem::rabbitmq::declare_queue_with_dead_letters;
  const auto t = declare_queue_with_dead_letters(connection(), "cards");
  EXPECT_EQ(t.queue, "cards");
  EXPECT_EQ(t.dead_letter_exchange, "cards.dlx");
  EXPECT_EQ(t.dead_letter_queue, "cards.dlq");
  EXPECT_NO_THROW(declare_queue_with_dead_letters(connection(), "cards"));  // idempotent
  // The consumer's own declaration (declare_queue) has the same arguments.
  auto opts = options("cards");
  opts.dead_letter_exchange = t.dead_letter_exchange;
  EXPECT_NO_THROW(idem::rabbitmq::Consumer(
      connection(), [](const idem::Message&) -> idem::Result { return {}; }, opts));
  // Whatever reaches the dead-letter exchange lands in the dead-letter queue.
  idem::rabbitmq::Publisher(connection())
      .publish({.exchange = "cards.dlx", .routing_key = "any", .biz_id = "probe", .body = "p"});
  const auto probe = admin_->get("cards.dlq");
  ASSERT_TRUE(probe.has_value());
  EXPECT_EQ(probe->body, "p");
  const auto quorum = declare_queue_with_dead_letters(connection(), "cards-quorum",
                                                      {.type = idem::rabbitmq::QueueType::quorum,
                                                       .dead_letter_queue = "cards-quorum.dead",
                                                       .delivery_limit = 10});
  EXPECT_EQ(quorum.dead_letter_queue, "cards-quorum.dead");
  EXPECT_NO_THROW(declare_queue_with_dead_letters(connection(), "cards-quorum",
                                                  {.type = idem::rabbitmq::QueueType::quorum,
                                                   .dead_letter_queue = "cards-quorum.dead",
                                                   .delivery_limit = 10}));
  // x-delivery-limit is set: declaring it with another limit is refused.
  EXPECT_THROW(declare_queue_with_dead_letters(connection(), "cards-quorum",
                                               {.type = idem::rabbitmq::QueueType::quorum,
                                                .dead_letter_queue = "cards-quorum.dead",
                                                .delivery_limit = 11}),
               idem::rabbitmq::RabbitError);
  // On your own rabbitmq-c connection and channel.
  const auto native = declare_queue_with_dead_letters(admin_->native(), 1, "cards-native",
                                                      {.dead_letter_exchange = "native.dlx"});
  EXPECT_EQ(native.dead_letter_exchange, "native.dlx");
  EXPECT_EQ(native.dead_letter_queue, "cards-native.dlq");
  EXPECT_EQ(admin_->depth("cards-native.dlq"), 0u);  // exists
  // A queue that exists with other arguments: 406, and the message says what to do.
  try {
    declare_queue_with_dead_letters(connection(), "cards",
                                    {.type = idem::rabbitmq::QueueType::quorum});
    FAIL() << "declaring a classic queue as quorum must fail";
  } catch (const idem::rabbitmq::RabbitError& e) {
    EXPECT_EQ(e.code(), 406);
    EXPECT_NE(std::string(e.what()).find("PRECONDITION_FAILED"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("declaring queue 'cards.dlq'"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("exists with other arguments"), std::string::npos)
        << e.what();
  }
}

}  // namespace
