// SqliteStore: opening the store and the DedupStore operations (claim, complete, release, ...).

#include <sqlite3.h>

#include <optional>
#include <string>
#include <vector>

#include "store_impl.hpp"

namespace idem {

using detail::Step;
using detail::sqlite::kDone;
using detail::sqlite::kInProgress;

SqliteStore::Impl::Impl(std::string path, const SqliteOptions& opts)
    : options(opts),
      clock(opts.clock != nullptr ? opts.clock : &system_clock()),
      conn(std::move(path), opts.busy_timeout, opts.read_only) {
  // A private in-memory database has no file to share: it keeps its own journal mode. A
  // read-only store reads the file in the mode its writers chose.
  if (!conn.in_memory() && !opts.read_only) {
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
  }
  conn.exec_script(opts.synchronous == SqliteSync::full ? "PRAGMA synchronous=FULL"
                                                        : "PRAGMA synchronous=NORMAL",
                   "setting PRAGMA synchronous", detail::Phase::open);
  detail::sqlite::open_schema(conn, opts.read_only);

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
  forget =
      conn.prepare_internal("DELETE FROM idem_keys WHERE key = ?1 AND state <> 2 RETURNING token");
  // One pass over a slice in key order; expiry is judged in C++ so each row is visited once
  // (a second statement to find the slice's end doubled the sweep's cost).
  sweep = conn.prepare_internal(
      "SELECT key, state, expires_at, token FROM idem_keys WHERE key >= ?1 ORDER BY key "
      "LIMIT ?2");
  erase = conn.prepare_internal("DELETE FROM idem_keys WHERE key = ?1");
  abandon = conn.prepare_internal(
      "UPDATE idem_keys SET state = 2, token = ?3, expires_at = ?2, response = NULL "
      "WHERE key = ?1");
  count = conn.prepare_internal(
      "SELECT count(*), coalesce(sum(state = 0 AND expires_at > ?1), 0), "
      "coalesce(sum(state = 1 AND expires_at > ?1), 0) FROM idem_keys");
  file_bytes = conn.prepare_internal(
      "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()");
  offset_get = conn.prepare_internal(detail::sqlite::kOffsetSql);
  offsets_all = conn.prepare_internal(
      "SELECT topic, partition_id, next_offset FROM idem_offsets ORDER BY topic, partition_id");
}

namespace {
SqliteOptions checked(const std::string& path, const SqliteOptions& options) {
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

SqliteStore::SqliteStore(std::string path, SqliteOptions options)
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

StoreStats SqliteStore::do_stats() {
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

}  // namespace idem
