#pragma once
/// @file
/// @brief The exception tree: every exception idem throws derives from idem::Error.

#include <stdexcept>
#include <string>

namespace idem {

/// @brief Base of every exception thrown by idem.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// @brief The message itself is unusable (empty key, key over max_key_bytes, ...).
/// Retrying will not help: dead-letter it.
class InvalidMessage : public Error {
 public:
  using Error::Error;
};

/// @brief The store could not be reached or answered with an error. Nothing was recorded as
/// done; the message must not be acked. Retrying later may succeed.
class StoreUnavailable : public Error {
 public:
  using Error::Error;
};

/// @brief A store was configured or used in a way it cannot support (bad option values).
class ConfigError : public Error {
 public:
  using Error::Error;
};

}  // namespace idem
