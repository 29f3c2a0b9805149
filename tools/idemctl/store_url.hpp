#pragma once
// idemctl's store URLs: sqlite:///path/to/db and redis://[[user]:password@]host[:port][/db][?...].

#include <chrono>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>

namespace idemctl {

/// @brief A store URL that cannot be used; what() says what is wrong and the expected form.
class BadUrl : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// @brief sqlite:///absolute/path or sqlite://relative/path.
struct SqliteUrl {
  std::string path;
};

/// @brief redis://[[user]:password@]host[:port][/db][?prefix=P&timeout_ms=N].
struct RedisUrl {
  std::string host = "127.0.0.1";
  int port = 6379;
  int db = 0;
  std::string user{};
  std::string password{};
  std::string prefix = "idem:";
  /// Connect and command timeout.
  std::chrono::milliseconds timeout{2000};
};

using StoreUrl = std::variant<SqliteUrl, RedisUrl>;

/// @brief Parses a store URL. Percent-escapes (%40 ...) are decoded in the path, user,
/// password and query values.
/// @throws BadUrl naming what is wrong.
StoreUrl parse_store_url(std::string_view url);

/// @brief The URL for messages, with any password replaced by "***".
std::string redacted(std::string_view url);

}  // namespace idemctl
