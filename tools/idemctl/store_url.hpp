#pragma once
// idemctl's store URLs: sqlite:///path/to/db, redis://[[user]:password@]host[:port][/db][?...]
// and postgres://[user[:password]@]host[:port]/dbname[?param=value&schema=S].

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

/// @brief postgres:// or postgresql://, libpq's URI form; `schema` (idem's tables) is taken
/// out, every other parameter goes to libpq, which checks it when the store connects.
struct PostgresUrl {
  /// The URI without idem's own parameters, as PostgresOptions::conninfo.
  std::string conninfo;
  std::string schema = "idem";
};

using StoreUrl = std::variant<SqliteUrl, RedisUrl, PostgresUrl>;

/// @brief Parses a store URL. Percent-escapes (%40 ...) are decoded in the path, user,
/// password and query values.
/// @throws BadUrl naming what is wrong.
StoreUrl parse_store_url(std::string_view url);

/// @brief The URL for messages, with any password (user:password@ or password=) replaced by
/// "***".
std::string redacted(std::string_view url);

}  // namespace idemctl
