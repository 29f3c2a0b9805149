#pragma once
/// @file
/// @brief idem::SqliteOutbox (writes outgoing messages inside the business transaction) and
/// idem::SqliteOutboxSource (the relay's side of the same table). See docs/outbox.md.

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "idem/inner_msg_id.hpp"
#include "idem/outbox/outbox_message.hpp"
#include "idem/outbox/outbox_relay.hpp"

struct sqlite3;

namespace idem {

class SqliteTx;

/// @brief Where an SQLite outbox lives. Plain values with defaults.
struct SqliteOutboxOptions {
  /// The outbox table; its lease table is "<table>_lease". [A-Za-z0-9_], 1..63 characters.
  std::string table = "idem_outbox";
  /// How long a statement waits for another connection's lock before failing.
  std::chrono::milliseconds busy_timeout{5000};
};

/// @brief Writes outgoing messages into the outbox table inside a transaction the caller has
/// open, so they commit or roll back with the business writes. Each message gets its
/// InnerMsgId here, once; the relay publishes it with that id on every attempt. Thread-safe
/// (one writer may serve every connection of the process).
class SqliteOutbox {
 public:
  /// @brief Opens the database file once to create the tables if they are missing.
  /// @throws idem::ConfigError for a bad table name or a file that cannot be opened;
  /// idem::SqliteUnavailable when the tables cannot be created.
  explicit SqliteOutbox(const std::string& path, SqliteOutboxOptions options = {});

  /// @brief Inserts message in the transaction of an SqliteStore handler (inbox).
  /// @return The message's inner id.
  /// @throws idem::InvalidMessage for an empty key; idem::SqliteError when the insert fails.
  InnerMsgId add(SqliteTx& tx, const OutboxMessage& message);
  /// @brief Inserts message on db, on which the caller has BEGUN a transaction (a
  /// producer-only service's business transaction); the caller commits or rolls back.
  /// @throws idem::ConfigError when db is in autocommit mode (no transaction open);
  /// idem::InvalidMessage for an empty key; idem::SqliteError when the insert fails.
  InnerMsgId add(sqlite3* db, const OutboxMessage& message);

  const std::string& table() const noexcept { return options_.table; }

 private:
  SqliteOutboxOptions options_;
  std::string insert_sql_;
  InnerMsgIdGenerator ids_;
};

/// @brief The relay's side of an SQLite outbox: its own connection to the file (WAL). The
/// lease is a row in "<table>_lease", judged on this machine's wall clock. Not thread-safe.
class SqliteOutboxSource final : public OutboxSource {
 public:
  /// @throws idem::ConfigError for a bad table name; idem::SqliteUnavailable when the file
  /// cannot be opened or the tables cannot be created.
  explicit SqliteOutboxSource(const std::string& path, SqliteOutboxOptions options = {});
  ~SqliteOutboxSource() override;
  SqliteOutboxSource(const SqliteOutboxSource&) = delete;
  SqliteOutboxSource& operator=(const SqliteOutboxSource&) = delete;

  bool acquire_lease(std::string_view holder, std::chrono::milliseconds lease) override;
  void release_lease(std::string_view holder) noexcept override;
  std::vector<OutboxRow> fetch_pending(std::size_t limit) override;
  void mark_sent(std::span<const std::int64_t> seqs) override;
  std::size_t purge_sent(std::chrono::milliseconds retention, std::size_t limit) override;
  Backlog backlog() override;

  sqlite3* native_handle() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem
