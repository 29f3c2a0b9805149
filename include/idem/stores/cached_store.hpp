#pragma once
/// @file
/// @brief idem::CachedStore: a bounded local cache of done keys in front of any DedupStore, so
/// a duplicate of a key this process has seen done costs no round trip to Redis or a
/// database. See docs/stores/cached.md.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "idem/clock.hpp"
#include "idem/dedup_store.hpp"
#include "idem/metrics.hpp"

namespace idem {

/// @brief Bounds and reporting of a CachedStore.
struct CachedOptions {
  /// Most done keys remembered; past it the least recently used are dropped (they are then
  /// asked of the store again).
  std::size_t max_entries = 100'000;
  /// Most bytes remembered (keys, stored responses and bookkeeping), same eviction.
  std::size_t max_bytes = std::size_t{64} << 20;
  /// Longest time an entry answers for the store, whatever the record's retention. Bounds how
  /// long a forget() made through another process (idemctl, another consumer) goes unnoticed.
  std::chrono::milliseconds max_ttl{std::chrono::minutes{5}};
  /// Counter::cache_hits and Counter::cache_misses go here when set. Must outlive the store.
  Metrics* metrics = nullptr;
  /// Time source of the entries' deadlines; nullptr: idem::monotonic_clock(). Only durations
  /// are compared with the store's, so the store's clock may differ.
  const Clock* clock = nullptr;
};

/// @brief The old name of CachedOptions.
using CachedStoreOptions [[deprecated("use idem::CachedOptions")]] = CachedOptions;

/// @brief What a CachedStore has answered, read without stopping it.
struct CachedStoreStats {
  std::uint64_t hits = 0;    ///< claims answered from the cache (no store call)
  std::uint64_t misses = 0;  ///< claims asked of the store
  std::size_t entries = 0;   ///< done keys remembered now
  std::size_t bytes = 0;     ///< bytes accounted against max_bytes
};

/// @brief A decorator over any DedupStore that remembers done keys locally.
///
/// A claim of a key the cache holds as done (with a compatible payload fingerprint) is
/// answered `done`, with the stored response, without calling the store. Everything else
/// goes to the store: every claim that can acquire a key, completions, releases, forgets.
/// An entry is made when this process completes a key (it lives for the completion's
/// retention) or when the store answers `done` (it lives for what inspect() says is left of
/// the record), and never longer than max_ttl: it never outlives the record it stands for.
/// forget() through the decorator drops the entry; a forget elsewhere is seen once the entry
/// ends. Thread-safe. The inner store must outlive the decorator.
class CachedStore final : public DedupStore {
 public:
  /// @throws idem::ConfigError for zero bounds or a non-positive max_ttl.
  explicit CachedStore(DedupStore& inner, CachedOptions options = {});
  ~CachedStore() override;

  std::string_view name() const noexcept override { return name_; }
  DedupStore& inner() const noexcept { return inner_; }
  /// @brief The cache's own counters (hits, misses, entries); stats() gives the inner store's
  /// StoreStats.
  CachedStoreStats counters() const;
  [[deprecated("use counters()")]] CachedStoreStats cache_stats() const { return counters(); }
  /// @brief Forgets every cached entry (the store's records are untouched).
  void clear_cache();

 private:
  Claim do_claim(const ClaimRequest& request) override;
  bool do_complete(const Completion& completion) override;
  bool do_release(std::string_view key, std::uint64_t token) override;
  bool do_forget(std::string_view key) override;
  std::vector<Claim> do_claim_batch(std::span<const ClaimRequest> requests) override;
  std::vector<bool> do_complete_batch(std::span<const Completion> completions) override;
  std::optional<RecordInfo> do_inspect(std::string_view key) override;
  StoreStats do_stats() override;
  std::size_t do_purge_expired(std::size_t max_records) override;
  void do_await_change(std::string_view key, std::chrono::milliseconds max_wait) override;

  // Remembers what a miss taught: an acquired claim's fingerprint (until its completion),
  // or a done record.
  void learn(const ClaimRequest& request, const Claim& claim, std::int64_t asked_at,
             std::uint64_t generation);

  DedupStore& inner_;
  std::string name_;
  struct Cache;
  std::unique_ptr<Cache> cache_;
};

}  // namespace idem
