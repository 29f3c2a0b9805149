#pragma once
/// @file
/// @brief Vocabulary shared by the RabbitMQ consumer and publisher (<idem/rabbitmq.hpp>).

#include <chrono>
#include <string>
#include <string_view>

#include "idem/error.hpp"

namespace idem::rabbitmq {

/// @brief Where and how to connect.
struct ConnectionOptions {
  std::string host = "127.0.0.1";
  int port = 5672;
  std::string vhost = "/";
  std::string user = "guest";
  std::string password = "guest";
  /// Limit on TCP connect plus AMQP handshake; also the limit on each RPC (declare, ack).
  std::chrono::milliseconds connect_timeout{std::chrono::seconds{5}};
  /// AMQP heartbeat interval; 0 disables. Served while the loop waits for deliveries.
  std::chrono::seconds heartbeat{30};
};

/// @brief Header carrying the biz-id (KeySource::header, the default).
inline constexpr std::string_view default_biz_id_header = "idem-biz-id";
/// @brief Header counting the failed attempts of a message: the consumer sets it (decimal
/// text) on the copy it republishes for a retry (RetryMode::republish, the default).
inline constexpr std::string_view attempts_header = "idem-attempts";
/// @brief Headers the consumer adds to the copy it publishes to the dead-letter exchange:
/// why (e.g. "missing biz-id header idem-biz-id", "attempts exhausted: handler failed"),
/// the queue it was consumed from, and the failed attempts when that was the reason.
inline constexpr std::string_view dlq_reason_header = "idem-dlq-reason";
inline constexpr std::string_view dlq_queue_header = "idem-dlq-queue";
inline constexpr std::string_view dlq_attempts_header = "idem-dlq-attempts";

/// @brief rabbitmq-c or the broker reported an error; code() is the amqp_status_enum value or
/// the AMQP reply code (e.g. 404, 406), os_error() the errno of a failed socket call. what()
/// names the broker address and what went wrong, e.g. "connection refused on 127.0.0.1:5673".
class RabbitError : public Error {
 public:
  RabbitError(const std::string& what, int code, int os_error = 0)
      : Error(what), code_(code), os_error_(os_error) {}
  int code() const noexcept { return code_; }
  /// @brief errno of the socket call that failed (ECONNREFUSED, ETIMEDOUT, ...); 0 if none.
  int os_error() const noexcept { return os_error_; }

 private:
  int code_;
  int os_error_;
};

/// @brief The broker could not be reached, refused the login, or the connection broke:
/// trying again later may succeed (the consumer and publisher do so by themselves).
class ConnectionError : public RabbitError {
 public:
  using RabbitError::RabbitError;
};

}  // namespace idem::rabbitmq
