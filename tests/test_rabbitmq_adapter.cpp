// The RabbitMQ adapter against a real rabbitmq-server started once for this binary.

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <cerrno>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "idem/rabbitmq.hpp"
#include "support/free_port.hpp"
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
  // A classic queue limited to max_length ready messages that refuses (nacks) publishes beyond.
  void declare_bounded_queue(const std::string& queue, std::int64_t max_length) {
    amqp_table_entry_t entries[2]{};
    entries[0].key = amqp_cstring_bytes("x-max-length");
    entries[0].value.kind = AMQP_FIELD_KIND_I64;
    entries[0].value.value.i64 = max_length;
    entries[1].key = amqp_cstring_bytes("x-overflow");
    entries[1].value.kind = AMQP_FIELD_KIND_UTF8;
    entries[1].value.value.bytes = amqp_cstring_bytes("reject-publish");
    amqp_queue_declare(conn_, 1, amqp_cstring_bytes(queue.c_str()), 0, 1, 0, 0, {2, entries});
    check("queue.declare bounded");
  }
  amqp_connection_state_t native() const { return conn_; }
  void declare_fanout(const std::string& exchange, const std::string& bound_queue) {
    amqp_exchange_declare(conn_, 1, amqp_cstring_bytes(exchange.c_str()),
                          amqp_cstring_bytes("fanout"), 0, 1, 0, 0, amqp_empty_table);
    check("exchange.declare");
    declare_queue(bound_queue);
    amqp_queue_bind(conn_, 1, amqp_cstring_bytes(bound_queue.c_str()),
                    amqp_cstring_bytes(exchange.c_str()), amqp_empty_bytes, amqp_empty_table);
    check("queue.bind");
  }
  // A message straight from rabbitmq-c: string headers, and optionally an integer one.
  void publish_raw(const std::string& queue, const std::string& body,
                   const std::vector<std::pair<std::string, std::string>>& headers = {},
                   std::optional<std::pair<std::string, std::int64_t>> integer_header = {},
                   bool with_expiration_and_user_id = false) {
    std::vector<amqp_table_entry_t> entries;
    for (const auto& [name, value] : headers) {
      amqp_table_entry_t e{};
      e.key = amqp_cstring_bytes(name.c_str());
      e.value.kind = AMQP_FIELD_KIND_UTF8;
      e.value.value.bytes = amqp_cstring_bytes(value.c_str());
      entries.push_back(e);
    }
    if (integer_header) {
      amqp_table_entry_t e{};
      e.key = amqp_cstring_bytes(integer_header->first.c_str());
      e.value.kind = AMQP_FIELD_KIND_I64;
      e.value.value.i64 = integer_header->second;
      entries.push_back(e);
    }
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
    props.headers = {static_cast<int>(entries.size()), entries.data()};
    props.message_id = amqp_cstring_bytes("raw-message");
    if (with_expiration_and_user_id) {
      props._flags |= AMQP_BASIC_EXPIRATION_FLAG | AMQP_BASIC_USER_ID_FLAG;
      props.expiration = amqp_cstring_bytes("600000");
      props.user_id = amqp_cstring_bytes("guest");
    }
    if (amqp_basic_publish(conn_, 1, amqp_empty_bytes, amqp_cstring_bytes(queue.c_str()), 0, 0,
                           &props, amqp_cstring_bytes(body.c_str())) != AMQP_STATUS_OK) {
      throw std::runtime_error("basic.publish failed");
    }
  }
  struct Got {
    std::string body, message_id, routing_key;
    bool has_expiration = false, has_user_id = false;
    std::map<std::string, std::string> headers;  // integers as decimal text
  };
  // basic.get (auto-ack) of one message, trying `tries` times 20 ms apart (5 s by default).
  std::optional<Got> get(const std::string& queue, int tries = 250) {
    for (int i = 0; i < tries; ++i) {
      amqp_rpc_reply_t r = amqp_basic_get(conn_, 1, amqp_cstring_bytes(queue.c_str()), 1);
      if (r.reply_type != AMQP_RESPONSE_NORMAL) throw std::runtime_error("basic.get failed");
      if (r.reply.id == AMQP_BASIC_GET_OK_METHOD) {
        Got got;
        const auto* ok = static_cast<const amqp_basic_get_ok_t*>(r.reply.decoded);
        got.routing_key.assign(static_cast<const char*>(ok->routing_key.bytes),
                               ok->routing_key.len);
        amqp_message_t m{};
        if (amqp_read_message(conn_, 1, &m, 0).reply_type != AMQP_RESPONSE_NORMAL) {
          throw std::runtime_error("reading a message failed");
        }
        got.body.assign(static_cast<const char*>(m.body.bytes), m.body.len);
        got.has_expiration = (m.properties._flags & AMQP_BASIC_EXPIRATION_FLAG) != 0;
        got.has_user_id = (m.properties._flags & AMQP_BASIC_USER_ID_FLAG) != 0;
        if (m.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
          got.message_id.assign(static_cast<const char*>(m.properties.message_id.bytes),
                                m.properties.message_id.len);
        }
        if (m.properties._flags & AMQP_BASIC_HEADERS_FLAG) {
          for (int h = 0; h < m.properties.headers.num_entries; ++h) {
            const amqp_table_entry_t& e = m.properties.headers.entries[h];
            std::string name(static_cast<const char*>(e.key.bytes), e.key.len);
            if (e.value.kind == AMQP_FIELD_KIND_UTF8 || e.value.kind == AMQP_FIELD_KIND_BYTES) {
              got.headers[name].assign(static_cast<const char*>(e.value.value.bytes.bytes),
                                       e.value.value.bytes.len);
            } else if (e.value.kind == AMQP_FIELD_KIND_I64) {
              got.headers[name] = std::to_string(e.value.value.i64);
            }
          }
        }
        amqp_destroy_message(&m);
        return got;
      }
      std::this_thread::sleep_for(20ms);
    }
    return std::nullopt;
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

// Every line the adapter reported, with its level when it came through the Logger.
struct Lines {
  void add(std::string_view line) {
    std::lock_guard lock(mutex);
    lines.emplace_back(line);
    std::fprintf(stderr, "rabbitmq adapter: %.*s\n", static_cast<int>(line.size()), line.data());
  }
  std::size_t count(std::string_view part) const {
    std::lock_guard lock(mutex);
    std::size_t n = 0;
    for (const std::string& l : lines) n += l.find(part) != std::string::npos ? 1 : 0;
    return n;
  }
  mutable std::mutex mutex;
  std::vector<std::string> lines;
};

class RecordingLogger final : public idem::Logger {
 public:
  void log(idem::LogLevel level, std::string_view line) noexcept override {
    std::lock_guard lock(mutex_);
    lines_.emplace_back(level, std::string(line));
  }
  std::size_t count(idem::LogLevel level, std::string_view part) const {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    for (const auto& [l, text] : lines_) {
      n += l == level && text.find(part) != std::string::npos ? 1 : 0;
    }
    return n;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::pair<idem::LogLevel, std::string>> lines_;
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
            .on_error = [this](std::string_view e) { errors_.add(e); }};
  }
  // A consumer options with a dead-letter exchange bound to its dead-letter queue.
  idem::rabbitmq::ConsumerOptions with_dead_letters(const std::string& queue,
                                                    unsigned max_attempts = 3) {
    const auto t = idem::rabbitmq::declare_queue_with_dead_letters(connection(), queue);
    auto opts = options(queue);
    opts.dead_letter_exchange = t.dead_letter_exchange;
    opts.max_attempts = max_attempts;
    return opts;
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
  mutable Lines errors_;
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
  EXPECT_EQ(admin_->depth("stream"), 0u);
  EXPECT_GE(errors_.count("lost: the broker closed the connection: 320 CONNECTION_FORCED - idem "
                          "test: dropped mid-stream; reconnecting"),
            1u);
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
      connection(), {.backoff = 20ms,
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
                     .backoff = 10ms,
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
