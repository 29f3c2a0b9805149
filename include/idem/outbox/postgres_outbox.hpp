#pragma once
/// @file
/// @brief idem::PostgresOutbox (writes outgoing messages inside the business transaction) and
/// idem::PostgresOutboxSource (the relay's side of the same table). See docs/outbox.md.

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

struct pg_conn;
typedef struct pg_conn PGconn;  // NOLINT(modernize-use-using): libpq's C type

namespace idem {

class PostgresTx;

/// @brief Where a PostgreSQL outbox lives. Plain values with defaults.
struct PostgresOutboxOptions {
  /// Any libpq connection string (key=value or postgresql:// URI).
  std::string conninfo{};
  /// Schema (created if missing) and table; the lease table is "<table>_lease".
  /// [A-Za-z0-9_], 1..63 characters each.
  std::string schema = "public";
  std::string table = "idem_outbox";
};

/// @brief Writes outgoing messages into the outbox table inside a transaction the caller has
/// open, so they commit or roll back with the business writes. Each message gets its
/// InnerMsgId here, once. Thread-safe.
class PostgresOutbox {
 public:
  /// @brief Connects once to create the schema and tables if they are missing.
  /// @throws idem::ConfigError for a bad name; idem::PostgresUnavailable when the server
  /// cannot be reached or refuses the DDL.
  explicit PostgresOutbox(PostgresOutboxOptions options);

  /// @brief Inserts message in the transaction of a PostgresStore handler (inbox).
  /// @throws idem::InvalidMessage for an empty key; idem::PostgresError when the insert fails.
  InnerMsgId add(PostgresTx& tx, const OutboxMessage& message);
  /// @brief Inserts message on conn, on which the caller has BEGUN a transaction; the caller
  /// commits or rolls back.
  /// @throws idem::ConfigError when no transaction is open on conn; idem::InvalidMessage for
  /// an empty key; idem::PostgresError when the insert fails (the transaction is then aborted).
  InnerMsgId add(PGconn* conn, const OutboxMessage& message);

  /// @brief The quoted "schema"."table".
  const std::string& qualified_table() const noexcept { return qualified_; }

 private:
  std::string qualified_;
  std::string insert_sql_;
  InnerMsgIdGenerator ids_;
};

/// @brief The relay's side of a PostgreSQL outbox: its own connection (reconnected after a
/// failure). The lease is a row in "<table>_lease", judged on the server's clock. Not
/// thread-safe.
class PostgresOutboxSource final : public OutboxSource {
 public:
  /// @throws idem::ConfigError for a bad name; idem::PostgresUnavailable when the server
  /// cannot be reached.
  explicit PostgresOutboxSource(PostgresOutboxOptions options);
  ~PostgresOutboxSource() override;
  PostgresOutboxSource(const PostgresOutboxSource&) = delete;
  PostgresOutboxSource& operator=(const PostgresOutboxSource&) = delete;

  bool acquire_lease(std::string_view holder, std::chrono::milliseconds lease) override;
  void release_lease(std::string_view holder) noexcept override;
  std::vector<OutboxRow> fetch_pending(std::size_t limit) override;
  void mark_sent(std::span<const std::int64_t> seqs) override;
  std::size_t purge_sent(std::chrono::milliseconds retention, std::size_t limit) override;
  Backlog backlog() override;

  PGconn* native_handle() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem
