#pragma once
/// @file
/// @brief Store URLs: memory:, sqlite:, redis:// and postgres:// (postgresql://) parsed into
/// plain values, for services that take their store from configuration (see idem::open_store)
/// and for idemctl. Part of the idem::open_store target.

#include <chrono>
#include <string>
#include <string_view>
#include <variant>

#include "idem/error.hpp"

namespace idem {

/// @brief A store URL that cannot be used; what() quotes the URL (password masked), says what is
/// wrong and shows the expected form.
class BadStoreUrl : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

/// @brief memory: (an in-process MemoryStore; nothing survives the process).
struct MemoryUrl {};

/// @brief sqlite:///absolute/path, sqlite:/absolute/path or sqlite://relative/path.
struct SqliteUrl {
  std::string path;
};

/// @brief redis://[[user]:password@]host[:port][/db][?prefix=P&timeout_ms=N&db=N].
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

using StoreUrl = std::variant<MemoryUrl, SqliteUrl, RedisUrl, PostgresUrl>;

/// @brief Parses a store URL (RFC 3986, with uriparser). Percent-escapes (%40 ...) are decoded
/// in the path, user, password and query values; a space in a path may be written as is.
/// @throws idem::BadStoreUrl naming what is wrong.
StoreUrl parse_store_url(std::string_view url);

/// @brief The URL for messages, with any password (user:password@ or password=) replaced by
/// "***".
std::string redact_store_url(std::string_view url);

}  // namespace idem
