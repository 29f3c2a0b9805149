// Tests of idem::SqliteStore: the shared store and inbox conformance suites, purging, late
// completions, deadlines, and bad input (options, files, locks). The transactional inbox is in
// test_sqlite_inbox.cpp, real processes in test_sqlite_processes.cpp.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/sqlite.hpp"
#include "idem/testing/inbox_conformance.hpp"
#include "idem/testing/store_conformance.hpp"
#include "support/child_process.hpp"
#include "support/sanitized.hpp"
#include "support/sqlite_raw_db.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace std::chrono_literals;
using idem::ClaimRequest;
using idem::ClaimStatus;
using idem::IdempotentConsumer;
using idem::Message;
using idem::Outcome;
using idem::Result;
using idem::SqliteBlob;
using idem::SqliteOptions;
using idem::SqliteStore;
using idem::SqliteTx;
using idem::test_support::wait_exit_code;

using idem::test_support::sqlite::RawDb;
using idem::test_support::sqlite::TempDir;
using idem::testing::kSanitized;

// --- Conformance -----------------------------------------------------------------------------

struct SqliteStoreFactory {
  TempDir dir;
  idem::ManualClock clock;
  std::unique_ptr<idem::DedupStore> make() {
    return std::make_unique<SqliteStore>(
        dir.file("conformance.db"),
        SqliteOptions{.synchronous = idem::SqliteSync::normal, .clock = &clock});
  }
  void advance(std::chrono::milliseconds ms) { clock.advance(ms.count()); }
  // Every consume is one or two commits: fewer keys than the in-memory stores race on.
  static constexpr std::size_t race_keys = kSanitized ? 1'000 : 5'000;
};

struct SqliteInboxFactory {
  using Store = SqliteStore;
  TempDir dir;
  idem::ManualClock clock;
  std::unique_ptr<Store> make() {
    auto store = std::make_unique<SqliteStore>(
        dir.file("inbox-conformance.db"),
        SqliteOptions{.synchronous = idem::SqliteSync::normal, .clock = &clock});
    store->transaction([](SqliteTx& tx) { tx.exec("CREATE TABLE effects(key BLOB NOT NULL)"); });
    return store;
  }
  void advance(std::chrono::milliseconds ms) { clock.advance(ms.count()); }
  static void write_effect(SqliteTx& tx, std::string_view key) {
    tx.exec("INSERT INTO effects(key) VALUES(?1)", SqliteBlob{key});
  }
  std::int64_t effects(Store& store, std::string_view key) {
    std::int64_t n = 0;
    store.transaction([&](SqliteTx& tx) {
      n = tx.query_int64("SELECT count(*) FROM effects WHERE key = ?1", SqliteBlob{key}).value();
    });
    return n;
  }
};

}  // namespace

namespace idem::testing {
INSTANTIATE_TYPED_TEST_SUITE_P(Sqlite, StoreConformance, SqliteStoreFactory);
INSTANTIATE_TYPED_TEST_SUITE_P(Sqlite, InboxConformance, SqliteInboxFactory);
}  // namespace idem::testing

namespace {

// --- Purging -----------------------------------------------------------------------------------

TEST(SqlitePurge, ExpiredRecordsArePurgedInBoundedStepsAndTokensKeepRising) {
  TempDir dir;
  idem::ManualClock clock;
  // Every write transaction sweeps 4 + 2 * inserted records.
  SqliteStore store(dir.file("purge.db"), {.synchronous = idem::SqliteSync::normal,
                                           .clock = &clock,
                                           .purge_interval = 1,
                                           .purge_extra = 4});
  auto records = [&] {
    return RawDb(dir.file("purge.db")).scalar("SELECT count(*) FROM idem_keys");
  };
  std::uint64_t first_token = 0;
  for (int i = 0; i < 300; ++i) {
    const std::string key = "old-" + std::to_string(i);
    idem::Claim c = store.claim({.key = key, .retention = 1s, .mark_done = true});
    ASSERT_EQ(c.status, ClaimStatus::acquired);
    if (i == 0) first_token = c.token;
  }
  EXPECT_EQ(records(), 300);  // nothing expired yet: the sweep deleted nothing
  clock.advance(2000);
  for (int i = 0; i < 8; ++i) store.claim({.key = "new-" + std::to_string(i), .mark_done = true});
  // 8 steps of 6 records: bounded, and most of what they saw had expired.
  const std::int64_t left = records();
  EXPECT_GE(left, 308 - 8 * 6);
  EXPECT_LE(left, 308 - 20);
  EXPECT_EQ(store.purge_expired(), static_cast<std::size_t>(left - 8));
  EXPECT_EQ(records(), 8);
  EXPECT_EQ(store.purge_expired(), 0u);
  // A purged key comes back with a larger token than it ever had.
  idem::Claim again = store.claim({.key = "old-0"});
  ASSERT_EQ(again.status, ClaimStatus::acquired);
  EXPECT_GT(again.token, first_token);
  // In steady state the sweep keeps pace: the table stays near the live records.
  for (int round = 0; round < 20; ++round) {
    for (int i = 0; i < 50; ++i) {
      store.claim({.key = "k-" + std::to_string(round) + "-" + std::to_string(i),
                   .retention = 1s,
                   .mark_done = true});
    }
    clock.advance(250);
  }
  EXPECT_LE(records(), 4 * 50 * 2);
}

// --- Completions and deadlines --------------------------------------------------------------

TEST(SqliteComplete, ACompletionWhoseRecordWasPurgedStillRecordsTheKeyAsDone) {
  TempDir dir;
  idem::ManualClock clock;
  SqliteStore store(dir.file("complete.db"), {.clock = &clock, .purge_interval = 0});
  const idem::Claim one = store.claim({.key = "k", .lease = 1000ms});
  const idem::Claim two = store.claim({.key = "b", .lease = 1000ms});
  ASSERT_EQ(one.status, ClaimStatus::acquired);
  ASSERT_EQ(two.status, ClaimStatus::acquired);
  clock.advance(2000);  // the leases ran out and nobody took over; the purge drops both
  EXPECT_EQ(store.purge_expired(), 2u);
  EXPECT_FALSE(store.inspect("k").has_value());
  EXPECT_TRUE(store.complete({.key = "k", .token = one.token, .response = "r"}));
  EXPECT_EQ(store.complete_batch(std::vector<idem::Completion>{{.key = "b", .token = two.token}}),
            std::vector<bool>{true});
  const idem::Claim again = store.claim({.key = "k"});
  EXPECT_EQ(again.status, ClaimStatus::done);
  EXPECT_EQ(again.response, "r");
  EXPECT_EQ(store.claim({.key = "b"}).status, ClaimStatus::done);
  // A record of the key with another token is never overwritten, and a token that was never
  // handed out does not create one.
  const idem::Claim other = store.claim({.key = "other"});
  ASSERT_EQ(other.status, ClaimStatus::acquired);
  EXPECT_FALSE(store.complete({.key = "other", .token = other.token + 1}));
  EXPECT_FALSE(store.complete({.key = "never", .token = other.token + 1000}));
  EXPECT_FALSE(store.inspect("never").has_value());
  EXPECT_EQ(store.claim({.key = "other"}).status, ClaimStatus::in_progress);
}

TEST(SqliteDurations, DeadlinesSaturateInsteadOfWrapping) {
  // The core caps leases and retention (at 100 years); a clock near the end of time must still
  // not make now + duration overflow into the past.
  TempDir dir;
  idem::ManualClock clock(INT64_MAX - 10'000);
  SqliteStore store(dir.file("forever.db"), {.clock = &clock});
  constexpr auto long_time = std::chrono::hours(24 * 365 * 50);
  ASSERT_EQ(store.claim({.key = "held", .lease = long_time}).status, ClaimStatus::acquired);
  EXPECT_EQ(store.claim({.key = "held"}).status, ClaimStatus::in_progress);
  const idem::Claim c = store.claim({.key = "done"});
  ASSERT_TRUE(store.complete({.key = "done", .token = c.token, .retention = long_time}));
  EXPECT_EQ(store.claim({.key = "marked", .retention = long_time, .mark_done = true}).status,
            ClaimStatus::acquired);
  clock.advance(5'000);
  EXPECT_EQ(store.claim({.key = "held"}).status, ClaimStatus::in_progress);
  EXPECT_EQ(store.claim({.key = "done"}).status, ClaimStatus::done);
  EXPECT_EQ(store.claim({.key = "marked"}).status, ClaimStatus::done);
  const std::optional<idem::RecordInfo> info = store.inspect("held");
  ASSERT_TRUE(info.has_value());
  EXPECT_GT(info->expires_in_ms, 0);
  EXPECT_EQ(store.purge_expired(), 0u);
}

// --- Bad input -------------------------------------------------------------------------------

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const idem::Error& e) {
    return e.what();
  }
  return "(no exception)";
}

TEST(SqliteBadInput, OptionsAreChecked) {
  TempDir dir;
  EXPECT_THROW(SqliteStore("", {}), idem::ConfigError);
  EXPECT_THROW(SqliteStore(dir.file("x.db"), {.busy_timeout = -1ms}), idem::ConfigError);
}

TEST(SqliteBadInput, InMemoryDatabaseWorks) {
  // The store's own error text recommends ":memory:" for a private database: it must open.
  SqliteStore store(":memory:");
  IdempotentConsumer consumer(store, [](const Message&, SqliteTx& tx) {
    tx.exec("CREATE TABLE IF NOT EXISTS seen(key BLOB)");
  });
  EXPECT_EQ(consumer.consume({.key = "k", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "k", .payload = "p"}).outcome, Outcome::duplicate);
}

TEST(SqliteBadInput, ForeignOrOlderTableLayoutIsAConfigError) {
  TempDir dir;
  const std::string path = dir.file("old.db");
  {
    sqlite3* raw = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &raw), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(raw,
                           "CREATE TABLE idem_keys(key BLOB PRIMARY KEY, state INTEGER, "
                           "token INTEGER, expires_at INTEGER)",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(raw);
  }
  const std::string message = error_of([&] { SqliteStore store(path); });
  EXPECT_NE(message.find("idem_keys table has the columns (key, state, token, expires_at)"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("new file"), std::string::npos) << message;
  EXPECT_THROW(SqliteStore{path}, idem::ConfigError);
}

TEST(SqliteBadInput, UnwritablePath) {
  const std::string message =
      error_of([] { SqliteStore store("/nonexistent-idem-dir/sub/dedup.db"); });
  EXPECT_NE(message.find("/nonexistent-idem-dir/sub/dedup.db"), std::string::npos) << message;
  EXPECT_NE(message.find("SQLITE_CANTOPEN"), std::string::npos) << message;
  EXPECT_NE(message.find("directory exists"), std::string::npos) << message;
  EXPECT_THROW(SqliteStore("/nonexistent-idem-dir/sub/dedup.db"), idem::StoreUnavailable);
}

TEST(SqliteBadInput, FileThatIsNotADatabase) {
  TempDir dir;
  const std::string path = dir.file("notes.txt");
  std::ofstream(path) << std::string(8192, 'x');
  const std::string message = error_of([&] { SqliteStore store(path); });
  EXPECT_NE(message.find("not a database"), std::string::npos) << message;
  EXPECT_NE(message.find("SQLITE_NOTADB"), std::string::npos) << message;
  EXPECT_THROW(SqliteStore{path}, idem::StoreUnavailable);
}

TEST(SqliteBadInput, ReadOnlyFile) {
  TempDir dir;
  const std::string path = dir.file("ro.db");
  { SqliteStore create(path); }
  ASSERT_EQ(::chmod(path.c_str(), 0444), 0);
  ASSERT_EQ(::chmod(dir.path().c_str(), 0755), 0);
  std::string message;
  if (::geteuid() != 0) {
    message = error_of([&] { SqliteStore store(path); });
  } else {
    // root ignores file modes: open it from a child that dropped to "nobody".
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fds[0]);
      std::string what = "setuid failed";
      if (::setgid(65534) == 0 && ::setuid(65534) == 0) {
        what = error_of([&] { SqliteStore store(path); });
      }
      (void)!::write(fds[1], what.data(), what.size());
      ::_exit(0);
    }
    ::close(fds[1]);
    char buffer[4096];
    ssize_t got = 0;
    while ((got = ::read(fds[0], buffer, sizeof buffer)) > 0) message.append(buffer, got);
    ::close(fds[0]);
    EXPECT_EQ(wait_exit_code(pid), 0);
  }
  EXPECT_NE(message.find("read-only"), std::string::npos) << message;
  EXPECT_NE(message.find("SQLITE_READONLY"), std::string::npos) << message;
}

// A read-only store (what idemctl inspect/stats open) reads while another connection holds the
// write lock, refuses writes clearly, and refuses a file without idem's tables.
TEST(SqliteReadOnly, ReadsDuringAWriteTransactionAndRefusesWrites) {
  TempDir dir;
  const std::string path = dir.file("ro-store.db");
  SqliteStore writer(path);
  const idem::Claim c = writer.claim({.key = "k", .fingerprint = {}, .lease = 30s});
  ASSERT_TRUE(writer.complete({.key = "k", .token = c.token, .response = "r"}));
  writer.transaction([&](SqliteTx&) {
    SqliteStore reader(path, {.busy_timeout = 0ms, .read_only = true});
    const std::optional<idem::RecordInfo> info = reader.inspect("k");
    ASSERT_TRUE(info.has_value());
    EXPECT_EQ(info->response, "r");
    EXPECT_EQ(reader.stats().done, 1u);
    const std::string what = error_of([&] { reader.forget("k"); });
    EXPECT_NE(what.find("SQLITE_READONLY"), std::string::npos) << what;
  });
  const std::string empty = dir.file("empty.db");
  std::ofstream(empty).flush();  // an empty file is an empty SQLite database
  const std::string what = error_of([&] { SqliteStore(empty, {.read_only = true}); });
  EXPECT_NE(what.find("does not hold this idem's tables"), std::string::npos) << what;
}

TEST(SqliteBadInput, DatabaseLockedPastBusyTimeout) {
  TempDir dir;
  const std::string path = dir.file("locked.db");
  SqliteStore store(path, {.busy_timeout = 200ms, .synchronous = idem::SqliteSync::normal});
  store.transaction([](SqliteTx& tx) { tx.exec("CREATE TABLE cards(key BLOB)"); });
  int runs = 0;
  IdempotentConsumer inbox(store, [&](const Message& m, SqliteTx& tx) {
    ++runs;
    tx.exec("INSERT INTO cards(key) VALUES(?1)", SqliteBlob{m.key});
  });
  IdempotentConsumer claims(store, [&](const Message&) { ++runs; });

  RawDb other(path);
  other.exec("BEGIN IMMEDIATE");
  const auto start = std::chrono::steady_clock::now();
  std::string message;
  try {
    inbox.consume({.key = "k", .payload = "p"});
    ADD_FAILURE() << "consumed while another connection held the lock";
  } catch (const idem::StoreUnavailable& e) {
    message = e.what();
  }
  EXPECT_GE(std::chrono::steady_clock::now() - start, 190ms);
  EXPECT_NE(message.find("SQLITE_BUSY"), std::string::npos) << message;
  EXPECT_NE(message.find("busy_timeout"), std::string::npos) << message;
  EXPECT_NE(message.find("do not ack"), std::string::npos) << message;
  EXPECT_THROW(claims.consume({.key = "c", .payload = "p"}), idem::StoreUnavailable);
  std::vector<Message> batch{{.key = "b1"}, {.key = "b2"}};
  EXPECT_THROW(inbox.consume_batch(batch), idem::StoreUnavailable);
  other.exec("COMMIT");

  EXPECT_EQ(runs, 0);
  EXPECT_EQ(RawDb(path).scalar("SELECT count(*) FROM idem_keys"), 0);
  EXPECT_EQ(inbox.consume({.key = "k", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(claims.consume({.key = "c", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(runs, 2);
}

}  // namespace
