#pragma once
// The transaction a transactional handler runs in: idem::InboxTransaction's hooks on one
// pooled connection, in libpq pipeline mode when the core allows deferral.

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "connection.hpp"
#include "idem/inbox_store.hpp"
#include "idem/stores/postgres_store.hpp"
#include "store_impl.hpp"

namespace idem::detail {

class PostgresSession final : public InboxTransaction {
 public:
  enum class Kind {
    inbox,  // consume_*_in_transaction: claims, a savepoint per message
    work,   // PostgresStore::transaction(): the caller's work only
  };

  /// mode optimistic: pipelined, no savepoint per message, handlers' statements prepared
  /// once per connection; careful: each statement awaited, a savepoint per message, text.
  PostgresSession(PostgresStore::Impl& impl, pg::Lease lease, InboxMode mode, Kind kind);
  ~PostgresSession() override;

  /// Sends BEGIN (pipelined: its answer is read with the first claims).
  void begin();
  /// transaction(): checks the work left the transaction open, then commits.
  void finish_work();
  PostgresTx& tx() noexcept { return tx_; }

  // InboxTransaction
  void prepare(std::span<const ClaimRequest> requests) override;
  Claim claim(const ClaimRequest& request, bool& fresh) override;
  void begin_message() override;
  bool per_message_savepoints() const noexcept override { return savepoints_; }
  void rollback() noexcept override;
  void release_message() override;
  void rollback_message() override;
  void undo_claim(const ClaimRequest& request, std::uint64_t token, bool fresh) override;
  void store_response(std::string_view key, std::string_view response) override;
  void save_offsets(std::span<const PartitionOffset> offsets) override;
  void commit() override;
  void check_open(std::string_view who) override;
  void check_alive_after_failure(std::string_view who, std::string_view error) override;
  bool claims_confirmed() const noexcept override { return !speculative_; }
  std::uint64_t confirmed_token() const noexcept override { return speculative_token_; }

  // PostgresTx
  PGconn* native_handle();
  void user_exec(std::string_view sql, std::span<const PostgresParam> params);
  pg::ResultPtr user_query(std::string_view sql, std::span<const PostgresParam> params);
  void save_offset(std::string_view topic, std::int32_t partition, std::int64_t next_offset);

 private:
  // Claims distinct requests in one statement inside a savepoint; false when a key was held
  // by another open transaction past lock_wait (then nothing was claimed). answers[i] is
  // nullopt for a key another transaction changed meanwhile.
  bool claim_group(std::span<const ClaimRequest* const> group,
                   std::vector<std::optional<pg::ClaimAnswer>>& answers);
  void queue_text(std::string_view sql, std::string what);
  void queue_idem(pg::Sql which, const pg::Params& params, std::string what);
  // Reads every queued answer. A failed handler statement that was deferred fails the run
  // (InboxRetryWithoutDeferral); awaited counts the trailing statements the caller waits for
  // (their errors are the caller's to report).
  std::vector<pg::Reply> drain(std::size_t awaited = 0);
  // drain(), then PostgresUnavailable for any failed statement of idem's.
  void drain_ok();
  [[noreturn]] void fail_on(const pg::Reply& reply);
  void open_pending_savepoint();
  // The statement_timeout and lock_timeout of idem's statements, or of the handler's.
  void use_idem_settings();
  void use_user_settings();
  void refuse_if_deferred_failed() const;
  // ConfigError for a handler's statement that would end idem's transaction, change the
  // session or drop idem's prepared statements.
  void refuse_session_control(std::string_view sql) const;
  // The answer to a speculative claim, from the replies of the drain that carried it: the
  // token, or the end of this attempt (the key is not new, or the server is gone).
  void read_speculative_claim(const pg::Reply& reply);
  // Throws when the transaction is no longer ours to commit (sync mode only).
  void check_status(std::string_view who, std::string_view error, bool after_failure);

  PostgresStore::Impl& impl_;
  pg::Lease lease_;
  pg::Connection& conn_;
  PostgresTx tx_;
  const bool may_defer_;
  const bool savepoints_;
  const Kind kind_;
  bool open_ = false;
  bool deferred_failed_ = false;
  std::string deferred_error_;
  bool user_queued_ = false;        // a handler's statement awaits its answer in the pipeline
  bool user_settings_ = false;      // the handler's timeouts are in effect
  bool savepoint_pending_ = false;  // the message's savepoint opens with its first statement
  bool savepoint_open_ = false;
  bool native_taken_ = false;   // no pipelining, savepoints up front for the rest of it
  bool awaited_error_ = false;  // a handler's awaited statement failed in this message
  // PostgresOptions::speculative_claims, for a lone message of an optimistic attempt: its
  // claim is a plain INSERT sent with the handler's statements, answered at the next drain.
  bool speculative_ = false;
  bool speculative_unread_ = false;
  std::size_t speculative_reply_ = 0;  // its reply's index in that drain
  std::uint64_t speculative_token_ = 0;
  bool speculation_missed_ = false;
  const ClaimRequest* prepared_base_ = nullptr;
  std::vector<std::optional<pg::ClaimAnswer>> prepared_;
};

}  // namespace idem::detail
