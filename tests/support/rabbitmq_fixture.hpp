#pragma once
// The RabbitMQ adapter tests' shared harness: one real rabbitmq-server per test binary (a
// GoogleTest environment), an admin connection, recorders and the RabbitMqAdapter fixture.
// The server and its environment are inline: one per binary, however many files include this.

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

#include "idem/prometheus_metrics.hpp"
#include "idem/rabbitmq.hpp"
#include "support/free_port.hpp"
#include "support/rabbitmq_server.hpp"

namespace idem_rabbitmq_test {

using namespace std::chrono_literals;
using idem::test_support::rabbitmq::RabbitMqServer;

inline std::unique_ptr<RabbitMqServer> server;
inline std::string server_error;

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

[[maybe_unused]] inline const auto* const environment =
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
    return {.port = server->port(), .connect_timeout = 2s, .heartbeat = 5s};
  }
  idem::rabbitmq::ConsumerOptions options(const std::string& queue) const {
    return {.queue = queue,
            .prefetch = 16,
            .retry_delay = 20ms,
            .retry_backoff = 20ms,
            .max_retry_backoff = 200ms,
            .reconnect_backoff = 20ms,
            .max_reconnect_backoff = 200ms,
            .poll_timeout = 20ms,
            .on_error = [this](std::string_view e) { errors_.add(e); },
            .metrics = &metrics_};
  }
  std::uint64_t count(idem::Counter counter) const { return metrics_.value(counter); }
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
  mutable idem::PrometheusMetrics metrics_;  // what options() count into
};

}  // namespace idem_rabbitmq_test
