#include "idem/stores/cached_store.hpp"

#include <absl/container/flat_hash_map.h>

#include <algorithm>
#include <atomic>
#include <list>
#include <mutex>
#include <utility>

namespace idem {

// An LRU list of done keys with a hash index into it, plus the fingerprints of claims this
// process acquired and has not completed yet (a Completion carries none, and an entry must
// answer `conflict` cases by passing them to the store, not `done`).
struct CachedStore::Cache {
  struct Entry {
    std::string key;
    std::int64_t deadline_ms;
    Fingerprint fingerprint;
    std::optional<std::string> response;
    std::size_t bytes;
  };
  struct Pending {
    std::uint64_t token;
    Fingerprint fingerprint;
  };
  using List = std::list<Entry>;

  Cache(CachedOptions opts)
      : options(opts), clock(opts.clock != nullptr ? *opts.clock : monotonic_clock()) {}

  std::int64_t now() const noexcept { return clock.now_ms(); }

  // A done answer for the request, when a live entry with a compatible fingerprint has one.
  std::optional<Claim> lookup(const ClaimRequest& request) {
    {
      std::lock_guard lock(mutex);
      auto found = index.find(request.key);
      if (found != index.end()) {
        Entry& entry = *found->second;
        if (entry.deadline_ms <= now()) {
          erase(found);
        } else if (request.fingerprint.empty() || entry.fingerprint == request.fingerprint) {
          lru.splice(lru.begin(), lru, found->second);
          hits.fetch_add(1, std::memory_order_relaxed);
          if (options.metrics != nullptr) options.metrics->add(Counter::cache_hits);
          return Claim{.status = ClaimStatus::done, .response = entry.response};
        }
      }
    }
    misses.fetch_add(1, std::memory_order_relaxed);
    if (options.metrics != nullptr) options.metrics->add(Counter::cache_misses);
    return std::nullopt;
  }

  // The forget generation before a store call whose answer may be remembered.
  std::uint64_t generation() {
    std::lock_guard lock(mutex);
    return forgets;
  }

  // Remembers a done key until deadline_ms (capped by max_ttl from now), replacing what the
  // cache held for it. Not when a forget went through since `seen` (the answer may predate
  // it), nor when the entry would be too big or already over.
  void remember(std::string_view key, const Fingerprint& fingerprint,
                const std::optional<std::string>& response, std::int64_t deadline_ms,
                std::uint64_t seen) {
    const std::int64_t now_ms = now();
    deadline_ms = std::min(deadline_ms, now_ms + options.max_ttl.count());
    const std::size_t bytes =
        sizeof(Entry) + 2 * sizeof(void*) + key.size() + (response ? response->size() : 0);
    std::lock_guard lock(mutex);
    if (auto found = index.find(key); found != index.end()) erase(found);
    if (seen != forgets || deadline_ms <= now_ms || bytes > options.max_bytes) return;
    lru.push_front(Entry{std::string(key), deadline_ms, fingerprint, response, bytes});
    index.emplace(lru.front().key, lru.begin());
    total_bytes += bytes;
    while (index.size() > options.max_entries || total_bytes > options.max_bytes) {
      erase(index.find(lru.back().key));
    }
  }

  void forget(std::string_view key) {
    std::lock_guard lock(mutex);
    ++forgets;
    if (auto found = index.find(key); found != index.end()) erase(found);
    if (auto found = pending.find(absl::string_view(key.data(), key.size()));
        found != pending.end())
      pending.erase(found);
  }

  void acquired(std::string_view key, std::uint64_t token, const Fingerprint& fingerprint) {
    std::lock_guard lock(mutex);
    // Claims that were never completed nor released (a store error on the way) would pile
    // up; past the bound they are dropped: their completions are then not cached.
    if (pending.size() >= options.max_entries) pending.clear();
    pending.insert_or_assign(std::string(key), Pending{token, fingerprint});
  }

  // The fingerprint of our claim (key, token), removing it; nullopt if it is not ours.
  std::optional<Fingerprint> settle(std::string_view key, std::uint64_t token) {
    std::lock_guard lock(mutex);
    auto found = pending.find(absl::string_view(key.data(), key.size()));
    if (found == pending.end() || found->second.token != token) return std::nullopt;
    const Fingerprint fingerprint = found->second.fingerprint;
    pending.erase(found);
    return fingerprint;
  }

  void erase(absl::flat_hash_map<std::string_view, List::iterator>::iterator found) {
    const List::iterator entry = found->second;
    total_bytes -= entry->bytes;
    index.erase(found);
    lru.erase(entry);
  }

  const CachedOptions options;
  const Clock& clock;
  std::mutex mutex;
  List lru;                                                     // most recently used first
  absl::flat_hash_map<std::string_view, List::iterator> index;  // views into lru's keys
  absl::flat_hash_map<std::string, Pending> pending;
  std::size_t total_bytes = 0;
  std::uint64_t forgets = 0;  // forget() calls so far: answers older than one are not kept
  std::atomic<std::uint64_t> hits{0};
  std::atomic<std::uint64_t> misses{0};
};

namespace {
CachedOptions checked(CachedOptions options) {
  if (options.max_entries == 0 || options.max_bytes == 0 || options.max_ttl.count() <= 0) {
    throw ConfigError(
        "cached store: max_entries, max_bytes and max_ttl must be positive (to cache nothing, "
        "use the inner store directly)");
  }
  return options;
}
}  // namespace

CachedStore::CachedStore(DedupStore& inner, CachedOptions options)
    : inner_(inner),
      name_("cached " + std::string(inner.name())),
      cache_(std::make_unique<Cache>(checked(options))) {}

CachedStore::~CachedStore() = default;

CachedStoreStats CachedStore::counters() const {
  std::lock_guard lock(cache_->mutex);
  return CachedStoreStats{.hits = cache_->hits.load(std::memory_order_relaxed),
                          .misses = cache_->misses.load(std::memory_order_relaxed),
                          .entries = cache_->index.size(),
                          .bytes = cache_->total_bytes};
}

void CachedStore::clear_cache() {
  std::lock_guard lock(cache_->mutex);
  cache_->index.clear();
  cache_->lru.clear();
  cache_->total_bytes = 0;
}

void CachedStore::learn(const ClaimRequest& request, const Claim& claim, std::int64_t asked_at,
                        std::uint64_t generation) {
  if (claim.status == ClaimStatus::acquired) {
    // Recorded done at once (Mark::before_processing) for the retention; its completion
    // then stores the response, which replaces the entry.
    if (request.mark_done) {
      cache_->remember(request.key, request.fingerprint, std::nullopt,
                       asked_at + request.retention.count(), generation);
    }
    cache_->acquired(request.key, claim.token, request.fingerprint);
  } else if (claim.status == ClaimStatus::done) {
    // How long the record has left is not part of a claim's answer: ask once, so the entry
    // ends no later than the record. Stores that cannot tell are simply not cached.
    try {
      const std::optional<RecordInfo> info = inner_.inspect(request.key);
      if (info && info->state == RecordInfo::State::done) {
        cache_->remember(request.key, request.fingerprint, claim.response,
                         asked_at + info->expires_in_ms, generation);
      }
    } catch (const Error&) {  // NOLINT(bugprone-empty-catch): caching is an optimisation
    }
  }
}

Claim CachedStore::do_claim(const ClaimRequest& request) {
  if (std::optional<Claim> hit = cache_->lookup(request)) return std::move(*hit);
  const std::uint64_t generation = cache_->generation();
  const std::int64_t asked_at = cache_->now();
  Claim claim = inner_.claim(request);
  learn(request, claim, asked_at, generation);
  return claim;
}

std::vector<Claim> CachedStore::do_claim_batch(std::span<const ClaimRequest> requests) {
  std::vector<Claim> claims(requests.size());
  std::vector<ClaimRequest> missed;
  std::vector<std::size_t> missed_at;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    if (std::optional<Claim> hit = cache_->lookup(requests[i])) {
      claims[i] = std::move(*hit);
    } else {
      missed.push_back(requests[i]);
      missed_at.push_back(i);
    }
  }
  if (missed.empty()) return claims;
  const std::uint64_t generation = cache_->generation();
  const std::int64_t asked_at = cache_->now();
  std::vector<Claim> answers = inner_.claim_batch(missed);
  for (std::size_t j = 0; j < missed.size(); ++j) {
    learn(missed[j], answers[j], asked_at, generation);
    claims[missed_at[j]] = std::move(answers[j]);
  }
  return claims;
}

bool CachedStore::do_complete(const Completion& completion) {
  const std::uint64_t generation = cache_->generation();
  const std::int64_t asked_at = cache_->now();
  const bool done = inner_.complete(completion);
  const std::optional<Fingerprint> fingerprint = cache_->settle(completion.key, completion.token);
  if (done && fingerprint) {
    std::optional<std::string> response;
    if (completion.response) response = std::string(*completion.response);
    cache_->remember(completion.key, *fingerprint, response,
                     asked_at + completion.retention.count(), generation);
  }
  return done;
}

std::vector<bool> CachedStore::do_complete_batch(std::span<const Completion> completions) {
  const std::uint64_t generation = cache_->generation();
  const std::int64_t asked_at = cache_->now();
  std::vector<bool> done = inner_.complete_batch(completions);
  for (std::size_t i = 0; i < completions.size(); ++i) {
    const Completion& completion = completions[i];
    const std::optional<Fingerprint> fingerprint = cache_->settle(completion.key, completion.token);
    if (!done[i] || !fingerprint) continue;
    std::optional<std::string> response;
    if (completion.response) response = std::string(*completion.response);
    cache_->remember(completion.key, *fingerprint, response,
                     asked_at + completion.retention.count(), generation);
  }
  return done;
}

bool CachedStore::do_release(std::string_view key, std::uint64_t token) {
  (void)cache_->settle(key, token);
  return inner_.release(key, token);
}

bool CachedStore::do_forget(std::string_view key) {
  // Counted before and after the store's forget: an answer read before either is not kept.
  cache_->forget(key);
  const bool existed = inner_.forget(key);
  cache_->forget(key);
  return existed;
}

std::optional<RecordInfo> CachedStore::do_inspect(std::string_view key) {
  return inner_.inspect(key);
}

StoreStats CachedStore::do_stats() {
  return inner_.stats();
}

std::size_t CachedStore::do_purge_expired(std::size_t max_records) {
  return inner_.purge_expired(max_records);
}

void CachedStore::do_await_change(std::string_view key, std::chrono::milliseconds max_wait) {
  inner_.await_change(key, max_wait);
}

}  // namespace idem
