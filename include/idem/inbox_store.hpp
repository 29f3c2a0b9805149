#pragma once
/// @file
/// @brief idem::InboxStore: the transactional inbox, for stores that can run the handler
/// inside the transaction that records the key (idem::SqliteStore, idem::PostgresStore).
///
/// The base owns, once for every such store: request validation, settling duplicates,
/// in-progress keys and conflicts, a savepoint per message, the undo of a failed message,
/// offsets saved in the same transaction, and the retry of a batch whose deferred statements
/// failed. A backend implements one InboxTransaction (begin, claim, savepoint, ..., commit);
/// see docs/stores/writing-a-store.md.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "idem/claim.hpp"
#include "idem/dedup_store.hpp"
#include "idem/detail/function_ref.hpp"
#include "idem/partition_offset.hpp"
#include "idem/result.hpp"

namespace idem {

/// @brief How InboxStoreBase asks a backend to run one attempt at a call.
enum class InboxMode {
  /// The first attempt. The backend may defer statements (queue them and report their errors
  /// at commit) and may run messages without a savepoint of their own
  /// (InboxTransaction::per_message_savepoints() false): then a failing handler ends the
  /// attempt, the transaction is rolled back and the call runs again careful, unless it was a
  /// lone message, which is settled failed at once. Nothing costs a round trip or a
  /// subtransaction per message while nothing fails.
  optimistic,
  /// The rerun: every statement awaited, a savepoint per message, so a failing message undoes
  /// only its own writes and each statement's error reaches the handler that sent it.
  careful,
};

/// @brief One open transaction of a transactional store: the hooks InboxStore drives, in this
/// order per message: claim, then for an acquired key begin_message, the handler, and
/// release_message (+ store_response) or rollback_message (+ undo_claim). At the end
/// save_offsets and commit. The destructor rolls back what was not committed and never throws.
class InboxTransaction {
 public:
  virtual ~InboxTransaction() = default;
  InboxTransaction() = default;
  InboxTransaction(const InboxTransaction&) = delete;
  InboxTransaction& operator=(const InboxTransaction&) = delete;

  /// @brief Called once with every request of the call before the first claim(), so a
  /// backend can claim them in one set-based statement or one pipelined round and answer the
  /// claim() calls from it. The default does nothing.
  virtual void prepare(std::span<const ClaimRequest> requests) { (void)requests; }
  /// @brief Claims request.key inside the transaction. When acquired, the record is written
  /// done already (it commits with the handler's writes or not at all); fresh tells whether
  /// this call created it. A record held by another open transaction is reported in_progress
  /// (after a bounded wait, where the backend waits on row locks).
  virtual Claim claim(const ClaimRequest& request, bool& fresh) = 0;
  /// @brief Opens the message's savepoint (a backend may defer it to the first statement).
  virtual void begin_message() = 0;
  /// @brief False when messages run without a savepoint of their own (InboxMode::optimistic,
  /// where the backend supports it): a failed message cannot be undone alone, so the core
  /// rolls the transaction back and runs the call again careful. A backend may only return
  /// false if a rollback of the whole transaction also keeps every token it handed out from
  /// being handed out again (e.g. tokens from a PostgreSQL sequence). The default: true.
  virtual bool per_message_savepoints() const noexcept { return true; }
  /// @brief False while claim() answers acquired before the database has answered: a
  /// speculative claim, sent together with the handler's statements and COMMIT (one round
  /// trip for a lone message) and read at commit(). When the database refuses it (the key
  /// already has a record, or another transaction holds it) commit() throws
  /// InboxRetryWithoutDeferral and the call runs again careful; when the handler throws, the
  /// core rolls back and reruns careful with that failure known (the key may have been a
  /// duplicate, whose outcome is not failed). The default: true.
  virtual bool claims_confirmed() const noexcept { return true; }
  /// @brief After commit() of a speculative claim: the fencing token it was recorded with.
  virtual std::uint64_t confirmed_token() const noexcept { return 0; }
  /// @brief Rolls the whole transaction back now (after a lone message failed without a
  /// savepoint). Never throws: a backend that cannot roll back drops its connection instead.
  /// The default leaves it to the destructor.
  virtual void rollback() noexcept {}
  /// @brief The handler returned: keeps its writes (RELEASE the savepoint).
  virtual void release_message() = 0;
  /// @brief The handler threw: undoes its writes (ROLLBACK TO the savepoint, then RELEASE).
  virtual void rollback_message() = 0;
  /// @brief After rollback_message, unless the request was mark_done: drops the record of a
  /// failed attempt (fresh) or releases the record it took over, so a redelivery retries;
  /// the token it ran under must never be handed out again.
  virtual void undo_claim(const ClaimRequest& request, std::uint64_t token, bool fresh) = 0;
  /// @brief Stores the handler's response with the key's record.
  virtual void store_response(std::string_view key, std::string_view response) = 0;
  /// @brief Stores (topic, partition) -> next_offset rows in this transaction.
  virtual void save_offsets(std::span<const PartitionOffset> offsets) = 0;
  /// @brief Commits. A backend that deferred statements (libpq pipeline mode) and finds one of
  /// them failed throws idem::InboxRetryWithoutDeferral: the call runs again careful.
  virtual void commit() = 0;
  /// @brief After the handler returned: throws idem::ConfigError when the handler ended the
  /// transaction (COMMIT or ROLLBACK of its own), idem::StoreUnavailable when the backend
  /// lost it (the database rolled it back after an error the handler caught).
  virtual void check_open(std::string_view who) = 0;
  /// @brief After the handler threw: throws idem::StoreUnavailable when the transaction is
  /// gone with it (the earlier messages of the batch are then lost too).
  virtual void check_alive_after_failure(std::string_view who, std::string_view error) = 0;
};

/// @brief Thrown by an InboxTransaction whose deferred statements failed at commit (or at any
/// point where their results were read): the transaction is rolled back, and InboxStore runs
/// the whole call again in InboxMode::careful. Handlers of that call run again; only the
/// committed run's writes take effect.
class InboxRetryWithoutDeferral : public Error {
 public:
  using Error::Error;
};

/// @brief Runs the handler of request i inside the given transaction.
using InboxHandler =
    detail::FunctionRef<std::optional<std::string>(std::size_t, InboxTransaction&)>;

/// @brief The part of InboxStore that does not depend on the transaction type.
class InboxStoreBase : public DedupStore {
 public:
  /// @brief The next offset stored for (topic, partition); nullopt when none was stored.
  std::optional<std::int64_t> committed_offset(std::string_view topic, std::int32_t partition);
  /// @brief Every stored offset, ordered by topic and partition (for start-up or rebalance).
  std::vector<PartitionOffset> committed_offsets();
  /// @brief Stores offsets in a transaction of their own (e.g. after a run of duplicates).
  void save_offsets(std::span<const PartitionOffset> offsets);
  /// @brief Calls run a second time since this store was made: a deferred statement failed,
  /// or a message of a batch failed without a savepoint of its own (see InboxMode).
  std::uint64_t inbox_reruns() const noexcept { return reruns_.load(std::memory_order_relaxed); }

 protected:
  /// @brief Begins a transaction for one attempt at a call (see InboxMode).
  virtual std::unique_ptr<InboxTransaction> begin_inbox(InboxMode mode) = 0;
  virtual std::vector<PartitionOffset> do_committed_offsets() = 0;

  /// @brief Runs handler(i) for each acquired request in one transaction; see
  /// InboxStore::consume_batch_in_transaction.
  std::vector<Result> run_inbox(std::span<const ClaimRequest> requests, InboxHandler handler,
                                std::span<const PartitionOffset> offsets, bool* offsets_saved);

 private:
  struct KnownFailure;
  std::vector<Result> run_inbox_once(InboxTransaction& tx, std::span<const ClaimRequest> requests,
                                     InboxHandler handler, std::span<const PartitionOffset> offsets,
                                     bool& saved, const KnownFailure* known);

  std::atomic<std::uint64_t> reruns_{0};
};

/// @brief A transactional store whose handlers receive a Tx& (SqliteTx, PostgresTx).
/// A backend derives from InboxStore<Tx>, implements begin_inbox() returning an
/// InboxTransaction, and tx_of() giving the Tx that transaction's handlers see.
template <class Tx>
class InboxStore : public InboxStoreBase {
 public:
  using Transaction = Tx;

  /// @brief Records the key and runs handler in one transaction: on success the handler's
  /// writes and the done record commit together (processed); a handler exception rolls both
  /// back (failed, Result::error set; a redelivery processes it). A done key gives duplicate
  /// (with its response), a differing fingerprint conflict, a key held by a claim() or by
  /// another open transaction in_progress. With request.mark_done the record is kept even
  /// when the handler throws (at-most-once), its writes are not.
  /// @throws idem::InvalidMessage for a bad key; idem::ConfigError for a bad lease or
  /// retention, or a handler that ended the transaction itself.
  /// @throws idem::StoreUnavailable when the transaction cannot commit (nothing recorded).
  Result consume_in_transaction(const ClaimRequest& request,
                                detail::FunctionRef<std::optional<std::string>(Tx&)> handler) {
    std::vector<Result> results = run_inbox(
        std::span<const ClaimRequest>(&request, 1),
        [&](std::size_t, InboxTransaction& tx) { return handler(tx_of(tx)); }, {}, nullptr);
    return std::move(results.front());
  }

  /// @brief consume_in_transaction for a batch in one transaction (one commit), with a
  /// savepoint per message so a failing handler rolls back only its own message. A key
  /// repeated in the batch sees the earlier occurrence as done. If the commit fails, nothing
  /// of the batch is recorded.
  ///
  /// offsets are stored in the same transaction only if every result is ackable
  /// (idem::should_ack). Otherwise the stored offsets stay as they were (the results are still
  /// committed), so a consumer resuming from them replays the whole batch: its processed
  /// messages come back as duplicates, the others are retried. *offsets_saved (when given)
  /// tells which happened.
  /// @throws idem::InvalidMessage naming the first bad request; nothing is processed then.
  /// @throws idem::StoreUnavailable when the transaction cannot commit.
  std::vector<Result> consume_batch_in_transaction(
      std::span<const ClaimRequest> requests,
      detail::FunctionRef<std::optional<std::string>(std::size_t, Tx&)> handler,
      std::span<const PartitionOffset> offsets = {}, bool* offsets_saved = nullptr) {
    return run_inbox(
        requests, [&](std::size_t i, InboxTransaction& tx) { return handler(i, tx_of(tx)); },
        offsets, offsets_saved);
  }

 protected:
  /// @brief The handler-facing transaction of an InboxTransaction this store began.
  virtual Tx& tx_of(InboxTransaction& transaction) = 0;
};

}  // namespace idem
