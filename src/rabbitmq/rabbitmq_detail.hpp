#pragma once
// Private helpers of the RabbitMQ adapter: one RAII connection (our own TCP connect for precise
// errors, login, channel 1), a confirm-mode channel that reports acks, nacks and returns, and
// conversions between rabbitmq-c's byte buffers and string views.

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "idem/adapters/rabbitmq_common.hpp"

namespace idem::rabbitmq::detail {

inline constexpr amqp_channel_t channel = 1;

inline amqp_bytes_t bytes(std::string_view s) noexcept {
  return amqp_bytes_t{s.size(), const_cast<char*>(s.data())};
}
inline std::string_view view(amqp_bytes_t b) noexcept {
  return b.len == 0 ? std::string_view{}
                    : std::string_view(static_cast<const char*>(b.bytes), b.len);
}

/// "host:port", as messages name the broker.
std::string endpoint(const ConnectionOptions& options);
/// What a failed rabbitmq-c status means; os_error is errno taken right after the failed
/// call (used for AMQP_STATUS_SOCKET_ERROR), e.g. "socket error: connection reset by peer".
std::string describe_status(int status, int os_error);
/// What went wrong in an RPC reply, for messages.
std::string describe(const amqp_rpc_reply_t& reply, int os_error = 0);
/// The reply code of a connection.close or channel.close reply, else the library status.
int code_of(const amqp_rpc_reply_t& reply) noexcept;

/// A numeric header value (x-delivery-count is a long) or decimal text (idem-attempts).
std::optional<std::int64_t> as_integer(const amqp_field_value_t& v) noexcept;
/// The entry called name in table, or nullptr.
const amqp_table_entry_t* find(const amqp_table_t& table, std::string_view name) noexcept;
/// "string", "long", ... for messages about a header of the wrong type.
std::string_view kind_name(std::uint8_t kind) noexcept;

/// AMQP table entries pointing into memory owned by the caller (strings given to add(), the
/// table given to add_all_except()), which must outlive every use of get().
class Table {
 public:
  void add(std::string_view key, std::string_view value);
  /// Every entry of table except those whose name is in skip.
  void add_all_except(const amqp_table_t& table, std::initializer_list<std::string_view> skip);
  void clear() noexcept { entries_.clear(); }
  amqp_table_t get() noexcept;

 private:
  std::vector<amqp_table_entry_t> entries_;
};

/// An open connection with channel 1. Closes politely unless broken.
class Connection {
 public:
  /// @throws ConnectionError when the TCP connect, the login or opening the channel fails.
  explicit Connection(const ConnectionOptions& options);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  amqp_connection_state_t get() const noexcept { return state_.get(); }
  int socket() const noexcept { return amqp_get_sockfd(state_.get()); }
  /// "host:port".
  const std::string& where() const noexcept { return where_; }
  /// A socket or protocol error happened: skip the close handshake.
  void mark_broken() noexcept { broken_ = true; }
  /// Throws RabbitError("<what> on <where>: <reason>") unless the last RPC succeeded (then the
  /// connection is marked broken: the broker closes the channel on any RPC error).
  void check_rpc(std::string_view what);

 private:
  struct StateDeleter {
    void operator()(amqp_connection_state_t state) const noexcept {
      amqp_destroy_connection(state);
    }
  };
  std::unique_ptr<amqp_connection_state_t_, StateDeleter> state_;
  std::string where_;
  bool broken_ = false;
  bool open_ = false;
};

/// A Connection whose channel 1 is in confirm mode (confirm.select). publish() returns the
/// publish sequence number; next() reports the broker's confirms as they arrive.
class ConfirmChannel {
 public:
  /// @throws ConnectionError (see Connection) or RabbitError when confirm.select fails.
  explicit ConfirmChannel(const ConnectionOptions& options);

  /// basic.publish; returns its sequence number (1, 2, ... on this channel).
  /// @throws ConnectionError when the frames cannot be written.
  std::uint64_t publish(std::string_view exchange, std::string_view routing_key, bool mandatory,
                        const amqp_basic_properties_t& properties, std::string_view body);

  enum class EventKind {
    ack,       ///< confirms tag (and every lower one when multiple)
    nack,      ///< the broker could not take tag (and every lower one when multiple)
    returned,  ///< a mandatory message routed nowhere (its ack follows); detail says why
    timeout,   ///< nothing before the deadline
    broken,    ///< the connection or channel is gone; detail says why
  };
  struct Event {
    EventKind kind = EventKind::timeout;
    std::uint64_t tag = 0;
    bool multiple = false;
    std::string detail{};
  };
  /// Waits until deadline for the next confirm-related frame.
  Event next(std::chrono::steady_clock::time_point deadline);

  Connection& connection() noexcept { return conn_; }

 private:
  Connection conn_;
  std::uint64_t next_seq_ = 0;
};

}  // namespace idem::rabbitmq::detail
