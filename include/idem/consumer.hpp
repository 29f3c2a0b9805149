#pragma once
/// @file
/// @brief idem::IdempotentConsumer: wraps a message handler so each biz-id takes effect once.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "idem/claim.hpp"
#include "idem/dedup_store.hpp"
#include "idem/detail/function_ref.hpp"
#include "idem/detail/invoke_handler.hpp"
#include "idem/detail/settle.hpp"
#include "idem/fingerprint.hpp"
#include "idem/inbox_store.hpp"
#include "idem/message.hpp"
#include "idem/metrics.hpp"
#include "idem/options.hpp"
#include "idem/partition_offset.hpp"
#include "idem/result.hpp"

namespace idem {

/// @brief A store that can run the handler inside the transaction that records the key: it
/// derives from idem::InboxStore<Store::Transaction> (idem::SqliteStore, idem::PostgresStore).
template <class Store>
concept TransactionalStore = requires {
  typename Store::Transaction;
}
&&std::is_base_of_v<InboxStore<typename Store::Transaction>, Store>;

namespace detail {
template <class Handler, class Store>
constexpr bool runs_in_transaction() {
  if constexpr (TransactionalStore<Store>) {
    return std::is_invocable_v<Handler&, const Message&, typename Store::Transaction&>;
  } else {
    return false;
  }
}
}  // namespace detail

/// @brief Wraps a handler so that each biz-id (Message::key) takes effect once, however often
/// the broker delivers it.
///
/// Accepted handler forms, R being void, std::optional<std::string> or convertible to
/// std::string (a returned value is stored and replayed to duplicates):
/// - R(const idem::Message&)
/// - R(const idem::Message&, idem::FencingToken)
/// - R(const idem::Message&, Store::Transaction&) with a transactional store (idem::SqliteStore,
///   idem::PostgresStore): the handler's writes and the dedup record commit together.
///
/// consume() may be called from many threads at once if the handler may be.
template <class Handler, class Store = DedupStore>
class IdempotentConsumer {
  static_assert(std::is_base_of_v<DedupStore, Store>, "Store must derive from idem::DedupStore");

 public:
  /// @brief Wraps handler; store must outlive the consumer.
  // (Parameter names differ from the accessors so a function-pointer handler does not trip
  // -Wshadow in users' builds.)
  /// @throws idem::ConfigError when lease or retention is not positive (values above
  /// idem::kMaxDuration, e.g. milliseconds::max() for "forever", are capped to it).
  IdempotentConsumer(Store& dedup_store, Handler wrapped, Options consumer_options = {})
      : store_(dedup_store), handler_(std::move(wrapped)), options_(checked(consumer_options)) {}

  /// @brief Runs the handler unless the key is done or held; see idem::Outcome for what to do
  /// with the message afterwards.
  /// @throws idem::InvalidMessage for an empty or oversized key (dead-letter the message).
  /// @throws idem::StoreUnavailable when the store fails (do not ack; retry later).
  Result consume(const Message& message) {
    const ClaimRequest request = request_for(message);
    Result result = attempt(message, request);
    if (result.outcome == Outcome::in_progress) result = wait_for_holder(message, request);
    rethrow_if_asked(result);
    return result;
  }

  /// @brief consume() for a batch, results in order. A key repeated within the batch is
  /// processed at most once. Backends pipeline claims and completions.
  /// @throws idem::InvalidMessage naming the first bad message; nothing is processed then.
  /// @throws idem::StoreUnavailable when the store fails.
  std::vector<Result> consume_batch(std::span<const Message> batch) {
    std::vector<ClaimRequest> requests;
    requests.reserve(batch.size());
    for (const Message& message : batch) requests.push_back(request_for(message));
    std::vector<Result> results;
    if constexpr (detail::runs_in_transaction<Handler, Store>()) {
      results = consume_in_inbox(batch, requests, {}, nullptr);
    } else {
      results = consume_batch_with_claims(batch, requests);
    }
    wait_for_holders(batch, requests, results);
    for (const Result& result : results) rethrow_if_asked(result);
    return results;
  }

  /// @brief consume_batch() in one transaction of a transactional store, storing offsets in
  /// the same transaction: a consumer that resumes from the store's committed_offsets() after
  /// a crash starts exactly where its committed effects end. A handler that takes only the
  /// Message runs inside the transaction too.
  ///
  /// The offsets are stored only if every result is ackable (idem::should_ack). Otherwise (a
  /// message failed, was in_progress or conflicted) the stored offsets are left unchanged, so
  /// nothing unacked is skipped after a restart: the whole batch is replayed, its processed
  /// messages as duplicates. *offsets_saved (when given) tells whether they were stored; when
  /// false, redeliver or dead-letter the unacked messages, then store the offsets yourself
  /// (save_offsets) or consume the batch again. With Options::in_progress_wait a message that
  /// was in progress at commit time may be settled by the wait afterwards: every result is
  /// then ackable but *offsets_saved is false (the stored offsets lag; a resumed consumer
  /// replays those messages as duplicates).
  /// @throws as consume_batch (with rethrow_handler_errors, after the commit).
  std::vector<Result> consume_batch_with_offsets(
      std::span<const Message> batch, std::span<const PartitionOffset> offsets,
      bool* offsets_saved = nullptr) requires TransactionalStore<Store> {
    std::vector<ClaimRequest> requests;
    requests.reserve(batch.size());
    for (const Message& message : batch) requests.push_back(request_for(message));
    std::vector<Result> results = consume_in_inbox(batch, requests, offsets, offsets_saved);
    wait_for_holders(batch, requests, results);
    for (const Result& result : results) rethrow_if_asked(result);
    return results;
  }

  const Options& options() const noexcept { return options_; }
  Store& store() const noexcept { return store_; }
  Handler& handler() noexcept { return handler_; }

 private:
  static Options checked(Options options) {
    if (options.lease.count() <= 0 || options.retention.count() <= 0) {
      throw ConfigError("Options::lease and Options::retention must be positive (lease " +
                        std::to_string(options.lease.count()) + " ms, retention " +
                        std::to_string(options.retention.count()) + " ms)");
    }
    options.lease = std::min(options.lease, kMaxDuration);
    options.retention = std::min(options.retention, kMaxDuration);
    return options;
  }

  ClaimRequest request_for(const Message& message) const {
    return ClaimRequest{
        .key = message.key,
        .fingerprint = !options_.verify_payload             ? Fingerprint{}
                       : options_.fingerprint_of != nullptr ? options_.fingerprint_of(message)
                                                            : Fingerprint::of(message.payload),
        .lease = options_.lease,
        .retention = options_.retention,
        .max_key_bytes = options_.max_key_bytes,
        .mark_done = options_.mark == Mark::before_processing,
    };
  }

  // Runs the handler under an acquired claim; on failure releases it (after_success) or keeps
  // the key done (before_processing: at-most-once). Never throws: callers rethrow when asked,
  // after they have recorded what the rest of a batch did.
  Result run_handler(const Message& message, std::uint64_t token) {
    ClaimGuard guard(store_, message.key, token);
    if (options_.mark == Mark::before_processing) guard.dismiss();
    try {
      std::optional<std::string> response = timed(Timing::handler, [&] {
        return detail::invoke_handler(handler_, message, FencingToken{token});
      });
      guard.dismiss();
      return Result{
          .outcome = Outcome::processed, .response = std::move(response), .fencing_token = token};
    } catch (...) {
      guard.release();
      log_handler_failure(message, std::current_exception(),
                          options_.mark == Mark::before_processing
                              ? "the key stays recorded (Mark::before_processing: at-most-once)"
                              : "the claim was released for a redelivery");
      return Result{
          .outcome = Outcome::failed, .error = std::current_exception(), .fencing_token = token};
    }
  }

  // The transactional inbox: the store runs the handler inside the transaction that records
  // the key. Counted and logged like every other path.
  std::vector<Result> consume_in_inbox(std::span<const Message> batch,
                                       std::span<const ClaimRequest> requests,
                                       std::span<const PartitionOffset> offsets,
                                       bool* offsets_saved) requires TransactionalStore<Store> {
    using Tx = typename Store::Transaction;
    std::vector<Result> results = guard_store([&] {
      return store_.consume_batch_in_transaction(
          requests,
          [&](std::size_t i, Tx& tx) -> std::optional<std::string> {
            return timed(Timing::handler, [&] {
              if constexpr (std::is_invocable_v<Handler&, const Message&, Tx&>) {
                return detail::call_returning_response(handler_, batch[i], tx);
              } else {
                return detail::call_returning_response(handler_, batch[i]);
              }
            });
          },
          offsets, offsets_saved);
    });
    for (std::size_t i = 0; i < results.size(); ++i) {
      if (results[i].outcome == Outcome::failed) {
        log_handler_failure(batch[i], results[i].error, "its writes were rolled back");
      }
      count(results[i]);
    }
    return results;
  }

  // One attempt at a message: through the inbox transaction or a claim.
  Result attempt(const Message& message, const ClaimRequest& request) {
    if constexpr (detail::runs_in_transaction<Handler, Store>()) {
      std::vector<Result> results =
          consume_in_inbox(std::span<const Message>(&message, 1),
                           std::span<const ClaimRequest>(&request, 1), {}, nullptr);
      return std::move(results.front());
    } else {
      return run_claimed(message, claim(request));
    }
  }

  // Options::in_progress_wait: asks again, with growing pauses in which the store may wake
  // us when the key changes, until the holder is done or the wait runs out. Holds nothing
  // while pausing. An in_progress answer is counted once, when the wait gives up.
  Result wait_for_holder(const Message& message, const ClaimRequest& request) {
    using SteadyClock = std::chrono::steady_clock;
    if (options_.in_progress_wait.count() <= 0) return Result{.outcome = Outcome::in_progress};
    const SteadyClock::time_point deadline = SteadyClock::now() + options_.in_progress_wait;
    std::chrono::milliseconds pause{1};
    for (;;) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - SteadyClock::now());
      if (left.count() <= 0) break;
      guard_store([&] { store_.await_change(request.key, std::min(pause, left)); });
      pause = std::min(pause * 2, kLongestPause);
      Result result = attempt(message, request);
      if (result.outcome != Outcome::in_progress) return result;
    }
    if (options_.metrics) options_.metrics->add(Counter::in_progress);
    return Result{.outcome = Outcome::in_progress};
  }

  // wait_for_holder() for each in_progress result of a batch, once the batch holds nothing
  // (its transaction committed, its claims completed): a key held by the batch itself is
  // never waited on.
  void wait_for_holders(std::span<const Message> batch, std::span<const ClaimRequest> requests,
                        std::vector<Result>& results) {
    for (std::size_t i = 0; i < results.size(); ++i) {
      if (results[i].outcome == Outcome::in_progress) {
        results[i] = wait_for_holder(batch[i], requests[i]);
      }
    }
  }

  static constexpr std::chrono::milliseconds kLongestPause{100};

  Completion completion_for(const Message& message, const Result& result) const {
    Completion completion{
        .key = message.key, .token = result.fencing_token, .retention = options_.retention};
    if (result.response) completion.response = *result.response;
    return completion;
  }

  // A before_processing claim is already done; it only needs completing to store a response.
  // after_success records a success. before_processing recorded the key at the claim, but
  // completes anyway, success or failure: it stores the response and tells the store that
  // the handler is over (MemoryStore keeps such records from eviction until then).
  bool needs_completion(const Result& result) const {
    if (options_.mark == Mark::before_processing) {
      return result.outcome == Outcome::processed || result.outcome == Outcome::failed;
    }
    return result.outcome == Outcome::processed;
  }

  Result run_claimed(const Message& message, Claim claim) {
    Result result = settle_or_run(message, claim);
    if (needs_completion(result)) {
      const Completion completion = completion_for(message, result);
      bool recorded = guard_store([&] {
        return timed(Timing::store_complete, [&] { return store_.complete(completion); });
      });
      if (!recorded) note_lease_lost(message);
    }
    count(result);
    return result;
  }

  Result settle_or_run(const Message& message, Claim& claim) {
    if (std::optional<Result> early = detail::settled(claim)) return std::move(*early);
    if (claim.took_over && options_.metrics) options_.metrics->add(Counter::lease_takeovers);
    return run_handler(message, claim.token);
  }

  Claim claim(const ClaimRequest& request) {
    return guard_store(
        [&] { return timed(Timing::store_claim, [&] { return store_.claim(request); }); });
  }

  std::vector<Result> consume_batch_with_claims(std::span<const Message> batch,
                                                std::span<const ClaimRequest> requests) {
    // Only the first occurrence of a key goes into the pipelined round. A repeat is settled
    // from the first one's result when that was processed or a duplicate (it must not run
    // again, even if the store lost the record meanwhile), else against the store.
    std::vector<std::size_t> firsts, repeats;
    std::unordered_map<std::string_view, std::size_t> first_of;
    first_of.reserve(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) {
      (first_of.try_emplace(batch[i].key, i).second ? firsts : repeats).push_back(i);
    }
    std::vector<ClaimRequest> first_requests;
    first_requests.reserve(firsts.size());
    for (std::size_t i : firsts) first_requests.push_back(requests[i]);
    std::vector<Claim> claims = guard_store([&] {
      return timed(Timing::store_claim, [&] { return store_.claim_batch(first_requests); });
    });

    std::vector<Result> results(batch.size());
    std::vector<std::size_t> completed;  // indexes of results whose completion is sent
    std::vector<Completion> completions;
    for (std::size_t n = 0; n < firsts.size(); ++n) {
      std::size_t i = firsts[n];
      results[i] = settle_or_run(batch[i], claims[n]);
      if (needs_completion(results[i])) {
        completed.push_back(i);
        completions.push_back(completion_for(batch[i], results[i]));
      } else {
        count(results[i]);
      }
    }
    if (!completions.empty()) {
      std::vector<bool> recorded = guard_store([&] {
        return timed(Timing::store_complete, [&] { return store_.complete_batch(completions); });
      });
      for (std::size_t n = 0; n < completions.size(); ++n) {
        if (!recorded[n]) note_lease_lost(batch[completed[n]]);
        count(results[completed[n]]);
      }
    }
    for (std::size_t i : repeats) {
      const std::size_t first = first_of.at(batch[i].key);
      if (should_ack(results[first].outcome)) {
        const bool same_payload =
            requests[i].fingerprint.compatible_with(requests[first].fingerprint);
        results[i] = same_payload ? Result{.outcome = Outcome::duplicate,
                                           .response = results[first].response}
                                  : Result{.outcome = Outcome::conflict};
        count(results[i]);
      } else {
        results[i] = run_claimed(batch[i], claim(requests[i]));
      }
    }
    return results;
  }

  // Runs f, timing it when metrics are on (no clock read otherwise).
  template <class F>
  auto timed(Timing timing, F&& f) -> decltype(f()) {
    if (options_.metrics == nullptr) return f();
    const auto start = std::chrono::steady_clock::now();
    struct Observe {
      Metrics* metrics;
      Timing timing;
      std::chrono::steady_clock::time_point start;
      ~Observe() { metrics->observe(timing, std::chrono::steady_clock::now() - start); }
    } observe{options_.metrics, timing, start};
    return f();
  }

  // Runs a store call; counts and logs StoreUnavailable on its way out.
  template <class F>
  auto guard_store(F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const StoreUnavailable& e) {
      if (options_.metrics) options_.metrics->add(Counter::store_errors);
      if (options_.logger) options_.logger->log(LogLevel::error, e.what());
      throw;
    }
  }

  static_assert(static_cast<int>(Counter::failed) == static_cast<int>(Outcome::failed),
                "the first Counter values mirror Outcome");
  void count(const Result& result) const {
    if (options_.metrics == nullptr) return;
    // With a wait, in_progress is not final yet: wait_for_holder() counts it if it stays.
    if (result.outcome == Outcome::in_progress && options_.in_progress_wait.count() > 0) return;
    options_.metrics->add(static_cast<Counter>(static_cast<int>(result.outcome)));
  }

  void note_lease_lost(const Message& message) const {
    if (options_.metrics) options_.metrics->add(Counter::lease_lost);
    if (options_.logger) {
      options_.logger->log(LogLevel::warning,
                           "lease of a key expired before its handler finished (" +
                               std::to_string(message.key.size()) +
                               "-byte key); another worker may have run it too: raise "
                               "Options::lease above your slowest handler");
    }
  }

  void log_handler_failure(const Message& message, const std::exception_ptr& error,
                           std::string_view consequence) const {
    if (options_.logger == nullptr) return;
    std::string line = "handler failed for a " + std::to_string(message.key.size()) +
                       "-byte key; " + std::string(consequence);
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      line += ": ";
      line += e.what();
    } catch (...) {  // NOLINT(bugprone-empty-catch): non-std exceptions carry no text
    }
    options_.logger->log(LogLevel::warning, line);
  }

  void rethrow_if_asked(const Result& result) const {
    if (options_.rethrow_handler_errors && result.error) std::rethrow_exception(result.error);
  }

  Store& store_;
  Handler handler_;
  Options options_;
};

}  // namespace idem

namespace idem {

/// @brief consumer.consume_batch_with_offsets(batch, offsets, offsets_saved); kept for code
/// written against the SQLite-only free function.
template <class Handler, class Store>
requires TransactionalStore<Store> std::vector<Result> consume_batch_with_offsets(
    IdempotentConsumer<Handler, Store>& consumer, std::span<const Message> batch,
    std::span<const PartitionOffset> offsets, bool* offsets_saved = nullptr) {
  return consumer.consume_batch_with_offsets(batch, offsets, offsets_saved);
}

}  // namespace idem
