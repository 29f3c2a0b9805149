// PostgresStore throughput against raw libpq doing the least a dedup table can do, on the same
// private PostgreSQL server (tests/support/postgres_server.hpp, started once in main(), on the
// main thread), over the same kind of connection (TCP on 127.0.0.1, the same user and
// database, the server's default durability: synchronous_commit = on, fsync = on). Each side
// has its own schema (its own dedup and cards tables), fresh for every benchmark run.
//
// The raw side is the fastest honest libpq loop we could write: one connection kept in
// pipeline mode, the dedup insert and the card insert as prepared statements
// (PQsendQueryPrepared, key bound as binary bytea), BEGIN and COMMIT as parameterless
// extended-protocol queries, one PQpipelineSync per transaction, so a whole transaction is one
// round trip. Its dedup table is raw(key bytea PRIMARY KEY); the card row is inserted
// unconditionally (every key is new, and a real consumer would need a round trip or a CTE to
// make it conditional: this makes the baseline faster, never slower).
//   BatchCard:  consume_batch(1000), handler inserts one card row through the PostgresTx
//               vs BEGIN; 1000 x (INSERT INTO raw ... ON CONFLICT DO NOTHING; INSERT INTO
//               cards); COMMIT -- all in one pipeline, one sync
//   SingleCard: consume(1 message), same handler
//               vs BEGIN; INSERT ... ON CONFLICT DO NOTHING; INSERT INTO cards; COMMIT -- one
//               pipeline, one sync
//   Batch, Single: the same with a handler that does nothing and no card insert on the raw
//               side (the dedup overhead alone).
//
// Pair* benchmarks give the ratios: each iteration runs the raw operation and the idem one
// back to back (alternating which goes first) and times each, so both see the same server,
// disk and neighbours; counters raw/s, idem/s and ratio = idem/raw. Their argument is the
// number of keys already in both dedup tables (and analyzed) before the run: 0 is a service's
// first minutes, 100000 the steady state of a table holding a retention window of keys.
//
// Two diagnostics, not pairs of idem and raw:
// - BM_PhasesCard times where idem's wall time goes, from the handler: start -> first handler
//   call (BEGIN + the set-based claim, one round trip), first -> last handler return (the
//   client queueing the handlers' statements), last handler -> return (the commit round trip:
//   the server runs every queued statement, then COMMIT and its WAL flush).
// - BM_RawLadderCard pairs the raw transaction with itself plus some of idem's extra
//   statements or round trips, or with its dedup table shaped like idem's record (see
//   Ladder), to price each.
//
// IDEM_BENCH_PG_CONNINFO_EXTRA (see conninfo()) changes both sides' connection settings.
// IDEM_BENCH_PG_STATS=1 restarts the server with pg_stat_statements before the benchmarks and
// prints, at the end, every statement's calls and server time (both sides; it slows both).
// Results and ratios: docs/benchmarks-postgres.md. Run with --benchmark_filter to pick rows.

#include <benchmark/benchmark.h>
#include <libpq-fe.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "idem/postgres.hpp"
#include "support/postgres_server.hpp"

namespace {

constexpr int kBatch = 1000;
constexpr const char* kCardNumber = "4000-0000-0000-0002";

using Clock = std::chrono::steady_clock;
using idem::test_support::PostgresServer;

PostgresServer* g_server = nullptr;  // owned by main(), started before any benchmark

// Both sides' connection string. IDEM_BENCH_PG_CONNINFO_EXTRA is appended to it, for
// experiments only (e.g. "options='-c plan_cache_mode=force_generic_plan'").
std::string conninfo() {
  const char* extra = std::getenv("IDEM_BENCH_PG_CONNINFO_EXTRA");
  return g_server->conninfo() + (extra != nullptr ? std::string(" ") + extra : std::string());
}

std::string key_of(std::uint64_t n) {
  return "order-" + std::to_string(n);
}

// A fresh pair of schema names per benchmark run.
int next_run() {
  static int runs = 0;
  return ++runs;
}

struct ConnFinish {
  void operator()(PGconn* conn) const noexcept { PQfinish(conn); }
};
struct ResultClear {
  void operator()(PGresult* result) const noexcept { PQclear(result); }
};
using ConnPtr = std::unique_ptr<PGconn, ConnFinish>;
using ResultPtr = std::unique_ptr<PGresult, ResultClear>;

ConnPtr connect(const std::string& conninfo) {
  ConnPtr conn(PQconnectdb(conninfo.c_str()));
  if (PQstatus(conn.get()) != CONNECTION_OK) {
    throw std::runtime_error(std::string("connect: ") + PQerrorMessage(conn.get()));
  }
  // Quiet: DROP SCHEMA ... CASCADE would print a NOTICE per table.
  PQsetNoticeProcessor(
      conn.get(), [](void*, const char*) {}, nullptr);
  return conn;
}

void exec(PGconn* conn, const std::string& sql) {
  ResultPtr result(PQexec(conn, sql.c_str()));
  const ExecStatusType status = PQresultStatus(result.get());
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    throw std::runtime_error(sql + ": " + PQresultErrorMessage(result.get()));
  }
}

// What a raw transaction sends besides its baseline, to price idem's extra statements one by
// one (a bitmask, the benchmark's argument).
struct Ladder {
  // idem's per-transaction and per-message statements around the same work: set_config,
  // SAVEPOINT/RELEASE around the dedup inserts and around each message's card insert.
  bool bookkeeping = false;
  // The card insert as unnamed text (PQsendQueryParams), as a PostgresTx sends a handler's
  // statement, instead of prepared.
  bool text_card = false;
  // A sync after the dedup inserts (their answers read), then the rest: two round trips.
  bool claim_round_trip = false;
  // The dedup row as wide as idem's record: state, expires_at (statement_timestamp() plus a
  // bound retention) and fingerprint columns besides the key.
  bool wide_row = false;
  // An index on the expiry column (needs wide_row), as idem's purge uses.
  bool expiry_index = false;
  // A token column filled from a sequence (nextval per insert).
  bool sequence_token = false;
  // idem's BEGIN: BEGIN ISOLATION LEVEL READ COMMITTED.
  bool idem_begin = false;
  // BEGIN as a named prepared statement (parsed once per connection).
  bool prepared_begin = false;
  // The dedup insert RETURNING its token and two set_config calls (a speculative claim's).
  bool idem_returning = false;
  // The session settings idem's connections run with: statement_timeout 10 s, lock_timeout
  // 200 ms (set once at connect).
  bool idem_session = false;

  static Ladder of(std::int64_t bits) {
    return {.bookkeeping = (bits & 1) != 0,
            .text_card = (bits & 2) != 0,
            .claim_round_trip = (bits & 4) != 0,
            .wide_row = (bits & 8) != 0,
            .expiry_index = (bits & 16) != 0,
            .sequence_token = (bits & 32) != 0,
            .idem_begin = (bits & 64) != 0,
            .prepared_begin = (bits & 128) != 0,
            .idem_returning = (bits & 256) != 0,
            .idem_session = (bits & 512) != 0};
  }
  static std::string label(std::int64_t bits) {
    std::string text;
    if ((bits & 1) != 0) text += "+bookkeeping statements ";
    if ((bits & 2) != 0) text += "+unprepared card insert ";
    if ((bits & 4) != 0) text += "+claim round trip ";
    if ((bits & 8) != 0) text += "+wide row ";
    if ((bits & 16) != 0) text += "+expiry index ";
    if ((bits & 32) != 0) text += "+sequence token ";
    if ((bits & 64) != 0) text += "+idem's BEGIN ";
    if ((bits & 128) != 0) text += "+prepared BEGIN ";
    if ((bits & 256) != 0) text += "+idem's RETURNING ";
    if ((bits & 512) != 0) text += "+idem's session ";
    if (!text.empty()) text.pop_back();
    return text;
  }
};

// The raw baseline: its own schema with raw(key bytea PRIMARY KEY) and cards, one connection
// kept in pipeline mode, a transaction = one pipeline and one sync. On destruction it drops
// its schema and, when given, the idem side's (after the store closed its connections).
class RawPg {
 public:
  // shape: the dedup table's extra columns and indexes (Ladder bits 8, 16, 32).
  RawPg(const std::string& conninfo, std::string schema, std::string idem_schema = {},
        const Ladder& shape = {})
      : conn_(connect(conninfo)), schema_(std::move(schema)), idem_schema_(std::move(idem_schema)) {
    exec(conn_.get(), "CREATE SCHEMA " + schema_);
    std::string columns = "key bytea PRIMARY KEY", names = "key", values = "$1";
    if (shape.wide_row) {
      columns += ", state int2 NOT NULL, expires_at timestamptz NOT NULL, fingerprint int8";
      names += ", state, expires_at, fingerprint";
      values += ", 0, statement_timestamp() + 86400000 * interval '1 millisecond', 42";
    }
    if (shape.sequence_token) {
      exec(conn_.get(), "CREATE SEQUENCE " + schema_ + ".tokens AS bigint");
      columns += ", token int8 NOT NULL";
      names += ", token";
      values += ", nextval('" + schema_ + ".tokens')";
    }
    exec(conn_.get(), "CREATE TABLE " + schema_ + ".raw(" + columns + ")");
    if (shape.expiry_index) exec(conn_.get(), "CREATE INDEX ON " + schema_ + ".raw(expires_at)");
    exec(conn_.get(),
         "CREATE TABLE " + schema_ + ".cards(payment_id bytea NOT NULL, number text NOT NULL)");
    insert_sql_ = "INSERT INTO " + schema_ + ".raw(" + names + ") VALUES(" + values +
                  ") ON CONFLICT DO NOTHING";
    if (shape.idem_returning) {
      insert_sql_ += " RETURNING " + std::string(shape.sequence_token ? "token" : "1") +
                     ", set_config('lock_timeout', '0', true), "
                     "set_config('statement_timeout', '0', true)";
    }
    if (shape.idem_begin) begin_ = "BEGIN ISOLATION LEVEL READ COMMITTED";
    if (shape.prepared_begin) {
      prepare("raw_begin", begin_, 0);
      prepared_begin_ = true;
    }
    if (shape.idem_session)
      exec(conn_.get(), "SET statement_timeout = 10000; SET lock_timeout = 200");
    card_sql_ = "INSERT INTO " + schema_ + ".cards(payment_id, number) VALUES($1, $2)";
    prepare("raw_insert", insert_sql_, 1);
    prepare("raw_card", card_sql_, 2);
    if (PQenterPipelineMode(conn_.get()) == 0) fail("PQenterPipelineMode");
  }
  RawPg(const RawPg&) = delete;
  RawPg& operator=(const RawPg&) = delete;
  ~RawPg() {
    try {
      PQexitPipelineMode(conn_.get());
      exec(conn_.get(), "DROP SCHEMA IF EXISTS " + schema_ + " CASCADE");
      if (!idem_schema_.empty()) {
        exec(conn_.get(), "DROP SCHEMA IF EXISTS " + idem_schema_ + " CASCADE");
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cleanup: %s\n", e.what());
    }
  }

  // Fills raw with n keys that are not the benchmark's ("old-<n>") and analyzes it: the
  // steady state of a table holding a retention window's worth of keys.
  void prefill(std::int64_t n) {
    if (n == 0) return;
    PQexitPipelineMode(conn_.get());
    exec(conn_.get(), "INSERT INTO " + schema_ +
                          ".raw SELECT ('old-' || g)::bytea FROM generate_series(1, " +
                          std::to_string(n) + ") g");
    exec(conn_.get(), "ANALYZE " + schema_ + ".raw");
    if (PQenterPipelineMode(conn_.get()) == 0) fail("PQenterPipelineMode");
  }

  // One transaction: BEGIN, per key the dedup insert (and the card insert), COMMIT; sent in
  // one pipeline, read after one sync (two with ladder.claim_round_trip).
  void transaction(const std::vector<std::string>& keys, bool card, const Ladder& ladder = {}) {
    if (prepared_begin_) {
      if (PQsendQueryPrepared(conn_.get(), "raw_begin", 0, nullptr, nullptr, nullptr, 0) == 0) {
        fail("raw_begin");
      }
      ++pending_;
    } else {
      text(begin_);
    }
    if (ladder.bookkeeping) text("SAVEPOINT c");
    for (const std::string& key : keys) insert(key);
    if (ladder.bookkeeping) text("RELEASE SAVEPOINT c");
    if (ladder.claim_round_trip) sync_and_read();
    if (ladder.bookkeeping) {
      text(
          "SELECT set_config('lock_timeout', '0', true), set_config('statement_timeout', '0', "
          "true)");
    }
    for (const std::string& key : keys) {
      if (!card) continue;
      if (ladder.bookkeeping) text("SAVEPOINT m");
      send_card(key, ladder.text_card);
      if (ladder.bookkeeping) text("RELEASE SAVEPOINT m");
    }
    text("COMMIT");
    sync_and_read();
  }

 private:
  [[noreturn]] void fail(const char* what) {
    throw std::runtime_error(std::string(what) + ": " + PQerrorMessage(conn_.get()));
  }

  void prepare(const char* name, const std::string& sql, int params) {
    const Oid types[] = {17, 25};  // bytea, text
    ResultPtr result(PQprepare(conn_.get(), name, sql.c_str(), params, types));
    if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) {
      throw std::runtime_error(sql + ": " + PQresultErrorMessage(result.get()));
    }
  }

  void text(const char* sql) {
    if (PQsendQueryParams(conn_.get(), sql, 0, nullptr, nullptr, nullptr, nullptr, 0) == 0) {
      fail(sql);
    }
    ++pending_;
  }

  void insert(const std::string& key) {
    const char* values[] = {key.data()};
    const int lengths[] = {static_cast<int>(key.size())};
    const int formats[] = {1};
    if (PQsendQueryPrepared(conn_.get(), "raw_insert", 1, values, lengths, formats, 0) == 0) {
      fail("raw_insert");
    }
    ++pending_;
  }

  void send_card(const std::string& key, bool as_text) {
    const char* values[] = {key.data(), kCardNumber};
    const int lengths[] = {static_cast<int>(key.size()), 0};
    const int formats[] = {1, 0};
    int sent = 0;
    if (as_text) {
      const Oid types[] = {17, 0};  // what PostgresTx binds: bytea, and text left to the server
      sent =
          PQsendQueryParams(conn_.get(), card_sql_.c_str(), 2, types, values, lengths, formats, 0);
    } else {
      sent = PQsendQueryPrepared(conn_.get(), "raw_card", 2, values, lengths, formats, 0);
    }
    if (sent == 0) fail("raw_card");
    ++pending_;
  }

  void sync_and_read() {
    if (PQpipelineSync(conn_.get()) == 0) fail("PQpipelineSync");
    for (; pending_ > 0; --pending_) {
      ResultPtr result(PQgetResult(conn_.get()));
      const ExecStatusType status = PQresultStatus(result.get());
      if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
        throw std::runtime_error(std::string("raw pipeline: ") + PQresStatus(status) + " " +
                                 PQresultErrorMessage(result.get()));
      }
      if (PQgetResult(conn_.get()) != nullptr) throw std::runtime_error("two results");
    }
    ResultPtr sync(PQgetResult(conn_.get()));
    if (PQresultStatus(sync.get()) != PGRES_PIPELINE_SYNC) throw std::runtime_error("no sync");
  }

  ConnPtr conn_;
  std::string schema_;
  std::string idem_schema_;
  std::string insert_sql_;
  std::string card_sql_;
  const char* begin_ = "BEGIN";
  bool prepared_begin_ = false;
  int pending_ = 0;
};

// One run's two sides: the raw connection and schema, the store and its own schema with a
// cards table (the same layout as the raw side's). prefill: keys already in both dedup tables.
struct Sides {
  int run = next_run();
  std::string idem_schema = "bench_idem_" + std::to_string(run);
  RawPg raw{conninfo(), "bench_raw_" + std::to_string(run), idem_schema};
  idem::PostgresStore store;
  std::string card_sql = "INSERT INTO " + idem_schema + ".cards(payment_id, number) VALUES($1, $2)";

  // speculative: PostgresOptions::speculative_claims (lone messages in one round trip).
  explicit Sides(std::int64_t prefill, bool speculative = false)
      : store({.conninfo = conninfo(), .schema = idem_schema, .speculative_claims = speculative}) {
    store.transaction([&](idem::PostgresTx& tx) {
      tx.exec("CREATE TABLE " + idem_schema +
              ".cards(payment_id bytea NOT NULL, number text NOT NULL)");
      if (prefill == 0) return;
      // Done records a day from expiry, as the store writes them (token from its sequence).
      const std::string& schema = idem_schema;
      tx.exec("INSERT INTO " + schema + ".idem_keys(key, state, token, expires_at) " +
              "SELECT ('old-' || g)::bytea, 1, nextval('" + schema + ".idem_tokens'), " +
              "statement_timestamp() + interval '1 day' FROM generate_series(1, " +
              std::to_string(prefill) + ") g");
      tx.exec("ANALYZE " + idem_schema + ".idem_keys");
    });
    raw.prefill(prefill);
  }
};

void label_prefill(benchmark::State& state, std::int64_t prefill) {
  state.SetLabel(prefill == 0 ? "fresh tables" : std::to_string(prefill) + " keys already stored");
}

// Runs raw() and idem() in alternating order each iteration, timing each; reports their rates
// in messages per second and the ratio idem / raw.
template <class Raw, class Idem>
void paired(benchmark::State& state, int messages_per_op, Raw&& raw, Idem&& idem) {
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
}

// Fills keys with fresh ones (and batch with messages on them).
void fill(std::vector<std::string>& keys, std::uint64_t& next) {
  for (std::string& key : keys) key = key_of(next++);
}
void fill(std::vector<std::string>& keys, std::vector<idem::Message>& batch, std::uint64_t& next) {
  fill(keys, next);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    batch[i] = idem::Message{.key = keys[i], .payload = "{\"amount\":10}"};
  }
}

template <class Consumer>
void consume_batch_checked(Consumer& consumer, const std::vector<idem::Message>& batch) {
  const std::vector<idem::Result> results = consumer.consume_batch(batch);
  for (const idem::Result& result : results) {
    if (result.outcome != idem::Outcome::processed) throw std::runtime_error("not processed");
  }
}

template <class Consumer>
void consume_checked(Consumer& consumer, const std::string& key) {
  if (consumer.consume({.key = key, .payload = "{\"amount\":10}"}).outcome !=
      idem::Outcome::processed) {
    throw std::runtime_error("not processed");
  }
}

template <class Body>
void guarded(benchmark::State& state, Body&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_PairBatchCard(benchmark::State& state) {
  guarded(state, [&] {
    Sides sides(state.range(0));
    idem::IdempotentConsumer consumer(
        sides.store, [&](const idem::Message& m, idem::PostgresTx& tx) {
          tx.exec(sides.card_sql, idem::PostgresBytes{m.key}, kCardNumber);
        });
    std::uint64_t next_raw = 0, next_idem = 0;
    std::vector<std::string> raw_keys(kBatch), keys(kBatch);
    std::vector<idem::Message> batch(kBatch);
    paired(
        state, kBatch,
        [&] {
          fill(raw_keys, next_raw);
          sides.raw.transaction(raw_keys, /*card=*/true);
        },
        [&] {
          fill(keys, batch, next_idem);
          consume_batch_checked(consumer, batch);
        });
    label_prefill(state, state.range(0));
  });
}

void BM_PairSingleCard(benchmark::State& state) {
  guarded(state, [&] {
    Sides sides(state.range(0), state.range(1) != 0);
    idem::IdempotentConsumer consumer(
        sides.store, [&](const idem::Message& m, idem::PostgresTx& tx) {
          tx.exec(sides.card_sql, idem::PostgresBytes{m.key}, kCardNumber);
        });
    std::uint64_t next_raw = 0, next_idem = 0;
    std::vector<std::string> raw_key(1);
    paired(
        state, 1,
        [&] {
          fill(raw_key, next_raw);
          sides.raw.transaction(raw_key, /*card=*/true);
        },
        [&] { consume_checked(consumer, key_of(next_idem++)); });
    label_prefill(state, state.range(0));
  });
}

void BM_PairBatch(benchmark::State& state) {
  guarded(state, [&] {
    Sides sides(state.range(0));
    idem::IdempotentConsumer consumer(sides.store, [](const idem::Message&, idem::PostgresTx&) {});
    std::uint64_t next_raw = 0, next_idem = 0;
    std::vector<std::string> raw_keys(kBatch), keys(kBatch);
    std::vector<idem::Message> batch(kBatch);
    paired(
        state, kBatch,
        [&] {
          fill(raw_keys, next_raw);
          sides.raw.transaction(raw_keys, /*card=*/false);
        },
        [&] {
          fill(keys, batch, next_idem);
          consume_batch_checked(consumer, batch);
        });
    label_prefill(state, state.range(0));
  });
}

void BM_PairSingle(benchmark::State& state) {
  guarded(state, [&] {
    Sides sides(state.range(0), state.range(1) != 0);
    idem::IdempotentConsumer consumer(sides.store, [](const idem::Message&, idem::PostgresTx&) {});
    std::uint64_t next_raw = 0, next_idem = 0;
    std::vector<std::string> raw_key(1);
    paired(
        state, 1,
        [&] {
          fill(raw_key, next_raw);
          sides.raw.transaction(raw_key, /*card=*/false);
        },
        [&] { consume_checked(consumer, key_of(next_idem++)); });
    label_prefill(state, state.range(0));
  });
}

// Where idem's wall time goes, timed from the handler (see the file comment). Args: messages
// per transaction, keys already stored.
void BM_PhasesCard(benchmark::State& state) {
  guarded(state, [&] {
    Sides sides(state.range(1));
    Clock::time_point first{}, last{};
    bool seen = false;
    idem::IdempotentConsumer consumer(
        sides.store, [&](const idem::Message& m, idem::PostgresTx& tx) {
          if (!seen) first = Clock::now();
          seen = true;
          tx.exec(sides.card_sql, idem::PostgresBytes{m.key}, kCardNumber);
          last = Clock::now();
        });
    const auto size = static_cast<std::size_t>(state.range(0));
    std::uint64_t next = 0;
    std::vector<std::string> keys(size);
    std::vector<idem::Message> batch(size);
    Clock::duration claim{}, handlers{}, commit{};
    for (auto _ : state) {
      state.PauseTiming();
      fill(keys, batch, next);
      seen = false;
      state.ResumeTiming();
      const auto start = Clock::now();
      consume_batch_checked(consumer, batch);
      const auto end = Clock::now();
      claim += first - start;
      handlers += last - first;
      commit += end - last;
    }
    const double n = static_cast<double>(state.iterations());
    auto us = [&](Clock::duration d) { return std::chrono::duration<double, std::micro>(d) / n; };
    state.counters["claim_us"] = us(claim).count();
    state.counters["handlers_us"] = us(handlers).count();
    state.counters["commit_us"] = us(commit).count();
    state.SetItemsProcessed(state.iterations() * state.range(0));
    label_prefill(state, state.range(1));
  });
}

// A raw transaction with cards against itself with some of idem's extras added (Args: the
// Ladder bits, messages per transaction). Here raw/s is the plain transaction, idem/s the one
// with the extras, and ratio = with / without: the price of those extras alone.
void BM_RawLadderCard(benchmark::State& state) {
  guarded(state, [&] {
    const int run = next_run();
    RawPg base(conninfo(), "bench_raw_" + std::to_string(run));
    const Ladder ladder = Ladder::of(state.range(0));
    RawPg extra(conninfo(), "bench_rawx_" + std::to_string(run), {}, ladder);
    const auto size = static_cast<std::size_t>(state.range(1));
    std::uint64_t next_base = 0, next_extra = 0;
    std::vector<std::string> base_keys(size), extra_keys(size);
    paired(
        state, static_cast<int>(size),
        [&] {
          fill(base_keys, next_base);
          base.transaction(base_keys, /*card=*/true);
        },
        [&] {
          fill(extra_keys, next_extra);
          extra.transaction(extra_keys, /*card=*/true, ladder);
        });
    state.SetLabel(Ladder::label(state.range(0)));
  });
}

// Wall time: commits wait for the WAL flush and round trips for the server, not for our CPU.
// Arg: keys already in both dedup tables (0: fresh tables, as a new service starts).
BENCHMARK(BM_PairBatchCard)->Arg(0)->Arg(100'000)->UseRealTime()->MinTime(3.0);
BENCHMARK(BM_PairSingleCard)
    ->ArgsProduct({{0, 100'000}, {0, 1}})
    ->ArgNames({"stored", "speculative"})
    ->UseRealTime()
    ->MinTime(3.0);
BENCHMARK(BM_PairBatch)->Arg(0)->Arg(100'000)->UseRealTime()->MinTime(3.0);
BENCHMARK(BM_PairSingle)
    ->ArgsProduct({{0, 100'000}, {0, 1}})
    ->ArgNames({"stored", "speculative"})
    ->UseRealTime()
    ->MinTime(3.0);
BENCHMARK(BM_PhasesCard)
    ->ArgsProduct({{1, kBatch}, {0, 100'000}})
    ->UseRealTime()
    ->MinTime(3.0)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_RawLadderCard)->ArgsProduct({{1, 2, 4, 7}, {1, kBatch}})->UseRealTime()->MinTime(3.0);
// One message per transaction: the dedup table shaped like idem's record (8, 24, 56), idem's
// BEGIN as text and prepared (64, 192), its claim's RETURNING (256) and session timeouts
// (512), and all of them together (504, 1016) -- what a speculative claim sends.
BENCHMARK(BM_RawLadderCard)
    ->ArgsProduct({{8, 24, 56, 64, 192, 256, 512, 504, 1016}, {1}})
    ->UseRealTime()
    ->MinTime(3.0);

// IDEM_BENCH_PG_STATS=1: load pg_stat_statements (a restart) before the benchmarks.
bool stats_wanted() {
  const char* value = std::getenv("IDEM_BENCH_PG_STATS");
  return value != nullptr && std::string(value) == "1";
}

void enable_stats(PostgresServer& server) {
  // track_utility is on by default: BEGIN, SAVEPOINT, RELEASE and COMMIT are counted too.
  server.admin({"ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"});
  server.stop();
  server.start();
  server.admin(
      {"ALTER SYSTEM SET pg_stat_statements.track_planning = on", "SELECT pg_reload_conf()"});
  server.admin({"CREATE EXTENSION pg_stat_statements"}, PostgresServer::kDatabase);
}

// Every statement the benchmarks ran, with its calls and server time (schema names folded).
void print_stats(PostgresServer& server) {
  ConnPtr conn = connect(server.admin_conninfo());
  ResultPtr result(
      PQexec(conn.get(),
             "SELECT sum(calls)::int8, round(sum(total_exec_time)::numeric, 1), "
             "round((sum(total_exec_time) / sum(calls))::numeric * 1000, 2), "
             "round((sum(total_plan_time) / sum(calls))::numeric * 1000, 2), sum(plans)::int8, "
             "left(regexp_replace(regexp_replace(query, 'bench_(raw|rawx|idem)_[0-9]+', "
             "'bench_\\1_N', 'g'), '\\s+', ' ', 'g'), 90) AS q "
             "FROM pg_stat_statements WHERE query !~ "
             "'pg_stat_statements|CREATE|DROP|ANALYZE|pg_reload_conf' "
             "GROUP BY q ORDER BY 2 DESC LIMIT 40"));
  if (PQresultStatus(result.get()) != PGRES_TUPLES_OK) {
    std::fprintf(stderr, "pg_stat_statements: %s\n", PQresultErrorMessage(result.get()));
    return;
  }
  std::printf("\n%9s %10s %9s %9s %9s  statement (pg_stat_statements, both sides, all runs)\n",
              "calls", "exec ms", "exec us", "plan us", "plans");
  for (int row = 0; row < PQntuples(result.get()); ++row) {
    std::printf("%9s %10s %9s %9s %9s  %s\n", PQgetvalue(result.get(), row, 0),
                PQgetvalue(result.get(), row, 1), PQgetvalue(result.get(), row, 2),
                PQgetvalue(result.get(), row, 3), PQgetvalue(result.get(), row, 4),
                PQgetvalue(result.get(), row, 5));
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  try {
    // On the main thread: the postmaster dies with the thread that started it.
    PostgresServer server;
    g_server = &server;
    if (stats_wanted()) enable_stats(server);
    benchmark::RunSpecifiedBenchmarks();
    if (stats_wanted()) print_stats(server);
    g_server = nullptr;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_postgres_store: %s\n", e.what());
    return 1;
  }
  benchmark::Shutdown();
  return 0;
}
