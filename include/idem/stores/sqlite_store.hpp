#pragma once
/// @file
/// @brief idem::SqliteStore: the embedded DedupStore (one SQLite file, WAL), with a
/// transactional inbox (handler writes and the dedup record commit together), batched group
/// commit and Kafka-style offsets in the same transaction. See docs/stores/sqlite.md.

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "idem/claim.hpp"
#include "idem/clock.hpp"
#include "idem/dedup_store.hpp"
#include "idem/detail/function_ref.hpp"
#include "idem/error.hpp"
#include "idem/inbox_store.hpp"
#include "idem/partition_offset.hpp"
#include "idem/result.hpp"

struct sqlite3;
struct sqlite3_stmt;

namespace idem {

namespace detail {
class SqliteConnection;
/// Finalizes a statement (for std::unique_ptr).
struct SqliteStmtFinalizer {
  void operator()(sqlite3_stmt* stmt) const noexcept;
};
}  // namespace detail

/// @brief An SQLite call failed in a way that makes the store unusable for now (busy past
/// busy_timeout, I/O error, disk full, read-only or corrupt file, ...). Nothing was recorded
/// as done: do not ack the message.
class SqliteUnavailable : public StoreUnavailable {
 public:
  SqliteUnavailable(const std::string& what, int code, int extended_code)
      : StoreUnavailable(what), code_(code), extended_code_(extended_code) {}
  /// @brief The primary SQLite result code (e.g. 5, SQLITE_BUSY).
  int code() const noexcept { return code_; }
  /// @brief The extended SQLite result code (e.g. 517, SQLITE_BUSY_SNAPSHOT).
  int extended_code() const noexcept { return extended_code_; }

 private:
  int code_;
  int extended_code_;
};

/// @brief A statement a handler ran through SqliteTx was refused by SQLite for a reason of
/// its own (constraint violation, SQL syntax error, type mismatch, ...).
class SqliteError : public Error {
 public:
  SqliteError(const std::string& what, int code, int extended_code)
      : Error(what), code_(code), extended_code_(extended_code) {}
  int code() const noexcept { return code_; }
  int extended_code() const noexcept { return extended_code_; }

 private:
  int code_;
  int extended_code_;
};

/// @brief PRAGMA synchronous of the store's connection.
enum class SqliteSync {
  /// fsync the WAL at every commit: a committed message survives power loss (default).
  full,
  /// fsync only at checkpoints: survives a process crash, but the last commits before a
  /// power loss or OS crash may roll back. Messages acked after those commits are then neither
  /// recorded nor (with the transactional inbox) in effect, and the broker will not redeliver
  /// them, unless the consumer resumes from offsets kept in the same file
  /// (consume_batch_with_offsets), which roll back with them and are read again.
  normal,
};

/// @brief Tuning of a SqliteStore. Plain values with defaults.
struct SqliteOptions {
  /// How long a write waits for another connection's (process's) lock before failing with
  /// idem::SqliteUnavailable. 0: fail at once. Negative: idem::ConfigError.
  std::chrono::milliseconds busy_timeout{5000};
  /// Durability of each commit; see SqliteSync.
  SqliteSync synchronous = SqliteSync::full;
  /// Time source of leases and retention; nullptr: idem::system_clock() (wall clock, since
  /// several processes may share the file). Must outlive the store.
  const Clock* clock = nullptr;
  /// Expired records are deleted by a sweep along the primary key that rides on writes: one
  /// write transaction in purge_interval (and any that inserted 64 records or more) examines
  /// twice the records inserted since the previous step, plus purge_extra, and deletes the
  /// expired ones. 0: no automatic purge (call purge_expired()).
  std::size_t purge_interval = 8;
  /// Records a purge step examines beyond twice the records inserted (keeps the sweep moving
  /// when few records are new).
  std::size_t purge_extra = 8;
  /// Open the file for reading only (operators' inspect and stats): no write lock is ever
  /// taken, so it never waits behind a consumer's transaction; the file must exist and hold
  /// idem's tables (else idem::ConfigError), and every write fails with
  /// idem::SqliteUnavailable (SQLITE_READONLY).
  bool read_only = false;
};

/// @brief The old name of SqliteOptions.
using SqliteStoreOptions [[deprecated("use idem::SqliteOptions")]] = SqliteOptions;

/// @brief A BLOB parameter (SqliteStatement binds std::string_view as TEXT).
struct SqliteBlob {
  std::string_view bytes;
};

/// @brief A prepared statement borrowed from the connection's cache; reset (and its bindings
/// cleared) when it goes out of scope. Parameters are 1-based, columns 0-based.
class SqliteStatement {
 public:
  SqliteStatement(SqliteStatement&& other) noexcept;
  SqliteStatement& operator=(SqliteStatement&&) = delete;
  SqliteStatement(const SqliteStatement&) = delete;
  SqliteStatement& operator=(const SqliteStatement&) = delete;
  ~SqliteStatement();

  SqliteStatement& bind_int64(int index, std::int64_t value);
  SqliteStatement& bind_double(int index, double value);
  SqliteStatement& bind_text(int index, std::string_view text);
  SqliteStatement& bind_blob(int index, std::string_view bytes);
  SqliteStatement& bind_null(int index);

  /// @brief Binds by type: integers (and bool) as INTEGER, floating point as REAL, strings as
  /// TEXT, SqliteBlob as BLOB, nullptr / an empty optional as NULL.
  template <class T>
  SqliteStatement& bind(int index, const T& value) {
    using V = std::remove_cvref_t<T>;
    if constexpr (std::is_same_v<V, std::nullptr_t>) {
      return bind_null(index);
    } else if constexpr (std::is_same_v<V, SqliteBlob>) {
      return bind_blob(index, value.bytes);
    } else if constexpr (std::integral<V>) {
      return bind_int64(index, static_cast<std::int64_t>(value));
    } else if constexpr (std::floating_point<V>) {
      return bind_double(index, static_cast<double>(value));
    } else if constexpr (std::is_convertible_v<const V&, std::string_view>) {
      return bind_text(index, std::string_view(value));
    } else {
      static_assert(
          requires { value.has_value(); }, "unsupported SQLite parameter type");
      return value ? bind(index, *value) : bind_null(index);
    }
  }

  /// @brief Binds args to parameters 1, 2, ... in order.
  template <class... Args>
  SqliteStatement& bind_all(const Args&... args) {
    int index = 0;
    (bind(++index, args), ...);
    return *this;
  }

  /// @brief Steps once. True when a row is ready to read.
  /// @throws idem::SqliteError or idem::SqliteUnavailable when SQLite refuses.
  bool step();
  /// @brief Steps to completion; returns the rows the statement changed.
  std::int64_t run();
  /// @brief Rewinds so the statement can be stepped again (bindings are kept).
  void reset() noexcept;

  int column_count() const noexcept;
  bool column_is_null(int column) const noexcept;
  std::int64_t column_int64(int column) const noexcept;
  double column_double(int column) const noexcept;
  /// @brief Valid until the next step, reset or destruction.
  std::string_view column_text(int column) const noexcept;
  /// @brief Valid until the next step, reset or destruction.
  std::string_view column_blob(int column) const noexcept;

  /// @brief The statement for the C API; stepping it there belongs to the message too.
  /// @throws idem::SqliteUnavailable when the message's savepoint cannot be opened.
  sqlite3_stmt* native_handle() const;

 private:
  friend class detail::SqliteConnection;
  // Borrowed from the connection's cache: reset and handed back on destruction.
  SqliteStatement(detail::SqliteConnection* connection, sqlite3_stmt* cached, bool* in_use) noexcept
      : connection_(connection), stmt_(cached), in_use_(in_use) {}
  // Not cached (the cache is full, or the same SQL is already in use): finalized here.
  SqliteStatement(detail::SqliteConnection* connection,
                  std::unique_ptr<sqlite3_stmt, detail::SqliteStmtFinalizer> owned) noexcept
      : connection_(connection), owned_(std::move(owned)), stmt_(owned_.get()), in_use_(nullptr) {}

  detail::SqliteConnection* connection_;
  std::unique_ptr<sqlite3_stmt, detail::SqliteStmtFinalizer> owned_;
  sqlite3_stmt* stmt_;  // owned_.get() or the cache's statement
  bool* in_use_;        // the cache slot's flag; nullptr for an owned statement
};

/// @brief The open write transaction a transactional handler runs in. Everything executed
/// through it (or through native_handle()) commits together with the dedup record, or not at
/// all. Do not BEGIN, COMMIT, ROLLBACK or END it yourself (idem::ConfigError from prepare()
/// and exec(); SQLITE_AUTH through native_handle()); SAVEPOINTs of your own are fine.
class SqliteTx {
 public:
  SqliteTx(const SqliteTx&) = delete;
  SqliteTx& operator=(const SqliteTx&) = delete;

  /// @brief The connection of this transaction (escape hatch to the C API). Statements run
  /// through it belong to the message, as those run through prepare()/exec() do. Call it only
  /// inside the handler or the transaction() work: it may open the message's savepoint.
  /// @throws idem::SqliteUnavailable when the message's savepoint cannot be opened.
  sqlite3* native_handle() const;

  /// @brief Prepares one SQL statement, cached by its text on this connection.
  /// @throws idem::SqliteError for bad SQL, or more than one statement in sql.
  SqliteStatement prepare(std::string_view sql);

  /// @brief Runs one statement with bound parameters; returns the rows it changed.
  template <class... Args>
  std::int64_t exec(std::string_view sql, const Args&... args) {
    SqliteStatement statement = prepare(sql);
    statement.bind_all(args...);
    return statement.run();
  }

  /// @brief The first column of the first row as an integer; nullopt for no row or NULL.
  template <class... Args>
  std::optional<std::int64_t> query_int64(std::string_view sql, const Args&... args) {
    SqliteStatement statement = prepare(sql);
    statement.bind_all(args...);
    if (!statement.step() || statement.column_is_null(0)) return std::nullopt;
    return statement.column_int64(0);
  }

  /// @brief Stores (topic, partition) -> next_offset in this transaction.
  void save_offset(std::string_view topic, std::int32_t partition, std::int64_t next_offset);
  /// @brief The next offset stored for (topic, partition), as this transaction sees it.
  std::optional<std::int64_t> committed_offset(std::string_view topic, std::int32_t partition);

 private:
  friend class SqliteStore;
  explicit SqliteTx(detail::SqliteConnection& connection) noexcept : connection_(&connection) {}
  detail::SqliteConnection* connection_;
};

/// @brief The embedded DedupStore: one table keyed by the biz-id (a BLOB primary key, so the
/// database itself refuses a second record of a key), in a WAL-mode SQLite file.
///
/// Concurrency: one connection per SqliteStore, guarded by a mutex, so the threads of a process
/// take turns (SQLite admits one writer at a time anyway, and a std::mutex hands over far
/// faster than SQLite's file-lock polling). Several processes (or several SqliteStore objects)
/// may share one file: each write is a BEGIN IMMEDIATE transaction and waits up to
/// busy_timeout for the others. Do not use a store across fork(); open a new one in the child.
///
/// Two ways to consume:
/// - through DedupStore (any handler form): claim with a lease, run the handler, complete;
/// - transactional inbox, when IdempotentConsumer's handler takes an idem::SqliteTx& (or via
///   consume_in_transaction): the record and the handler's writes commit in one transaction;
///   no lease, no window of duplication.
class SqliteStore final : public InboxStore<SqliteTx> {
 public:
  /// @brief Opens (creating if needed) the database at path, in WAL mode, and its tables.
  /// @throws idem::ConfigError for bad options.
  /// @throws idem::SqliteUnavailable when the file cannot be opened or written (missing
  /// directory, read-only file, not a database, locked past busy_timeout).
  explicit SqliteStore(std::string path, SqliteOptions options = {});
  ~SqliteStore() override;
  SqliteStore(SqliteStore&&) = delete;

  std::string_view name() const noexcept override { return "sqlite"; }
  const std::string& path() const noexcept;

  // consume_in_transaction, consume_batch_in_transaction, committed_offset(s) and
  // save_offsets come from InboxStore: each is one BEGIN IMMEDIATE transaction.

  /// @brief Runs work in one write transaction of this store's connection (for schema set-up,
  /// reading business tables, ...). Commits when work returns, rolls back if it throws.
  void transaction(detail::FunctionRef<void(SqliteTx&)> work);

 private:
  Claim do_claim(const ClaimRequest& request) override;
  bool do_complete(const Completion& completion) override;
  bool do_release(std::string_view key, std::uint64_t token) override;
  bool do_forget(std::string_view key) override;
  std::vector<Claim> do_claim_batch(std::span<const ClaimRequest> requests) override;
  std::vector<bool> do_complete_batch(std::span<const Completion> completions) override;
  std::optional<RecordInfo> do_inspect(std::string_view key) override;
  /// Counts with one scan of the table: keep operators' polling intervals long.
  StoreStats do_stats() override;
  /// Deletes up to max_records expired records (done past retention, released, or lease
  /// expired), in transactions of at most 1000.
  std::size_t do_purge_expired(std::size_t max_records) override;
  std::unique_ptr<InboxTransaction> begin_inbox(InboxMode mode) override;
  std::vector<PartitionOffset> do_committed_offsets() override;
  SqliteTx& tx_of(InboxTransaction& transaction) override;

  class Lock;
  class Inbox;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem
