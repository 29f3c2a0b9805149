#include "idem/outbox/sqlite_outbox.hpp"

#include <sqlite3.h>

#include <chrono>
#include <memory>
#include <utility>

#include "idem/error.hpp"
#include "idem/stores/sqlite_store.hpp"

namespace idem {

namespace {

std::int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct DbClose {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
struct StmtFinalize {
  void operator()(sqlite3_stmt* s) const noexcept { sqlite3_finalize(s); }
};
using Db = std::unique_ptr<sqlite3, DbClose>;
using Stmt = std::unique_ptr<sqlite3_stmt, StmtFinalize>;

std::string quoted(const std::string& name) {
  return "\"" + name + "\"";
}

[[noreturn]] void unavailable(sqlite3* db, const std::string& what) {
  const int code = db != nullptr ? sqlite3_errcode(db) : SQLITE_CANTOPEN;
  const int ext = db != nullptr ? sqlite3_extended_errcode(db) : SQLITE_CANTOPEN;
  throw SqliteUnavailable("SQLite outbox: " + what + ": " +
                              (db != nullptr ? sqlite3_errmsg(db) : "cannot open") +
                              " (check the file, its permissions and the disk)",
                          code, ext);
}

Stmt prepare(sqlite3* db, const std::string& sql) {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v3(db, sql.c_str(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT,
                         &s, nullptr) != SQLITE_OK) {
    unavailable(db, "preparing \"" + sql + "\"");
  }
  return Stmt(s);
}

void exec(sqlite3* db, const std::string& sql) {
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK) {
    unavailable(db, "running \"" + sql + "\"");
  }
}

Db open(const std::string& path, std::chrono::milliseconds busy_timeout) {
  sqlite3* raw = nullptr;
  const int rc =
      sqlite3_open_v2(path.c_str(), &raw,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  Db db(raw);
  if (rc != SQLITE_OK) unavailable(db.get(), "opening \"" + path + "\"");
  sqlite3_busy_timeout(db.get(), static_cast<int>(busy_timeout.count()));
  exec(db.get(), "PRAGMA journal_mode=WAL");
  return db;
}

void validate(const SqliteOutboxOptions& options) {
  detail::validate_outbox_identifier("SqliteOutboxOptions::table", options.table);
  if (options.busy_timeout.count() < 0) {
    throw ConfigError("SqliteOutboxOptions::busy_timeout must not be negative");
  }
}

void create_tables(sqlite3* db, const std::string& table) {
  const std::string t = quoted(table);
  exec(db, "BEGIN IMMEDIATE");
  try {
    exec(db, "CREATE TABLE IF NOT EXISTS " + t +
                 "(seq INTEGER PRIMARY KEY, inner_id TEXT NOT NULL, destination TEXT NOT NULL, "
                 "routing_key TEXT NOT NULL, msg_key BLOB NOT NULL, payload BLOB NOT NULL, "
                 "headers BLOB NOT NULL, created_ms INTEGER NOT NULL, sent_ms INTEGER)");
    exec(db, "CREATE INDEX IF NOT EXISTS " + quoted(table + "_pending") + " ON " + t +
                 "(seq) WHERE sent_ms IS NULL");
    exec(db, "CREATE TABLE IF NOT EXISTS " + quoted(table + "_lease") +
                 "(id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, "
                 "expires_ms INTEGER NOT NULL)");
    exec(db, "COMMIT");
  } catch (...) {
    sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

std::string_view column_bytes(sqlite3_stmt* s, int i) {
  const void* p = sqlite3_column_blob(s, i);
  const int n = sqlite3_column_bytes(s, i);
  return p == nullptr ? std::string_view{}
                      : std::string_view(static_cast<const char*>(p), static_cast<std::size_t>(n));
}

}  // namespace

// --- Writer -------------------------------------------------------------------------------

SqliteOutbox::SqliteOutbox(const std::string& path, SqliteOutboxOptions options)
    : options_(std::move(options)) {
  validate(options_);
  Db db = open(path, options_.busy_timeout);
  create_tables(db.get(), options_.table);
  insert_sql_ = "INSERT INTO " + quoted(options_.table) +
                "(inner_id, destination, routing_key, msg_key, payload, headers, created_ms) "
                "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)";
}

InnerMsgId SqliteOutbox::add(SqliteTx& tx, const OutboxMessage& message) {
  detail::validate_outbox_message(message);
  const InnerMsgId id = ids_.next();
  char text[36];
  id.write_to(text);
  tx.exec(insert_sql_, std::string_view(text, sizeof text), message.destination,
          message.routing_key, SqliteBlob{message.key}, SqliteBlob{message.payload},
          SqliteBlob{detail::encode_outbox_headers(message.headers)}, wall_ms());
  return id;
}

InnerMsgId SqliteOutbox::add(sqlite3* db, const OutboxMessage& message) {
  if (db == nullptr) throw ConfigError("SqliteOutbox::add: the connection is null");
  if (sqlite3_get_autocommit(db) != 0) {
    throw ConfigError(
        "SqliteOutbox::add: no transaction is open on this connection; BEGIN one, write the "
        "business rows and the outbox message, then COMMIT (else the message is not tied to "
        "them)");
  }
  detail::validate_outbox_message(message);
  const InnerMsgId id = ids_.next();
  char text[36];
  id.write_to(text);
  const std::string headers = detail::encode_outbox_headers(message.headers);
  sqlite3_stmt* raw = nullptr;
  if (sqlite3_prepare_v2(db, insert_sql_.c_str(), static_cast<int>(insert_sql_.size()), &raw,
                         nullptr) != SQLITE_OK) {
    throw SqliteError(std::string("SqliteOutbox::add: ") + sqlite3_errmsg(db), sqlite3_errcode(db),
                      sqlite3_extended_errcode(db));
  }
  Stmt s(raw);
  sqlite3_bind_text(raw, 1, text, sizeof text, SQLITE_STATIC);
  sqlite3_bind_text(raw, 2, message.destination.data(),
                    static_cast<int>(message.destination.size()), SQLITE_STATIC);
  sqlite3_bind_text(raw, 3, message.routing_key.data(),
                    static_cast<int>(message.routing_key.size()), SQLITE_STATIC);
  sqlite3_bind_blob(raw, 4, message.key.data(), static_cast<int>(message.key.size()),
                    SQLITE_STATIC);
  sqlite3_bind_blob(raw, 5, message.payload.data(), static_cast<int>(message.payload.size()),
                    SQLITE_STATIC);
  sqlite3_bind_blob(raw, 6, headers.data(), static_cast<int>(headers.size()), SQLITE_STATIC);
  sqlite3_bind_int64(raw, 7, wall_ms());
  if (sqlite3_step(raw) != SQLITE_DONE) {
    throw SqliteError(std::string("SqliteOutbox::add: ") + sqlite3_errmsg(db), sqlite3_errcode(db),
                      sqlite3_extended_errcode(db));
  }
  return id;
}

// --- Relay side ---------------------------------------------------------------------------

struct SqliteOutboxSource::Impl {
  Db db;
  Stmt lease, release, fetch, mark, purge, backlog, begin, commit, rollback;
};

SqliteOutboxSource::SqliteOutboxSource(const std::string& path, SqliteOutboxOptions options)
    : impl_(std::make_unique<Impl>()) {
  validate(options);
  impl_->db = open(path, options.busy_timeout);
  sqlite3* db = impl_->db.get();
  // A mark lost to a power cut only publishes the row again (same inner id).
  exec(db, "PRAGMA synchronous=NORMAL");
  create_tables(db, options.table);
  const std::string t = quoted(options.table);
  const std::string lease = quoted(options.table + "_lease");
  impl_->lease = prepare(db, "INSERT INTO " + lease +
                                 "(id, holder, expires_ms) VALUES(1, ?1, ?2) ON CONFLICT(id) DO "
                                 "UPDATE SET holder = excluded.holder, expires_ms = "
                                 "excluded.expires_ms WHERE holder = excluded.holder OR "
                                 "expires_ms < ?3");
  impl_->release = prepare(db, "DELETE FROM " + lease + " WHERE holder = ?1");
  impl_->fetch = prepare(db,
                         "SELECT seq, inner_id, destination, routing_key, msg_key, payload, "
                         "headers, created_ms FROM " +
                             t + " WHERE sent_ms IS NULL ORDER BY seq LIMIT ?1");
  impl_->mark = prepare(db, "UPDATE " + t + " SET sent_ms = ?1 WHERE seq = ?2");
  impl_->purge = prepare(db, "DELETE FROM " + t + " WHERE seq IN (SELECT seq FROM " + t +
                                 " WHERE sent_ms IS NOT NULL AND sent_ms <= ?1 ORDER BY seq "
                                 "LIMIT ?2)");
  impl_->backlog =
      prepare(db, "SELECT count(*), min(created_ms) FROM " + t + " WHERE sent_ms IS NULL");
  impl_->begin = prepare(db, "BEGIN IMMEDIATE");
  impl_->commit = prepare(db, "COMMIT");
  impl_->rollback = prepare(db, "ROLLBACK");
}

SqliteOutboxSource::~SqliteOutboxSource() = default;

sqlite3* SqliteOutboxSource::native_handle() const noexcept {
  return impl_->db.get();
}

namespace {
// Steps a statement that returns no rows and resets it.
void run(sqlite3* db, sqlite3_stmt* s, const char* what) {
  const int rc = sqlite3_step(s);
  sqlite3_reset(s);
  if (rc != SQLITE_DONE) unavailable(db, what);
}
}  // namespace

bool SqliteOutboxSource::acquire_lease(std::string_view holder, std::chrono::milliseconds lease) {
  sqlite3* db = impl_->db.get();
  sqlite3_stmt* s = impl_->lease.get();
  const std::int64_t now = wall_ms();
  sqlite3_bind_text(s, 1, holder.data(), static_cast<int>(holder.size()), SQLITE_TRANSIENT);
  sqlite3_bind_int64(s, 2, now + lease.count());
  sqlite3_bind_int64(s, 3, now);
  run(db, s, "taking the relay lease");
  return sqlite3_changes(db) == 1;
}

void SqliteOutboxSource::release_lease(std::string_view holder) noexcept {
  sqlite3_stmt* s = impl_->release.get();
  sqlite3_bind_text(s, 1, holder.data(), static_cast<int>(holder.size()), SQLITE_TRANSIENT);
  sqlite3_step(s);
  sqlite3_reset(s);
}

std::vector<OutboxRow> SqliteOutboxSource::fetch_pending(std::size_t limit) {
  sqlite3* db = impl_->db.get();
  sqlite3_stmt* s = impl_->fetch.get();
  sqlite3_bind_int64(s, 1, static_cast<std::int64_t>(limit));
  std::vector<OutboxRow> rows;
  rows.reserve(limit);
  int rc = SQLITE_ROW;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    OutboxRow row;
    row.seq = sqlite3_column_int64(s, 0);
    const auto id = InnerMsgId::parse(column_bytes(s, 1));
    if (!id) {
      sqlite3_reset(s);
      throw Error("SQLite outbox: row " + std::to_string(row.seq) +
                  " has no valid inner id; rows must be written by SqliteOutbox::add");
    }
    row.inner_id = *id;
    row.message.destination = column_bytes(s, 2);
    row.message.routing_key = column_bytes(s, 3);
    row.message.key = column_bytes(s, 4);
    row.message.payload = column_bytes(s, 5);
    row.message.headers = detail::decode_outbox_headers(column_bytes(s, 6));
    row.created_ms = sqlite3_column_int64(s, 7);
    rows.push_back(std::move(row));
  }
  sqlite3_reset(s);
  if (rc != SQLITE_DONE) unavailable(db, "reading pending rows");
  return rows;
}

void SqliteOutboxSource::mark_sent(std::span<const std::int64_t> seqs) {
  sqlite3* db = impl_->db.get();
  run(db, impl_->begin.get(), "starting the mark transaction");
  try {
    sqlite3_stmt* s = impl_->mark.get();
    const std::int64_t now = wall_ms();
    for (std::int64_t seq : seqs) {
      sqlite3_bind_int64(s, 1, now);
      sqlite3_bind_int64(s, 2, seq);
      run(db, s, "marking rows sent");
    }
    run(db, impl_->commit.get(), "committing the marks");
  } catch (...) {
    sqlite3_step(impl_->rollback.get());
    sqlite3_reset(impl_->rollback.get());
    throw;
  }
}

std::size_t SqliteOutboxSource::purge_sent(std::chrono::milliseconds retention, std::size_t limit) {
  sqlite3* db = impl_->db.get();
  sqlite3_stmt* s = impl_->purge.get();
  sqlite3_bind_int64(s, 1, wall_ms() - retention.count());
  sqlite3_bind_int64(s, 2, static_cast<std::int64_t>(limit));
  run(db, s, "purging sent rows");
  return static_cast<std::size_t>(sqlite3_changes(db));
}

OutboxSource::Backlog SqliteOutboxSource::backlog() {
  sqlite3* db = impl_->db.get();
  sqlite3_stmt* s = impl_->backlog.get();
  Backlog b;
  if (sqlite3_step(s) != SQLITE_ROW) {
    sqlite3_reset(s);
    unavailable(db, "counting pending rows");
  }
  b.pending = static_cast<std::uint64_t>(sqlite3_column_int64(s, 0));
  if (sqlite3_column_type(s, 1) != SQLITE_NULL) b.oldest_ms = sqlite3_column_int64(s, 1);
  sqlite3_reset(s);
  return b;
}

}  // namespace idem
