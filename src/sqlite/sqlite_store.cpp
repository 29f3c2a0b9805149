#include "idem/stores/sqlite_store.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "idem/detail/settle.hpp"

namespace idem {
namespace detail {
namespace {

struct DbCloser {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
using StmtPtr = std::unique_ptr<sqlite3_stmt, SqliteStmtFinalizer>;

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept {
    return std::hash<std::string_view>{}(s);
  }
};

const char* code_name(int primary) noexcept {
  switch (primary) {
    case SQLITE_ERROR:
      return "SQLITE_ERROR";
    case SQLITE_INTERNAL:
      return "SQLITE_INTERNAL";
    case SQLITE_PERM:
      return "SQLITE_PERM";
    case SQLITE_ABORT:
      return "SQLITE_ABORT";
    case SQLITE_BUSY:
      return "SQLITE_BUSY";
    case SQLITE_LOCKED:
      return "SQLITE_LOCKED";
    case SQLITE_NOMEM:
      return "SQLITE_NOMEM";
    case SQLITE_READONLY:
      return "SQLITE_READONLY";
    case SQLITE_INTERRUPT:
      return "SQLITE_INTERRUPT";
    case SQLITE_IOERR:
      return "SQLITE_IOERR";
    case SQLITE_CORRUPT:
      return "SQLITE_CORRUPT";
    case SQLITE_FULL:
      return "SQLITE_FULL";
    case SQLITE_CANTOPEN:
      return "SQLITE_CANTOPEN";
    case SQLITE_PROTOCOL:
      return "SQLITE_PROTOCOL";
    case SQLITE_SCHEMA:
      return "SQLITE_SCHEMA";
    case SQLITE_TOOBIG:
      return "SQLITE_TOOBIG";
    case SQLITE_CONSTRAINT:
      return "SQLITE_CONSTRAINT";
    case SQLITE_MISMATCH:
      return "SQLITE_MISMATCH";
    case SQLITE_MISUSE:
      return "SQLITE_MISUSE";
    case SQLITE_NOLFS:
      return "SQLITE_NOLFS";
    case SQLITE_AUTH:
      return "SQLITE_AUTH";
    case SQLITE_RANGE:
      return "SQLITE_RANGE";
    case SQLITE_NOTADB:
      return "SQLITE_NOTADB";
    default:
      return "SQLITE_?";
  }
}

// Codes that say "the database cannot be used right now", as opposed to "this statement is
// wrong"; a handler's statement failing with one of these is reported as unavailability.
bool unavailable_code(int primary) noexcept {
  switch (primary) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_NOMEM:
    case SQLITE_READONLY:
    case SQLITE_INTERRUPT:
    case SQLITE_IOERR:
    case SQLITE_CORRUPT:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_PROTOCOL:
    case SQLITE_NOTADB:
    case SQLITE_NOLFS:
    case SQLITE_PERM:
    case SQLITE_AUTH:
      return true;
    default:
      return false;
  }
}

// now + span without signed overflow: a lease or retention of milliseconds::max() ("forever")
// saturates at the largest (or smallest) representable time instead of wrapping into the past.
std::int64_t deadline(std::int64_t now, std::chrono::milliseconds span) noexcept {
  const auto ms = static_cast<std::int64_t>(span.count());
  if (ms > 0 && now > INT64_MAX - ms) return INT64_MAX;
  if (ms < 0 && now < INT64_MIN - ms) return INT64_MIN;
  return now + ms;
}

bool only_separators(const char* tail) noexcept {
  for (; tail != nullptr && *tail != '\0'; ++tail) {
    if (*tail != ';' && *tail != ' ' && *tail != '\t' && *tail != '\n' && *tail != '\r') {
      return false;
    }
  }
  return true;
}

}  // namespace

enum class Phase { open, operation, user };

// One sqlite3 connection, its busy handler and its statement cache. Not thread-safe: the
// SqliteStore that owns it serializes every use behind its mutex.
class SqliteConnection {
 public:
  SqliteConnection(std::string path, std::chrono::milliseconds busy_timeout)
      : path_(std::move(path)), busy_timeout_(busy_timeout) {
    sqlite3* raw = nullptr;
    const int rc =
        sqlite3_open_v2(path_.c_str(), &raw,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
    db_.reset(raw);  // a handle comes back even on failure and must be closed
    if (rc != SQLITE_OK) fail(rc, "opening the database", Phase::open);
    sqlite3_extended_result_codes(db_.get(), 1);
    // Our own handler instead of sqlite3_busy_timeout: SQLite's sleeps 1, 2, 5, 10, ... ms,
    // which throttles processes sharing a file; this one polls from 20 us up to 2 ms.
    sqlite3_busy_handler(db_.get(), &SqliteConnection::on_busy, this);
    if (sqlite3_db_readonly(db_.get(), "main") == 1) {
      throw SqliteUnavailable(
          "sqlite store '" + path_ +
              "': the database file is read-only for this process (SQLITE_READONLY): a dedup "
              "store must write to it; fix the file's permissions or use a writable path; the "
              "store was not opened",
          SQLITE_READONLY, SQLITE_READONLY);
    }
  }

  sqlite3* db() const noexcept { return db_.get(); }
  const std::string& path() const noexcept { return path_; }

  [[noreturn]] void fail(int rc, std::string_view what, Phase phase) const {
    const int primary = rc & 0xff;
    std::string message = "sqlite store '" + path_ + "': " + std::string(what) + " failed: ";
    message += db_ ? sqlite3_errmsg(db_.get()) : sqlite3_errstr(rc);
    message += " (";
    message += code_name(primary);
    message += ", extended code " + std::to_string(rc) + "): " + advice(primary);
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
    if (phase == Phase::user && !unavailable_code(primary)) {
      throw SqliteError(message, primary, rc);
    }
    throw SqliteUnavailable(message, primary, rc);
  }

  // Before a handler's statement runs: if the transaction it belongs to is gone (SQLite rolled
  // it back after an error, or the handler ended it), the statement would run in autocommit
  // mode and commit on its own, apart from the dedup record. Refuse it.
  void require_transaction(std::string_view action, std::string_view sql) const {
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
  // Whether a handler's statement found (or left) the transaction rolled back since
  // reset_tx_lost(); see require_transaction.
  bool tx_lost() const noexcept { return tx_lost_; }
  void reset_tx_lost() noexcept { tx_lost_ = false; }

  // The message savepoint is opened by the handler's first statement, not before every
  // handler: a handler that writes nothing through the transaction then costs no
  // SAVEPOINT/RELEASE pair. Once a handler has taken native_handle(), every later handler gets
  // its savepoint up front: statements run through a kept sqlite3* cannot be seen coming.
  void defer_savepoint(sqlite3_stmt* open_savepoint) {
    savepoint_ = open_savepoint;
    savepoint_open_ = false;
    if (raw_handle_taken_) open_deferred_savepoint();
  }
  void open_deferred_savepoint() {
    if (savepoint_ == nullptr || savepoint_open_) return;
    const int rc = sqlite3_step(savepoint_);
    sqlite3_reset(savepoint_);
    if (rc != SQLITE_DONE) fail(rc, "opening the message's savepoint", Phase::user);
    savepoint_open_ = true;
  }
  // Ends the deferral; true when the savepoint was opened (and must be released).
  bool end_deferred_savepoint() noexcept {
    const bool opened = savepoint_open_;
    savepoint_ = nullptr;
    savepoint_open_ = false;
    return opened;
  }
  sqlite3* raw_handle() {
    raw_handle_taken_ = true;
    open_deferred_savepoint();
    return db_.get();
  }

  // Runs SQL without parameters (pragmas, schema).
  void exec_script(const char* sql, std::string_view what, Phase phase) {
    const int rc = sqlite3_exec(db_.get(), sql, nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) fail(rc, what, phase);
  }

  StmtPtr prepare_internal(const char* sql) {
    sqlite3_stmt* stmt = nullptr;
    const int rc =
        sqlite3_prepare_v3(db_.get(), sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    StmtPtr owned(stmt);
    if (rc != SQLITE_OK) fail(rc, std::string("preparing \"") + sql + "\"", Phase::open);
    return owned;
  }

  SqliteStatement prepare_user(std::string_view sql) {
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
    if (rc != SQLITE_OK) fail(rc, "preparing \"" + shown + "\"", Phase::user);
    if (stmt == nullptr) {
      throw SqliteError("sqlite store '" + path_ + "': \"" + shown + "\" holds no SQL statement",
                        SQLITE_MISUSE, SQLITE_MISUSE);
    }
    if (tail != nullptr && tail < sql.data() + sql.size() &&
        !only_separators(std::string(tail, sql.data() + sql.size()).c_str())) {
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

 private:
  static constexpr std::size_t kMaxCached = 256;

  static std::string advice(int primary) {
    switch (primary) {
      case SQLITE_BUSY:
      case SQLITE_LOCKED:
        return "another connection kept the database locked longer than busy_timeout; retry "
               "later, or raise SqliteStoreOptions::busy_timeout if that writer is expected to "
               "be slow";
      case SQLITE_CANTOPEN:
        return "check that the directory exists and that this process may create files in it "
               "(SQLite also creates the -wal and -shm files next to the database)";
      case SQLITE_NOTADB:
        return "the file is not an SQLite database (or is encrypted): point SqliteStore at a "
               "new path or at the right file";
      case SQLITE_READONLY:
        return "the database, its directory or its -wal/-shm files are read-only for this "
               "process: fix their permissions or use a writable path";
      case SQLITE_PERM:
      case SQLITE_AUTH:
        return "access was denied: check the file's permissions";
      case SQLITE_FULL:
        return "the disk is full: free some space";
      case SQLITE_IOERR:
        return "the operating system reported an I/O error: check the disk and file system";
      case SQLITE_CORRUPT:
        return "the database file is corrupt: restore it from a backup, or move it aside and "
               "start a new one (its done keys are then forgotten)";
      case SQLITE_NOMEM:
        return "SQLite ran out of memory";
      default:
        return "see SQLite's message";
    }
  }

  static int on_busy(void* self, int count) noexcept {
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

  struct Cached {
    StmtPtr stmt;
    bool in_use = false;
  };

  std::string path_;
  std::chrono::milliseconds busy_timeout_;
  std::chrono::steady_clock::time_point busy_since_{};
  std::unique_ptr<sqlite3, DbCloser> db_;
  std::unordered_map<std::string, Cached, StringHash, std::equal_to<>> cache_;
  mutable bool tx_lost_ = false;
  sqlite3_stmt* savepoint_ = nullptr;  // the message savepoint to open on first use
  bool savepoint_open_ = false;
  bool raw_handle_taken_ = false;
};

}  // namespace detail

// --- SqliteStatement -------------------------------------------------------------------------

void detail::SqliteStmtFinalizer::operator()(sqlite3_stmt* stmt) const noexcept {
  sqlite3_finalize(stmt);
}

SqliteStatement::SqliteStatement(SqliteStatement&& other) noexcept
    : connection_(other.connection_),
      owned_(std::move(other.owned_)),
      stmt_(std::exchange(other.stmt_, nullptr)),
      in_use_(std::exchange(other.in_use_, nullptr)) {}

SqliteStatement::~SqliteStatement() {
  if (in_use_ == nullptr) return;  // owned_ finalizes an uncached statement
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
  *in_use_ = false;
}

namespace {
void check_bind(detail::SqliteConnection& connection, sqlite3_stmt* stmt, int rc, int index) {
  if (rc == SQLITE_OK) return;
  connection.fail(
      rc, "binding parameter " + std::to_string(index) + " of \"" + sqlite3_sql(stmt) + "\"",
      detail::Phase::user);
}
// sqlite3_bind_blob with a null pointer binds NULL; an empty view must stay an empty value.
const char* data_of(std::string_view bytes) noexcept {
  return bytes.data() != nullptr ? bytes.data() : "";
}
}  // namespace

SqliteStatement& SqliteStatement::bind_int64(int index, std::int64_t value) {
  check_bind(*connection_, stmt_, sqlite3_bind_int64(stmt_, index, value), index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_double(int index, double value) {
  check_bind(*connection_, stmt_, sqlite3_bind_double(stmt_, index, value), index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_text(int index, std::string_view text) {
  check_bind(
      *connection_, stmt_,
      sqlite3_bind_text64(stmt_, index, data_of(text), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8),
      index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_blob(int index, std::string_view bytes) {
  check_bind(*connection_, stmt_,
             sqlite3_bind_blob64(stmt_, index, data_of(bytes), bytes.size(), SQLITE_TRANSIENT),
             index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_null(int index) {
  check_bind(*connection_, stmt_, sqlite3_bind_null(stmt_, index), index);
  return *this;
}

bool SqliteStatement::step() {
  if (sqlite3_get_autocommit(connection_->db()) != 0) {
    connection_->require_transaction("running", sqlite3_sql(stmt_));
  }
  connection_->open_deferred_savepoint();
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  const std::string sql = sqlite3_sql(stmt_);
  connection_->fail(rc, "running \"" + sql.substr(0, 200) + "\"", detail::Phase::user);
}

sqlite3_stmt* SqliteStatement::native_handle() const {
  (void)connection_->raw_handle();  // it may be stepped where step() cannot see it
  return stmt_;
}

std::int64_t SqliteStatement::run() {
  while (step()) {
  }
  return sqlite3_changes(connection_->db());
}

void SqliteStatement::reset() noexcept {
  sqlite3_reset(stmt_);
}
int SqliteStatement::column_count() const noexcept {
  return sqlite3_column_count(stmt_);
}
bool SqliteStatement::column_is_null(int column) const noexcept {
  return sqlite3_column_type(stmt_, column) == SQLITE_NULL;
}
std::int64_t SqliteStatement::column_int64(int column) const noexcept {
  return sqlite3_column_int64(stmt_, column);
}
double SqliteStatement::column_double(int column) const noexcept {
  return sqlite3_column_double(stmt_, column);
}
std::string_view SqliteStatement::column_text(int column) const noexcept {
  const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, column));
  return text == nullptr ? std::string_view{}
                         : std::string_view(
                               text, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column)));
}
std::string_view SqliteStatement::column_blob(int column) const noexcept {
  const auto* blob = static_cast<const char*>(sqlite3_column_blob(stmt_, column));
  return blob == nullptr ? std::string_view{}
                         : std::string_view(
                               blob, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column)));
}

// --- SqliteTx --------------------------------------------------------------------------------

namespace {
constexpr const char* kSaveOffsetSql =
    "INSERT INTO idem_offsets(topic, partition_id, next_offset) VALUES(?1, ?2, ?3) "
    "ON CONFLICT(topic, partition_id) DO UPDATE SET next_offset = excluded.next_offset";
constexpr const char* kOffsetSql =
    "SELECT next_offset FROM idem_offsets WHERE topic = ?1 AND partition_id = ?2";
}  // namespace

sqlite3* SqliteTx::native_handle() const {
  return connection_->raw_handle();
}

SqliteStatement SqliteTx::prepare(std::string_view sql) {
  connection_->require_transaction("preparing", sql);
  return connection_->prepare_user(sql);
}

void SqliteTx::save_offset(std::string_view topic, std::int32_t partition,
                           std::int64_t next_offset) {
  exec(kSaveOffsetSql, topic, partition, next_offset);
}

std::optional<std::int64_t> SqliteTx::committed_offset(std::string_view topic,
                                                       std::int32_t partition) {
  return query_int64(kOffsetSql, topic, partition);
}

// --- SqliteStore -----------------------------------------------------------------------------

namespace {

using detail::StmtPtr;

constexpr std::int64_t kInProgress = 0;
constexpr std::int64_t kDone = 1;
constexpr std::int64_t kReleased = 2;
constexpr std::int64_t kSchemaVersion = 1;

// Keys are BLOBs compared with memcmp: binary-safe, NUL bytes included. expires_at is the
// lease end (in progress), the retention end (done) or the release time (released), in the
// store clock's milliseconds. There is deliberately no index on expires_at: a second B-tree
// doubles the pages each one-message commit writes (measured: half the throughput). Purging
// sweeps the primary key instead, a bounded slice per transaction (see purge_step).
constexpr const char* kSchemaSql = R"sql(
CREATE TABLE IF NOT EXISTS idem_keys(
  key         BLOB PRIMARY KEY NOT NULL,
  state       INTEGER NOT NULL,
  token       INTEGER NOT NULL,
  expires_at  INTEGER NOT NULL,
  fingerprint INTEGER,
  response    BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idem_meta(
  name  TEXT PRIMARY KEY NOT NULL,
  value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO idem_meta(name, value) VALUES('schema_version', 1), ('token_floor', 0);
CREATE TABLE IF NOT EXISTS idem_offsets(
  topic        TEXT NOT NULL,
  partition_id INTEGER NOT NULL,
  next_offset  INTEGER NOT NULL,
  PRIMARY KEY(topic, partition_id)
) WITHOUT ROWID;
)sql";

// The payload fingerprint as one 64-bit INTEGER: the low half of the XXH3-128 digest (as in
// MemoryStore; a false "same payload" needs a 2^-64 collision). NULL means "not fingerprinted".
// Eight bytes instead of a 17-byte BLOB keep rows small: fewer page splits, fewer WAL frames.
struct CompactFingerprint {
  std::int64_t value = 0;
  bool present = false;

  explicit CompactFingerprint(const Fingerprint& fp) noexcept : present(!fp.empty()) {
    // 0 is a valid low half; map it to 1 so it never reads as "unchecked".
    value = static_cast<std::int64_t>(fp.low != 0 ? fp.low : 1);
  }
  bool compatible_with(bool stored_present, std::int64_t stored) const noexcept {
    return !present || !stored_present || stored == value;
  }
};

// Binds and steps one of the store's own statements; resets it on scope exit so no read
// snapshot outlives the call. Blobs are bound SQLITE_STATIC: they outlive the Step.
class Step {
 public:
  Step(detail::SqliteConnection& connection, sqlite3_stmt* stmt, std::string_view what) noexcept
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
  Step& fingerprint(int index, const CompactFingerprint& fp) {
    return fp.present ? i64(index, fp.value) : null(index);
  }

  bool row() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc != SQLITE_DONE) connection_.fail(rc, what_, detail::Phase::operation);
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
    if (rc != SQLITE_OK) connection_.fail(rc, what_, detail::Phase::operation);
    return *this;
  }

  detail::SqliteConnection& connection_;
  sqlite3_stmt* stmt_;
  std::string_view what_;
};

std::string describe(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "a non-standard exception";
  }
}

}  // namespace

struct SqliteStore::Impl {
  Impl(std::string path, const SqliteStoreOptions& opts)
      : options(opts),
        clock(opts.clock != nullptr ? opts.clock : &system_clock()),
        conn(std::move(path), opts.busy_timeout) {
    conn.exec_script("PRAGMA journal_mode=WAL", "switching to WAL mode", detail::Phase::open);
    {
      StmtPtr mode = conn.prepare_internal("PRAGMA journal_mode");
      Step step(conn, mode.get(), "reading the journal mode");
      const bool wal = step.row() && step.column_blob(0) == "wal";
      if (!wal) {
        throw SqliteUnavailable("sqlite store '" + conn.path() +
                                    "': the database could not be switched to WAL mode (is it "
                                    "on a network file system without shared memory?); the "
                                    "store was not opened",
                                SQLITE_CANTOPEN, SQLITE_CANTOPEN);
      }
    }
    conn.exec_script(opts.synchronous == SqliteSync::full ? "PRAGMA synchronous=FULL"
                                                          : "PRAGMA synchronous=NORMAL",
                     "setting PRAGMA synchronous", detail::Phase::open);
    conn.exec_script("BEGIN IMMEDIATE", "locking the database to create the tables",
                     detail::Phase::open);
    try {
      conn.exec_script(kSchemaSql, "creating the tables", detail::Phase::open);
      conn.exec_script("COMMIT", "committing the tables", detail::Phase::open);
    } catch (...) {
      sqlite3_exec(conn.db(), "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }

    begin = conn.prepare_internal("BEGIN IMMEDIATE");
    commit = conn.prepare_internal("COMMIT");
    rollback = conn.prepare_internal("ROLLBACK");
    savepoint = conn.prepare_internal("SAVEPOINT idem_message");
    release_savepoint = conn.prepare_internal("RELEASE idem_message");
    rollback_to_savepoint = conn.prepare_internal("ROLLBACK TO idem_message");
    meta_get = conn.prepare_internal("SELECT value FROM idem_meta WHERE name = ?1");
    floor_raise = conn.prepare_internal(
        "UPDATE idem_meta SET value = max(value, ?1) WHERE name = 'token_floor'");
    insert = conn.prepare_internal(
        "INSERT INTO idem_keys(key, state, token, expires_at, fingerprint, response) "
        "VALUES(?1, ?2, ?3, ?4, ?5, NULL) ON CONFLICT(key) DO NOTHING");
    select = conn.prepare_internal(
        "SELECT state, token, expires_at, fingerprint, response FROM idem_keys WHERE key = ?1");
    retake = conn.prepare_internal(
        "UPDATE idem_keys SET state = ?2, token = ?3, expires_at = ?4, fingerprint = ?5, "
        "response = NULL WHERE key = ?1");
    set_response = conn.prepare_internal("UPDATE idem_keys SET response = ?2 WHERE key = ?1");
    complete = conn.prepare_internal(
        "UPDATE idem_keys SET state = 1, expires_at = ?3, response = ?4 "
        "WHERE key = ?1 AND token = ?2 AND state <> 2");
    // The claim's record was purged (its lease ran out, nobody took over): record the key as
    // done all the same. Only a token already handed out (<= token_floor, which the purge
    // raised to it) is believed; ON CONFLICT: a record of the key exists, so it is not ours.
    complete_absent = conn.prepare_internal(
        "INSERT INTO idem_keys(key, state, token, expires_at, fingerprint, response) "
        "SELECT ?1, 1, ?2, ?3, NULL, ?4 WHERE ?2 <= (SELECT value FROM idem_meta "
        "WHERE name = 'token_floor') ON CONFLICT(key) DO NOTHING");
    release = conn.prepare_internal(
        "UPDATE idem_keys SET state = 2, expires_at = ?3 "
        "WHERE key = ?1 AND token = ?2 AND state = 0");
    forget = conn.prepare_internal(
        "DELETE FROM idem_keys WHERE key = ?1 AND state <> 2 RETURNING token");
    sweep_end = conn.prepare_internal(
        "SELECT key FROM idem_keys WHERE key >= ?1 ORDER BY key LIMIT 1 OFFSET ?2");
    // Plain range scans: an IN (subquery) or RETURNING would build ephemeral tables whose
    // page-cache allocations churn the heap (measured: brk on every purge step).
    sweep_expired_range = conn.prepare_internal(
        "SELECT key, token FROM idem_keys WHERE key >= ?1 AND key < ?4 AND "
        "(expires_at <= ?2 OR state = 2) ORDER BY key LIMIT ?3");
    sweep_expired_tail = conn.prepare_internal(
        "SELECT key, token FROM idem_keys WHERE key >= ?1 AND (expires_at <= ?2 OR state = 2) "
        "ORDER BY key LIMIT ?3");
    erase = conn.prepare_internal("DELETE FROM idem_keys WHERE key = ?1");
    abandon = conn.prepare_internal(
        "UPDATE idem_keys SET state = 2, token = ?3, expires_at = ?2, response = NULL "
        "WHERE key = ?1");
    count = conn.prepare_internal(
        "SELECT count(*), coalesce(sum(state = 0 AND expires_at > ?1), 0), "
        "coalesce(sum(state = 1 AND expires_at > ?1), 0) FROM idem_keys");
    file_bytes = conn.prepare_internal(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()");
    offset_get = conn.prepare_internal(kOffsetSql);
    offsets_all = conn.prepare_internal(
        "SELECT topic, partition_id, next_offset FROM idem_offsets ORDER BY topic, partition_id");

    Step version(conn, meta_get.get(), "reading the schema version");
    version.text(1, "schema_version");
    if (version.row() && version.column_int64(0) > kSchemaVersion) {
      throw ConfigError("sqlite store '" + conn.path() +
                        "': the database has idem schema version " +
                        std::to_string(version.column_int64(0)) + " but this build knows " +
                        std::to_string(kSchemaVersion) + ": upgrade idem or use another file");
    }
  }

  // The write transaction of one call: BEGIN IMMEDIATE (waiting up to busy_timeout for other
  // connections), rolled back on scope exit unless committed.
  //
  // While it is open, a commit hook vetoes every commit but its own COMMIT: should SQLite roll
  // the transaction back under a handler (SQLITE_FULL, IOERR, NOMEM, INTERRUPT) and the
  // handler write on through native_handle(), those writes run in autocommit mode and would
  // otherwise commit on their own, without the dedup record.
  class WriteTx {
   public:
    WriteTx(Impl& impl, std::int64_t now) : impl_(impl), now_(now) {
      Step(impl.conn, impl.begin.get(), "starting a write transaction (BEGIN IMMEDIATE)").run();
      impl.floor.reset();
      impl.conn.reset_tx_lost();
      impl.commit_allowed = false;
      sqlite3_commit_hook(impl.conn.db(), &WriteTx::veto_commit, &impl.commit_allowed);
      open_ = true;
    }
    WriteTx(const WriteTx&) = delete;
    WriteTx& operator=(const WriteTx&) = delete;
    ~WriteTx() {
      rollback();
      sqlite3_commit_hook(impl_.conn.db(), nullptr, nullptr);
    }

    void commit(bool housekeeping = true) {
      if (housekeeping) impl_.maybe_purge(now_);
      impl_.commit_allowed = true;
      try {
        Step(impl_.conn, impl_.commit.get(), "committing").run();
      } catch (...) {
        impl_.commit_allowed = false;
        throw;
      }
      impl_.commit_allowed = false;
      open_ = false;
    }
    void rollback() noexcept {
      if (!open_) return;
      open_ = false;
      if (sqlite3_get_autocommit(impl_.conn.db()) != 0) return;  // SQLite already rolled back
      sqlite3_step(impl_.rollback.get());
      sqlite3_reset(impl_.rollback.get());
    }

   private:
    static int veto_commit(void* allowed) noexcept { return *static_cast<bool*>(allowed) ? 0 : 1; }

    Impl& impl_;
    std::int64_t now_;
    bool open_ = false;
  };

  void run(const StmtPtr& stmt, std::string_view what) { Step(conn, stmt.get(), what).run(); }

  // Tokens of a key strictly increase: a kept record counts up from its own token; a new record
  // starts above token_floor, which is raised to every token a deleted record held. Read once
  // per transaction (a separate SELECT is cheaper than INSERT ... RETURNING).
  std::int64_t token_floor() {
    if (!floor) {
      Step step(conn, meta_get.get(), "reading the token floor");
      step.text(1, "token_floor");
      floor = step.row() ? step.column_int64(0) : 0;
    }
    return *floor;
  }
  void raise_floor(std::int64_t token) {
    Step(conn, floor_raise.get(), "raising the token floor").i64(1, token).run();
    floor.reset();
  }

  // Takes the key if it is absent, released or expired, writing it in the given state;
  // inside an open write transaction.
  Claim claim_row(const ClaimRequest& request, std::int64_t now, bool done, bool* fresh = nullptr) {
    const CompactFingerprint fp(request.fingerprint);
    const std::int64_t state = done ? kDone : kInProgress;
    const std::int64_t expires = detail::deadline(now, done ? request.retention : request.lease);
    const std::int64_t fresh_token = token_floor() + 1;
    {
      Step step(conn, insert.get(), "recording the key");
      step.blob(1, request.key).i64(2, state).i64(3, fresh_token).i64(4, expires);
      step.fingerprint(5, fp).run();
    }
    if (sqlite3_changes(conn.db()) == 1) {  // ON CONFLICT DO NOTHING: 0 when the key exists
      ++inserted;
      if (fresh != nullptr) *fresh = true;
      return Claim{.status = ClaimStatus::acquired,
                   .token = static_cast<std::uint64_t>(fresh_token)};
    }
    std::int64_t old_state = 0, old_token = 0;
    {
      Step step(conn, select.get(), "reading the key's record");
      step.blob(1, request.key);
      if (!step.row()) {
        conn.fail(SQLITE_INTERNAL, "reading the key's record (it vanished inside a transaction)",
                  detail::Phase::operation);
      }
      old_state = step.column_int64(0);
      old_token = step.column_int64(1);
      const bool live = old_state != kReleased && step.column_int64(2) > now;
      if (live) {
        if (!fp.compatible_with(!step.column_is_null(3), step.column_int64(3))) {
          return Claim{.status = ClaimStatus::conflict};
        }
        if (old_state == kInProgress) return Claim{.status = ClaimStatus::in_progress};
        Claim claim{.status = ClaimStatus::done};
        if (!step.column_is_null(4)) claim.response = std::string(step.column_blob(4));
        return claim;
      }
    }
    const std::int64_t token = old_token + 1;
    Step step(conn, retake.get(), "taking over the key");
    step.blob(1, request.key).i64(2, state).i64(3, token).i64(4, expires);
    step.fingerprint(5, fp).run();
    return Claim{.status = ClaimStatus::acquired,
                 .token = static_cast<std::uint64_t>(token),
                 .took_over = old_state == kInProgress};
  }

  // Records the key as done for the claim's token; false when another claim owns the key.
  bool complete_row(const Completion& c, std::int64_t now);

  void store_response(std::string_view key, std::string_view response) {
    Step step(conn, set_response.get(), "storing the handler's response");
    step.blob(1, key).blob(2, response).run();
  }

  // Examines the next `limit` records in key order from where the previous step stopped
  // (wrapping at the end) and deletes the expired ones, at most max_delete: done past
  // retention, released, or in progress past the lease. Both scans run inside SQLite; only
  // the deleted rows come back. Returns how many it deleted.
  std::size_t purge_step(std::int64_t now, std::size_t limit, std::size_t max_delete = SIZE_MAX) {
    const auto as_int = [](std::size_t n) {
      return static_cast<std::int64_t>(std::min<std::size_t>(n, INT64_MAX));
    };
    std::optional<std::string> end;  // first key after the slice; none: the slice ends the table
    {
      Step step(conn, sweep_end.get(), "purging expired records");
      step.blob(1, sweep_cursor).i64(2, as_int(limit));
      if (step.row()) end = std::string(step.column_blob(0));
    }
    std::vector<std::string> expired;  // in key order
    std::int64_t max_token = 0;
    {
      Step step(conn, end ? sweep_expired_range.get() : sweep_expired_tail.get(),
                "purging expired records");
      step.blob(1, sweep_cursor).i64(2, now).i64(3, as_int(max_delete));
      if (end) step.blob(4, *end);
      while (step.row()) {
        expired.emplace_back(step.column_blob(0));
        max_token = std::max(max_token, step.column_int64(1));
      }
    }
    for (const std::string& key : expired) {
      Step(conn, erase.get(), "purging expired records").blob(1, key).run();
    }
    const std::size_t deleted = expired.size();
    if (deleted > 0) raise_floor(max_token);
    if (deleted > 0 && deleted == max_delete) {
      sweep_cursor = std::move(expired.back());  // stopped early: resume right there
    } else if (end) {
      sweep_cursor = std::move(*end);
    } else {
      sweep_cursor.clear();  // reached the end: the next step starts over
    }
    return deleted;
  }

  // Bounded work per write transaction: a slice of purge_extra + 2 * (records inserted since
  // the last step) rows. Sweeping twice as fast as records arrive, a full pass takes about
  // two thirds of the retention, so an expired record goes within that time after expiring.
  void maybe_purge(std::int64_t now) {
    constexpr std::size_t kPurgeNowAfter = 64;  // inserted records: batches purge every time
    if (options.purge_interval == 0) return;
    if (++writes % options.purge_interval != 0 && inserted < kPurgeNowAfter) return;
    purge_step(now, options.purge_extra + 2 * inserted);
    inserted = 0;
  }

  // After a failed attempt whose record was undone: the token it ran under must never be handed
  // out again. A key this attempt created has no row left: raise the floor. A key it took over
  // is back to its old expired/released row: keep it released, with the burned token.
  void burn_token(std::string_view key, std::uint64_t token, bool fresh, std::int64_t now) {
    if (fresh) {
      raise_floor(static_cast<std::int64_t>(token));
      return;
    }
    Step step(conn, abandon.get(), "releasing the failed message's record");
    step.blob(1, key).i64(2, now).i64(3, static_cast<std::int64_t>(token)).run();
  }

  // Ends the savepoint deferral however the handler leaves.
  struct SavepointScope {
    detail::SqliteConnection& conn;
    ~SavepointScope() { conn.end_deferred_savepoint(); }
  };

  // Runs the handler of an acquired claim inside a savepoint opened after the record was
  // written, so the savepoint only covers the handler's own writes (cheap when it writes
  // little), and only once the handler runs a statement (free when it writes nothing). On an
  // exception those writes are rolled back and, unless mark_done keeps the record
  // (at-most-once), the record goes too: deleted if this call created it (raising the token
  // floor, so the next attempt still gets a larger token), else left released.
  template <class Handler>
  Result run_handler(const ClaimRequest& request, const Claim& claim, bool fresh, std::int64_t now,
                     Handler&& handler, std::size_t index) {
    SavepointScope scope{conn};
    conn.defer_savepoint(savepoint.get());
    std::optional<std::string> response;
    try {
      response = handler();
    } catch (...) {
      Result failed{.outcome = Outcome::failed,
                    .error = std::current_exception(),
                    .fencing_token = claim.token};
      ensure_alive_after(failed.error, index);
      if (conn.end_deferred_savepoint()) {
        run(rollback_to_savepoint, "rolling back the failed handler's writes");
        run(release_savepoint, "closing the message's savepoint");
      }
      if (!request.mark_done) {
        if (fresh) {
          Step(conn, erase.get(), "dropping the failed message's record")
              .blob(1, request.key)
              .run();
        }
        burn_token(request.key, claim.token, fresh, now);
      }
      return failed;
    }
    ensure_open(index);
    if (conn.end_deferred_savepoint()) run(release_savepoint, "closing the message's savepoint");
    if (response) store_response(request.key, *response);
    return Result{.outcome = Outcome::processed,
                  .response = std::move(response),
                  .fencing_token = claim.token};
  }

  // A handler may not end the transaction it was given; if it did (or SQLite rolled it back
  // after an error), the record and its writes are no longer atomic.
  static constexpr std::size_t kNoIndex = SIZE_MAX;
  static std::string who(std::size_t index) {
    return index == kNoIndex ? std::string("the handler")
                             : "the handler of message " + std::to_string(index);
  }

  void ensure_open(std::size_t index) const {
    if (sqlite3_get_autocommit(conn.db()) == 0) return;
    if (conn.tx_lost()) {
      throw SqliteUnavailable("sqlite store '" + conn.path() +
                                  "': SQLite rolled back the "
                                  "transaction during " +
                                  who(index) +
                                  " (after an error such as SQLITE_FULL, SQLITE_IOERR, "
                                  "SQLITE_NOMEM or SQLITE_INTERRUPT, which the handler caught); "
                                  "nothing of it was recorded as done: do not ack, retry later",
                              SQLITE_ABORT, SQLITE_ABORT);
    }
    throw ConfigError("sqlite store '" + conn.path() + "': the transaction was ended during " +
                      who(index) +
                      " (COMMIT, ROLLBACK or RELEASE through native_handle(), or SQLite rolled "
                      "it back after an error the handler caught); nothing was recorded as "
                      "done: do not ack; use SAVEPOINTs of your own inside handlers, and let "
                      "SQLite's errors propagate");
  }

  // After a handler exception: an I/O error, SQLITE_FULL and the like make SQLite roll back
  // the whole transaction, taking the earlier messages of a batch (or a mark_done record) with
  // it. Then nothing may be acked.
  void ensure_alive_after(const std::exception_ptr& error, std::size_t index) const {
    if (sqlite3_get_autocommit(conn.db()) == 0) return;
    throw SqliteUnavailable("sqlite store '" + conn.path() + "': " + who(index) + " failed (" +
                                describe(error) +
                                ") and SQLite rolled back the whole transaction; nothing of it "
                                "was recorded as done: do not ack, retry later",
                            SQLITE_ABORT, SQLITE_ABORT);
  }

  SqliteStoreOptions options;
  const Clock* clock;
  detail::SqliteConnection conn;
  std::mutex mutex;
  std::atomic<std::thread::id> owner{};

  StmtPtr begin, commit, rollback, savepoint, release_savepoint, rollback_to_savepoint;
  StmtPtr meta_get, floor_raise, insert, select, retake, set_response, complete, complete_absent,
      release;
  StmtPtr forget, sweep_end, sweep_expired_range, sweep_expired_tail, erase, abandon;
  StmtPtr offset_get, offsets_all, count, file_bytes;

  std::size_t writes = 0;             // write transactions, for purge_interval
  std::size_t inserted = 0;           // records inserted since the last purge step
  std::optional<std::int64_t> floor;  // token_floor, cached for the open transaction
  bool commit_allowed = false;        // the commit hook lets only WriteTx::commit through
  std::string sweep_cursor;           // where the purge sweep goes on (key >=); empty: start
};

// Serializes the threads of this process on the one connection, and refuses re-entry from a
// handler running inside the store's transaction (that would deadlock).
class SqliteStore::Lock {
 public:
  explicit Lock(Impl& impl) : impl_(impl) {
    if (impl.owner.load(std::memory_order_relaxed) == std::this_thread::get_id()) {
      throw ConfigError("sqlite store '" + impl.conn.path() +
                        "': called again from inside its own transaction (a transactional "
                        "handler or transaction() work used the store): use the SqliteTx you "
                        "were given");
    }
    impl.mutex.lock();
    impl.owner.store(std::this_thread::get_id(), std::memory_order_relaxed);
  }
  Lock(const Lock&) = delete;
  Lock& operator=(const Lock&) = delete;
  ~Lock() {
    impl_.owner.store(std::thread::id{}, std::memory_order_relaxed);
    impl_.mutex.unlock();
  }

 private:
  Impl& impl_;
};

namespace {
SqliteStoreOptions checked(const std::string& path, const SqliteStoreOptions& options) {
  if (path.empty()) {
    throw ConfigError(
        "sqlite store: the path is empty: give the database file's path (\":memory:\" for a "
        "private in-memory database)");
  }
  if (options.busy_timeout.count() < 0) {
    throw ConfigError("sqlite store '" + path + "': busy_timeout is " +
                      std::to_string(options.busy_timeout.count()) +
                      " ms; use 0 (fail at once) or a positive wait");
  }
  return options;
}
}  // namespace

SqliteStore::SqliteStore(std::string path, SqliteStoreOptions options)
    : impl_(std::make_unique<Impl>(path, checked(path, options))) {}

SqliteStore::~SqliteStore() = default;

const std::string& SqliteStore::path() const noexcept {
  return impl_->conn.path();
}

Claim SqliteStore::do_claim(const ClaimRequest& request) {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  Claim claim = impl_->claim_row(request, now, request.mark_done);
  tx.commit();
  return claim;
}

std::vector<Claim> SqliteStore::do_claim_batch(std::span<const ClaimRequest> requests) {
  std::vector<Claim> claims;
  claims.reserve(requests.size());
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  for (const ClaimRequest& request : requests) {
    claims.push_back(impl_->claim_row(request, now, request.mark_done));
  }
  tx.commit();
  return claims;
}

namespace {
bool complete_stmt(detail::SqliteConnection& conn, sqlite3_stmt* stmt, const Completion& c,
                   std::int64_t now) {
  Step step(conn, stmt, "recording the key as done");
  step.blob(1, c.key).i64(2, static_cast<std::int64_t>(c.token));
  step.i64(3, detail::deadline(now, c.retention));
  if (c.response) {
    step.blob(4, *c.response);
  } else {
    step.null(4);
  }
  step.run();
  return sqlite3_changes(conn.db()) == 1;
}
}  // namespace

bool SqliteStore::Impl::complete_row(const Completion& c, std::int64_t now) {
  if (complete_stmt(conn, complete.get(), c, now)) return true;
  if (!complete_stmt(conn, complete_absent.get(), c, now)) return false;
  ++inserted;
  return true;
}

bool SqliteStore::do_complete(const Completion& completion) {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  const bool done = impl_->complete_row(completion, now);
  tx.commit();
  return done;
}

std::vector<bool> SqliteStore::do_complete_batch(std::span<const Completion> completions) {
  std::vector<bool> done;
  done.reserve(completions.size());
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  for (const Completion& completion : completions) {
    done.push_back(impl_->complete_row(completion, now));
  }
  tx.commit();
  return done;
}

bool SqliteStore::do_release(std::string_view key, std::uint64_t token) {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  {
    Step step(impl_->conn, impl_->release.get(), "releasing the claim");
    step.blob(1, key).i64(2, static_cast<std::int64_t>(token)).i64(3, now).run();
  }
  const bool released = sqlite3_changes(impl_->conn.db()) == 1;
  tx.commit();
  return released;
}

bool SqliteStore::do_forget(std::string_view key) {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  std::optional<std::int64_t> token;
  {
    Step step(impl_->conn, impl_->forget.get(), "forgetting the key");
    step.blob(1, key);
    if (step.row()) token = step.column_int64(0);
    step.run();
  }
  if (token) impl_->raise_floor(*token);
  tx.commit();
  return token.has_value();
}

Result SqliteStore::consume_in_transaction(
    const ClaimRequest& request,
    detail::FunctionRef<std::optional<std::string>(SqliteTx&)> handler) {
  validate_key(request.key, request.max_key_bytes);
  Lock lock(*impl_);
  Impl& m = *impl_;
  const std::int64_t now = m.clock->now_ms();
  Impl::WriteTx tx(m, now);
  SqliteTx user(m.conn);
  // The record is written done before the handler runs, so both commit together.
  bool fresh = false;
  Claim claim = m.claim_row(request, now, /*done=*/true, &fresh);
  if (std::optional<Result> early = detail::settled(claim)) return std::move(*early);
  Result result = m.run_handler(
      request, claim, fresh, now, [&] { return handler(user); }, Impl::kNoIndex);
  tx.commit();
  return result;
}

std::vector<Result> SqliteStore::consume_batch_in_transaction(
    std::span<const ClaimRequest> requests,
    detail::FunctionRef<std::optional<std::string>(std::size_t, SqliteTx&)> handler,
    std::span<const PartitionOffset> offsets, bool* offsets_saved) {
  if (offsets_saved != nullptr) *offsets_saved = false;
  validate_keys(requests);
  std::vector<Result> results(requests.size());
  Lock lock(*impl_);
  Impl& m = *impl_;
  const std::int64_t now = m.clock->now_ms();
  Impl::WriteTx tx(m, now);
  SqliteTx user(m.conn);
  for (std::size_t i = 0; i < requests.size(); ++i) {
    bool fresh = false;
    Claim claim = m.claim_row(requests[i], now, /*done=*/true, &fresh);
    if (std::optional<Result> early = detail::settled(claim)) {
      results[i] = std::move(*early);
      continue;
    }
    results[i] = m.run_handler(
        requests[i], claim, fresh, now, [&] { return handler(i, user); }, i);
  }
  // The offsets cover the whole batch: moving them past a message that was not acked (failed,
  // in_progress, conflict) would lose it after a restart. Then they stay where they were, and
  // a consumer resuming from them replays the batch (its processed messages as duplicates).
  const bool save = std::all_of(results.begin(), results.end(),
                                [](const Result& r) { return should_ack(r.outcome); });
  if (save) {
    for (const PartitionOffset& offset : offsets) {
      user.save_offset(offset.topic, offset.partition, offset.next_offset);
    }
  }
  tx.commit();
  if (offsets_saved != nullptr) *offsets_saved = save;
  return results;
}

void SqliteStore::transaction(detail::FunctionRef<void(SqliteTx&)> work) {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  SqliteTx user(impl_->conn);
  work(user);
  if (sqlite3_get_autocommit(impl_->conn.db()) != 0 && impl_->conn.tx_lost()) {
    throw SqliteUnavailable("sqlite store '" + impl_->conn.path() +
                                "': SQLite rolled back the transaction during transaction() "
                                "work (after an error such as SQLITE_FULL, SQLITE_IOERR, "
                                "SQLITE_NOMEM or SQLITE_INTERRUPT, which the work caught); "
                                "none of it was committed",
                            SQLITE_ABORT, SQLITE_ABORT);
  }
  if (sqlite3_get_autocommit(impl_->conn.db()) != 0) {
    throw ConfigError("sqlite store '" + impl_->conn.path() +
                      "': transaction() work ended the transaction itself (COMMIT or ROLLBACK "
                      "through native_handle()?); use SAVEPOINTs of your own instead");
  }
  tx.commit();
}

std::optional<std::int64_t> SqliteStore::committed_offset(std::string_view topic,
                                                          std::int32_t partition) {
  Lock lock(*impl_);
  Step step(impl_->conn, impl_->offset_get.get(), "reading a committed offset");
  step.text(1, topic).i64(2, partition);
  if (!step.row()) return std::nullopt;
  return step.column_int64(0);
}

std::vector<PartitionOffset> SqliteStore::committed_offsets() {
  Lock lock(*impl_);
  std::vector<PartitionOffset> offsets;
  Step step(impl_->conn, impl_->offsets_all.get(), "reading the committed offsets");
  while (step.row()) {
    offsets.push_back(PartitionOffset{
        .topic = std::string(step.column_blob(0)),
        .partition = static_cast<std::int32_t>(step.column_int64(1)),
        .next_offset = step.column_int64(2),
    });
  }
  return offsets;
}

void SqliteStore::save_offsets(std::span<const PartitionOffset> offsets) {
  Lock lock(*impl_);
  Impl::WriteTx tx(*impl_, impl_->clock->now_ms());
  SqliteTx user(impl_->conn);
  for (const PartitionOffset& offset : offsets) {
    user.save_offset(offset.topic, offset.partition, offset.next_offset);
  }
  tx.commit();
}

std::optional<RecordInfo> SqliteStore::do_inspect(std::string_view key) {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Step step(impl_->conn, impl_->select.get(), "reading the key's record");
  step.blob(1, key);
  if (!step.row()) return std::nullopt;
  RecordInfo info;
  const std::int64_t state = step.column_int64(0);
  info.state = state == kInProgress ? RecordInfo::State::in_progress
               : state == kDone     ? RecordInfo::State::done
                                    : RecordInfo::State::released;
  info.token = static_cast<std::uint64_t>(step.column_int64(1));
  info.expires_in_ms = step.column_int64(2) - now;
  if (!step.column_is_null(4)) info.response = std::string(step.column_blob(4));
  return info;
}

StoreStats SqliteStore::do_stats_summary() {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  StoreStats stats;
  {
    Step step(impl_->conn, impl_->count.get(), "counting records");
    step.i64(1, now);
    if (step.row()) {
      stats.records = static_cast<std::uint64_t>(step.column_int64(0));
      stats.in_progress = static_cast<std::uint64_t>(step.column_int64(1));
      stats.done = static_cast<std::uint64_t>(step.column_int64(2));
    }
  }
  Step size(impl_->conn, impl_->file_bytes.get(), "reading the database size");
  if (size.row()) stats.bytes = static_cast<std::uint64_t>(size.column_int64(0));
  return stats;
}

std::size_t SqliteStore::purge_expired(std::size_t max_records) {
  // One pass over the whole table, 1000 records per transaction so each write lock is short.
  constexpr std::size_t kChunk = 1000;
  std::size_t total = 0;
  bool first = true;
  while (total < max_records) {
    Lock lock(*impl_);
    if (first) impl_->sweep_cursor.clear();
    first = false;
    const std::int64_t now = impl_->clock->now_ms();
    Impl::WriteTx tx(*impl_, now);
    total += impl_->purge_step(now, kChunk, max_records - total);
    tx.commit(/*housekeeping=*/false);
    if (impl_->sweep_cursor.empty()) break;  // reached the end of the table
  }
  return total;
}

}  // namespace idem
