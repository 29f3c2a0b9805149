#include "idem/inbox_store.hpp"

#include <algorithm>
#include <charconv>
#include <string>
#include <string_view>

#include "idem/detail/settle.hpp"

namespace idem {
namespace {

std::string describe(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "a non-standard exception";
  }
}

// "the handler" or "the handler of message N", for the hooks' error messages; built in a
// fixed buffer because check_open() takes it for every message of a batch.
class HandlerName {
 public:
  HandlerName(std::size_t index, std::size_t count) {
    constexpr std::string_view kOne = "the handler";
    constexpr std::string_view kOf = "the handler of message ";
    if (count == 1) {
      size_ = kOne.copy(buffer_, kOne.size());
      return;
    }
    size_ = kOf.copy(buffer_, kOf.size());
    size_ = static_cast<std::size_t>(
        std::to_chars(buffer_ + size_, buffer_ + sizeof buffer_, index).ptr - buffer_);
  }
  operator std::string_view() const noexcept { return {buffer_, size_}; }

 private:
  char buffer_[48];
  std::size_t size_ = 0;
};

}  // namespace

// A message failed in an optimistic attempt without a savepoint of its own: the attempt is
// rolled back and the careful rerun settles this message as failed with the same error,
// without running its handler again (so the outcome is the one a savepoint would have given).
struct InboxStoreBase::KnownFailure {
  std::size_t index;
  std::exception_ptr error;
};

std::vector<Result> InboxStoreBase::run_inbox(std::span<const ClaimRequest> requests,
                                              InboxHandler handler,
                                              std::span<const PartitionOffset> offsets,
                                              bool* offsets_saved) {
  if (offsets_saved != nullptr) *offsets_saved = false;
  validate_keys(requests);
  return translate_errors([&] {
    bool saved = false;
    std::vector<Result> results;
    // At-most-once messages never run twice: their calls start careful.
    const bool careful_first = std::any_of(requests.begin(), requests.end(),
                                           [](const ClaimRequest& r) { return r.mark_done; });
    std::optional<KnownFailure> known;
    try {
      const InboxMode mode = careful_first ? InboxMode::careful : InboxMode::optimistic;
      std::unique_ptr<InboxTransaction> tx = begin_inbox(mode);
      results = run_inbox_once(*tx, requests, handler, offsets, saved, nullptr);
      if (offsets_saved != nullptr) *offsets_saved = saved;
      return results;
    } catch (const InboxRetryWithoutDeferral&) {
      // A deferred statement failed and took the transaction with it.
      ++reruns_;
    } catch (KnownFailure& failure) {
      ++reruns_;
      known = std::move(failure);
    }
    // Run again with each statement's answer awaited and a savepoint per message, so an
    // error reaches the handler that caused it and a failure undoes only its message.
    // The handlers before the failure run again; their first run's writes were rolled back.
    std::unique_ptr<InboxTransaction> tx = begin_inbox(InboxMode::careful);
    results = run_inbox_once(*tx, requests, handler, offsets, saved, known ? &*known : nullptr);
    if (offsets_saved != nullptr) *offsets_saved = saved;
    return results;
  });
}

std::vector<Result> InboxStoreBase::run_inbox_once(InboxTransaction& tx,
                                                   std::span<const ClaimRequest> requests,
                                                   InboxHandler handler,
                                                   std::span<const PartitionOffset> offsets,
                                                   bool& saved, const KnownFailure* known) {
  std::vector<Result> results(requests.size());
  tx.prepare(requests);
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const ClaimRequest& request = requests[i];
    // The record is written done before the handler runs, so both commit together. A key
    // repeated in the batch finds the earlier occurrence's record in this transaction.
    bool fresh = false;
    Claim claim = tx.claim(request, fresh);
    if (std::optional<Result> early = detail::settled(claim)) {
      results[i] = std::move(*early);
      continue;
    }
    tx.begin_message();
    std::optional<std::string> response;
    try {
      if (known != nullptr && known->index == i) std::rethrow_exception(known->error);
      response = handler(i, tx);
    } catch (const InboxRetryWithoutDeferral&) {
      throw;
    } catch (const ConfigError&) {
      throw;  // misuse (a COMMIT of its own, ...): retrying cannot help; nothing commits
    } catch (...) {
      Result failed{.outcome = Outcome::failed,
                    .error = std::current_exception(),
                    .fencing_token = claim.token};
      if (!tx.per_message_savepoints()) {  // an optimistic attempt, never at most once
        if (requests.size() == 1) {
          if (!tx.claims_confirmed()) {
            // The claim was never answered: the key may be a duplicate, whose outcome this
            // failure must not replace. The careful rerun claims it and settles it failed
            // with this error without running the handler again (or finds it settled).
            tx.rollback();
            throw KnownFailure{i, failed.error};
          }
          // Rolling the whole transaction back undoes exactly this message: its writes and
          // its claim (the backend keeps the token from coming back). No rerun: the handler
          // ran once, as it does outside a transaction.
          tx.rollback();
          results[i] = std::move(failed);
          saved = false;
          return results;
        }
        throw KnownFailure{i, failed.error};
      }
      tx.check_alive_after_failure(HandlerName(i, requests.size()), describe(failed.error));
      tx.rollback_message();
      if (!request.mark_done) tx.undo_claim(request, claim.token, fresh);
      results[i] = std::move(failed);
      continue;
    }
    tx.check_open(HandlerName(i, requests.size()));
    tx.release_message();
    if (response) tx.store_response(request.key, *response);
    results[i] = Result{.outcome = Outcome::processed,
                        .response = std::move(response),
                        .fencing_token = claim.token};
  }
  // The offsets cover the whole batch: moving them past a message that was not acked (failed,
  // in_progress, conflict) would lose it after a restart. Then they stay where they were, and
  // a consumer resuming from them replays the batch (its processed messages as duplicates).
  saved = std::all_of(results.begin(), results.end(),
                      [](const Result& r) { return should_ack(r.outcome); });
  if (saved && !offsets.empty()) tx.save_offsets(offsets);
  tx.commit();
  if (!tx.claims_confirmed()) {
    for (Result& result : results) {
      if (result.outcome == Outcome::processed) result.fencing_token = tx.confirmed_token();
    }
  }
  return results;
}

std::optional<std::int64_t> InboxStoreBase::committed_offset(std::string_view topic,
                                                             std::int32_t partition) {
  for (const PartitionOffset& offset : committed_offsets()) {
    if (offset.topic == topic && offset.partition == partition) return offset.next_offset;
  }
  return std::nullopt;
}

std::vector<PartitionOffset> InboxStoreBase::committed_offsets() {
  return translate_errors([&] { return do_committed_offsets(); });
}

void InboxStoreBase::save_offsets(std::span<const PartitionOffset> offsets) {
  translate_errors([&] {
    std::unique_ptr<InboxTransaction> tx = begin_inbox(InboxMode::careful);
    tx->save_offsets(offsets);
    tx->commit();
  });
}

}  // namespace idem
