// The RabbitMQ publisher against a real rabbitmq-server (pipelined confirms, republishing under
// the same message_id) and the connection errors both sides report.

#include "support/rabbitmq_fixture.hpp"

namespace {

using namespace idem_rabbitmq_test;  // NOLINT(google-build-using-namespace): the fixture

TEST_F(RabbitMqAdapter, LostPublisherConfirmGivesTwoCopiesAndOneEffect) {
  admin_->declare_queue("confirms");
  std::set<std::string> sent;
  {
    idem::rabbitmq::Publisher publisher(
        connection(), {.confirm_timeout = 200ms,
                       .reconnect_backoff = 10ms,
                       .lose_confirm = [](const idem::InnerMsgId&, unsigned attempt) {
                         static int first_attempts = 0;
                         return attempt == 1 && first_attempts++ == 0;  // only the first message
                       }});
    for (int i = 0; i < 5; ++i) {
      sent.insert(publisher
                      .publish({.routing_key = "confirms",
                                .biz_id = "transfer-" + std::to_string(i),
                                .body = "amount=" + std::to_string(i)})
                      .to_string());
      EXPECT_EQ(publisher.last_attempts(), i == 0 ? 2u : 1u);
    }
  }
  EXPECT_EQ(admin_->depth("confirms"), 6u);  // the republished copy carries the same id

  idem::MemoryStore store;
  Effects effects;
  std::set<std::string> inner_ids;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    effects.add(m.key);
    inner_ids.insert(std::string(m.inner_id));
  });
  idem::rabbitmq::Consumer consumer(connection(), idem_consumer, options("confirms"));
  ASSERT_TRUE(poll_until([&] { return consumer.stats().acked == 6; }, consumer));
  EXPECT_EQ(effects.total, 5);
  EXPECT_EQ(inner_ids, sent);
}

TEST_F(RabbitMqAdapter, ConnectionRefusedSaysWhereAndWhy) {
  const int port = idem::test_support::free_port();  // nothing listens there
  const std::string where = "connection refused on 127.0.0.1:" + std::to_string(port);
  const idem::rabbitmq::ConnectionOptions nowhere{.port = port, .connect_timeout = 2s};
  try {
    idem::rabbitmq::Consumer consumer(
        nowhere, [](const idem::Message&) -> idem::Result { return {}; }, {.queue = "q"});
    FAIL() << "no broker there";
  } catch (const idem::rabbitmq::ConnectionError& e) {
    EXPECT_NE(std::string(e.what()).find(where), std::string::npos) << e.what();
    EXPECT_EQ(e.os_error(), ECONNREFUSED);
  }
  try {
    idem::rabbitmq::Publisher publisher(nowhere);
    FAIL() << "no broker there";
  } catch (const idem::rabbitmq::ConnectionError& e) {
    EXPECT_NE(std::string(e.what()).find(where), std::string::npos) << e.what();
  }
  EXPECT_THROW(idem::rabbitmq::declare_queue_with_dead_letters(nowhere, "q"),
               idem::rabbitmq::ConnectionError);
  try {
    idem::rabbitmq::declare_queue_with_dead_letters({.host = "no-such-host.invalid"}, "q");
    FAIL() << "no such host";
  } catch (const idem::rabbitmq::ConnectionError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot resolve RabbitMQ host 'no-such-host.invalid'"),
              std::string::npos)
        << e.what();
  }
}

TEST_F(RabbitMqAdapter, RefusedLoginSaysWhy) {
  auto bad = connection();
  bad.password = "wrong";
  try {
    idem::rabbitmq::Publisher publisher(bad);
    FAIL() << "wrong password";
  } catch (const idem::rabbitmq::ConnectionError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("AMQP login to 127.0.0.1:" + std::to_string(server->port()) +
                        " as 'guest' on vhost '/' failed"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("ACCESS_REFUSED"), std::string::npos) << what;
  }
}

TEST_F(RabbitMqAdapter, PipelinedPublisherKeepsItsWindowAndConfirmsEverything) {
  admin_->declare_queue("pipeline");
  std::vector<std::string> confirmed;
  idem::rabbitmq::Publisher publisher(connection(),
                                      {.window = 8, .on_confirm = [&](const idem::InnerMsgId& id) {
                                         confirmed.push_back(id.to_string());
                                       }});
  std::vector<std::string> sent;
  for (int i = 0; i < 100; ++i) {
    sent.push_back(publisher
                       .send({.routing_key = "pipeline",
                              .biz_id = "p-" + std::to_string(i),
                              .body = std::to_string(i)})
                       .to_string());
    EXPECT_LE(publisher.unconfirmed(), 8u);
  }
  publisher.flush();
  EXPECT_EQ(publisher.unconfirmed(), 0u);
  EXPECT_EQ(confirmed, sent);  // one queue: confirms come in publish order
  const auto stats = publisher.stats();
  EXPECT_EQ(stats.published, 100u);
  EXPECT_EQ(stats.confirmed, 100u);
  EXPECT_EQ(stats.republished, 0u);
  EXPECT_EQ(admin_->depth("pipeline"), 100u);
}

TEST_F(RabbitMqAdapter, PipelinedPublisherLosesNothingWhenTheServerDropsItsConnection) {
  admin_->declare_queue("pipelined-drop");
  constexpr int n = 2000;
  std::map<std::string, std::string> inner_of;  // biz-id -> the InnerMsgId send() assigned
  // Also one lost confirm on the new connection, so that messages the broker already holds
  // are published again too (duplicates downstream).
  idem::rabbitmq::Publisher publisher(
      connection(), {.reconnect_backoff = 20ms,
                     .window = n,
                     .on_error = [this](std::string_view e) { errors_.add(e); },
                     .lose_confirm =
                         [&](const idem::InnerMsgId& id, unsigned attempt) {
                           return attempt == 2 && id.to_string() == inner_of["pay-1500"];
                         }});
  auto send = [&](int i) {
    const std::string biz = "pay-" + std::to_string(i);
    inner_of[biz] = publisher
                        .send({.routing_key = "pipelined-drop",
                               .biz_id = biz,
                               .body = "amount=" + std::to_string(i)})
                        .to_string();
  };
  for (int i = 0; i < n / 2; ++i) send(i);
  // The window is not full, so not one confirm has been read: all are outstanding.
  EXPECT_EQ(publisher.unconfirmed(), static_cast<std::size_t>(n / 2));
  ASSERT_NO_THROW(server->ctl({"close_all_connections", "idem test: confirms outstanding"}));
  admin_ = std::make_unique<Admin>(server->port());  // closed too
  for (int i = n / 2; i < n; ++i) send(i);
  publisher.flush();
  const auto stats = publisher.stats();
  EXPECT_EQ(stats.confirmed, static_cast<std::uint64_t>(n));
  EXPECT_EQ(stats.failed, 0u);
  EXPECT_GE(stats.reconnects, 1u);
  EXPECT_GE(stats.republished, static_cast<std::uint64_t>(n / 2));  // at least the unconfirmed half
  EXPECT_EQ(errors_.count("CONNECTION_FORCED - idem test: confirms outstanding"), 1u);
  EXPECT_EQ(errors_.count("no confirm (lose_confirm)"), 1u);
  const std::uint32_t in_queue = admin_->depth("pipelined-drop");
  EXPECT_GE(in_queue, static_cast<std::uint32_t>(n));
  RecordProperty("republished", static_cast<int>(stats.republished));
  RecordProperty("copies_in_queue", static_cast<int>(in_queue));

  // Downstream: an idem consumer keyed on the biz-id applies one effect per logical message,
  // and every copy of a message carries the InnerMsgId it was first sent with.
  idem::MemoryStore store;
  Effects effects;
  std::atomic<int> wrong_ids{0};
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    effects.add(m.key);
    if (inner_of[std::string(m.key)] != m.inner_id) ++wrong_ids;
  });
  std::atomic<int> duplicates{0};
  auto opts = options("pipelined-drop");
  opts.prefetch = 256;
  opts.on_result = [&](const idem::rabbitmq::Delivery& d, const idem::Result& r) {
    if (inner_of[std::string(*d.header("idem-biz-id"))] != d.message_id) ++wrong_ids;
    if (r.outcome == idem::Outcome::duplicate) ++duplicates;
  };
  idem::rabbitmq::Consumer consumer(connection(), idem_consumer, opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().acked == in_queue; }, consumer, 60s));
  EXPECT_EQ(effects.total, n);
  EXPECT_EQ(effects.distinct(), static_cast<std::size_t>(n));
  EXPECT_EQ(duplicates, static_cast<int>(in_queue) - n);
  EXPECT_GT(duplicates, 0);
  EXPECT_EQ(wrong_ids, 0);
  std::fprintf(stderr, "pipelined drop: %llu republished, %u copies for %d messages\n",
               static_cast<unsigned long long>(stats.republished), in_queue, n);
}

TEST_F(RabbitMqAdapter, NackedMessageIsPublishedAgainThenGivenUp) {
  admin_->declare_bounded_queue("bounded", 1);  // the broker nacks publishes beyond one message
  idem::rabbitmq::Publisher publisher(
      connection(),
      {.max_attempts = 3, .on_error = [this](std::string_view e) { errors_.add(e); }});
  const idem::InnerMsgId first = publisher.send({.routing_key = "bounded", .biz_id = "a"});
  const idem::InnerMsgId second = publisher.send({.routing_key = "bounded", .biz_id = "b"});
  EXPECT_THROW(publisher.flush(), idem::rabbitmq::RabbitError);
  const auto failed = publisher.take_failed();
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].inner_id, second);
  EXPECT_NE(first, second);
  const auto stats = publisher.stats();
  EXPECT_EQ(stats.confirmed, 1u);
  EXPECT_EQ(stats.published, 4u);  // a, then b three times on the same channel
  EXPECT_EQ(stats.republished, 2u);
  EXPECT_EQ(stats.reconnects, 0u);
  EXPECT_EQ(errors_.count("unconfirmed: the broker nacked it (basic.nack); publishing it again"),
            2u);
  EXPECT_EQ(admin_->depth("bounded"), 1u);
}

TEST_F(RabbitMqAdapter, PublisherGivesUpAfterMaxAttemptsAndKeepsTheMessage) {
  admin_->declare_queue("give-up");
  idem::rabbitmq::Publisher publisher(
      connection(), {.confirm_timeout = 200ms,
                     .max_attempts = 2,
                     .reconnect_backoff = 10ms,
                     .on_error = [this](std::string_view e) { errors_.add(e); },
                     .lose_confirm = [](const idem::InnerMsgId&, unsigned) { return true; }});
  try {
    publisher.publish({.routing_key = "give-up", .biz_id = "a"});
    FAIL() << "every confirm is lost";
  } catch (const idem::rabbitmq::RabbitError& e) {
    EXPECT_NE(std::string(e.what()).find("unconfirmed after 2 attempts"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(publisher.last_attempts(), 2u);
  const idem::InnerMsgId id = publisher.send({.routing_key = "give-up", .biz_id = "b"});
  EXPECT_THROW(publisher.flush(), idem::rabbitmq::RabbitError);
  auto failed = publisher.take_failed();
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].inner_id, id);  // publish it again later under the same id
  EXPECT_EQ(failed[0].biz_id, "b");
  EXPECT_NO_THROW(publisher.flush());
  EXPECT_EQ(publisher.stats().failed, 2u);
  EXPECT_EQ(errors_.count("unconfirmed after 2 attempts (max_attempts)"), 2u);
}

}  // namespace
