#include "schema.hpp"

#include <array>
#include <string>

#include "connection.hpp"
#include "idem/error.hpp"

namespace idem::detail::sqlite {
namespace {

// The columns of each table, in order, as this build writes them.
constexpr std::array<const char*, 6> kKeyColumns{"key",        "state",       "token",
                                                 "expires_at", "fingerprint", "response"};
constexpr std::array<const char*, 3> kOffsetColumns{"topic", "partition_id", "next_offset"};

std::string columns_of(SqliteConnection& conn, const char* table) {
  StmtPtr info = conn.prepare_internal(
      (std::string("SELECT name FROM pragma_table_info('") + table + "') ORDER BY cid").c_str());
  Step step(conn, info.get(), "reading the table layout");
  std::string names;
  while (step.row()) {
    if (!names.empty()) names += ", ";
    names += step.column_blob(0);
  }
  return names;
}

template <std::size_t N>
std::string joined(const std::array<const char*, N>& names) {
  std::string out;
  for (const char* name : names) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

template <std::size_t N>
void require_layout(SqliteConnection& conn, const char* table,
                    const std::array<const char*, N>& expected) {
  const std::string found = columns_of(conn, table);
  if (found == joined(expected)) return;
  throw ConfigError("sqlite store '" + conn.path() + "': the database's " + table +
                    " table has the columns (" + found + "), not idem's (" + joined(expected) +
                    "): it was made by an older idem or by another program; point the store at "
                    "a new file, or move that table aside (its done keys are then forgotten)");
}

// True when idem's three tables exist and the version row says this build's layout: then
// opening needs no write lock (idemctl and a second consumer never wait behind a writer).
bool schema_in_place(SqliteConnection& conn) {
  StmtPtr tables = conn.prepare_internal(
      "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND "
      "name IN ('idem_keys', 'idem_meta', 'idem_offsets')");
  {
    Step step(conn, tables.get(), "looking for idem's tables");
    if (!step.row() || step.column_int64(0) != 3) return false;
  }
  // Both rows idem writes with the tables: the version, and the token floor (without it
  // tokens could repeat after a purge).
  StmtPtr meta = conn.prepare_internal(
      "SELECT count(*), coalesce(sum(name = 'schema_version' AND value = ?1), 0) FROM idem_meta "
      "WHERE name IN ('schema_version', 'token_floor')");
  Step rows(conn, meta.get(), "reading the schema version");
  rows.i64(1, kSchemaVersion);
  return rows.row() && rows.column_int64(0) == 2 && rows.column_int64(1) == 1;
}

}  // namespace

void open_schema(SqliteConnection& conn, bool read_only) {
  if (schema_in_place(conn)) {
    require_layout(conn, "idem_keys", kKeyColumns);
    require_layout(conn, "idem_offsets", kOffsetColumns);
    return;
  }
  if (read_only) {
    throw ConfigError("sqlite store '" + conn.path() +
                      "': opened read-only, but the file does not hold this idem's tables (not "
                      "an idem store, or one no consumer of this version has opened yet)");
  }
  conn.exec_script("BEGIN IMMEDIATE", "locking the database to create the tables", Phase::open);
  try {
    conn.exec_script(kSchemaSql, "creating the tables", Phase::open);
    conn.exec_script("COMMIT", "committing the tables", Phase::open);
  } catch (...) {
    sqlite3_exec(conn.db(), "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
  StmtPtr meta = conn.prepare_internal("SELECT value FROM idem_meta WHERE name = 'schema_version'");
  Step version(conn, meta.get(), "reading the schema version");
  if (version.row() && version.column_int64(0) > kSchemaVersion) {
    throw ConfigError("sqlite store '" + conn.path() + "': the database has idem schema version " +
                      std::to_string(version.column_int64(0)) + " but this build knows " +
                      std::to_string(kSchemaVersion) + ": upgrade idem or use another file");
  }
  require_layout(conn, "idem_keys", kKeyColumns);
  require_layout(conn, "idem_offsets", kOffsetColumns);
}

}  // namespace idem::detail::sqlite
