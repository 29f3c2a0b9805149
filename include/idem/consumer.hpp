#pragma once
/// @file
/// @brief idem::IdempotentConsumer: wraps a message handler so each biz-id takes effect once.

#include <cstddef>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include "idem/claim.hpp"
#include "idem/dedup_store.hpp"
#include "idem/detail/function_ref.hpp"
#include "idem/detail/invoke_handler.hpp"
#include "idem/fingerprint.hpp"
#include "idem/message.hpp"
#include "idem/options.hpp"
#include "idem/result.hpp"

namespace idem {

/// @brief A store that can run the handler inside the transaction that records the key
/// (see idem::SqliteStore). It provides `Transaction` and
///   Result consume_in_transaction(const ClaimRequest&,
///   FunctionRef<optional<string>(Transaction&)>) vector<Result>
///   consume_batch_in_transaction(span<const ClaimRequest>,
///                                               FunctionRef<optional<string>(size_t,
///                                               Transaction&)>)
template <class Store>
concept TransactionalStore = requires {
  typename Store::Transaction;
};

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
/// - void(const idem::Message&, Store::Transaction&) with a transactional store such as
///   idem::SqliteStore: the handler's writes and the dedup record commit together.
///
/// consume() may be called from many threads at once if the handler may be.
template <class Handler, class Store = DedupStore>
class IdempotentConsumer {
  static_assert(std::is_base_of_v<DedupStore, Store>, "Store must derive from idem::DedupStore");

 public:
  /// @brief Wraps handler; store must outlive the consumer.
  IdempotentConsumer(Store& store, Handler handler, Options options = {})
      : store_(store), handler_(std::move(handler)), options_(options) {}

  /// @brief Runs the handler unless the key is done or held; see idem::Outcome for what to do
  /// with the message afterwards.
  /// @throws idem::InvalidMessage for an empty or oversized key (dead-letter the message).
  /// @throws idem::StoreUnavailable when the store fails (do not ack; retry later).
  Result consume(const Message& message) {
    ClaimRequest request = request_for(message);
    if constexpr (detail::runs_in_transaction<Handler, Store>()) {
      Result result = store_.consume_in_transaction(
          request, [&](typename Store::Transaction& tx) -> std::optional<std::string> {
            return detail::call_returning_response(handler_, message, tx);
          });
      rethrow_if_asked(result);
      return result;
    } else {
      return run_claimed(message, store_.claim(request));
    }
  }

  /// @brief consume() for a batch, results in order. A key repeated within the batch is
  /// processed at most once. Backends pipeline claims and completions.
  /// @throws idem::InvalidMessage naming the first bad message; nothing is processed then.
  /// @throws idem::StoreUnavailable when the store fails.
  std::vector<Result> consume_batch(std::span<const Message> batch) {
    std::vector<ClaimRequest> requests;
    requests.reserve(batch.size());
    for (const Message& message : batch) requests.push_back(request_for(message));
    if constexpr (detail::runs_in_transaction<Handler, Store>()) {
      std::vector<Result> results = store_.consume_batch_in_transaction(
          requests,
          [&](std::size_t i, typename Store::Transaction& tx) -> std::optional<std::string> {
            return detail::call_returning_response(handler_, batch[i], tx);
          });
      for (Result& result : results) rethrow_if_asked(result);
      return results;
    } else {
      return consume_batch_with_claims(batch, requests);
    }
  }

  const Options& options() const noexcept { return options_; }
  Store& store() const noexcept { return store_; }
  Handler& handler() noexcept { return handler_; }

 private:
  ClaimRequest request_for(const Message& message) const {
    return ClaimRequest{
        .key = message.key,
        .fingerprint = options_.verify_payload ? Fingerprint::of(message.payload) : Fingerprint{},
        .lease = options_.lease,
        .retention = options_.retention,
        .max_key_bytes = options_.max_key_bytes,
        .mark_done = options_.mark == Mark::before_processing,
    };
  }

  static std::optional<Result> settled(Claim& claim) {
    switch (claim.status) {
      case ClaimStatus::done:
        return Result{.outcome = Outcome::duplicate, .response = std::move(claim.response)};
      case ClaimStatus::in_progress:
        return Result{.outcome = Outcome::in_progress};
      case ClaimStatus::conflict:
        return Result{.outcome = Outcome::conflict};
      case ClaimStatus::acquired:
        break;
    }
    return std::nullopt;
  }

  // Runs the handler under an acquired claim; on failure releases it (after_success) or keeps
  // the key done (before_processing: at-most-once). Never throws: callers rethrow when asked,
  // after they have recorded what the rest of a batch did.
  Result run_handler(const Message& message, std::uint64_t token) {
    ClaimGuard guard(store_, message.key, token);
    if (options_.mark == Mark::before_processing) guard.dismiss();
    try {
      std::optional<std::string> response =
          detail::invoke_handler(handler_, message, FencingToken{token});
      guard.dismiss();
      return Result{
          .outcome = Outcome::processed, .response = std::move(response), .fencing_token = token};
    } catch (...) {
      guard.release();
      return Result{
          .outcome = Outcome::failed, .error = std::current_exception(), .fencing_token = token};
    }
  }

  Completion completion_for(const Message& message, const Result& result) const {
    Completion completion{
        .key = message.key, .token = result.fencing_token, .retention = options_.retention};
    if (result.response) completion.response = *result.response;
    return completion;
  }

  // A before_processing claim is already done; it only needs completing to store a response.
  bool needs_completion(const Result& result) const {
    return result.outcome == Outcome::processed &&
           (options_.mark == Mark::after_success || result.response.has_value());
  }

  Result run_claimed(const Message& message, Claim claim) {
    if (std::optional<Result> early = settled(claim)) return std::move(*early);
    Result result = run_handler(message, claim.token);
    // A refused completion means our lease expired and another worker took over; the handler
    // did succeed, so the message is still processed (the metrics count it).
    if (needs_completion(result)) store_.complete(completion_for(message, result));
    rethrow_if_asked(result);
    return result;
  }

  std::vector<Result> consume_batch_with_claims(std::span<const Message> batch,
                                                std::span<const ClaimRequest> requests) {
    // Only the first occurrence of a key goes into the pipelined round; repeats are settled
    // afterwards against the store, so they see the first one's outcome.
    std::vector<std::size_t> firsts, repeats;
    std::unordered_set<std::string_view> seen;
    seen.reserve(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) {
      (seen.insert(batch[i].key).second ? firsts : repeats).push_back(i);
    }
    std::vector<ClaimRequest> first_requests;
    first_requests.reserve(firsts.size());
    for (std::size_t i : firsts) first_requests.push_back(requests[i]);
    std::vector<Claim> claims = store_.claim_batch(first_requests);

    std::vector<Result> results(batch.size());
    std::vector<Completion> completions;
    for (std::size_t n = 0; n < firsts.size(); ++n) {
      std::size_t i = firsts[n];
      if (std::optional<Result> early = settled(claims[n])) {
        results[i] = std::move(*early);
        continue;
      }
      results[i] = run_handler(batch[i], claims[n].token);
      if (needs_completion(results[i])) completions.push_back(completion_for(batch[i], results[i]));
    }
    if (!completions.empty()) store_.complete_batch(completions);
    for (std::size_t i : repeats) {
      Claim claim = store_.claim(requests[i]);
      if (std::optional<Result> early = settled(claim)) {
        results[i] = std::move(*early);
        continue;
      }
      results[i] = run_handler(batch[i], claim.token);
      if (needs_completion(results[i])) store_.complete(completion_for(batch[i], results[i]));
    }
    for (const Result& result : results) rethrow_if_asked(result);
    return results;
  }

  void rethrow_if_asked(const Result& result) const {
    if (options_.rethrow_handler_errors && result.error) std::rethrow_exception(result.error);
  }

  Store& store_;
  Handler handler_;
  Options options_;
};

}  // namespace idem
