// SqliteStore throughput against raw SQLite doing the least a dedup table can do, with the same
// pragmas (WAL, synchronous FULL or NORMAL) on the same disk:
//   batched: consume_batch of 1000 messages in one transaction (transactional inbox, one
//            SAVEPOINT per message)  vs  BEGIN; 1000 x prepared INSERT OR IGNORE; COMMIT
//   single:  consume() of one message per transaction  vs  one autocommit INSERT OR IGNORE
//   claims:  consume() through claim + complete (two commits per message; no raw twin)
// The handler does nothing, so the numbers are the dedup overhead alone. Every key is new.
// Results and ratios: docs/benchmarks-sqlite.md. Run with --benchmark_filter to pick rows.

#include <benchmark/benchmark.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "idem/sqlite.hpp"

namespace {

constexpr int kBatch = 1000;

class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("IDEM_BENCH_DIR");
    std::string pattern = std::string(base ? base : "/tmp") + "/idem-bench-sqlite-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  std::string file(const char* name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

idem::SqliteSync sync_of(const benchmark::State& state) {
  return state.range(0) == 0 ? idem::SqliteSync::full : idem::SqliteSync::normal;
}

void label(benchmark::State& state) {
  state.SetLabel(state.range(0) == 0 ? "synchronous=FULL" : "synchronous=NORMAL");
}

std::string key_of(std::uint64_t n) {
  return "order-" + std::to_string(n);
}

// The raw baseline: one WITHOUT ROWID table with a BLOB primary key, WAL, same synchronous.
class RawTable {
 public:
  RawTable(const std::string& path, idem::SqliteSync sync) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) throw std::runtime_error("open failed");
    exec("PRAGMA journal_mode=WAL");
    exec(sync == idem::SqliteSync::full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
    exec("CREATE TABLE raw(key BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID");
    sqlite3_prepare_v3(db_, "INSERT OR IGNORE INTO raw(key) VALUES(?1)", -1,
                       SQLITE_PREPARE_PERSISTENT, &insert_, nullptr);
    sqlite3_prepare_v3(db_, "BEGIN IMMEDIATE", -1, SQLITE_PREPARE_PERSISTENT, &begin_, nullptr);
    sqlite3_prepare_v3(db_, "COMMIT", -1, SQLITE_PREPARE_PERSISTENT, &commit_, nullptr);
  }
  RawTable(const RawTable&) = delete;
  RawTable& operator=(const RawTable&) = delete;
  ~RawTable() {
    sqlite3_finalize(insert_);
    sqlite3_finalize(begin_);
    sqlite3_finalize(commit_);
    sqlite3_close(db_);
  }
  void insert(const std::string& key) {
    sqlite3_bind_blob(insert_, 1, key.data(), static_cast<int>(key.size()), SQLITE_STATIC);
    if (sqlite3_step(insert_) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
    sqlite3_reset(insert_);
  }
  void begin() { step(begin_); }
  void commit() { step(commit_); }

 private:
  void exec(const char* sql) {
    if (sqlite3_exec(db_, sql, nullptr, nullptr, nullptr) != SQLITE_OK) {
      throw std::runtime_error(sqlite3_errmsg(db_));
    }
  }
  void step(sqlite3_stmt* stmt) {
    if (sqlite3_step(stmt) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
    sqlite3_reset(stmt);
  }

  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* begin_ = nullptr;
  sqlite3_stmt* commit_ = nullptr;
};

void BM_RawBatch(benchmark::State& state) {
  TempDir dir;
  RawTable raw(dir.file("raw.db"), sync_of(state));
  std::uint64_t next = 0;
  std::vector<std::string> keys(kBatch);
  for (auto _ : state) {
    state.PauseTiming();
    for (std::string& key : keys) key = key_of(next++);
    state.ResumeTiming();
    raw.begin();
    for (const std::string& key : keys) raw.insert(key);
    raw.commit();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  label(state);
}

void BM_IdemBatch(benchmark::State& state) {
  TempDir dir;
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  idem::IdempotentConsumer consumer(store, [](const idem::Message&, idem::SqliteTx&) {});
  std::uint64_t next = 0;
  std::vector<std::string> keys(kBatch);
  std::vector<idem::Message> batch(kBatch);
  for (auto _ : state) {
    state.PauseTiming();
    for (int i = 0; i < kBatch; ++i) {
      keys[i] = key_of(next++);
      batch[i] = idem::Message{.key = keys[i], .payload = "{\"amount\":10}"};
    }
    state.ResumeTiming();
    std::vector<idem::Result> results = consumer.consume_batch(batch);
    if (results.back().outcome != idem::Outcome::processed) state.SkipWithError("not processed");
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  label(state);
}

void BM_RawSingle(benchmark::State& state) {
  TempDir dir;
  RawTable raw(dir.file("raw.db"), sync_of(state));
  std::uint64_t next = 0;
  for (auto _ : state) raw.insert(key_of(next++));  // autocommit: one transaction each
  state.SetItemsProcessed(state.iterations());
  label(state);
}

void BM_IdemSingle(benchmark::State& state) {
  TempDir dir;
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  idem::IdempotentConsumer consumer(store, [](const idem::Message&, idem::SqliteTx&) {});
  std::uint64_t next = 0;
  for (auto _ : state) {
    const std::string key = key_of(next++);
    if (consumer.consume({.key = key, .payload = "{\"amount\":10}"}).outcome !=
        idem::Outcome::processed) {
      state.SkipWithError("not processed");
    }
  }
  state.SetItemsProcessed(state.iterations());
  label(state);
}

void BM_IdemClaimComplete(benchmark::State& state) {
  TempDir dir;
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {});
  std::uint64_t next = 0;
  for (auto _ : state) {
    const std::string key = key_of(next++);
    if (consumer.consume({.key = key, .payload = "{\"amount\":10}"}).outcome !=
        idem::Outcome::processed) {
      state.SkipWithError("not processed");
    }
  }
  state.SetItemsProcessed(state.iterations());
  label(state);
}

// Arg 0: synchronous=FULL, 1: NORMAL. Wall time: fsync is not CPU time.
BENCHMARK(BM_RawBatch)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemBatch)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_RawSingle)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemSingle)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemClaimComplete)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);

}  // namespace
