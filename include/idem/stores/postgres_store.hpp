#pragma once
/// @file
/// @brief idem::PostgresStore: dedup records in the service's own PostgreSQL database, with
/// the transactional inbox (handler writes and the dedup record commit together) and offsets
/// in the same transaction. See docs/stores/postgres.md.

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "idem/claim.hpp"
#include "idem/dedup_store.hpp"
#include "idem/error.hpp"
#include "idem/inbox_store.hpp"
#include "idem/partition_offset.hpp"

// libpq's handle types, forward-declared so this header does not need libpq-fe.h (the same
// declarations as libpq's; repeating a typedef is allowed).
struct pg_conn;
struct pg_result;
typedef struct pg_conn PGconn;
typedef struct pg_result PGresult;

namespace idem {

/// @brief The server could not be reached or refused idem's own statements (connection
/// refused or lost, authentication failed, unknown database, statement timeout, the server
/// shutting down, ...). Nothing was recorded as done: do not ack the message.
class PostgresUnavailable : public StoreUnavailable {
 public:
  PostgresUnavailable(const std::string& what, std::string sqlstate)
      : StoreUnavailable(what), sqlstate_(std::move(sqlstate)) {}
  /// @brief The SQLSTATE of the server's error (e.g. "57P01"); empty for connection errors.
  const std::string& sqlstate() const noexcept { return sqlstate_; }

 private:
  std::string sqlstate_;
};

/// @brief A statement a handler ran through PostgresTx was refused for a reason of its own
/// (unique violation, syntax error, ...). The handler's message fails and is rolled back.
class PostgresError : public Error {
 public:
  PostgresError(const std::string& what, std::string sqlstate)
      : Error(what), sqlstate_(std::move(sqlstate)) {}
  /// @brief The SQLSTATE of the server's error (e.g. "23505", unique_violation).
  const std::string& sqlstate() const noexcept { return sqlstate_; }

 private:
  std::string sqlstate_;
};

/// @brief Tuning of a PostgresStore. Plain values with defaults.
struct PostgresOptions {
  /// Any libpq connection string: "host=127.0.0.1 port=5432 dbname=app user=app" or a
  /// postgresql:// URI. A password in it never appears in an error message.
  std::string conninfo{};
  /// Schema of idem's tables (idem_keys, idem_offsets, idem_meta and the idem_tokens
  /// sequence); created when missing. Letters, digits and _ only.
  std::string schema = "idem";
  /// Connections the store opens at most (one per thread using the store at a time).
  std::size_t pool_size = 4;
  /// Longest wait for a connection to be established (all of conninfo's hosts together, to
  /// the millisecond) and for a free connection of the pool.
  std::chrono::milliseconds connect_timeout{std::chrono::seconds{5}};
  /// statement_timeout of idem's own statements: a server that stops answering gives
  /// idem::PostgresUnavailable after this instead of a hang. 0: no limit.
  std::chrono::milliseconds statement_timeout{std::chrono::seconds{10}};
  /// Transactional inbox: how long a second worker waits for the row lock of a key whose
  /// first delivery's transaction is still open before answering in_progress (the handler
  /// may run for long; the record is only visible once that transaction commits).
  std::chrono::milliseconds lock_wait{std::chrono::milliseconds{200}};
  /// Transactional inbox, one message per call: send the key's claim together with the
  /// handler's statements and COMMIT, one round trip instead of two. The handler then runs
  /// before the database has said whether the key is new: when it is not (a duplicate, a key
  /// another transaction holds, an expired record), the transaction is rolled back, the
  /// handler's writes with it, and the call runs again the usual way (the handler runs again
  /// only if the key turns out to be claimable). Turn it on only for handlers whose every
  /// effect goes through the PostgresTx: anything else they do happens for duplicates too.
  /// Batches are not affected. See docs/stores/postgres.md, "Speculative claims".
  bool speculative_claims = false;
  /// After a failed connection attempt, the pool waits this long before the next one
  /// (callers meanwhile get idem::PostgresUnavailable at once).
  std::chrono::milliseconds reconnect_backoff{std::chrono::milliseconds{200}};
  /// Expired records deleted per purge statement (one short transaction each).
  std::size_t purge_batch = 1000;
  /// Automatic purge: one bounded purge step after a write at most this often (and after
  /// every write while steps keep finding a full purge_batch), skipped while another session
  /// holds the purge advisory lock. 0: none (call purge_expired()).
  std::chrono::milliseconds purge_interval{std::chrono::seconds{60}};
};

/// @brief Counters of a PostgresStore's waits for held keys (await_change, used by
/// Options::in_progress_wait) since construction. See docs/stores/postgres.md.
struct PostgresStoreStats {
  std::uint64_t notifications = 0;    ///< NOTIFYs received on the listening connection
  std::uint64_t waits_woken = 0;      ///< waits ended by a notification for their key
  std::uint64_t waits_settled = 0;    ///< waits that found the key settled once registered
  std::uint64_t waits_timed_out = 0;  ///< waits that ran out their max_wait
  std::uint64_t wait_fallbacks = 0;   ///< waits without a listening connection (paused) or
                                      ///< whose connection or check failed (returned early)
  std::uint64_t waiting = 0;          ///< threads waiting for a notification right now
};

/// @brief A bytea parameter (strings bind as text).
struct PostgresBytes {
  std::string_view bytes;
};

/// @brief Rows a statement returned (text format). Move-only; owns the PGresult.
class PostgresRows {
 public:
  PostgresRows() = default;
  PostgresRows(PostgresRows&&) noexcept = default;
  PostgresRows& operator=(PostgresRows&&) noexcept = default;
  ~PostgresRows();

  int size() const noexcept;
  int columns() const noexcept;
  bool is_null(int row, int column) const noexcept;
  /// @brief The value's text; valid while this object lives.
  std::string_view text(int row, int column) const noexcept;
  /// @brief The value parsed as an integer. @throws idem::PostgresError when it is not one.
  std::int64_t int64(int row, int column) const;
  /// @brief Rows the statement changed (INSERT, UPDATE, DELETE), from the command tag.
  std::int64_t affected() const noexcept;
  PGresult* native_handle() const noexcept { return result_.get(); }

 private:
  friend class PostgresTx;
  struct Clear {
    void operator()(PGresult* result) const noexcept;
  };
  explicit PostgresRows(PGresult* result) noexcept : result_(result) {}
  std::unique_ptr<PGresult, Clear> result_;
};

namespace detail {
class PostgresSession;
// One bound parameter in text or binary form, or NULL.
struct PostgresParam {
  std::optional<std::string> value;
  bool binary = false;
};
template <class T>
PostgresParam postgres_param(const T& value) {
  using V = std::remove_cvref_t<T>;
  if constexpr (std::is_same_v<V, std::nullptr_t>) {
    return {};
  } else if constexpr (std::is_same_v<V, PostgresBytes>) {
    return {std::string(value.bytes), true};
  } else if constexpr (std::is_same_v<V, bool>) {
    return {std::string(value ? "true" : "false"), false};
  } else if constexpr (std::integral<V> || std::floating_point<V>) {
    return {std::to_string(value), false};
  } else if constexpr (std::is_convertible_v<const V&, std::string_view>) {
    return {std::string(std::string_view(value)), false};
  } else {
    static_assert(
        requires { value.has_value(); }, "unsupported PostgreSQL parameter type");
    return value ? postgres_param(*value) : PostgresParam{};
  }
}
}  // namespace detail

/// @brief The open transaction a transactional handler runs in. Everything executed through
/// it (or on native_handle()) commits together with the dedup record, or not at all. Do not
/// COMMIT, ROLLBACK or RELEASE it yourself (idem::ConfigError); SAVEPOINTs of your own are
/// fine. Parameters are $1, $2, ... bound in order: integers and strings as text,
/// PostgresBytes as bytea, nullptr or an empty optional as NULL.
class PostgresTx {
 public:
  PostgresTx(const PostgresTx&) = delete;
  PostgresTx& operator=(const PostgresTx&) = delete;

  /// @brief The connection this transaction is open on. Statements run on it belong to the
  /// message. Taking it ends pipelining for the rest of the transaction.
  PGconn* native_handle();

  /// @brief Runs one statement. In the transactional inbox the statement may be sent
  /// pipelined (not awaited): its error then fails the commit and the whole call is run again
  /// statement by statement, where the error reaches the handler (handlers run again; only
  /// the committed run has effects). Use query() to wait for a statement's answer.
  /// @throws idem::PostgresError when the server refuses the statement;
  /// idem::ConfigError for COMMIT, ROLLBACK, BEGIN and the like.
  template <class... Args>
  void exec(std::string_view sql, const Args&... args) {
    std::vector<detail::PostgresParam> params{detail::postgres_param(args)...};
    exec_params(sql, params);
  }

  /// @brief Runs one statement and returns its rows (waits for the answer).
  template <class... Args>
  PostgresRows query(std::string_view sql, const Args&... args) {
    std::vector<detail::PostgresParam> params{detail::postgres_param(args)...};
    return query_params(sql, params);
  }

  /// @brief The first column of the first row as an integer; nullopt for no row or NULL.
  template <class... Args>
  std::optional<std::int64_t> query_int64(std::string_view sql, const Args&... args) {
    PostgresRows rows = query(sql, args...);
    if (rows.size() == 0 || rows.is_null(0, 0)) return std::nullopt;
    return rows.int64(0, 0);
  }

  /// @brief Stores (topic, partition) -> next_offset in this transaction.
  void save_offset(std::string_view topic, std::int32_t partition, std::int64_t next_offset);

  void exec_params(std::string_view sql, std::span<const detail::PostgresParam> params);
  PostgresRows query_params(std::string_view sql, std::span<const detail::PostgresParam> params);

 private:
  friend class detail::PostgresSession;
  explicit PostgresTx(detail::PostgresSession& session) noexcept : session_(&session) {}
  detail::PostgresSession* session_;
};

/// @brief Dedup records in PostgreSQL, shared safely by many processes on many machines.
///
/// Keys are bytea (any bytes); leases and retention run on the server's clock; fencing tokens
/// come from a sequence, so they strictly increase per key, also across purges. A pool of
/// up to pool_size connections serves the threads of a process; a connection lost (server
/// restart) is replaced on the next call.
///
/// Two ways to consume, like idem::SqliteStore:
/// - through DedupStore (any handler form): claim with a lease, run the handler, complete;
/// - transactional inbox, when IdempotentConsumer's handler takes an idem::PostgresTx&: the
///   record and the handler's writes commit in one transaction; no lease, no window of
///   duplication.
///
/// Waiting for a held key (Options::in_progress_wait): complete, release and forget NOTIFY
/// only when a waiter registered interest in the key, so commits pay no NOTIFY lock when
/// nobody waits; the inbox never notifies (a waiter wakes at its commit through the row
/// lock). See docs/stores/postgres.md.
class PostgresStore final : public InboxStore<PostgresTx> {
 public:
  /// @brief Connects once (to check the server and create the tables when missing).
  /// @throws idem::ConfigError for bad options or a schema of another idem version.
  /// @throws idem::PostgresUnavailable when the server cannot be reached.
  explicit PostgresStore(PostgresOptions options);
  ~PostgresStore() override;
  PostgresStore(PostgresStore&&) = delete;

  std::string_view name() const noexcept override { return "postgres"; }
  const PostgresOptions& options() const noexcept;

  /// @brief Runs work in one transaction on a pooled connection (schema set-up, reading
  /// business tables, ...). Commits when work returns, rolls back if it throws.
  void transaction(detail::FunctionRef<void(PostgresTx&)> work);

  /// @brief The store's own counters: the waits for held keys (Options::in_progress_wait).
  /// stats() gives the store-wide StoreStats every backend has.
  PostgresStoreStats counters() const;

 private:
  Claim do_claim(const ClaimRequest& request) override;
  bool do_complete(const Completion& completion) override;
  bool do_release(std::string_view key, std::uint64_t token) override;
  bool do_forget(std::string_view key) override;
  std::vector<Claim> do_claim_batch(std::span<const ClaimRequest> requests) override;
  std::vector<bool> do_complete_batch(std::span<const Completion> completions) override;
  std::optional<RecordInfo> do_inspect(std::string_view key) override;
  StoreStats do_stats() override;
  /// Deletes up to max_records expired records in bounded steps. Only one instance purges
  /// at a time (an advisory lock); others return 0 meanwhile.
  std::size_t do_purge_expired(std::size_t max_records) override;
  /// LISTENs on a dedicated connection (opened on the first wait, never a pooled one) and
  /// registers interest in the key there (a shared advisory lock, which the completing
  /// statements probe before they NOTIFY), checks the record (FOR SHARE, on a pooled
  /// connection), then waits for the key's notification or max_wait. Store failures do not
  /// escape: it pauses (or returns early) instead, and the caller's next claim reports them.
  void do_await_change(std::string_view key, std::chrono::milliseconds max_wait) override;
  std::unique_ptr<InboxTransaction> begin_inbox(InboxMode mode) override;
  std::vector<PartitionOffset> do_committed_offsets() override;
  PostgresTx& tx_of(InboxTransaction& transaction) override;

  friend class detail::PostgresSession;  // the inbox transaction uses the pool and the purge
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem
