#include "connection.hpp"

#include <algorithm>
#include <string>
#include <thread>

#include "errors.hpp"
#include "idem/error.hpp"

namespace idem::detail {
namespace {

bool only_separators(std::string_view tail) noexcept {
  return std::all_of(tail.begin(), tail.end(), [](char c) {
    return c == ';' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
  });
}

}  // namespace

SqliteConnection::SqliteConnection(std::string path, std::chrono::milliseconds busy_timeout,
                                   bool read_only)
    : path_(std::move(path)), busy_timeout_(busy_timeout) {
  sqlite3* raw = nullptr;
  const int flags = read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
  const int rc = sqlite3_open_v2(path_.c_str(), &raw, flags | SQLITE_OPEN_NOMUTEX, nullptr);
  db_.reset(raw);  // a handle comes back even on failure and must be closed
  if (rc != SQLITE_OK) fail(rc, "opening the database", Phase::open);
  sqlite3_extended_result_codes(db_.get(), 1);
  // Our own handler instead of sqlite3_busy_timeout: SQLite's sleeps 1, 2, 5, 10, ... ms,
  // which throttles processes sharing a file; this one polls from 20 us up to 2 ms.
  sqlite3_busy_handler(db_.get(), &SqliteConnection::on_busy, this);
  sqlite3_set_authorizer(db_.get(), &SqliteConnection::authorize, this);
  if (!read_only && sqlite3_db_readonly(db_.get(), "main") == 1) {
    throw SqliteUnavailable(
        "sqlite store '" + path_ +
            "': the database file is read-only for this process (SQLITE_READONLY): a dedup "
            "store must write to it; fix the file's permissions or use a writable path; the "
            "store was not opened",
        SQLITE_READONLY, SQLITE_READONLY);
  }
}

bool SqliteConnection::in_memory() const noexcept {
  const char* file = sqlite3_db_filename(db_.get(), "main");
  return file == nullptr || *file == '\0';
}

void SqliteConnection::fail(int rc, std::string_view what, Phase phase) const {
  const int primary = rc & 0xff;
  std::string message = "sqlite store '" + path_ + "': " + std::string(what) + " failed: ";
  message += db_ ? sqlite3_errmsg(db_.get()) : sqlite3_errstr(rc);
  message += " (";
  message += sqlite::code_name(primary);
  message += ", extended code " + std::to_string(rc) + "): " + sqlite::advice(primary);
  switch (phase) {
    case Phase::open:
      message += "; the store was not opened";
      break;
    case Phase::operation:
      message += "; nothing was recorded as done: do not ack the message, retry later";
      break;
    case Phase::user:
      break;
  }
  // SQLite rolls the whole transaction back after SQLITE_FULL, IOERR, NOMEM, INTERRUPT, ...
  if (phase == Phase::user && sqlite3_get_autocommit(db_.get()) != 0) tx_lost_ = true;
  if (phase == Phase::user && !sqlite::unavailable_code(primary)) {
    throw SqliteError(message, primary, rc);
  }
  throw SqliteUnavailable(message, primary, rc);
}

void SqliteConnection::require_transaction(std::string_view action, std::string_view sql) const {
  if (sqlite3_get_autocommit(db_.get()) == 0) return;
  tx_lost_ = true;
  throw SqliteUnavailable(
      "sqlite store '" + path_ + "': " + std::string(action) + " \"" +
          std::string(sql.substr(0, 200)) +
          "\" refused: the transaction is gone (SQLite rolled it back after an error such as "
          "SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM or SQLITE_INTERRUPT, or it was ended "
          "through native_handle()), so the statement would commit on its own, apart from "
          "the dedup record; nothing was recorded as done: do not ack the message, let this "
          "error propagate and retry later",
      SQLITE_ABORT, SQLITE_ABORT);
}

void SqliteConnection::defer_savepoint(sqlite3_stmt* open_savepoint) {
  savepoint_ = open_savepoint;
  savepoint_open_ = false;
  if (raw_handle_taken_) open_deferred_savepoint();
}
void SqliteConnection::open_deferred_savepoint() {
  if (savepoint_ == nullptr || savepoint_open_) return;
  const int rc = sqlite3_step(savepoint_);
  sqlite3_reset(savepoint_);
  if (rc != SQLITE_DONE) fail(rc, "opening the message's savepoint", Phase::user);
  savepoint_open_ = true;
}
bool SqliteConnection::end_deferred_savepoint() noexcept {
  const bool opened = savepoint_open_;
  savepoint_ = nullptr;
  savepoint_open_ = false;
  return opened;
}
sqlite3* SqliteConnection::raw_handle() {
  raw_handle_taken_ = true;
  open_deferred_savepoint();
  return db_.get();
}

void SqliteConnection::exec_script(const char* sql, std::string_view what, Phase phase) {
  const int rc = sqlite3_exec(db_.get(), sql, nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) fail(rc, what, phase);
}

StmtPtr SqliteConnection::prepare_internal(const char* sql) {
  refused_tx_control_ = false;
  sqlite3_stmt* stmt = nullptr;
  const int rc = sqlite3_prepare_v3(db_.get(), sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
  StmtPtr owned(stmt);
  if (rc != SQLITE_OK) fail(rc, std::string("preparing \"") + sql + "\"", Phase::open);
  return owned;
}

SqliteStatement SqliteConnection::prepare_user(std::string_view sql) {
  refused_tx_control_ = false;
  auto it = cache_.find(sql);
  if (it != cache_.end() && !it->second.in_use) {
    it->second.in_use = true;
    return SqliteStatement(this, it->second.stmt.get(), &it->second.in_use);
  }
  sqlite3_stmt* stmt = nullptr;
  const char* tail = nullptr;
  const int rc = sqlite3_prepare_v3(db_.get(), sql.data(), static_cast<int>(sql.size()),
                                    SQLITE_PREPARE_PERSISTENT, &stmt, &tail);
  StmtPtr owned(stmt);
  const std::string shown(sql.substr(0, 200));
  if (rc != SQLITE_OK) {
    throw_if_transaction_control(sql);
    fail(rc, "preparing \"" + shown + "\"", Phase::user);
  }
  if (stmt == nullptr) {
    throw SqliteError("sqlite store '" + path_ + "': \"" + shown + "\" holds no SQL statement",
                      SQLITE_MISUSE, SQLITE_MISUSE);
  }
  if (tail != nullptr && tail < sql.data() + sql.size() &&
      !only_separators(
          std::string_view(tail, static_cast<std::size_t>(sql.data() + sql.size() - tail)))) {
    throw SqliteError("sqlite store '" + path_ + "': \"" + shown +
                          "\" holds more than one statement: prepare() and exec() take one "
                          "statement at a time",
                      SQLITE_MISUSE, SQLITE_MISUSE);
  }
  if (it == cache_.end() && cache_.size() < kMaxCached) {
    auto [slot, inserted] = cache_.emplace(std::string(sql), Cached{std::move(owned), true});
    (void)inserted;
    return SqliteStatement(this, slot->second.stmt.get(), &slot->second.in_use);
  }
  return SqliteStatement(this, std::move(owned));
}

int SqliteConnection::on_busy(void* self, int count) noexcept {
  auto* connection = static_cast<SqliteConnection*>(self);
  const auto now = std::chrono::steady_clock::now();
  if (count == 0) connection->busy_since_ = now;
  const auto waited = now - connection->busy_since_;
  if (waited >= connection->busy_timeout_) return 0;
  const auto step = std::chrono::microseconds(20 << std::min(count, 7));
  std::this_thread::sleep_for(
      std::min<std::chrono::steady_clock::duration>(step, connection->busy_timeout_ - waited));
  return 1;
}

int SqliteConnection::authorize(void* self, int action, const char* arg1, const char* arg2,
                                const char*, const char*) noexcept {
  auto* connection = static_cast<SqliteConnection*>(self);
  if (!connection->guard_user_) return SQLITE_OK;
  const bool ends_transaction = action == SQLITE_TRANSACTION;  // BEGIN, COMMIT, ROLLBACK
  const bool ends_savepoint = action == SQLITE_SAVEPOINT && arg1 != nullptr && arg2 != nullptr &&
                              std::string_view(arg1) != "BEGIN" &&
                              sqlite3_stricmp(arg2, kMessageSavepoint) == 0;
  if (!ends_transaction && !ends_savepoint) return SQLITE_OK;
  connection->refused_tx_control_ = true;
  connection->refused_since_guard_ = true;
  return SQLITE_DENY;
}

void SqliteConnection::throw_if_transaction_control(std::string_view sql) const {
  if (!refused_tx_control_) return;
  throw ConfigError("sqlite store '" + path_ + "': \"" + std::string(sql.substr(0, 200)) +
                    "\" refused: a handler may not begin, commit or roll back the store's "
                    "transaction (nor release its savepoint " +
                    kMessageSavepoint +
                    "): idem commits the handler's writes with the dedup record; use "
                    "SAVEPOINTs of your own to undo part of the work, or throw to undo all of "
                    "it");
}

}  // namespace idem::detail
