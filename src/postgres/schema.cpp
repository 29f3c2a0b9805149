// idem's tables, their statements, and the start-up check that creates what is missing.

#include <chrono>
#include <optional>
#include <string>

#include "connection.hpp"
#include "idem/detail/key_hash.hpp"
#include "store_impl.hpp"

namespace idem::detail::pg {
namespace {

// Advisory lock classes (the object id is hashtext(schema)): one serializes table creation,
// the other lets one purger run at a time.
constexpr const char* kCreateLockClass = "1768187244";
constexpr const char* kPurgeLockClass = "1768187245";
// The third class: a waiter's interest in a key (object id: Statements::wait_lock_id).
constexpr const char* kWaitLockClass = "1768187246";

std::string replace_all(std::string text, std::string_view from, const std::string& to) {
  for (std::size_t pos = text.find(from); pos != std::string::npos;
       pos = text.find(from, pos + to.size())) {
    text.replace(pos, from.size(), to);
  }
  return text;
}

// The bounded purge delete: the oldest expired records through the expires_at index, rows
// another transaction holds are skipped (they are being claimed or completed right now).
constexpr const char* kPurgeRows =
    "ctid = ANY(ARRAY(SELECT ctid FROM @keys WHERE expires_at <= statement_timestamp() "
    "ORDER BY expires_at LIMIT $1::int8 FOR UPDATE SKIP LOCKED))";

// A change of the record of the key whose wait hash is `h` (an int8 expression), announced
// only when a waiter listens for it. A waiter holds the key's wait lock (shared, at session
// level) while it waits: the probe, an exclusive try-lock released at once, fails exactly
// then, and only then does the statement NOTIFY (NOTIFY serialises the commits that
// notified: see docs/stores/postgres.md). The probe runs after the statement changed the row,
// whose lock it keeps until commit: a waiter that registers after the probe finds the change
// when it reads the row (FOR SHARE waits for that commit), one that registered before gets
// the notification. Used as the branches of a CASE after a WHEN for "nothing changed".
std::string announce(const std::string& h) {
  const std::string id = "(" + h + " & 2147483647)::int4";
  return "WHEN pg_try_advisory_lock(@wait_class, " + id +
         ") THEN NOT pg_advisory_unlock(@wait_class, " + id + ") ELSE pg_notify('@channel', " + h +
         "::text) IS NULL END";
}

}  // namespace

std::int64_t Statements::wait_hash(std::string_view key) const noexcept {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(detail::key_hash(key)) ^
                                   schema_hash_);
}

Statements::Statements(const std::string& schema)
    : schema_(schema),
      quoted_('"' + schema + '"'),
      channel_(("idem_wait_" + schema).substr(0, 63)),
      schema_hash_(static_cast<std::uint64_t>(detail::key_hash(schema)) * 0x9e3779b97f4a7c15ULL) {
  const std::string keys = table("idem_keys");
  // A regclass literal; built with append(): GCC 12 -O3 warns (-Wrestrict, a false
  // positive) on "'" + std::string.
  std::string tokens(1, '\'');
  tokens.append(table("idem_tokens")).push_back('\'');
  auto set = [&](Sql which, std::string sql) {
    sql = replace_all(std::move(sql), "@keys", keys);
    sql = replace_all(std::move(sql), "@tokens_lit", tokens);
    sql = replace_all(std::move(sql), "@tokens_rel", table("idem_tokens"));
    sql = replace_all(std::move(sql), "@offsets", table("idem_offsets"));
    sql = replace_all(std::move(sql), "@purge_class", kPurgeLockClass);
    sql = replace_all(std::move(sql), "@wait_class", kWaitLockClass);
    sql = replace_all(std::move(sql), "@channel", channel_);  // letters, digits and _ only
    sql_[static_cast<std::size_t>(which)] = std::move(sql);
  };

  // READ COMMITTED whatever the session's default: the claims' ON CONFLICT and row-lock
  // rechecks rely on it (a newer snapshot per statement, no serialization failures).
  set(Sql::begin, "BEGIN ISOLATION LEVEL READ COMMITTED");

  // One statement claims any number of distinct keys (the caller removes repeats):
  // - ins inserts the keys that have no record (ON CONFLICT DO NOTHING: under READ COMMITTED
  //   it waits for a transaction that is inserting or changing the same key, up to
  //   lock_timeout, then sees its reply);
  // - upd takes over records whose lease or retention ended (the row lock and a recheck of
  //   expires_at on the newest row version make two takers exclusive);
  // - cur is what the statement's snapshot shows for the rest: live records (done,
  //   in_progress, conflict) and, for upd's keys, the state before the takeover.
  // A key that another transaction committed after the snapshot appears in none of them
  // (kind 3) or only as a stale expired row (kind 2, not live): the caller claims it again.
  // upd finds its rows through the primary key: "+ interval '0'" keeps the planner from
  // walking the expires_at index instead, which would visit every expired record not yet
  // purged on each claim.
  // Tokens come from one sequence, so they strictly increase per key even across purges.
  set(Sql::claim, R"sql(
WITH req AS (
  SELECT r.key, r.state, r.ms, r.fp, r.ord
  FROM unnest($1::bytea[], $2::int2[], $3::int8[], $4::int8[])
       WITH ORDINALITY AS r(key, state, ms, fp, ord)
), ins AS (
  INSERT INTO @keys AS t (key, state, token, expires_at, fingerprint)
  SELECT req.key, req.state, nextval(@tokens_lit),
         statement_timestamp() + req.ms * interval '1 millisecond', req.fp
  FROM req ORDER BY req.key
  ON CONFLICT (key) DO NOTHING
  RETURNING t.key, t.token
), cur AS (
  SELECT t.key, t.state, t.token, t.expires_at > statement_timestamp() AS live, t.fingerprint,
         CASE WHEN t.expires_at > statement_timestamp() THEN t.response END AS response
  FROM @keys AS t WHERE t.key = ANY($1::bytea[])
), upd AS (
  UPDATE @keys AS t
  SET state = req.state, token = nextval(@tokens_lit),
      expires_at = statement_timestamp() + req.ms * interval '1 millisecond',
      fingerprint = req.fp, response = NULL
  FROM req JOIN cur ON cur.key = req.key AND NOT cur.live  -- only keys found expired: new
                                                           -- keys cost no second index probe
  WHERE t.key = req.key AND t.expires_at + interval '0' <= statement_timestamp()
  RETURNING t.key, t.token
)
SELECT req.ord,
       (CASE WHEN ins.key IS NOT NULL THEN 0 WHEN upd.key IS NOT NULL THEN 1
             WHEN cur.key IS NOT NULL THEN 2 ELSE 3 END)::int2,
       coalesce(ins.token, upd.token, cur.token, 0)::int8,
       coalesce(cur.state, -1)::int2,
       coalesce(cur.live, false),
       cur.fingerprint,
       cur.response
FROM req
LEFT JOIN ins ON ins.key = req.key
LEFT JOIN upd ON upd.key = req.key
LEFT JOIN cur ON cur.key = req.key)sql");
  // One key: the same statement over scalar parameters. With arrays the planner guesses 10
  // rows for unnest() and re-plans every single-key call (its custom plan always looks
  // cheaper); with scalars the plan cache settles on the generic plan after five calls.
  {
    std::string one(text(Sql::claim));
    one = replace_all(std::move(one),
                      "  SELECT r.key, r.state, r.ms, r.fp, r.ord\n"
                      "  FROM unnest($1::bytea[], $2::int2[], $3::int8[], $4::int8[])\n"
                      "       WITH ORDINALITY AS r(key, state, ms, fp, ord)\n",
                      "  SELECT $1::bytea AS key, $2::int2 AS state, $3::int8 AS ms, "
                      "$4::int8 AS fp, 1::int8 AS ord\n");
    one = replace_all(std::move(one), "t.key = ANY($1::bytea[])", "t.key = $1::bytea");
    sql_[static_cast<std::size_t>(Sql::claim_one)] = std::move(one);
  }

  // A speculative inbox claim (PostgresOptions::speculative_claims): the claim of a key with
  // no record at all, as one plain INSERT. Any record, or another transaction inserting the
  // same key (past lock_timeout), fails it, and with it the rest of the pipeline. Once the
  // row is in, RETURNING hands the transaction over to the handler's timeouts ($5 lock,
  // $6 statement), which saves the statement that would otherwise do it.
  set(Sql::claim_new, R"sql(
INSERT INTO @keys (key, state, token, expires_at, fingerprint)
VALUES ($1::bytea, $2::int2, nextval(@tokens_lit),
        statement_timestamp() + $3::int8 * interval '1 millisecond', $4::int8)
RETURNING token, set_config('lock_timeout', $5::text, true),
          set_config('statement_timeout', $6::text, true))sql");

  // Completes while the token owns the key (in progress or done, expired or not). When the
  // record is gone (its lease ended and a purge deleted it, nobody took over), the key is
  // recorded done all the same, for a token the sequence has handed out. $5: wait hashes; a
  // completed key is announced when a waiter listens (the third column; see announce()).
  set(Sql::complete, R"sql(
WITH req AS (
  SELECT r.key, r.token, r.ms, r.response, r.h, r.ord
  FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::bytea[], $5::int8[])
       WITH ORDINALITY AS r(key, token, ms, response, h, ord)
), upd AS (
  UPDATE @keys AS t
  SET state = 1, expires_at = statement_timestamp() + req.ms * interval '1 millisecond',
      response = req.response
  FROM req
  WHERE t.key = req.key AND t.token = req.token
  RETURNING t.key
), ins AS (
  INSERT INTO @keys AS t (key, state, token, expires_at, fingerprint, response)
  SELECT req.key, 1, req.token, statement_timestamp() + req.ms * interval '1 millisecond',
         NULL, req.response
  FROM req
  WHERE req.token <= (SELECT last_value FROM @tokens_rel)
    AND NOT EXISTS (SELECT 1 FROM @keys AS k WHERE k.key = req.key)
  ORDER BY req.key
  ON CONFLICT (key) DO NOTHING
  RETURNING t.key
)
SELECT req.ord, (upd.key IS NOT NULL OR ins.key IS NOT NULL),
       CASE WHEN upd.key IS NULL AND ins.key IS NULL THEN NULL )sql" +
                         announce("req.h") + R"sql(
FROM req LEFT JOIN upd ON upd.key = req.key LEFT JOIN ins ON ins.key = req.key)sql");

  // One row when the record was deleted (announced when a waiter listens).
  set(Sql::release,
      "WITH del AS (DELETE FROM @keys WHERE key = $1::bytea AND token = $2::int8 AND state = 0 "
      "RETURNING key) SELECT CASE WHEN false THEN NULL " +
          announce("$3::int8") + " FROM del");
  set(Sql::forget,
      "WITH del AS (DELETE FROM @keys WHERE key = $1::bytea RETURNING key) SELECT CASE WHEN "
      "false THEN NULL " +
          announce("$2::int8") + " FROM del");
  set(Sql::undo, "DELETE FROM @keys WHERE key = $1::bytea AND token = $2::int8");
  set(Sql::response, "UPDATE @keys SET response = $2::bytea WHERE key = $1::bytea");
  set(Sql::inspect,
      "SELECT state, token, floor(extract(epoch FROM expires_at - statement_timestamp()) * "
      "1000)::int8, response FROM @keys WHERE key = $1::bytea");
  set(Sql::stats,
      "SELECT count(*), count(*) FILTER (WHERE state = 0 AND expires_at > "
      "statement_timestamp()), count(*) FILTER (WHERE state = 1 AND expires_at > "
      "statement_timestamp()), pg_total_relation_size('" +
          keys + "'::regclass) FROM @keys");
  set(Sql::save_offsets,
      "INSERT INTO @offsets (topic, partition_id, next_offset) "
      "SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[]) "
      "ON CONFLICT (topic, partition_id) DO UPDATE SET next_offset = excluded.next_offset");
  set(Sql::offsets,
      "SELECT topic, partition_id, next_offset FROM @offsets ORDER BY topic, partition_id");
  set(Sql::purge_step, std::string("DELETE FROM @keys WHERE ") + kPurgeRows);
  // The same step for the automatic purge, in one round trip: only when no other session
  // holds the purge lock (a transaction-level lock, released by the statement's commit).
  set(Sql::purge_gated,
      std::string("WITH gate AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(@purge_class, "
                  "hashtext($2::text)) AS ok) DELETE FROM @keys WHERE (SELECT ok FROM gate) "
                  "AND ") +
          kPurgeRows);
  set(Sql::purge_lock, "SELECT pg_try_advisory_lock(@purge_class, hashtext($1::text))");
  set(Sql::purge_unlock, "SELECT pg_advisory_unlock(@purge_class, hashtext($1::text))");
  // A waiter's check, after it registered: FOR SHARE waits for a transaction that is changing
  // the row (a completion whose probe ran before the registration) and reads the newest
  // version; lock_timeout (lock_wait) bounds the wait for a long one (an inbox transaction).
  set(Sql::held,
      "SELECT state = 0 AND expires_at > statement_timestamp() FROM @keys WHERE key = $1::bytea "
      "FOR SHARE");
  set(Sql::wait_lock, "SELECT pg_advisory_lock_shared(@wait_class, $1::int4)");
  set(Sql::wait_unlock, "SELECT pg_advisory_unlock_shared(@wait_class, $1::int4)");
}

const char* Statements::name(Sql which) noexcept {
  static constexpr const char* kNames[kSqlCount] = {
      "idem_begin",        "idem_claim",      "idem_claim_one",   "idem_claim_new",
      "idem_complete",     "idem_release",    "idem_forget",      "idem_undo",
      "idem_response",     "idem_inspect",    "idem_stats",       "idem_save_offsets",
      "idem_offsets",      "idem_purge_step", "idem_purge_gated", "idem_purge_lock",
      "idem_purge_unlock", "idem_held",       "idem_wait_lock",   "idem_wait_unlock"};
  return kNames[static_cast<std::size_t>(which)];
}

std::string Statements::create_script() const {
  return replace_all(replace_all(R"sql(
CREATE SCHEMA IF NOT EXISTS @schema;
CREATE TABLE IF NOT EXISTS @schema.idem_meta (
  name  text PRIMARY KEY,
  value bigint NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS @schema.idem_tokens AS bigint;
CREATE TABLE IF NOT EXISTS @schema.idem_keys (
  key         bytea PRIMARY KEY,
  state       smallint NOT NULL CHECK (state IN (0, 1)),
  token       bigint NOT NULL,
  expires_at  timestamptz NOT NULL,
  fingerprint bigint,
  response    bytea
);
CREATE INDEX IF NOT EXISTS idem_keys_expires_at ON @schema.idem_keys (expires_at);
CREATE TABLE IF NOT EXISTS @schema.idem_offsets (
  topic        text NOT NULL,
  partition_id integer NOT NULL,
  next_offset  bigint NOT NULL,
  PRIMARY KEY (topic, partition_id)
);
INSERT INTO @schema.idem_meta (name, value) VALUES ('schema_version', @version)
  ON CONFLICT (name) DO NOTHING;
)sql",
                                 "@schema", quoted_),
                     "@version", std::to_string(kSchemaVersion));
}

// --- Start-up --------------------------------------------------------------------------------

namespace {

struct Probe {
  bool keys = false;
  std::string layout;     // of idem_keys, when it exists
  bool complete = false;  // every object exists
};

Probe probe(Connection& conn) {
  // Catalog tables only, all read in the statement's snapshot: to_regclass() would see a
  // table another creator committed after that snapshot, whose columns the snapshot misses.
  Params params;
  params.text(conn.statements().schema_name());
  ResultPtr result = conn.run(
      Statement::text(
          "WITH rel AS (SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n ON "
          "n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname IN ('idem_keys', "
          "'idem_meta', 'idem_tokens', 'idem_offsets', 'idem_keys_expires_at')) "
          "SELECT EXISTS (SELECT FROM rel WHERE relname = 'idem_keys'), "
          "(SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' "
          "ORDER BY a.attnum) FROM pg_attribute a JOIN rel ON a.attrelid = rel.oid WHERE "
          "rel.relname = 'idem_keys' AND a.attnum > 0 AND NOT a.attisdropped), "
          "(SELECT count(*) FROM rel) = 5"),
      params, "looking for idem's tables", conn.idem_deadline());
  if (PQresultStatus(result.get()) != PGRES_TUPLES_OK) {
    throw_idem_error(conn.target(), "looking for idem's tables", conn.get(), result.get());
  }
  Probe found;
  found.keys = std::string_view(PQgetvalue(result.get(), 0, 0)) == "t";
  found.layout = PQgetvalue(result.get(), 0, 1);
  found.complete = std::string_view(PQgetvalue(result.get(), 0, 2)) == "t";
  return found;
}

void check_layout(Connection& conn, const Probe& found) {
  if (!found.keys || found.layout == kKeysLayout) return;
  throw ConfigError(conn.target().label + ": schema " + conn.statements().schema() +
                    " already has an idem_keys table whose columns are (" + found.layout +
                    ") but this idem needs (" + std::string(kKeysLayout) +
                    "): it was made by another program or an older idem; set "
                    "PostgresOptions::schema to another schema, or drop or rename that table");
}

// The version row; nullopt when there is none yet.
std::optional<std::int64_t> read_version(Connection& conn) {
  ResultPtr result =
      conn.run(Statement::text("SELECT value FROM " + conn.statements().table("idem_meta") +
                               " WHERE name = 'schema_version'"),
               Params{}, "reading idem's schema version", conn.idem_deadline());
  if (PQresultStatus(result.get()) != PGRES_TUPLES_OK) {
    const std::string state = sqlstate_of(result.get());
    if (state.rfind("42", 0) == 0 && state != "42501") {
      throw ConfigError(conn.target().label + ": schema " + conn.statements().schema() +
                        " has an idem_meta table idem cannot read (" +
                        server_message(result.get()) +
                        "): it was made by another program; use another "
                        "PostgresOptions::schema, or drop or rename that table");
    }
    throw_idem_error(conn.target(), "reading idem's schema version", conn.get(), result.get());
  }
  if (PQntuples(result.get()) == 0) return std::nullopt;
  return std::stoll(PQgetvalue(result.get(), 0, 0));
}

void check_version(Connection& conn, std::optional<std::int64_t> version) {
  if (!version || *version == kSchemaVersion) return;
  throw ConfigError(conn.target().label + ": schema " + conn.statements().schema() +
                    " holds idem schema version " + std::to_string(*version) +
                    " but this build knows version " + std::to_string(kSchemaVersion) +
                    (*version > kSchemaVersion
                         ? ": it was created by a newer idem; upgrade idem in this service, or "
                           "use another PostgresOptions::schema"
                         : ": it was created by an older idem; migrate it (see "
                           "docs/stores/postgres.md) or use another PostgresOptions::schema"));
}

[[noreturn]] void creation_failed(Connection& conn, const PGresult* result) {
  const std::string state = sqlstate_of(result);
  if (state == "55P03") {
    throw PostgresUnavailable(conn.target().label +
                                  ": creating idem's tables failed (SQLSTATE 55P03): another "
                                  "session held a lock on them for longer than "
                                  "PostgresOptions::lock_wait (a migration?); retry later",
                              state);
  }
  if (state == "42501") {
    throw ConfigError(conn.target().label +
                      ": the user may not create idem's schema or "
                      "tables (" +
                      server_message(result) +
                      "): let a privileged user create them once (docs/stores/postgres.md "
                      "lists the statements), or grant CREATE on the database");
  }
  throw_idem_error(conn.target(), "creating idem's tables", conn.get(), result);
}

// The wait for the table-creation lock ran out (lock_timeout or statement_timeout, both
// statement_timeout there).
[[noreturn]] void creation_lock_failed(Connection& conn, const PGresult* result) {
  const std::string state = sqlstate_of(result);
  if (state != "55P03" && state != "57014") creation_failed(conn, result);
  throw PostgresUnavailable(
      conn.target().label + ": waiting for the table-creation lock failed (SQLSTATE " + state +
          "): another instance kept creating idem's tables in this schema for longer than "
          "PostgresOptions::statement_timeout (" +
          ms_setting(conn.settings().statement_timeout) + "); retry later",
      state);
}

}  // namespace

void ensure_schema(Connection& conn) {
  // Fast path, no lock and no CREATE privilege needed: everything is there already.
  Probe found = probe(conn);
  check_layout(conn, found);
  if (found.complete) {
    const std::optional<std::int64_t> version = read_version(conn);
    check_version(conn, version);
    if (version) return;
  }
  // Create what is missing. Concurrent creators (many processes starting at once) queue on a
  // transaction-level advisory lock, so CREATE ... IF NOT EXISTS never races on the catalog.
  // Each statement has its own deadline: the wait for the lock may take most of one.
  auto run = [&](const std::string& sql) {
    for (const ResultPtr& result :
         conn.run_script(sql, "creating idem's tables", conn.idem_deadline())) {
      const ExecStatusType status = PQresultStatus(result.get());
      if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
        creation_failed(conn, result.get());
      }
    }
  };
  auto set_lock_timeout = [&](std::chrono::milliseconds wait) {
    Params value;
    value.text(ms_setting(wait));
    ResultPtr set = conn.run(Statement::text("SELECT set_config('lock_timeout', $1, true)"), value,
                             "creating idem's tables", conn.idem_deadline());
    if (PQresultStatus(set.get()) != PGRES_TUPLES_OK) creation_failed(conn, set.get());
  };
  run("BEGIN ISOLATION LEVEL READ COMMITTED");
  try {
    // The session's lock_timeout is lock_wait, a bound for a key's record; another instance
    // creating the tables may hold the lock longer than that on a busy server: wait for it up
    // to statement_timeout, then go back to lock_wait for the tables themselves.
    set_lock_timeout(conn.settings().statement_timeout);
    Params params;
    params.text(conn.statements().schema_name());
    ResultPtr locked =
        conn.run(Statement::text(std::string("SELECT pg_advisory_xact_lock(") + kCreateLockClass +
                                 ", hashtext($1::text))"),
                 params, "waiting for the table-creation lock", conn.idem_deadline());
    if (PQresultStatus(locked.get()) != PGRES_TUPLES_OK) creation_lock_failed(conn, locked.get());
    set_lock_timeout(conn.settings().lock_wait);
    // Another creator may have been first: then nothing is left to create (and its store may
    // be busy on the tables, which CREATE INDEX IF NOT EXISTS would still lock).
    const Probe again = probe(conn);
    check_layout(conn, again);
    std::optional<std::int64_t> version = again.complete ? read_version(conn) : std::nullopt;
    if (!version) {
      run(conn.statements().create_script());
      version = read_version(conn);
    }
    check_version(conn, version);
    run("COMMIT");
  } catch (...) {
    if (PQstatus(conn.get()) == CONNECTION_OK && !conn.broken()) {
      try {
        (void)conn.run_script("ROLLBACK", "rolling back", conn.idem_deadline());
      } catch (...) {  // NOLINT(bugprone-empty-catch): the first error is the one to report
        conn.mark_broken();
      }
    }
    throw;
  }
}

}  // namespace idem::detail::pg
