#pragma once
/// @file
/// @brief The exceptions of idem::RedisStore: each kind of Redis failure is its own type, all
/// of them idem::StoreUnavailable (do not ack; retrying later may succeed).

#include <chrono>
#include <optional>
#include <string>

#include "idem/error.hpp"

namespace idem {

/// @brief RedisStore could not get an answer it can use. what() is summary() — a stable first
/// part that names the node and what to check, so logs group — followed, when connects to the
/// node are held back by the reconnect backoff, by ". Next reconnect attempt in N ms."
class RedisUnavailable : public StoreUnavailable {
 public:
  /// @brief What went wrong, by what the caller can do about it.
  enum class Kind {
    unavailable,  ///< none of the below: pool exhausted, cluster not settling, too few replicas
    io,           ///< the connection could not be made or broke (refused, reset, closed)
    timeout,      ///< no connection or no reply within the configured timeout
    protocol,     ///< the peer does not speak the Redis protocol (wrong host/port?)
    reply,        ///< Redis answered with an error (credentials, OOM, ACL, SELECT, ...)
  };

  RedisUnavailable(Kind kind, std::string summary,
                   std::optional<std::chrono::milliseconds> retry_in = std::nullopt)
      : StoreUnavailable(compose(summary, retry_in)),
        kind_(kind),
        summary_(std::move(summary)),
        retry_in_(retry_in) {}

  /// @brief The kind, as the dynamic type also says (RedisIoError, RedisTimeout, ...).
  Kind kind() const noexcept { return kind_; }
  /// @brief what() without the varying reconnect delay.
  const std::string& summary() const noexcept { return summary_; }
  /// @brief Set when the call was refused without trying, because the node's reconnect
  /// backoff (RedisOptions::reconnect_backoff) still runs: how long it still runs.
  std::optional<std::chrono::milliseconds> retry_in() const noexcept { return retry_in_; }

 private:
  static std::string compose(const std::string& summary,
                             std::optional<std::chrono::milliseconds> retry_in) {
    if (!retry_in) return summary;
    return summary + ". Next reconnect attempt in " + std::to_string(retry_in->count()) + " ms.";
  }

  Kind kind_;
  std::string summary_;
  std::optional<std::chrono::milliseconds> retry_in_;
};

/// @brief The connection to Redis could not be made or broke (Kind::io).
class RedisIoError : public RedisUnavailable {
 public:
  explicit RedisIoError(std::string summary,
                        std::optional<std::chrono::milliseconds> retry_in = std::nullopt)
      : RedisUnavailable(Kind::io, std::move(summary), retry_in) {}

 protected:
  RedisIoError(Kind kind, std::string summary, std::optional<std::chrono::milliseconds> retry_in)
      : RedisUnavailable(kind, std::move(summary), retry_in) {}
};

/// @brief No connection or no reply within RedisOptions::connect_timeout / command_timeout
/// (Kind::timeout). An I/O error: the connection is closed.
class RedisTimeout : public RedisIoError {
 public:
  explicit RedisTimeout(std::string summary,
                        std::optional<std::chrono::milliseconds> retry_in = std::nullopt)
      : RedisIoError(Kind::timeout, std::move(summary), retry_in) {}
};

/// @brief The peer did not answer like Redis (Kind::protocol): check host and port.
class RedisProtocolError : public RedisUnavailable {
 public:
  explicit RedisProtocolError(std::string summary,
                              std::optional<std::chrono::milliseconds> retry_in = std::nullopt)
      : RedisUnavailable(Kind::protocol, std::move(summary), retry_in) {}
};

/// @brief Redis answered with an error reply (Kind::reply): refused credentials, OOM, a command
/// the user's ACL forbids, ... The message quotes the reply and says what to change.
class RedisReplyError : public RedisUnavailable {
 public:
  explicit RedisReplyError(std::string summary,
                           std::optional<std::chrono::milliseconds> retry_in = std::nullopt)
      : RedisUnavailable(Kind::reply, std::move(summary), retry_in) {}
};

}  // namespace idem
