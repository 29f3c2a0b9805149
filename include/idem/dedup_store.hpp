#pragma once
/// @file
/// @brief idem::DedupStore, the interface every backend implements, and idem::ClaimGuard.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "idem/claim.hpp"
#include "idem/error.hpp"

namespace idem {

/// @brief What a store holds for one key, for operators (idemctl inspect).
struct RecordInfo {
  enum class State { in_progress, done, released };
  State state = State::done;
  std::uint64_t token = 0;
  /// Milliseconds until the lease (in_progress) or retention (done) ends; <= 0: expired.
  std::int64_t expires_in_ms = 0;
  std::optional<std::string> response{};
};

/// @brief Store-wide numbers, for operators (idemctl stats). The same meaning for every store
/// (the conformance suite checks it); unknown values stay 0.
struct StoreStats {
  /// Records the store holds now, in any state, including expired or released ones it has not
  /// deleted yet (what purge_expired() may drop, and what `bytes` pays for).
  std::uint64_t records = 0;
  /// Records in progress whose lease still runs (an expired lease is not counted).
  std::uint64_t in_progress = 0;
  /// Done records still within their retention.
  std::uint64_t done = 0;
  /// Storage used by the records (memory, file or table size, as the backend can tell).
  std::uint64_t bytes = 0;
  /// Done records dropped early to respect a bound (bounded stores only).
  std::uint64_t evictions = 0;
  /// Entries where the store keeps its records that are not records of its own (e.g. a Redis
  /// key under the prefix written by another program); not counted in `records`.
  std::uint64_t foreign = 0;
};

/// @brief Throws InvalidMessage unless 1 <= key.size() <= max_key_bytes. Any bytes are allowed.
/// @throws idem::InvalidMessage with a message that says what to change.
void validate_key(std::string_view key, std::size_t max_key_bytes);

/// @brief The longest lease or retention a store accepts (100 years): deadlines stay far from
/// overflowing. IdempotentConsumer caps Options to it, so "forever" can be spelled
/// std::chrono::milliseconds::max().
inline constexpr std::chrono::milliseconds kMaxDuration{100LL * 366 * 24 * 3600 * 1000};

/// @brief validate_key, plus a lease and retention of 1 ms to kMaxDuration.
/// @throws idem::InvalidMessage for a bad key; idem::ConfigError for a bad duration.
void validate_request(const ClaimRequest& request);

/// @brief validate_request for every request of a batch.
/// @throws idem::InvalidMessage naming the first bad request's index.
void validate_keys(std::span<const ClaimRequest> requests);

/// @brief Abstract dedup record store.
///
/// The public, non-virtual methods validate keys once for every backend and translate any
/// non-idem exception a backend lets out into idem::StoreUnavailable. A backend implements
/// the protected do_* hooks (see docs/stores/writing-a-store.md):
/// - do_claim: atomically take a key that is absent, released, expired or whose lease expired;
///   otherwise report done (with the response), in_progress or conflict. Tokens handed out
///   for one key must strictly increase, across releases and takeovers.
/// - do_complete / do_release: act only while the token still owns the key; return false
///   otherwise (the lease expired and someone else took over).
/// The batch hooks default to a loop; backends with round trips override them.
class DedupStore {
 public:
  virtual ~DedupStore() = default;
  DedupStore() = default;
  DedupStore(const DedupStore&) = delete;
  DedupStore& operator=(const DedupStore&) = delete;

  /// @brief Tries to take ownership of request.key.
  /// @throws idem::InvalidMessage for an empty or oversized key.
  /// @throws idem::StoreUnavailable when the backend fails.
  Claim claim(const ClaimRequest& request) {
    validate_request(request);
    return translate_errors([&] { return do_claim(request); });
  }

  /// @brief Records a claimed key as done. False when the token no longer owns the key.
  /// @throws idem::StoreUnavailable when the backend fails.
  bool complete(const Completion& completion) {
    return translate_errors([&] { return do_complete(completion); });
  }

  /// @brief Gives up a claim so a redelivery can take it. False when the token no longer owns
  /// the key. @throws idem::StoreUnavailable when the backend fails.
  bool release(std::string_view key, std::uint64_t token) {
    return translate_errors([&] { return do_release(key, token); });
  }

  /// @brief claim() for many keys, one answer per request, in order.
  /// @throws idem::InvalidMessage naming the first bad request; nothing is claimed then.
  std::vector<Claim> claim_batch(std::span<const ClaimRequest> requests);

  /// @brief complete() for many keys; element i is complete(completions[i]).
  std::vector<bool> complete_batch(std::span<const Completion> completions);

  /// @brief Drops the record of a key whatever its state (an operator's "forget").
  /// True when a record existed.
  bool forget(std::string_view key) {
    return translate_errors([&] { return do_forget(key); });
  }

  /// @brief The record of a key, or nullopt when there is none.
  /// @throws idem::ConfigError when the backend cannot inspect.
  std::optional<RecordInfo> inspect(std::string_view key) {
    return translate_errors([&] { return do_inspect(key); });
  }

  /// @brief Store-wide counts (see StoreStats). May scan every record: an operator's call.
  /// @throws idem::ConfigError when the backend cannot count.
  StoreStats stats() {
    return translate_errors([&] { return do_stats(); });
  }
  [[deprecated("use stats()")]] StoreStats stats_summary() { return stats(); }

  /// @brief Drops up to max_records expired records now; returns how many (0 for a store whose
  /// records expire by themselves, like Redis).
  std::size_t purge_expired(std::size_t max_records = SIZE_MAX) {
    return translate_errors([&] { return do_purge_expired(max_records); });
  }
  [[deprecated("use purge_expired()")]] std::size_t purge_expired_records(std::size_t max_records) {
    return purge_expired(max_records);
  }

  /// @brief Blocks for up to max_wait, or less when the record of key may have changed (a
  /// backend that can be notified returns at the change; the others just pause). The
  /// consumer's Options::in_progress_wait asks again after each call.
  void await_change(std::string_view key, std::chrono::milliseconds max_wait) {
    translate_errors([&] { do_await_change(key, max_wait); });
  }

  /// @brief Short backend name used in error messages, e.g. "redis".
  virtual std::string_view name() const noexcept = 0;

 protected:
  virtual Claim do_claim(const ClaimRequest& request) = 0;
  virtual bool do_complete(const Completion& completion) = 0;
  virtual bool do_release(std::string_view key, std::uint64_t token) = 0;
  virtual bool do_forget(std::string_view key) = 0;
  virtual std::vector<Claim> do_claim_batch(std::span<const ClaimRequest> requests);
  virtual std::vector<bool> do_complete_batch(std::span<const Completion> completions);
  // Operator hooks; the defaults say the backend does not support them.
  virtual std::optional<RecordInfo> do_inspect(std::string_view key);
  virtual StoreStats do_stats();
  virtual std::size_t do_purge_expired(std::size_t max_records);
  // Default: sleeps max_wait.
  virtual void do_await_change(std::string_view key, std::chrono::milliseconds max_wait);

 protected:
  /// @brief Runs f; lets idem::Error through and turns any other exception into
  /// idem::StoreUnavailable naming this store.
  template <class F>
  auto translate_errors(F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw_unavailable(e.what());
    }
  }

 private:
  [[noreturn]] void throw_unavailable(const char* what) const;
  [[noreturn]] void throw_miscounted(const char* operation, std::size_t answers,
                                     std::size_t requests) const;

 protected:
  [[noreturn]] void throw_unsupported(std::string_view operation) const;
};

/// @brief Releases a claim when it goes out of scope unless dismissed; never throws (a claim
/// that cannot be released expires with its lease).
class ClaimGuard {
 public:
  ClaimGuard(DedupStore& store, std::string_view key, std::uint64_t token) noexcept
      : store_(&store), key_(key), token_(token) {}
  ClaimGuard(const ClaimGuard&) = delete;
  ClaimGuard& operator=(const ClaimGuard&) = delete;
  ~ClaimGuard() { release(); }

  void dismiss() noexcept { store_ = nullptr; }
  void release() noexcept {
    if (store_ == nullptr) return;
    try {
      store_->release(key_, token_);
    } catch (...) {  // NOLINT(bugprone-empty-catch): the lease expiry is the fallback
    }
    store_ = nullptr;
  }

 private:
  DedupStore* store_;
  std::string_view key_;
  std::uint64_t token_;
};

}  // namespace idem
