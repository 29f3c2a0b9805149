#pragma once
// idemctl's store factory and exit codes.

#include <memory>
#include <stdexcept>
#include <string_view>

#include "idem/dedup_store.hpp"
#include "store_url.hpp"

namespace idemctl {

/// @brief idemctl's exit codes (also listed in `idemctl --help` and docs/operating.md).
enum ExitCode : int {
  exit_ok = 0,
  exit_missing_key = 1,  ///< inspect/forget: the store has no record of the key
  exit_usage = 2,        ///< bad arguments or a bad store url
  exit_unavailable = 3,  ///< the store cannot be reached, or failed
  exit_unsupported = 4,  ///< this build or this store cannot do the operation
  exit_aborted = 5,      ///< forget was not confirmed
};

/// @brief The backend of a URL was not compiled into this idemctl.
class BackendNotBuilt : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// @brief Opens the store a URL names and checks it answers (Redis: PING; SQLite: the file
/// must exist, idemctl never creates a database).
/// @throws BackendNotBuilt, idem::StoreUnavailable, idem::ConfigError (bad option values).
std::unique_ptr<idem::DedupStore> open_store(const StoreUrl& url);

/// @brief The backends compiled in, e.g. "sqlite, redis" (or "none").
std::string_view built_backends() noexcept;

}  // namespace idemctl
