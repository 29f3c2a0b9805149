#pragma once
// What the PostgresStore tests share: one private PostgreSQL server per test binary, started
// from the main thread before the first test, a fresh schema per test, and a plain libpq
// connection to look at what the store wrote.

#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "idem/postgres.hpp"
#include "support/postgres_server.hpp"

namespace idem::test_support::postgres {

using idem::PostgresOptions;
using idem::test_support::PostgresServer;

// A plain libpq connection of the test's own, to look at what the store wrote.
class RawDb {
 public:
  explicit RawDb(const std::string& conninfo) : conn_(PQconnectdb(conninfo.c_str())) {
    if (PQstatus(conn_) != CONNECTION_OK) {
      const std::string error = PQerrorMessage(conn_);
      PQfinish(conn_);
      throw std::runtime_error("test connection failed: " + error);
    }
  }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;
  ~RawDb() { PQfinish(conn_); }

  void exec(const std::string& sql) {
    PGresult* result = PQexec(conn_, sql.c_str());
    const ExecStatusType status = PQresultStatus(result);
    const std::string error = PQresultErrorMessage(result);
    PQclear(result);
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
      throw std::runtime_error(sql + ": " + error);
    }
  }
  std::string text(const std::string& sql) {
    PGresult* result = PQexec(conn_, sql.c_str());
    if (PQresultStatus(result) != PGRES_TUPLES_OK) {
      const std::string error = PQresultErrorMessage(result);
      PQclear(result);
      throw std::runtime_error(sql + ": " + error);
    }
    std::string value =
        PQntuples(result) > 0 && !PQgetisnull(result, 0, 0) ? PQgetvalue(result, 0, 0) : "";
    PQclear(result);
    return value;
  }
  std::int64_t scalar(const std::string& sql) {
    const std::string value = text(sql);
    return value.empty() ? 0 : std::stoll(value);
  }
  // Every row's first column, one per line (EXPLAIN output).
  std::string lines(const std::string& sql) {
    PGresult* result = PQexec(conn_, sql.c_str());
    std::string out = PQresultStatus(result) == PGRES_TUPLES_OK ? "" : PQresultErrorMessage(result);
    for (int row = 0; row < PQntuples(result); ++row) {
      out += std::string(PQgetvalue(result, row, 0)) + "\n";
    }
    PQclear(result);
    return out;
  }
  PGconn* get() const { return conn_; }

 private:
  PGconn* conn_;
};

// The test server, shared by every test of this binary (children get it via IDEM_PG_*).
inline PostgresServer& server() {
  static PostgresServer instance;
  return instance;
}

// Starts the server from the main thread, before the first test: the postmaster dies with the
// thread that forked it (PR_SET_PDEATHSIG), so no test's worker thread may be the first user.
class ServerEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { (void)server(); }
};
inline ::testing::Environment* const kServerEnvironment =
    ::testing::AddGlobalTestEnvironment(new ServerEnvironment);

inline std::string fresh_schema() {
  static std::atomic<int> counter{0};
  return "t" + std::to_string(::getpid()) + "_" + std::to_string(++counter);
}

inline PostgresOptions options_for(const std::string& schema) {
  return PostgresOptions{.conninfo = server().conninfo(), .schema = schema};
}

}  // namespace idem::test_support::postgres
