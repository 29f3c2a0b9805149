#pragma once
// One sqlite3 connection of a SqliteStore: its errors, busy handler, statement cache, the
// deferred message savepoint and the guard against handlers ending the store's transaction.

#include <sqlite3.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

#include "idem/stores/sqlite_store.hpp"

namespace idem::detail {

struct SqliteCloser {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
using StmtPtr = std::unique_ptr<sqlite3_stmt, SqliteStmtFinalizer>;

// Where an error happened, for the message's last words.
enum class Phase { open, operation, user };

// now + span without signed overflow: a lease or retention of milliseconds::max() ("forever")
// saturates at the largest representable time instead of wrapping into the past.
inline std::int64_t deadline(std::int64_t now, std::chrono::milliseconds span) noexcept {
  const auto ms = static_cast<std::int64_t>(span.count());
  if (ms > 0 && now > INT64_MAX - ms) return INT64_MAX;
  if (ms < 0 && now < INT64_MIN - ms) return INT64_MIN;
  return now + ms;
}

// sqlite3_bind_blob with a null pointer binds NULL; an empty view must stay an empty value.
inline const char* data_of(std::string_view bytes) noexcept {
  return bytes.data() != nullptr ? bytes.data() : "";
}

// The name of the savepoint each message of the inbox runs in.
inline constexpr const char* kMessageSavepoint = "idem_message";

// Not thread-safe: the SqliteStore that owns it serializes every use behind its mutex.
class SqliteConnection {
 public:
  SqliteConnection(std::string path, std::chrono::milliseconds busy_timeout,
                   bool read_only = false);

  sqlite3* db() const noexcept { return db_.get(); }
  const std::string& path() const noexcept { return path_; }
  // True for ":memory:" and other databases without a file (no WAL, no other process).
  bool in_memory() const noexcept;

  [[noreturn]] void fail(int rc, std::string_view what, Phase phase) const;

  // Before a handler's statement runs: if the transaction it belongs to is gone (SQLite rolled
  // it back after an error), the statement would run in autocommit mode and commit on its own,
  // apart from the dedup record. Refuse it.
  void require_transaction(std::string_view action, std::string_view sql) const;
  // Whether a handler's statement found (or left) the transaction rolled back since
  // reset_tx_lost(); see require_transaction.
  bool tx_lost() const noexcept { return tx_lost_; }
  void reset_tx_lost() noexcept { tx_lost_ = false; }

  // While user code runs inside the store's transaction, statements that would end it
  // (BEGIN, COMMIT, ROLLBACK, END, or RELEASE / ROLLBACK TO of the message savepoint) are
  // refused when they are prepared, through SqliteTx and native_handle() alike.
  void guard_user_statements(bool on) noexcept {
    if (on && !guard_user_) refused_since_guard_ = false;
    guard_user_ = on;
  }
  // Whether the guard refused a statement since it was turned on (the handler may have
  // ignored the SQLITE_AUTH it got through native_handle()).
  bool refused_transaction_control() const noexcept { return refused_since_guard_; }
  // Throws idem::ConfigError when the last prepare was refused by that guard.
  void throw_if_transaction_control(std::string_view sql) const;

  // The message savepoint is opened by the handler's first statement, not before every
  // handler: a handler that writes nothing through the transaction then costs no
  // SAVEPOINT/RELEASE pair. Once a handler has taken native_handle(), every later handler gets
  // its savepoint up front: statements run through a kept sqlite3* cannot be seen coming.
  void defer_savepoint(sqlite3_stmt* open_savepoint);
  void open_deferred_savepoint();
  // Ends the deferral; true when the savepoint was opened (and must be released).
  bool end_deferred_savepoint() noexcept;
  sqlite3* raw_handle();

  // Runs SQL without parameters (pragmas, schema).
  void exec_script(const char* sql, std::string_view what, Phase phase);
  StmtPtr prepare_internal(const char* sql);
  SqliteStatement prepare_user(std::string_view sql);

 private:
  static constexpr std::size_t kMaxCached = 256;
  static int on_busy(void* self, int count) noexcept;
  static int authorize(void* self, int action, const char* arg1, const char* arg2, const char*,
                       const char*) noexcept;

  struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  struct Cached {
    StmtPtr stmt;
    bool in_use = false;
  };

  std::string path_;
  std::chrono::milliseconds busy_timeout_;
  std::chrono::steady_clock::time_point busy_since_{};
  std::unique_ptr<sqlite3, SqliteCloser> db_;
  std::unordered_map<std::string, Cached, StringHash, std::equal_to<>> cache_;
  mutable bool tx_lost_ = false;
  sqlite3_stmt* savepoint_ = nullptr;  // the message savepoint to open on first use
  bool savepoint_open_ = false;
  bool raw_handle_taken_ = false;
  bool guard_user_ = false;
  bool refused_tx_control_ = false;
  bool refused_since_guard_ = false;
};

// Binds and steps one of the store's own statements; resets it on scope exit so no read
// snapshot outlives the call. Blobs are bound SQLITE_STATIC: they outlive the Step.
class Step {
 public:
  Step(SqliteConnection& connection, sqlite3_stmt* stmt, std::string_view what) noexcept
      : connection_(connection), stmt_(stmt), what_(what) {}
  Step(const Step&) = delete;
  Step& operator=(const Step&) = delete;
  ~Step() { sqlite3_reset(stmt_); }

  Step& i64(int index, std::int64_t value) {
    return check(sqlite3_bind_int64(stmt_, index, value));
  }
  Step& blob(int index, std::string_view bytes) {
    return check(sqlite3_bind_blob64(stmt_, index, data_of(bytes), bytes.size(), SQLITE_STATIC));
  }
  Step& text(int index, std::string_view chars) {
    return check(sqlite3_bind_text64(stmt_, index, data_of(chars), chars.size(), SQLITE_STATIC,
                                     SQLITE_UTF8));
  }
  Step& null(int index) { return check(sqlite3_bind_null(stmt_, index)); }

  bool row() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc != SQLITE_DONE) connection_.fail(rc, what_, Phase::operation);
    return false;
  }
  void run() {
    while (row()) {
    }
  }
  std::int64_t column_int64(int column) const noexcept {
    return sqlite3_column_int64(stmt_, column);
  }
  std::string_view column_blob(int column) const noexcept {
    const auto* blob = static_cast<const char*>(sqlite3_column_blob(stmt_, column));
    return blob == nullptr
               ? std::string_view{}
               : std::string_view(blob,
                                  static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column)));
  }
  bool column_is_null(int column) const noexcept {
    return sqlite3_column_type(stmt_, column) == SQLITE_NULL;
  }

 private:
  Step& check(int rc) {
    if (rc != SQLITE_OK) connection_.fail(rc, what_, Phase::operation);
    return *this;
  }

  SqliteConnection& connection_;
  sqlite3_stmt* stmt_;
  std::string_view what_;
};

}  // namespace idem::detail
