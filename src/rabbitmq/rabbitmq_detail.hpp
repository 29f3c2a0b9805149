#pragma once
// Private helpers of the RabbitMQ adapter: one RAII connection (socket, login, channel 1) and
// conversions between rabbitmq-c's byte buffers and string views.

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <memory>
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

/// What went wrong in an RPC reply, for messages.
std::string describe(const amqp_rpc_reply_t& reply);

/// String-valued AMQP table entries pointing into the strings given to add().
class Table {
 public:
  void add(std::string_view key, std::string_view value);
  amqp_table_t get() noexcept;

 private:
  std::vector<amqp_table_entry_t> entries_;
};

/// An open connection with channel 1. Move-only; closes politely unless broken.
class Connection {
 public:
  /// @throws RabbitError when connecting, logging in or opening the channel fails.
  explicit Connection(const ConnectionOptions& options);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  amqp_connection_state_t get() const noexcept { return state_.get(); }
  int socket() const noexcept { return amqp_get_sockfd(state_.get()); }
  /// A socket or protocol error happened: skip the close handshake.
  void mark_broken() noexcept { broken_ = true; }
  /// Throws RabbitError(what + reason) unless the last RPC succeeded; marks broken if so.
  void check_rpc(std::string_view what);

 private:
  struct StateDeleter {
    void operator()(amqp_connection_state_t state) const noexcept {
      amqp_destroy_connection(state);
    }
  };
  std::unique_ptr<amqp_connection_state_t_, StateDeleter> state_;
  bool broken_ = false;
  bool open_ = false;
};

}  // namespace idem::rabbitmq::detail
