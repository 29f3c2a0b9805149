// SqliteStore throughput against raw SQLite doing the least a dedup table can do, with the same
// pragmas (WAL, synchronous FULL or NORMAL) on the same disk:
//   batched: consume_batch of 1000 messages in one transaction (transactional inbox, one
//            SAVEPOINT per message)  vs  BEGIN; 1000 x prepared INSERT OR IGNORE; COMMIT
//   single:  consume() of one message per transaction  vs  one autocommit INSERT OR IGNORE
//   claims:  consume() through claim + complete (two commits per message; no raw twin)
// Those handlers do nothing, so the numbers are the dedup overhead alone. Two more pairs:
//   RawBatchSavepoint: the raw batch plus SAVEPOINT/RELEASE around each insert, the floor a
//            savepoint-per-message design can reach;
//   *Card:   the handler inserts one business row (INSERT INTO cards), vs raw SQL that inserts
//            the dedup key and the card row in the same transaction.
//   PairBatchRecord: the batched pair against a raw table whose rows carry what a dedup record
//            must (state, token, expiry, fingerprint), bound per row: the cost of idem's
//            machinery with the record's width taken out of the comparison.
// Every key is new.
//
// Pair* benchmarks give the ratios: each iteration runs the raw operation and the idem one
// back to back (alternating which goes first) and times each, so both see the same disk and
// the same neighbours; counters raw/s, idem/s and ratio = idem/raw. On a shared machine whose
// fsync latency drifts by 10x over minutes, only these paired ratios are meaningful.
// Results and ratios: docs/benchmarks-sqlite.md. Run with --benchmark_filter to pick rows.

#include <benchmark/benchmark.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "idem/sqlite.hpp"
#include "support/temp_dir.hpp"

namespace {

constexpr int kBatch = 1000;

using idem::testing::TempDir;

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
// With Width::record its rows also hold the columns of idem's record, filled per insert.
enum class Width { key, record };

class RawTable {
 public:
  RawTable(const std::string& path, idem::SqliteSync sync, Width width = Width::key)
      : width_(width) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) throw std::runtime_error("open failed");
    exec("PRAGMA journal_mode=WAL");
    exec(sync == idem::SqliteSync::full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
    exec(width == Width::key ? "CREATE TABLE raw(key BLOB PRIMARY KEY NOT NULL) WITHOUT ROWID"
                             : "CREATE TABLE raw(key BLOB PRIMARY KEY NOT NULL, state INTEGER NOT "
                               "NULL, token INTEGER NOT NULL, expires_at INTEGER NOT NULL, "
                               "fingerprint INTEGER, response BLOB) WITHOUT ROWID");
    exec("CREATE TABLE cards(payment_id BLOB NOT NULL, number TEXT NOT NULL)");
    sqlite3_prepare_v3(db_,
                       width == Width::key
                           ? "INSERT OR IGNORE INTO raw(key) VALUES(?1)"
                           : "INSERT OR IGNORE INTO raw(key, state, token, expires_at, "
                             "fingerprint, response) VALUES(?1, 1, ?2, ?3, ?4, NULL)",
                       -1, SQLITE_PREPARE_PERSISTENT, &insert_, nullptr);
    sqlite3_prepare_v3(db_, "INSERT INTO cards(payment_id, number) VALUES(?1, ?2)", -1,
                       SQLITE_PREPARE_PERSISTENT, &card_, nullptr);
    sqlite3_prepare_v3(db_, "SAVEPOINT m", -1, SQLITE_PREPARE_PERSISTENT, &savepoint_, nullptr);
    sqlite3_prepare_v3(db_, "RELEASE m", -1, SQLITE_PREPARE_PERSISTENT, &release_, nullptr);
    sqlite3_prepare_v3(db_, "BEGIN IMMEDIATE", -1, SQLITE_PREPARE_PERSISTENT, &begin_, nullptr);
    sqlite3_prepare_v3(db_, "COMMIT", -1, SQLITE_PREPARE_PERSISTENT, &commit_, nullptr);
  }
  RawTable(const RawTable&) = delete;
  RawTable& operator=(const RawTable&) = delete;
  ~RawTable() {
    sqlite3_finalize(insert_);
    sqlite3_finalize(card_);
    sqlite3_finalize(savepoint_);
    sqlite3_finalize(release_);
    sqlite3_finalize(begin_);
    sqlite3_finalize(commit_);
    sqlite3_close(db_);
  }
  void insert(const std::string& key) {
    sqlite3_bind_blob(insert_, 1, key.data(), static_cast<int>(key.size()), SQLITE_STATIC);
    if (width_ == Width::record) {
      const auto now = std::chrono::system_clock::now().time_since_epoch();
      sqlite3_bind_int64(insert_, 2, 1);
      sqlite3_bind_int64(insert_, 3,
                         std::chrono::duration_cast<std::chrono::milliseconds>(now).count() +
                             7 * 24 * 3600 * 1000LL);
      sqlite3_bind_int64(insert_, 4, static_cast<std::int64_t>(0x9e3779b97f4a7c15ULL ^ key.size()));
    }
    if (sqlite3_step(insert_) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
    sqlite3_reset(insert_);
  }
  // The key and its card row; INSERT OR IGNORE says whether the key was new.
  void insert_with_card(const std::string& key) {
    insert(key);
    if (sqlite3_changes(db_) == 0) return;
    sqlite3_bind_blob(card_, 1, key.data(), static_cast<int>(key.size()), SQLITE_STATIC);
    sqlite3_bind_text(card_, 2, "4000-0000-0000-0002", -1, SQLITE_STATIC);
    step(card_);
  }
  void savepoint() { step(savepoint_); }
  void release() { step(release_); }
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

  Width width_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* card_ = nullptr;
  sqlite3_stmt* savepoint_ = nullptr;
  sqlite3_stmt* release_ = nullptr;
  sqlite3_stmt* begin_ = nullptr;
  sqlite3_stmt* commit_ = nullptr;
};

void BM_RawBatch(benchmark::State& state) {
  TempDir dir("bench-sqlite");
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

void BM_RawBatchSavepoint(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state));
  std::uint64_t next = 0;
  std::vector<std::string> keys(kBatch);
  for (auto _ : state) {
    state.PauseTiming();
    for (std::string& key : keys) key = key_of(next++);
    state.ResumeTiming();
    raw.begin();
    for (const std::string& key : keys) {
      raw.insert(key);
      raw.savepoint();
      raw.release();
    }
    raw.commit();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  label(state);
}

void BM_RawBatchCard(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state));
  std::uint64_t next = 0;
  std::vector<std::string> keys(kBatch);
  for (auto _ : state) {
    state.PauseTiming();
    for (std::string& key : keys) key = key_of(next++);
    state.ResumeTiming();
    raw.begin();
    for (const std::string& key : keys) raw.insert_with_card(key);
    raw.commit();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  label(state);
}

// The transactional handler that issues a card: one INSERT through the SqliteTx.
constexpr auto issue_card = [](const idem::Message& m, idem::SqliteTx& tx) {
  tx.exec("INSERT INTO cards(payment_id, number) VALUES(?1, ?2)", idem::SqliteBlob{m.key},
          "4000-0000-0000-0002");
};

void create_cards(idem::SqliteStore& store) {
  store.transaction([](idem::SqliteTx& tx) {
    tx.exec("CREATE TABLE cards(payment_id BLOB NOT NULL, number TEXT NOT NULL)");
  });
}

void BM_IdemBatchCard(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  create_cards(store);
  idem::IdempotentConsumer consumer(store, issue_card);
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

void BM_RawSingleCard(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state));
  std::uint64_t next = 0;
  for (auto _ : state) {
    raw.begin();
    raw.insert_with_card(key_of(next++));
    raw.commit();
  }
  state.SetItemsProcessed(state.iterations());
  label(state);
}

void BM_IdemSingleCard(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  create_cards(store);
  idem::IdempotentConsumer consumer(store, issue_card);
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

void BM_IdemBatch(benchmark::State& state) {
  TempDir dir("bench-sqlite");
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
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state));
  std::uint64_t next = 0;
  for (auto _ : state) raw.insert(key_of(next++));  // autocommit: one transaction each
  state.SetItemsProcessed(state.iterations());
  label(state);
}

void BM_IdemSingle(benchmark::State& state) {
  TempDir dir("bench-sqlite");
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
  TempDir dir("bench-sqlite");
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

// Runs raw() and idem() in alternating order each iteration, timing each; reports their rates
// in messages per second and the ratio idem / raw.
template <class Raw, class Idem>
void paired(benchmark::State& state, int messages_per_op, Raw&& raw, Idem&& idem) {
  using Clock = std::chrono::steady_clock;
  Clock::duration raw_time{}, idem_time{};
  bool raw_first = true;
  for (auto _ : state) {
    for (int turn = 0; turn < 2; ++turn) {
      const bool run_raw = (turn == 0) == raw_first;
      const auto start = Clock::now();
      if (run_raw) {
        raw();
      } else {
        idem();
      }
      (run_raw ? raw_time : idem_time) += Clock::now() - start;
    }
    raw_first = !raw_first;
  }
  const double n = static_cast<double>(state.iterations()) * messages_per_op;
  const double raw_rate = n / std::chrono::duration<double>(raw_time).count();
  const double idem_rate = n / std::chrono::duration<double>(idem_time).count();
  state.counters["raw/s"] = raw_rate;
  state.counters["idem/s"] = idem_rate;
  state.counters["ratio"] = idem_rate / raw_rate;
  label(state);
}

void pair_batch(benchmark::State& state, Width raw_width) {
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state), raw_width);
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  idem::IdempotentConsumer consumer(store, [](const idem::Message&, idem::SqliteTx&) {});
  std::uint64_t next_raw = 0, next_idem = 0;
  std::vector<std::string> raw_keys(kBatch), keys(kBatch);
  std::vector<idem::Message> batch(kBatch);
  paired(
      state, kBatch,
      [&] {
        for (std::string& key : raw_keys) key = key_of(next_raw++);
        raw.begin();
        for (const std::string& key : raw_keys) raw.insert(key);
        raw.commit();
      },
      [&] {
        for (int i = 0; i < kBatch; ++i) {
          keys[i] = key_of(next_idem++);
          batch[i] = idem::Message{.key = keys[i], .payload = "{\"amount\":10}"};
        }
        consumer.consume_batch(batch);
      });
}

void BM_PairBatch(benchmark::State& state) {
  pair_batch(state, Width::key);
}

void BM_PairBatchRecord(benchmark::State& state) {
  pair_batch(state, Width::record);
}

void BM_PairSingle(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state));
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  idem::IdempotentConsumer consumer(store, [](const idem::Message&, idem::SqliteTx&) {});
  std::uint64_t next_raw = 0, next_idem = 0;
  paired(
      state, 1, [&] { raw.insert(key_of(next_raw++)); },
      [&] {
        const std::string key = key_of(next_idem++);
        consumer.consume({.key = key, .payload = "{\"amount\":10}"});
      });
}

void BM_PairBatchCard(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state));
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  create_cards(store);
  idem::IdempotentConsumer consumer(store, issue_card);
  std::uint64_t next_raw = 0, next_idem = 0;
  std::vector<std::string> raw_keys(kBatch), keys(kBatch);
  std::vector<idem::Message> batch(kBatch);
  paired(
      state, kBatch,
      [&] {
        for (std::string& key : raw_keys) key = key_of(next_raw++);
        raw.begin();
        for (const std::string& key : raw_keys) raw.insert_with_card(key);
        raw.commit();
      },
      [&] {
        for (int i = 0; i < kBatch; ++i) {
          keys[i] = key_of(next_idem++);
          batch[i] = idem::Message{.key = keys[i], .payload = "{\"amount\":10}"};
        }
        consumer.consume_batch(batch);
      });
}

void BM_PairSingleCard(benchmark::State& state) {
  TempDir dir("bench-sqlite");
  RawTable raw(dir.file("raw.db"), sync_of(state));
  idem::SqliteStore store(dir.file("idem.db"), {.synchronous = sync_of(state)});
  create_cards(store);
  idem::IdempotentConsumer consumer(store, issue_card);
  std::uint64_t next_raw = 0, next_idem = 0;
  paired(
      state, 1,
      [&] {
        raw.begin();
        raw.insert_with_card(key_of(next_raw++));
        raw.commit();
      },
      [&] {
        const std::string key = key_of(next_idem++);
        consumer.consume({.key = key, .payload = "{\"amount\":10}"});
      });
}

// Arg 0: synchronous=FULL, 1: NORMAL. Wall time: fsync is not CPU time.
BENCHMARK(BM_RawBatch)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemBatch)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_RawSingle)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemSingle)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemClaimComplete)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_RawBatchSavepoint)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_RawBatchCard)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemBatchCard)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_RawSingleCard)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_IdemSingleCard)->Arg(0)->Arg(1)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_PairBatch)->Arg(0)->Arg(1)->UseRealTime()->MinTime(4.0);
BENCHMARK(BM_PairBatchRecord)->Arg(0)->Arg(1)->UseRealTime()->MinTime(4.0);
BENCHMARK(BM_PairSingle)->Arg(0)->Arg(1)->UseRealTime()->MinTime(4.0);
BENCHMARK(BM_PairBatchCard)->Arg(0)->Arg(1)->UseRealTime()->MinTime(4.0);
BENCHMARK(BM_PairSingleCard)->Arg(0)->Arg(1)->UseRealTime()->MinTime(4.0);

}  // namespace
