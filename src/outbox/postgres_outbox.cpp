#include "idem/outbox/postgres_outbox.hpp"

#include <libpq-fe.h>

#include <array>
#include <chrono>
#include <memory>
#include <utility>

#include "idem/error.hpp"
#include "idem/stores/postgres_store.hpp"

namespace idem {

namespace {

struct ConnClose {
  void operator()(PGconn* c) const noexcept { PQfinish(c); }
};
struct ResultClear {
  void operator()(PGresult* r) const noexcept { PQclear(r); }
};
using Conn = std::unique_ptr<PGconn, ConnClose>;
using PgResult = std::unique_ptr<PGresult, ResultClear>;

std::string sqlstate(const PGresult* r) {
  const char* s = r != nullptr ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  return s != nullptr ? s : "";
}

[[noreturn]] void unavailable(PGconn* c, const PGresult* r, const std::string& what) {
  throw PostgresUnavailable(
      "PostgreSQL outbox: " + what + ": " +
          (r != nullptr && PQresultErrorMessage(r)[0] != '\0' ? PQresultErrorMessage(r)
                                                              : PQerrorMessage(c)),
      sqlstate(r));
}

Conn connect(const std::string& conninfo) {
  Conn c(PQconnectdb(conninfo.c_str()));
  if (!c || PQstatus(c.get()) != CONNECTION_OK) {
    throw PostgresUnavailable(std::string("PostgreSQL outbox: cannot connect: ") +
                                  (c ? PQerrorMessage(c.get()) : "out of memory") +
                                  " (check PostgresOutboxOptions::conninfo and the server)",
                              "");
  }
  return c;
}

PgResult exec(PGconn* c, const std::string& sql, const char* what) {
  PgResult r(PQexec(c, sql.c_str()));
  const auto st = PQresultStatus(r.get());
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) unavailable(c, r.get(), what);
  return r;
}

std::string qualified(const PostgresOutboxOptions& o, const std::string& table) {
  return "\"" + o.schema + "\".\"" + table + "\"";
}

void validate(const PostgresOutboxOptions& o) {
  detail::validate_outbox_identifier("PostgresOutboxOptions::schema", o.schema);
  detail::validate_outbox_identifier("PostgresOutboxOptions::table", o.table);
}

void create_tables(PGconn* c, const PostgresOutboxOptions& o) {
  const std::string t = qualified(o, o.table);
  exec(c, "BEGIN", "starting the DDL transaction");
  try {
    // Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog: serialise them.
    exec(c, "SELECT pg_advisory_xact_lock(hashtext('idem_outbox_ddl'))", "locking the DDL");
    exec(c, "CREATE SCHEMA IF NOT EXISTS \"" + o.schema + "\"", "creating the schema");
    exec(c,
         "CREATE TABLE IF NOT EXISTS " + t +
             "(seq bigserial PRIMARY KEY, inner_id uuid NOT NULL, destination text NOT NULL, "
             "routing_key text NOT NULL, msg_key bytea NOT NULL, payload bytea NOT NULL, "
             "headers bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT "
             "clock_timestamp(), sent_at timestamptz)",
         "creating the outbox table");
    exec(c,
         "CREATE INDEX IF NOT EXISTS \"" + o.table + "_pending\" ON " + t +
             "(seq) WHERE sent_at IS NULL",
         "creating the pending index");
    exec(c,
         "CREATE TABLE IF NOT EXISTS " + qualified(o, o.table + "_lease") +
             "(id int PRIMARY KEY CHECK (id = 1), holder text NOT NULL, expires_at "
             "timestamptz NOT NULL)",
         "creating the lease table");
    exec(c, "COMMIT", "committing the DDL");
  } catch (...) {
    PQclear(PQexec(c, "ROLLBACK"));
    throw;
  }
}

std::uint64_t be64(const char* p) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

std::string_view value(const PGresult* r, int row, int col) {
  return {PQgetvalue(r, row, col), static_cast<std::size_t>(PQgetlength(r, row, col))};
}

}  // namespace

// --- Writer -------------------------------------------------------------------------------

PostgresOutbox::PostgresOutbox(PostgresOutboxOptions options) {
  validate(options);
  Conn c = connect(options.conninfo);
  create_tables(c.get(), options);
  qualified_ = qualified(options, options.table);
  insert_sql_ = "INSERT INTO " + qualified_ +
                "(inner_id, destination, routing_key, msg_key, payload, headers) "
                "VALUES($1::uuid, $2, $3, $4, $5, $6)";
}

InnerMsgId PostgresOutbox::add(PostgresTx& tx, const OutboxMessage& message) {
  detail::validate_outbox_message(message);
  const InnerMsgId id = ids_.next();
  tx.exec(insert_sql_, id.to_string(), message.destination, message.routing_key,
          PostgresBytes{message.key}, PostgresBytes{message.payload},
          PostgresBytes{detail::encode_outbox_headers(message.headers)});
  return id;
}

InnerMsgId PostgresOutbox::add(PGconn* conn, const OutboxMessage& message) {
  if (conn == nullptr) throw ConfigError("PostgresOutbox::add: the connection is null");
  const auto status = PQtransactionStatus(conn);
  if (status == PQTRANS_INERROR) {
    throw PostgresError(
        "PostgresOutbox::add: the transaction on this connection is aborted by an earlier "
        "error; ROLLBACK it",
        "25P02");
  }
  if (status != PQTRANS_INTRANS) {
    throw ConfigError(
        "PostgresOutbox::add: no transaction is open on this connection; BEGIN one, write the "
        "business rows and the outbox message, then COMMIT (else the message is not tied to "
        "them)");
  }
  detail::validate_outbox_message(message);
  const InnerMsgId id = ids_.next();
  const std::string id_text = id.to_string();
  const std::string headers = detail::encode_outbox_headers(message.headers);
  const std::array<const char*, 6> values{
      id_text.c_str(),    message.destination.c_str(), message.routing_key.c_str(),
      message.key.data(), message.payload.data(),      headers.data()};
  const std::array<int, 6> lengths{0,
                                   0,
                                   0,
                                   static_cast<int>(message.key.size()),
                                   static_cast<int>(message.payload.size()),
                                   static_cast<int>(headers.size())};
  const std::array<int, 6> formats{0, 0, 0, 1, 1, 1};
  PgResult r(PQexecParams(conn, insert_sql_.c_str(), 6, nullptr, values.data(), lengths.data(),
                          formats.data(), 0));
  if (PQresultStatus(r.get()) != PGRES_COMMAND_OK) {
    throw PostgresError(std::string("PostgresOutbox::add: ") + PQresultErrorMessage(r.get()),
                        sqlstate(r.get()));
  }
  return id;
}

// --- Relay side ---------------------------------------------------------------------------

struct PostgresOutboxSource::Impl {
  PostgresOutboxOptions options;
  Conn conn;
  std::string lease_sql, release_sql, fetch_sql, mark_sql, purge_sql, backlog_sql;

  PGconn* get() {
    if (!conn || PQstatus(conn.get()) != CONNECTION_OK) conn = connect(options.conninfo);
    return conn.get();
  }
  // Runs sql with text parameters; binary results when binary is set.
  PgResult run(const std::string& sql, std::initializer_list<const char*> params, const char* what,
               bool binary = false) {
    PGconn* c = get();
    PgResult r(PQexecParams(c, sql.c_str(), static_cast<int>(params.size()), nullptr,
                            params.begin(), nullptr, nullptr, binary ? 1 : 0));
    const auto st = PQresultStatus(r.get());
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) unavailable(c, r.get(), what);
    return r;
  }
};

PostgresOutboxSource::PostgresOutboxSource(PostgresOutboxOptions options)
    : impl_(std::make_unique<Impl>()) {
  validate(options);
  impl_->options = std::move(options);
  const PostgresOutboxOptions& o = impl_->options;
  create_tables(impl_->get(), o);
  const std::string t = qualified(o, o.table);
  const std::string lease = qualified(o, o.table + "_lease");
  impl_->lease_sql = "INSERT INTO " + lease +
                     " AS l (id, holder, expires_at) VALUES (1, $1, clock_timestamp() + $2 * "
                     "interval '1 millisecond') ON CONFLICT (id) DO UPDATE SET holder = "
                     "excluded.holder, expires_at = excluded.expires_at WHERE l.holder = "
                     "excluded.holder OR l.expires_at < clock_timestamp() RETURNING 1";
  impl_->release_sql = "DELETE FROM " + lease + " WHERE holder = $1";
  impl_->fetch_sql =
      "SELECT seq, inner_id, destination, routing_key, msg_key, payload, headers, "
      "(extract(epoch FROM created_at) * 1000)::bigint FROM " +
      t + " WHERE sent_at IS NULL ORDER BY seq LIMIT $1";
  impl_->mark_sql =
      "UPDATE " + t + " SET sent_at = clock_timestamp() WHERE seq = ANY($1::bigint[])";
  impl_->purge_sql = "DELETE FROM " + t + " WHERE seq IN (SELECT seq FROM " + t +
                     " WHERE sent_at <= clock_timestamp() - $1 * interval '1 millisecond' "
                     "ORDER BY seq LIMIT $2)";
  impl_->backlog_sql =
      "SELECT count(*), (extract(epoch FROM min(created_at)) * 1000)::bigint FROM " + t +
      " WHERE sent_at IS NULL";
}

PostgresOutboxSource::~PostgresOutboxSource() = default;

PGconn* PostgresOutboxSource::native_handle() const noexcept {
  return impl_->conn.get();
}

bool PostgresOutboxSource::acquire_lease(std::string_view holder, std::chrono::milliseconds lease) {
  const std::string h(holder);
  const std::string ms = std::to_string(lease.count());
  PgResult r = impl_->run(impl_->lease_sql, {h.c_str(), ms.c_str()}, "taking the relay lease");
  return PQntuples(r.get()) == 1;
}

void PostgresOutboxSource::release_lease(std::string_view holder) noexcept {
  try {
    const std::string h(holder);
    impl_->run(impl_->release_sql, {h.c_str()}, "releasing the relay lease");
  } catch (...) {  // NOLINT(bugprone-empty-catch): the lease then expires on its own
  }
}

std::vector<OutboxRow> PostgresOutboxSource::fetch_pending(std::size_t limit) {
  const std::string n = std::to_string(limit);
  PgResult r = impl_->run(impl_->fetch_sql, {n.c_str()}, "reading pending rows", true);
  const PGresult* res = r.get();
  std::vector<OutboxRow> rows;
  const int count = PQntuples(res);
  rows.reserve(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    OutboxRow row;
    row.seq = static_cast<std::int64_t>(be64(PQgetvalue(res, i, 0)));
    const char* id = PQgetvalue(res, i, 1);
    row.inner_id = InnerMsgId(be64(id), be64(id + 8));
    row.message.destination = value(res, i, 2);
    row.message.routing_key = value(res, i, 3);
    row.message.key = value(res, i, 4);
    row.message.payload = value(res, i, 5);
    row.message.headers = detail::decode_outbox_headers(value(res, i, 6));
    row.created_ms = static_cast<std::int64_t>(be64(PQgetvalue(res, i, 7)));
    rows.push_back(std::move(row));
  }
  return rows;
}

void PostgresOutboxSource::mark_sent(std::span<const std::int64_t> seqs) {
  if (seqs.empty()) return;
  std::string array = "{";
  for (std::int64_t seq : seqs) {
    if (array.size() > 1) array += ',';
    array += std::to_string(seq);
  }
  array += '}';
  impl_->run(impl_->mark_sql, {array.c_str()}, "marking rows sent");
}

std::size_t PostgresOutboxSource::purge_sent(std::chrono::milliseconds retention,
                                             std::size_t limit) {
  const std::string ms = std::to_string(retention.count());
  const std::string n = std::to_string(limit);
  PgResult r = impl_->run(impl_->purge_sql, {ms.c_str(), n.c_str()}, "purging sent rows");
  return static_cast<std::size_t>(std::stoull(PQcmdTuples(r.get())));
}

OutboxSource::Backlog PostgresOutboxSource::backlog() {
  PgResult r = impl_->run(impl_->backlog_sql, {}, "counting pending rows");
  Backlog b;
  b.pending = std::stoull(PQgetvalue(r.get(), 0, 0));
  if (PQgetisnull(r.get(), 0, 1) == 0) b.oldest_ms = std::stoll(PQgetvalue(r.get(), 0, 1));
  return b;
}

}  // namespace idem
