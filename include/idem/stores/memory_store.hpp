#pragma once
/// @file
/// @brief idem::MemoryStore: a thread-safe, bounded, TTL-aware in-process DedupStore.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "idem/clock.hpp"
#include "idem/dedup_store.hpp"

namespace idem {

/// @brief Limits and tuning of a MemoryStore. 0 means "no limit" / "pick a default".
struct MemoryOptions {
  /// Most records kept; past it the oldest done records are evicted (an evicted key can be
  /// processed again). Enforced per shard as max_keys / shards. 0: unbounded.
  std::size_t max_keys = 0;
  /// Most bytes of records (keys, bookkeeping, stored responses); same eviction as max_keys.
  /// 0: unbounded.
  std::size_t max_bytes = 0;
  /// Independently locked shards (rounded up to a power of two). 0: 64.
  std::size_t shards = 0;
  /// Time source; nullptr: idem::monotonic_clock(). Must outlive the store.
  const Clock* clock = nullptr;
};

/// @brief The old name of MemoryOptions.
using MemoryStoreOptions [[deprecated("use idem::MemoryOptions")]] = MemoryOptions;

/// @brief Counters of a MemoryStore, read without stopping it.
struct MemoryStoreStats {
  std::size_t keys = 0;         ///< records held now (any state)
  std::size_t bytes = 0;        ///< bytes accounted against max_bytes
  std::uint64_t evictions = 0;  ///< done records dropped early to respect the bounds
  std::uint64_t expired = 0;    ///< records dropped because their lease or retention ended
  std::uint64_t takeovers = 0;  ///< claims taken over from a holder whose lease expired
};

/// @brief In-process DedupStore: sharded, each shard a mutex and an abseil flat hash set of
/// compact records in insertion order. Expired records are purged a few at a time by the
/// calls that insert, never by a full scan. It does not survive a restart: use SqliteStore or
/// RedisStore when redeliveries can outlive the process.
class MemoryStore final : public DedupStore {
 public:
  explicit MemoryStore(MemoryOptions options = {});
  ~MemoryStore() override;

  /// @brief The store's own counters, read without stopping it (no scan; cheap to poll).
  /// stats() gives the store-wide StoreStats every backend has.
  MemoryStoreStats counters() const;
  std::string_view name() const noexcept override { return "memory"; }

 private:
  Claim do_claim(const ClaimRequest& request) override;
  bool do_complete(const Completion& completion) override;
  bool do_release(std::string_view key, std::uint64_t token) override;
  bool do_forget(std::string_view key) override;
  std::optional<RecordInfo> do_inspect(std::string_view key) override;
  StoreStats do_stats() override;
  void do_await_change(std::string_view key, std::chrono::milliseconds max_wait) override;
  std::size_t do_purge_expired(std::size_t max_records) override;

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem
