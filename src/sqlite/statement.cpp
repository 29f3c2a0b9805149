// SqliteStatement and SqliteTx: what a transactional handler runs its SQL through.

#include <string>

#include "connection.hpp"
#include "idem/stores/sqlite_store.hpp"
#include "schema.hpp"

namespace idem {

// --- SqliteStatement -------------------------------------------------------------------------

void detail::SqliteStmtFinalizer::operator()(sqlite3_stmt* stmt) const noexcept {
  sqlite3_finalize(stmt);
}

SqliteStatement::SqliteStatement(SqliteStatement&& other) noexcept
    : connection_(other.connection_),
      owned_(std::move(other.owned_)),
      stmt_(std::exchange(other.stmt_, nullptr)),
      in_use_(std::exchange(other.in_use_, nullptr)) {}

SqliteStatement::~SqliteStatement() {
  if (in_use_ == nullptr) return;  // owned_ finalizes an uncached statement
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
  *in_use_ = false;
}

namespace {
void check_bind(detail::SqliteConnection& connection, sqlite3_stmt* stmt, int rc, int index) {
  if (rc == SQLITE_OK) return;
  connection.fail(
      rc, "binding parameter " + std::to_string(index) + " of \"" + sqlite3_sql(stmt) + "\"",
      detail::Phase::user);
}
}  // namespace

SqliteStatement& SqliteStatement::bind_int64(int index, std::int64_t value) {
  check_bind(*connection_, stmt_, sqlite3_bind_int64(stmt_, index, value), index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_double(int index, double value) {
  check_bind(*connection_, stmt_, sqlite3_bind_double(stmt_, index, value), index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_text(int index, std::string_view text) {
  check_bind(*connection_, stmt_,
             sqlite3_bind_text64(stmt_, index, detail::data_of(text), text.size(), SQLITE_TRANSIENT,
                                 SQLITE_UTF8),
             index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_blob(int index, std::string_view bytes) {
  check_bind(
      *connection_, stmt_,
      sqlite3_bind_blob64(stmt_, index, detail::data_of(bytes), bytes.size(), SQLITE_TRANSIENT),
      index);
  return *this;
}
SqliteStatement& SqliteStatement::bind_null(int index) {
  check_bind(*connection_, stmt_, sqlite3_bind_null(stmt_, index), index);
  return *this;
}

bool SqliteStatement::step() {
  if (sqlite3_get_autocommit(connection_->db()) != 0) {
    connection_->require_transaction("running", sqlite3_sql(stmt_));
  }
  connection_->open_deferred_savepoint();
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  const std::string sql = sqlite3_sql(stmt_);
  connection_->fail(rc, "running \"" + sql.substr(0, 200) + "\"", detail::Phase::user);
}

sqlite3_stmt* SqliteStatement::native_handle() const {
  (void)connection_->raw_handle();  // it may be stepped where step() cannot see it
  return stmt_;
}

std::int64_t SqliteStatement::run() {
  while (step()) {
  }
  return sqlite3_changes(connection_->db());
}

void SqliteStatement::reset() noexcept {
  sqlite3_reset(stmt_);
}
int SqliteStatement::column_count() const noexcept {
  return sqlite3_column_count(stmt_);
}
bool SqliteStatement::column_is_null(int column) const noexcept {
  return sqlite3_column_type(stmt_, column) == SQLITE_NULL;
}
std::int64_t SqliteStatement::column_int64(int column) const noexcept {
  return sqlite3_column_int64(stmt_, column);
}
double SqliteStatement::column_double(int column) const noexcept {
  return sqlite3_column_double(stmt_, column);
}
std::string_view SqliteStatement::column_text(int column) const noexcept {
  const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, column));
  return text == nullptr ? std::string_view{}
                         : std::string_view(
                               text, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column)));
}
std::string_view SqliteStatement::column_blob(int column) const noexcept {
  const auto* blob = static_cast<const char*>(sqlite3_column_blob(stmt_, column));
  return blob == nullptr ? std::string_view{}
                         : std::string_view(
                               blob, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column)));
}

// --- SqliteTx --------------------------------------------------------------------------------

sqlite3* SqliteTx::native_handle() const {
  return connection_->raw_handle();
}

SqliteStatement SqliteTx::prepare(std::string_view sql) {
  connection_->require_transaction("preparing", sql);
  return connection_->prepare_user(sql);
}

void SqliteTx::save_offset(std::string_view topic, std::int32_t partition,
                           std::int64_t next_offset) {
  exec(detail::sqlite::kSaveOffsetSql, topic, partition, next_offset);
}

std::optional<std::int64_t> SqliteTx::committed_offset(std::string_view topic,
                                                       std::int32_t partition) {
  return query_int64(detail::sqlite::kOffsetSql, topic, partition);
}

}  // namespace idem
