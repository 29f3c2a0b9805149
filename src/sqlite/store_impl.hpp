#pragma once
// SqliteStore's state and the row operations its DedupStore, inbox and purge parts share.

#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "connection.hpp"
#include "idem/clock.hpp"
#include "idem/stores/sqlite_store.hpp"
#include "schema.hpp"

namespace idem {
namespace detail::sqlite {

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

inline Step& fingerprint(Step& step, int index, const CompactFingerprint& fp) {
  return fp.present ? step.i64(index, fp.value) : step.null(index);
}

}  // namespace detail::sqlite

struct SqliteStore::Impl {
  using Step = detail::Step;
  using StmtPtr = detail::StmtPtr;

  Impl(std::string path, const SqliteOptions& opts);

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
    const detail::sqlite::CompactFingerprint fp(request.fingerprint);
    const std::int64_t state = done ? detail::sqlite::kDone : detail::sqlite::kInProgress;
    const std::int64_t expires = detail::deadline(now, done ? request.retention : request.lease);
    const std::int64_t fresh_token = token_floor() + 1;
    {
      Step step(conn, insert.get(), "recording the key");
      step.blob(1, request.key).i64(2, state).i64(3, fresh_token).i64(4, expires);
      detail::sqlite::fingerprint(step, 5, fp).run();
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
      const bool live = old_state != detail::sqlite::kReleased && step.column_int64(2) > now;
      if (live) {
        if (!fp.compatible_with(!step.column_is_null(3), step.column_int64(3))) {
          return Claim{.status = ClaimStatus::conflict};
        }
        if (old_state == detail::sqlite::kInProgress)
          return Claim{.status = ClaimStatus::in_progress};
        Claim claim{.status = ClaimStatus::done};
        if (!step.column_is_null(4)) claim.response = std::string(step.column_blob(4));
        return claim;
      }
    }
    // Above the floor too: a late completion may have recorded an old token after a purge
    // raised the floor past it, and tokens handed out since must never come back.
    const std::int64_t token = std::max(old_token, token_floor()) + 1;
    Step step(conn, retake.get(), "taking over the key");
    step.blob(1, request.key).i64(2, state).i64(3, token).i64(4, expires);
    detail::sqlite::fingerprint(step, 5, fp).run();
    return Claim{.status = ClaimStatus::acquired,
                 .token = static_cast<std::uint64_t>(token),
                 .took_over = old_state == detail::sqlite::kInProgress};
  }

  // Records the key as done for the claim's token; false when another claim owns the key.
  bool complete_row(const Completion& c, std::int64_t now);

  void store_response(std::string_view key, std::string_view response) {
    Step step(conn, set_response.get(), "storing the handler's response");
    step.blob(1, key).blob(2, response).run();
  }

  // Examines the next `limit` records in key order from where the previous step stopped
  // (wrapping at the end) and deletes the expired ones, at most max_delete. Returns how many.
  std::size_t purge_step(std::int64_t now, std::size_t limit, std::size_t max_delete = SIZE_MAX);
  // Bounded purge work riding on a write transaction (see SqliteOptions::purge_interval).
  void maybe_purge(std::int64_t now);

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

  SqliteOptions options;
  const Clock* clock;
  detail::SqliteConnection conn;
  std::mutex mutex;
  std::atomic<std::thread::id> owner{};

  StmtPtr begin, commit, rollback, savepoint, release_savepoint, rollback_to_savepoint;
  StmtPtr meta_get, floor_raise, insert, select, retake, set_response, complete, complete_absent,
      release;
  StmtPtr forget, sweep, erase, abandon;
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

}  // namespace idem
