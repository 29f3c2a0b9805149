#pragma once
// What the SqliteStore tests share: a scratch directory of their own and a plain sqlite3
// connection to look at what the store wrote.

#include <sqlite3.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "support/temp_dir.hpp"

namespace idem::test_support::sqlite {

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it.
// The SQLite tests' own directory.
struct TempDir : idem::testing::TempDir {
  TempDir() : idem::testing::TempDir("sqlite") {}
};

// A plain sqlite3 connection of the test's own, to look at what the store wrote.
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK) {
      throw std::runtime_error("cannot open " + path);
    }
    sqlite3_busy_timeout(db_, 10'000);
  }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;
  ~RawDb() { sqlite3_close_v2(db_); }

  void exec(const char* sql) {
    char* error = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &error) != SQLITE_OK) {
      std::string message = error ? error : "?";
      sqlite3_free(error);
      throw std::runtime_error(std::string(sql) + ": " + message);
    }
  }
  std::string text(const char* sql) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db_, sql, -1, &stmt, nullptr) != SQLITE_OK) {
      throw std::runtime_error(std::string(sql) + ": " + sqlite3_errmsg(db_));
    }
    std::string value;
    if (sqlite3_step(stmt) == SQLITE_ROW && sqlite3_column_text(stmt, 0) != nullptr) {
      value = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    }
    sqlite3_finalize(stmt);
    return value;
  }
  std::int64_t scalar(const char* sql) {
    const std::string value = text(sql);
    return value.empty() ? 0 : std::stoll(value);
  }
  sqlite3* handle() const { return db_; }

 private:
  sqlite3* db_ = nullptr;
};

}  // namespace idem::test_support::sqlite
