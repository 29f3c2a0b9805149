#pragma once
// The SQLite store's tables: their SQL, and the checks that an existing file holds them.

#include <cstdint>

namespace idem::detail {
class SqliteConnection;
}

namespace idem::detail::sqlite {

inline constexpr std::int64_t kInProgress = 0;
inline constexpr std::int64_t kDone = 1;
inline constexpr std::int64_t kReleased = 2;
inline constexpr std::int64_t kSchemaVersion = 1;

// Keys are BLOBs compared with memcmp: binary-safe, NUL bytes included. expires_at is the
// lease end (in progress), the retention end (done) or the release time (released), in the
// store clock's milliseconds. There is deliberately no index on expires_at: a second B-tree
// doubles the pages each one-message commit writes (measured: half the throughput). Purging
// sweeps the primary key instead, a bounded slice per transaction (see purge_step).
inline constexpr const char* kSchemaSql = R"sql(
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

inline constexpr const char* kSaveOffsetSql =
    "INSERT INTO idem_offsets(topic, partition_id, next_offset) VALUES(?1, ?2, ?3) "
    "ON CONFLICT(topic, partition_id) DO UPDATE SET next_offset = excluded.next_offset";
inline constexpr const char* kOffsetSql =
    "SELECT next_offset FROM idem_offsets WHERE topic = ?1 AND partition_id = ?2";

/// Creates the tables when missing, in one write transaction, then checks that the file's
/// tables are the ones this build knows: idem::ConfigError names what differs and what to do.
void open_schema(SqliteConnection& connection, bool read_only = false);

}  // namespace idem::detail::sqlite
