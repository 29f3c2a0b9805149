// SqliteStore's transactional inbox: the InboxTransaction hooks the core's inbox drives, and
// transaction() for work of the user's own.

#include <sqlite3.h>

#include <string>
#include <vector>

#include "store_impl.hpp"

namespace idem {

// One BEGIN IMMEDIATE transaction, holding the store's lock from begin to commit or rollback.
class SqliteStore::Inbox final : public InboxTransaction {
 public:
  explicit Inbox(Impl& impl)
      : lock_(impl), m_(impl), now_(impl.clock->now_ms()), tx_(impl, now_), user_(impl.conn) {}
  ~Inbox() override {
    m_.conn.guard_user_statements(false);
    m_.conn.end_deferred_savepoint();
  }

  SqliteTx& user() noexcept { return user_; }

  Claim claim(const ClaimRequest& request, bool& fresh) override {
    return m_.claim_row(request, now_, /*done=*/true, &fresh);
  }
  void begin_message() override {
    m_.conn.defer_savepoint(m_.savepoint.get());
    m_.conn.guard_user_statements(true);
  }
  void release_message() override {
    if (m_.conn.end_deferred_savepoint()) {
      m_.run(m_.release_savepoint, "closing the message's savepoint");
    }
  }
  void rollback_message() override {
    if (m_.conn.end_deferred_savepoint()) {
      m_.run(m_.rollback_to_savepoint, "rolling back the failed handler's writes");
      m_.run(m_.release_savepoint, "closing the message's savepoint");
    }
  }
  void undo_claim(const ClaimRequest& request, std::uint64_t token, bool fresh) override {
    if (fresh) {
      Impl::Step(m_.conn, m_.erase.get(), "dropping the failed message's record")
          .blob(1, request.key)
          .run();
    }
    m_.burn_token(request.key, token, fresh, now_);
  }
  void store_response(std::string_view key, std::string_view response) override {
    m_.store_response(key, response);
  }
  void save_offsets(std::span<const PartitionOffset> offsets) override {
    for (const PartitionOffset& offset : offsets) {
      user_.save_offset(offset.topic, offset.partition, offset.next_offset);
    }
  }
  void commit() override { tx_.commit(); }

  // A handler may not end the transaction it was given; if SQLite rolled it back after an
  // error the handler caught, the record and its writes are no longer atomic either.
  void check_open(std::string_view who) override {
    m_.conn.guard_user_statements(false);
    if (m_.conn.refused_transaction_control()) {
      throw ConfigError("sqlite store '" + m_.conn.path() + "': " + std::string(who) +
                        " tried to begin, commit or roll back the store's transaction (SQLite "
                        "answered SQLITE_AUTH); nothing was recorded as done: idem commits the "
                        "handler's writes with the dedup record; use SAVEPOINTs of your own "
                        "to undo part of the work, or throw to undo all of it");
    }
    if (sqlite3_get_autocommit(m_.conn.db()) == 0) return;
    if (m_.conn.tx_lost()) {
      throw SqliteUnavailable("sqlite store '" + m_.conn.path() +
                                  "': SQLite rolled back the transaction during " +
                                  std::string(who) +
                                  " (after an error such as SQLITE_FULL, SQLITE_IOERR, "
                                  "SQLITE_NOMEM or SQLITE_INTERRUPT, which the handler caught); "
                                  "nothing of it was recorded as done: do not ack, retry later",
                              SQLITE_ABORT, SQLITE_ABORT);
    }
    throw ConfigError("sqlite store '" + m_.conn.path() + "': the transaction was ended during " +
                      std::string(who) +
                      " (through native_handle()); nothing was recorded as done: do not ack; "
                      "use SAVEPOINTs of your own inside handlers, and let SQLite's errors "
                      "propagate");
  }
  // An I/O error, SQLITE_FULL and the like make SQLite roll back the whole transaction, taking
  // the earlier messages of a batch (or a mark_done record) with it. Then nothing may be acked.
  void check_alive_after_failure(std::string_view who, std::string_view error) override {
    m_.conn.guard_user_statements(false);
    if (sqlite3_get_autocommit(m_.conn.db()) == 0) return;
    throw SqliteUnavailable("sqlite store '" + m_.conn.path() + "': " + std::string(who) +
                                " failed (" + std::string(error) +
                                ") and SQLite rolled back the whole transaction; nothing of it "
                                "was recorded as done: do not ack, retry later",
                            SQLITE_ABORT, SQLITE_ABORT);
  }

 private:
  Lock lock_;
  Impl& m_;
  std::int64_t now_;
  Impl::WriteTx tx_;
  SqliteTx user_;
};

std::unique_ptr<InboxTransaction> SqliteStore::begin_inbox(InboxMode /*mode*/) {
  return std::make_unique<Inbox>(*impl_);
}

SqliteTx& SqliteStore::tx_of(InboxTransaction& transaction) {
  return static_cast<Inbox&>(transaction).user();
}

std::vector<PartitionOffset> SqliteStore::do_committed_offsets() {
  Lock lock(*impl_);
  std::vector<PartitionOffset> offsets;
  detail::Step step(impl_->conn, impl_->offsets_all.get(), "reading the committed offsets");
  while (step.row()) {
    offsets.push_back(PartitionOffset{
        .topic = std::string(step.column_blob(0)),
        .partition = static_cast<std::int32_t>(step.column_int64(1)),
        .next_offset = step.column_int64(2),
    });
  }
  return offsets;
}

void SqliteStore::transaction(detail::FunctionRef<void(SqliteTx&)> work) {
  Lock lock(*impl_);
  const std::int64_t now = impl_->clock->now_ms();
  Impl::WriteTx tx(*impl_, now);
  SqliteTx user(impl_->conn);
  struct Guard {
    detail::SqliteConnection& conn;
    ~Guard() { conn.guard_user_statements(false); }
  } guard{impl_->conn};
  impl_->conn.guard_user_statements(true);
  work(user);
  impl_->conn.guard_user_statements(false);
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
                      "': transaction() work ended the transaction itself (through "
                      "native_handle()); use SAVEPOINTs of your own instead");
  }
  tx.commit();
}

}  // namespace idem
