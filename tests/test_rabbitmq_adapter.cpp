// The RabbitMQ adapter against a real rabbitmq-server started once for this binary.

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/rabbitmq.hpp"
#include "support/rabbitmq_server.hpp"

namespace {

using namespace std::chrono_literals;
using idem::test_support::rabbitmq::RabbitMqServer;

std::unique_ptr<RabbitMqServer> server;
std::string server_error;

class RabbitMqEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    try {
      server = std::make_unique<RabbitMqServer>();
    } catch (const std::exception& e) {
      server_error = e.what();
    }
  }
  void TearDown() override { server.reset(); }
};

[[maybe_unused]] const auto* const environment =
    ::testing::AddGlobalTestEnvironment(new RabbitMqEnvironment);

// A plain rabbitmq-c connection for setting up and inspecting queues.
class Admin {
 public:
  explicit Admin(int port) : conn_(amqp_new_connection()) {
    amqp_socket_t* socket = amqp_tcp_socket_new(conn_);
    if (amqp_socket_open(socket, "127.0.0.1", port) != 0) throw std::runtime_error("connect");
    amqp_login(conn_, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
    amqp_channel_open(conn_, 1);
    check("channel.open");
  }
  ~Admin() {
    amqp_channel_close(conn_, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn_, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn_);
  }
  Admin(const Admin&) = delete;
  Admin& operator=(const Admin&) = delete;

  // Same arguments as the adapter declares, or the broker refuses the second declaration.
  void declare_queue(const std::string& queue, const std::string& dlx = "") {
    amqp_table_entry_t entry{};
    amqp_table_t args = amqp_empty_table;
    if (!dlx.empty()) {
      entry.key = amqp_cstring_bytes("x-dead-letter-exchange");
      entry.value.kind = AMQP_FIELD_KIND_UTF8;
      entry.value.value.bytes = amqp_cstring_bytes(dlx.c_str());
      args = {1, &entry};
    }
    amqp_queue_declare(conn_, 1, amqp_cstring_bytes(queue.c_str()), 0, 1, 0, 0, args);
    check("queue.declare");
  }
  void declare_fanout(const std::string& exchange, const std::string& bound_queue) {
    amqp_exchange_declare(conn_, 1, amqp_cstring_bytes(exchange.c_str()),
                          amqp_cstring_bytes("fanout"), 0, 1, 0, 0, amqp_empty_table);
    check("exchange.declare");
    declare_queue(bound_queue);
    amqp_queue_bind(conn_, 1, amqp_cstring_bytes(bound_queue.c_str()),
                    amqp_cstring_bytes(exchange.c_str()), amqp_empty_bytes, amqp_empty_table);
    check("queue.bind");
  }
  // Ready (not unacked) messages in queue.
  std::uint32_t depth(const std::string& queue) {
    amqp_queue_declare_ok_t* ok = amqp_queue_declare(conn_, 1, amqp_cstring_bytes(queue.c_str()), 1,
                                                     0, 0, 0, amqp_empty_table);
    check("queue.declare passive");
    return ok->message_count;
  }

 private:
  void check(const char* what) {
    if (amqp_get_rpc_reply(conn_).reply_type != AMQP_RESPONSE_NORMAL) {
      throw std::runtime_error(std::string(what) + " failed");
    }
  }
  amqp_connection_state_t conn_;
};

struct Effects {
  void add(std::string_view key) {
    std::lock_guard lock(mutex);
    ++count[std::string(key)];
    ++total;
  }
  std::size_t distinct() const {
    std::lock_guard lock(mutex);
    return count.size();
  }
  mutable std::mutex mutex;
  std::map<std::string, int> count;
  std::atomic<int> total{0};
};

class RabbitMqAdapter : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(server, nullptr) << "no rabbitmq-server for the RabbitMQ tests: " << server_error;
    admin_ = std::make_unique<Admin>(server->port());
  }
  idem::rabbitmq::ConnectionOptions connection() const {
    return {.port = server->port(), .connect_timeout = 2s, .heartbeat_seconds = 5};
  }
  idem::rabbitmq::ConsumerOptions options(const std::string& queue) const {
    return {.queue = queue,
            .prefetch = 16,
            .retry_delay = 20ms,
            .backoff = 20ms,
            .max_backoff = 200ms,
            .poll_timeout = 20ms,
            .on_error = [](std::string_view e) {
              std::fprintf(stderr, "rabbitmq adapter: %.*s\n", static_cast<int>(e.size()),
                           e.data());
            }};
  }
  void publish(const std::string& queue, int n, const std::string& prefix) {
    idem::rabbitmq::Publisher publisher(connection());
    for (int i = 0; i < n; ++i) {
      publisher.publish({.routing_key = queue,
                         .biz_id = prefix + std::to_string(i),
                         .body = "body-" + std::to_string(i)});
    }
  }
  static bool poll_until(const std::function<bool()>& pred, idem::rabbitmq::Consumer& consumer,
                         std::chrono::milliseconds timeout = 20s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      consumer.poll(20ms);
    }
    return true;
  }

  std::unique_ptr<Admin> admin_;
};

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
  EXPECT_EQ(admin_->depth("stream"), 0u);
}

TEST_F(RabbitMqAdapter, LostPublisherConfirmGivesTwoCopiesAndOneEffect) {
  admin_->declare_queue("confirms");
  std::set<std::string> sent;
  {
    idem::rabbitmq::Publisher publisher(
        connection(), {.confirm_timeout = 200ms,
                       .backoff = 10ms,
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

TEST_F(RabbitMqAdapter, FailingMessageIsRequeuedThenDeadLettered) {
  admin_->declare_fanout("idem.test.dlx", "dead");
  admin_->declare_queue("work", "idem.test.dlx");
  publish("work", 1, "bad-");
  publish("work", 1, "good-");
  idem::MemoryStore store;
  Effects effects;
  int bad_calls = 0;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    if (m.key.starts_with("bad-")) {
      ++bad_calls;
      throw std::runtime_error("cannot parse");
    }
    effects.add(m.key);
  });
  auto opts = options("work");
  opts.dead_letter_exchange = "idem.test.dlx";
  opts.max_attempts = 3;
  idem::rabbitmq::Consumer consumer(connection(), idem_consumer, opts);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().dead_lettered == 1 && effects.total == 1; },
                         consumer));
  EXPECT_EQ(bad_calls, 3);
  EXPECT_EQ(consumer.stats().requeued, 2u);
  for (int i = 0; i < 50 && admin_->depth("dead") == 0; ++i) std::this_thread::sleep_for(20ms);
  EXPECT_EQ(admin_->depth("dead"), 1u);
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
}

}  // namespace
