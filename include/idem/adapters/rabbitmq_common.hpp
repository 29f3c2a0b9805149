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
  /// Limit on TCP connect plus AMQP handshake.
  std::chrono::milliseconds connect_timeout{std::chrono::seconds{5}};
  /// AMQP heartbeat in seconds; 0 disables. Served while the loop waits for deliveries.
  int heartbeat_seconds = 30;
};

/// @brief Header carrying the biz-id (KeySource::header, the default).
inline constexpr std::string_view default_biz_id_header = "idem-biz-id";
/// @brief Header the consumer adds to count failed attempts when it republishes; unused by
/// default (attempts are counted in process and from x-delivery-count).
inline constexpr std::string_view attempts_header = "idem-attempts";

/// @brief rabbitmq-c or the broker reported an error; code() is the amqp_status_enum value or
/// the AMQP reply code (e.g. 404), see what().
class RabbitError : public Error {
 public:
  RabbitError(const std::string& what, int code) : Error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

}  // namespace idem::rabbitmq
