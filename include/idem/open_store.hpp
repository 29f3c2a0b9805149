#pragma once
/// @file
/// @brief idem::open_store: a DedupStore from a URL, so a service can take its store from
/// configuration. Link idem::open_store, which links every backend this idem was built with
/// (a program that needs one backend only and none of the others' C libraries links that
/// backend alone and constructs its store directly).

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "idem/dedup_store.hpp"
#include "idem/store_url.hpp"

namespace idem {

/// @brief The URL names a backend this idem was built without.
class StoreBackendNotBuilt : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

/// @brief How open_store opens what the URL names.
struct OpenStoreOptions {
  /// SQLite: fail (idem::StoreUnavailable) when the file does not exist instead of creating
  /// it; an operator's typo then leaves no empty database behind.
  bool must_exist = false;
  /// SQLite: open for reading only (SqliteOptions::read_only): inspect and stats work and
  /// never wait behind a writer; writes fail. Implies must_exist.
  bool read_only = false;
  /// SQLite: how long to wait for another connection's lock (SqliteOptions::busy_timeout).
  std::chrono::milliseconds busy_timeout{5000};
  /// Redis: send PING at once, so a wrong address or password is reported here.
  bool ping = true;
  /// Connections per node (Redis) or per store (PostgreSQL); 0: the backend's default.
  std::size_t pool_size = 0;
};

/// @brief Opens the store a URL names: memory:, sqlite:..., redis://..., postgres://... (see
/// idem::StoreUrl for the forms).
/// @throws idem::BadStoreUrl, idem::StoreBackendNotBuilt, idem::ConfigError (bad option
/// values), idem::StoreUnavailable (cannot be reached or opened).
std::unique_ptr<DedupStore> open_store(std::string_view url, const OpenStoreOptions& options = {});

/// @brief open_store() for a URL already parsed.
std::unique_ptr<DedupStore> open_store(const StoreUrl& url, const OpenStoreOptions& options = {});

/// @brief The backends open_store can open in this build, e.g. "memory, sqlite, redis".
std::string_view open_store_backends() noexcept;

}  // namespace idem
