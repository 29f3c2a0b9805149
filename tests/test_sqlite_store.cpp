// Tests of idem::SqliteStore: the shared store conformance suite, then what only SQLite has:
// the transactional inbox, batches with savepoints, offsets, purging, bad files, and real
// processes (SIGKILLed consumers, two processes racing on one file).
//
// Child processes are this test binary re-executed with IDEM_SQLITE_CHILD set: the static
// initializer below runs the child's work and _exits before GoogleTest starts.

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
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/sqlite.hpp"
#include "idem/testing/inbox_conformance.hpp"
#include "idem/testing/store_conformance.hpp"
#include "support/sanitized.hpp"
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
using idem::SqliteStore;
using idem::SqliteStoreOptions;
using idem::SqliteTx;

using idem::testing::kSanitized;

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

std::int64_t index_of(std::string_view key) {
  return std::stoll(std::string(key.substr(key.find('-') + 1)));
}

// --- Child processes -------------------------------------------------------------------------

std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value ? value : fallback;
}

void signal_fd(int fd) {
  if (fd >= 0) {
    const char byte = 'r';
    (void)!::write(fd, &byte, 1);
    ::close(fd);
  }
}

// Consumes msg-0 .. msg-(n-1) through the transactional inbox, one business row each, resuming
// a little before the committed offset (a broker redelivers its uncommitted tail). With
// IDEM_QUOTA set it stops after that many deliveries and waits to be killed, so a kill round
// cannot finish the input early.
int crash_child() {
  const std::string path = env_or("IDEM_DB", "");
  const std::int64_t n = std::stoll(env_or("IDEM_N", "0"));
  const bool batched = env_or("IDEM_BATCHED", "0") == "1";
  const std::size_t quota = std::stoul(env_or("IDEM_QUOTA", "0"));
  SqliteStore store(path, {.synchronous = idem::SqliteSync::normal});
  IdempotentConsumer consumer(store, [&](const Message& m, SqliteTx& tx) {
    const std::int64_t i = index_of(m.key);
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", i, SqliteBlob{m.key});
    if (!batched) tx.save_offset("crash", 0, i + 1);
  });
  const std::int64_t committed = store.committed_offset("crash", 0).value_or(0);
  const std::int64_t start = std::max<std::int64_t>(0, committed - 25);
  signal_fd(std::stoi(env_or("IDEM_READY_FD", "-1")));

  std::vector<std::string> keys;
  for (std::int64_t i = start; i < n; ++i) keys.push_back("msg-" + std::to_string(i));
  std::mt19937 rng(static_cast<unsigned>(::getpid()));
  if (quota > 0 && keys.size() > quota) keys.resize(quota);
  std::size_t next = 0;
  while (next < keys.size()) {
    if (!batched) {
      if (!consumer.consume({.key = keys[next], .payload = "p"}).should_ack()) return 3;
      ++next;
      continue;
    }
    const std::size_t size = std::min<std::size_t>(keys.size() - next, 1 + rng() % 64);
    std::vector<Message> batch;
    for (std::size_t k = next; k < next + size; ++k)
      batch.push_back({.key = keys[k], .payload = "p"});
    const std::vector<idem::PartitionOffset> offsets{
        {.topic = "crash", .partition = 0, .next_offset = start + std::int64_t(next + size)}};
    for (const Result& r : idem::consume_batch_with_offsets(consumer, batch, offsets)) {
      if (!r.should_ack()) return 4;
    }
    next += size;
  }
  if (quota > 0) {
    for (;;) ::pause();  // until the parent's SIGKILL
  }
  return 0;
}

// Two stores (connections) of one file, four threads, racing on the same keys through the
// transactional inbox and through claim/complete. Writes the claim path's runs to IDEM_OUT.
int race_child() {
  const std::string path = env_or("IDEM_DB", "");
  const std::size_t keys = std::stoul(env_or("IDEM_N", "0"));
  const SqliteStoreOptions options{.busy_timeout = 60s, .synchronous = idem::SqliteSync::normal};
  SqliteStore a(path, options), b(path, options);
  std::mutex mutex;
  std::vector<std::int64_t> claimed_runs;
  auto tx_handler = [](const Message& m, SqliteTx& tx) {
    tx.exec("INSERT INTO runs(msg, pid) VALUES(?1, ?2)", index_of(m.key), ::getpid());
  };
  auto claim_handler = [&](const Message& m) {
    std::lock_guard lock(mutex);
    claimed_runs.push_back(index_of(m.key));
  };
  const idem::Options claim_options{.lease = 60s};
  IdempotentConsumer tx_a(a, tx_handler), tx_b(b, tx_handler);
  IdempotentConsumer claim_a(a, claim_handler, claim_options),
      claim_b(b, claim_handler, claim_options);

  signal_fd(std::stoi(env_or("IDEM_READY_FD", "-1")));
  char go = 0;
  if (::read(std::stoi(env_or("IDEM_GO_FD", "-1")), &go, 1) != 1) return 5;

  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      auto& tx_consumer = t < 2 ? tx_a : tx_b;
      auto& claim_consumer = t < 2 ? claim_a : claim_b;
      for (std::size_t n = 0; n < keys; ++n) {
        const std::size_t i = (n + t * keys / 4) % keys;
        const std::string tx_key = "tx-" + std::to_string(i);
        const std::string claim_key = "cl-" + std::to_string(i);
        if (!tx_consumer.consume({.key = tx_key, .payload = "p"}).should_ack()) ++errors;
        for (;;) {
          const Outcome outcome =
              claim_consumer.consume({.key = claim_key, .payload = "p"}).outcome;
          if (idem::should_ack(outcome)) break;
          if (outcome != Outcome::in_progress) {
            ++errors;
            break;
          }
          std::this_thread::sleep_for(100us);  // another process holds it: redeliver later
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::ofstream out(env_or("IDEM_OUT", "/dev/null"));
  for (std::int64_t i : claimed_runs) out << i << '\n';
  return errors == 0 && out ? 0 : 6;
}

const bool kIsChild = [] {
  const char* mode = std::getenv("IDEM_SQLITE_CHILD");
  if (mode == nullptr) return false;
  int code = 1;
  try {
    code = std::string(mode) == "crash" ? crash_child() : race_child();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "child %s: %s\n", mode, e.what());
    code = 2;
  }
  std::fflush(nullptr);
  ::_exit(code);
}();

// Re-executes this binary as a child with the given environment. The environment is built
// before fork(): only async-signal-safe calls happen in the child before exec.
pid_t spawn_child(const std::map<std::string, std::string>& env) {
  std::vector<std::string> entries;
  for (char** e = environ; *e != nullptr; ++e) entries.emplace_back(*e);
  for (const auto& [name, value] : env) entries.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (std::string& entry : entries) envp.push_back(entry.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execve(exe, argv, envp.data());
    ::_exit(127);
  }
  return pid;
}

int wait_exit_code(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// --- Conformance -----------------------------------------------------------------------------

struct SqliteStoreFactory {
  TempDir dir;
  idem::ManualClock clock;
  std::unique_ptr<idem::DedupStore> make() {
    return std::make_unique<SqliteStore>(
        dir.file("conformance.db"),
        SqliteStoreOptions{.synchronous = idem::SqliteSync::normal, .clock = &clock});
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
        SqliteStoreOptions{.synchronous = idem::SqliteSync::normal, .clock = &clock});
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

// --- Transactional inbox ---------------------------------------------------------------------

class SqliteInbox : public ::testing::Test {
 protected:
  SqliteInbox() : store_(dir_.file("inbox.db"), options()) {
    store_.transaction(
        [](SqliteTx& tx) { tx.exec("CREATE TABLE cards(msg TEXT NOT NULL, key BLOB NOT NULL)"); });
  }
  SqliteStoreOptions options() {
    return {.synchronous = idem::SqliteSync::normal, .clock = &clock_};
  }
  std::int64_t cards() { return RawDb(dir_.file("inbox.db")).scalar("SELECT count(*) FROM cards"); }
  std::int64_t records() {
    return RawDb(dir_.file("inbox.db")).scalar("SELECT count(*) FROM idem_keys");
  }

  TempDir dir_;
  idem::ManualClock clock_;
  SqliteStore store_;
};

auto card_writer(int& runs) {
  return [&runs](const Message& m, SqliteTx& tx) {
    ++runs;
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
  };
}

TEST_F(SqliteInbox, HandlerWritesAndTheRecordCommitTogether) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "card"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "card"}).outcome, Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "other"}).outcome, Outcome::conflict);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(cards(), 1);
}

TEST_F(SqliteInbox, HandlerThrowingAfterItsInsertLeavesNoTrace) {
  int attempts = 0;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
    if (++attempts == 1) throw std::runtime_error("card printer jammed");
  });
  Result failed = consumer.consume({.key = "pay-2", .payload = "card"});
  EXPECT_EQ(failed.outcome, Outcome::failed);
  ASSERT_TRUE(failed.error);
  EXPECT_THROW(std::rethrow_exception(failed.error), std::runtime_error);
  EXPECT_EQ(cards(), 0);    // the business row was rolled back
  EXPECT_EQ(records(), 0);  // and so was the dedup record
  Result retried = consumer.consume({.key = "pay-2", .payload = "card"});
  EXPECT_EQ(retried.outcome, Outcome::processed);
  EXPECT_GT(retried.fencing_token, failed.fencing_token);  // tokens rise across attempts
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(attempts, 2);
}

TEST_F(SqliteInbox, RethrowOptionLetsTheHandlerErrorOutWithNothingRecorded) {
  IdempotentConsumer consumer(
      store_,
      [](const Message& m, SqliteTx& tx) {
        tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
        throw std::logic_error("bug");
      },
      idem::Options{.rethrow_handler_errors = true});
  EXPECT_THROW(consumer.consume({.key = "k", .payload = "p"}), std::logic_error);
  EXPECT_EQ(cards(), 0);
  EXPECT_EQ(records(), 0);
}

TEST_F(SqliteInbox, ResponseIsReplayedToDuplicates) {
  IdempotentConsumer consumer(store_, [](const Message& m, SqliteTx&) {
    return std::string("card-for-") + std::string(m.key);
  });
  EXPECT_EQ(consumer.consume({.key = "k", .payload = "p"}).response, "card-for-k");
  Result again = consumer.consume({.key = "k", .payload = "p"});
  EXPECT_EQ(again.outcome, Outcome::duplicate);
  EXPECT_EQ(again.response, "card-for-k");
}

TEST_F(SqliteInbox, BinaryKeysWithNulAreDistinct) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  const std::string keys[] = {std::string("a\0b", 3), std::string("a\0c", 3), std::string("a"),
                              std::string("\0", 1), std::string("\xff\x00\xfe", 3)};
  for (const std::string& key : keys) {
    EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, Outcome::processed);
  }
  for (const std::string& key : keys) {
    EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, Outcome::duplicate);
  }
  EXPECT_EQ(runs, 5);
  RawDb raw(dir_.file("inbox.db"));
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM idem_keys WHERE length(key) = 3"), 3);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM idem_keys WHERE typeof(key) = 'blob'"), 5);
}

TEST_F(SqliteInbox, BeforeProcessingKeepsTheRecordButNotTheFailedWrites) {
  IdempotentConsumer consumer(
      store_,
      [](const Message& m, SqliteTx& tx) {
        tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
        if (m.key == "crashy") throw std::runtime_error("crash mid-handler");
      },
      idem::Options{.mark = idem::Mark::before_processing});
  EXPECT_EQ(consumer.consume({.key = "crashy", .payload = "p"}).outcome, Outcome::failed);
  EXPECT_EQ(consumer.consume({.key = "crashy", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "fine", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(records(), 2);
}

TEST_F(SqliteInbox, BatchRollsBackOnlyTheFailingMessage) {
  std::map<std::string, int> runs;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    ++runs[std::string(m.key)];
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
    if (m.key == "bad") throw std::runtime_error("boom");
    return "r-" + std::string(m.key);
  });
  std::vector<Message> batch{{.key = "a", .payload = "1"},
                             {.key = "bad", .payload = "2"},
                             {.key = "c", .payload = "3"},
                             {.key = "a", .payload = "1"},
                             {.key = "c", .payload = "changed"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  ASSERT_EQ(results.size(), 5u);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_TRUE(results[1].error);
  EXPECT_EQ(results[2].outcome, Outcome::processed);
  EXPECT_EQ(results[3].outcome, Outcome::duplicate);
  EXPECT_EQ(results[3].response, "r-a");
  EXPECT_EQ(results[4].outcome, Outcome::conflict);
  EXPECT_EQ(runs["a"], 1);
  RawDb raw(dir_.file("inbox.db"));
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards"), 2);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE key = x'626164'"), 0);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM idem_keys WHERE key = x'626164'"), 0);
  // The failed one is redelivered and processed.
  runs.clear();
  std::vector<Message> retry{{.key = "bad", .payload = "2"}};
  EXPECT_EQ(consumer.consume_batch(retry)[0].outcome, Outcome::failed);
  EXPECT_EQ(runs["bad"], 1);
}

// The message savepoint opens on the handler's first statement. Every way a handler can write
// must still be covered: exec/prepare, a statement stepped through its native handle, the
// connection's native handle, and a sqlite3* kept from an earlier message's handler.
TEST_F(SqliteInbox, EveryWayAHandlerWritesIsRolledBackWhenItFails) {
  sqlite3* kept = nullptr;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    const std::string key(m.key);
    if (key == "quiet") return;  // writes nothing: no savepoint is opened
    if (key == "quiet-fails") throw std::runtime_error("fails before writing");
    if (key.starts_with("stmt")) {
      idem::SqliteStatement insert = tx.prepare("INSERT INTO cards(msg, key) VALUES('stmt', ?1)");
      insert.bind_blob(1, m.key);
      ASSERT_EQ(sqlite3_step(insert.native_handle()), SQLITE_DONE);
    } else if (key.starts_with("raw")) {
      kept = tx.native_handle();
      ASSERT_EQ(sqlite3_exec(kept, "INSERT INTO cards(msg, key) VALUES('raw', x'00')", nullptr,
                             nullptr, nullptr),
                SQLITE_OK);
    } else if (key.starts_with("kept")) {
      // No call on tx at all: the handle of an earlier message's handler.
      ASSERT_EQ(sqlite3_exec(kept, "INSERT INTO cards(msg, key) VALUES('kept', x'01')", nullptr,
                             nullptr, nullptr),
                SQLITE_OK);
    } else {
      tx.exec("INSERT INTO cards(msg, key) VALUES('exec', ?1)", SqliteBlob{m.key});
    }
    if (key.ends_with("-fails")) throw std::runtime_error("fails after writing");
  });
  std::vector<Message> batch{
      {.key = "quiet", .payload = "p"},     {.key = "quiet-fails", .payload = "p"},
      {.key = "exec", .payload = "p"},      {.key = "exec-fails", .payload = "p"},
      {.key = "stmt", .payload = "p"},      {.key = "stmt-fails", .payload = "p"},
      {.key = "raw", .payload = "p"},       {.key = "raw-fails", .payload = "p"},
      {.key = "kept-fails", .payload = "p"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  ASSERT_EQ(results.size(), batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const bool fails = std::string_view(batch[i].key).ends_with("-fails");
    EXPECT_EQ(results[i].outcome, fails ? Outcome::failed : Outcome::processed) << batch[i].key;
  }
  RawDb raw(dir_.file("inbox.db"));
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'exec'"), 1);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'stmt'"), 1);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'raw'"), 1);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards WHERE msg = 'kept'"), 0);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards"), 3);
  EXPECT_EQ(records(), 4);  // quiet, exec, stmt, raw; the failed ones left nothing behind
  // A handler that writes nothing still commits its record.
  EXPECT_EQ(consumer.consume({.key = "quiet", .payload = "p"}).outcome, Outcome::duplicate);
}

TEST_F(SqliteInbox, OffsetsCommitWithTheBatchAndReadBack) {
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  EXPECT_FALSE(store_.committed_offset("orders", 0).has_value());
  std::vector<Message> batch{{.key = "o-152", .payload = "x"}, {.key = "o-153", .payload = "y"}};
  const std::vector<idem::PartitionOffset> offsets{
      {.topic = "orders", .partition = 1, .next_offset = 154},
      {.topic = "orders", .partition = 0, .next_offset = 7}};
  for (const Result& r : idem::consume_batch_with_offsets(consumer, batch, offsets)) {
    EXPECT_EQ(r.outcome, Outcome::processed);
  }
  EXPECT_EQ(store_.committed_offset("orders", 1), 154);
  EXPECT_EQ(store_.committed_offset("orders", 0), 7);
  EXPECT_FALSE(store_.committed_offset("orders", 2).has_value());
  store_.save_offsets(
      std::vector<idem::PartitionOffset>{{.topic = "audit", .partition = 3, .next_offset = 1}});
  {
    SqliteStore reopened(dir_.file("inbox.db"), options());
    std::vector<idem::PartitionOffset> all = reopened.committed_offsets();
    ASSERT_EQ(all.size(), 3u);
    EXPECT_EQ(all[0].topic, "audit");
    EXPECT_EQ(all[1].topic, "orders");
    EXPECT_EQ(all[1].partition, 0);
    EXPECT_EQ(all[2].partition, 1);
    EXPECT_EQ(all[2].next_offset, 154);
    reopened.transaction([](SqliteTx& tx) {
      EXPECT_EQ(tx.committed_offset("orders", 1), 154);
      tx.save_offset("orders", 1, 160);
    });
  }
  EXPECT_EQ(store_.committed_offset("orders", 1), 160);
  EXPECT_EQ(runs, 2);
}

TEST_F(SqliteInbox, ConfigErrorWhenTheHandlerReentersTheStoreOrEndsTheTransaction) {
  // Misuse is not a handler failure: the ConfigError escapes and nothing commits.
  IdempotentConsumer reenter(store_,
                             [&](const Message& m, SqliteTx&) { store_.claim({.key = m.key}); });
  EXPECT_THROW(reenter.consume({.key = "k1", .payload = "p"}), idem::ConfigError);
  EXPECT_FALSE(store_.inspect("k1").has_value());

  IdempotentConsumer commits(store_, [](const Message&, SqliteTx& tx) {
    sqlite3_exec(tx.native_handle(), "COMMIT", nullptr, nullptr, nullptr);
  });
  EXPECT_THROW(commits.consume({.key = "k2", .payload = "p"}), idem::ConfigError);
  EXPECT_FALSE(store_.inspect("k2").has_value());

  // Through the helper, every spelling of ending the transaction is refused before it runs.
  for (const char* sql : {"COMMIT", "ROLLBACK", "END", "BEGIN", "commit transaction",
                          "RELEASE idem_message", "ROLLBACK TO idem_message"}) {
    IdempotentConsumer helper(store_, [&](const Message&, SqliteTx& tx) {
      tx.exec("INSERT INTO cards(msg, key) VALUES('x', ?1)", SqliteBlob{"k3"});
      tx.exec(sql);
    });
    EXPECT_THROW(helper.consume({.key = "k3", .payload = "p"}), idem::ConfigError) << sql;
    EXPECT_FALSE(store_.inspect("k3").has_value()) << sql;
  }
  store_.transaction([](SqliteTx& tx) {
    EXPECT_EQ(tx.query_int64("SELECT count(*) FROM cards WHERE msg = 'x'"), 0);
    EXPECT_THROW(tx.exec("COMMIT"), idem::ConfigError);
  });
  // A savepoint of the handler's own is fine.
  IdempotentConsumer own(store_, [&](const Message&, SqliteTx& tx) {
    tx.exec("SAVEPOINT mine");
    tx.exec("INSERT INTO cards(msg, key) VALUES('y', ?1)", SqliteBlob{"k4"});
    tx.exec("ROLLBACK TO mine");
    tx.exec("RELEASE mine");
  });
  EXPECT_EQ(own.consume({.key = "k4", .payload = "p"}).outcome, Outcome::processed);
}

TEST_F(SqliteInbox, StatementHelpersReportBadSqlClearly) {
  store_.transaction([](SqliteTx& tx) {
    EXPECT_EQ(tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", "m", SqliteBlob{"k"}), 1);
    EXPECT_EQ(tx.query_int64("SELECT count(*) FROM cards WHERE msg = ?1", std::string("m")), 1);
    EXPECT_EQ(tx.query_int64("SELECT NULL"), std::nullopt);
    idem::SqliteStatement s = tx.prepare("SELECT msg, key FROM cards");
    ASSERT_TRUE(s.step());
    EXPECT_EQ(s.column_text(0), "m");
    EXPECT_EQ(s.column_blob(1), "k");
    EXPECT_FALSE(s.step());
    try {
      tx.exec("INSERT INTO no_such_table VALUES(1)");
      FAIL() << "bad SQL accepted";
    } catch (const idem::SqliteError& e) {
      EXPECT_NE(std::string(e.what()).find("no such table"), std::string::npos) << e.what();
      EXPECT_EQ(e.code(), SQLITE_ERROR);
    }
    EXPECT_THROW(tx.exec("SELECT 1; SELECT 2"), idem::SqliteError);
    // The same SQL twice at once: the second is a private (finalized) copy; moves are fine.
    idem::SqliteStatement first = tx.prepare("SELECT ?1");
    idem::SqliteStatement second = tx.prepare("SELECT ?1");
    first.bind_all(1);
    second.bind_all(2);
    idem::SqliteStatement moved = std::move(second);
    ASSERT_TRUE(first.step());
    ASSERT_TRUE(moved.step());
    EXPECT_EQ(first.column_int64(0), 1);
    EXPECT_EQ(moved.column_int64(0), 2);
  });
}

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

TEST_F(SqliteInbox, OperatorHooksInspectCountAndPurge) {
  idem::Claim held = store_.claim({.key = "held", .lease = 10s});
  ASSERT_EQ(held.status, ClaimStatus::acquired);
  idem::Claim done = store_.claim({.key = "done"});
  ASSERT_TRUE(
      store_.complete({.key = "done", .token = done.token, .response = "r", .retention = 60s}));
  std::optional<idem::RecordInfo> info = store_.inspect("done");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
  EXPECT_EQ(info->token, done.token);
  EXPECT_EQ(info->expires_in_ms, 60'000);
  EXPECT_EQ(info->response, "r");
  EXPECT_EQ(store_.inspect("held")->state, idem::RecordInfo::State::in_progress);
  EXPECT_FALSE(store_.inspect("absent").has_value());
  idem::StoreStats stats = store_.stats_summary();
  EXPECT_EQ(stats.records, 2u);
  EXPECT_EQ(stats.in_progress, 1u);
  EXPECT_EQ(stats.done, 1u);
  EXPECT_GT(stats.bytes, 0u);
  clock_.advance(20'000);  // the lease has ended
  EXPECT_EQ(store_.stats_summary().in_progress, 0u);
  EXPECT_EQ(store_.purge_expired_records(100), 1u);
  EXPECT_EQ(store_.stats_summary().records, 1u);
}

TEST_F(SqliteInbox, DoneRecordsSurviveReopening) {
  int runs = 0;
  {
    IdempotentConsumer consumer(store_, card_writer(runs));
    consumer.consume({.key = "persist", .payload = "p"});
  }
  SqliteStore reopened(dir_.file("inbox.db"), options());
  IdempotentConsumer consumer(reopened, card_writer(runs));
  EXPECT_EQ(consumer.consume({.key = "persist", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(runs, 1);
}

// --- Review fixes: offsets of partly failed batches, lost transactions, late completions,
// --- saturating deadlines ---------------------------------------------------------------------

TEST_F(SqliteInbox, OffsetsStayPutWhenAMessageOfTheBatchIsNotAcked) {
  bool fail_bad = true;
  std::map<std::string, int> runs;
  IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
    ++runs[std::string(m.key)];
    tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
    if (m.key == "bad" && fail_bad) throw std::runtime_error("boom");
  });
  using idem::PartitionOffset;
  store_.save_offsets(
      std::vector<PartitionOffset>{{.topic = "t", .partition = 0, .next_offset = 100}});
  const std::vector<Message> batch{{.key = "ok1", .payload = "1"},
                                   {.key = "bad", .payload = "2"},
                                   {.key = "ok2", .payload = "3"}};
  const std::vector<PartitionOffset> offsets{{.topic = "t", .partition = 0, .next_offset = 103}};
  bool saved = true;
  std::vector<Result> results = idem::consume_batch_with_offsets(consumer, batch, offsets, &saved);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_EQ(results[2].outcome, Outcome::processed);
  EXPECT_FALSE(saved);
  // Not moved past "bad": a consumer restarting here replays the batch and loses nothing.
  EXPECT_EQ(store_.committed_offset("t", 0), 100);
  EXPECT_EQ(cards(), 2);  // the processed ones are committed all the same

  fail_bad = false;  // the replay after a restart
  results = idem::consume_batch_with_offsets(consumer, batch, offsets, &saved);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0].outcome, Outcome::duplicate);
  EXPECT_EQ(results[1].outcome, Outcome::processed);
  EXPECT_EQ(results[2].outcome, Outcome::duplicate);
  EXPECT_TRUE(saved);
  EXPECT_EQ(store_.committed_offset("t", 0), 103);
  EXPECT_EQ(cards(), 3);
  EXPECT_EQ(runs["ok1"], 1);
  EXPECT_EQ(runs["bad"], 2);
  EXPECT_EQ(runs["ok2"], 1);

  // A conflict (dead-letter) and an in_progress key are not ackable either.
  const std::vector<PartitionOffset> later{{.topic = "t", .partition = 0, .next_offset = 105}};
  const std::vector<Message> conflicting{{.key = "ok3", .payload = "4"},
                                         {.key = "ok1", .payload = "changed"}};
  results = idem::consume_batch_with_offsets(consumer, conflicting, later, &saved);
  EXPECT_EQ(results[1].outcome, Outcome::conflict);
  EXPECT_FALSE(saved);
  EXPECT_EQ(store_.committed_offset("t", 0), 103);
  ASSERT_EQ(store_.claim({.key = "held"}).status, ClaimStatus::acquired);
  const std::vector<Message> held{{.key = "held", .payload = "5"}};
  results = idem::consume_batch_with_offsets(consumer, held, later, &saved);
  EXPECT_EQ(results[0].outcome, Outcome::in_progress);
  EXPECT_FALSE(saved);
  EXPECT_EQ(store_.committed_offset("t", 0), 103);
}

TEST_F(SqliteInbox, WritesAfterSqliteRolledBackTheTransactionNeverCommitOnTheirOwn) {
  for (const bool through_native : {false, true}) {
    SCOPED_TRACE(through_native ? "native_handle()" : "SqliteTx");
    const std::string key = through_native ? "native" : "tx";
    IdempotentConsumer consumer(store_, [&](const Message& m, SqliteTx& tx) {
      tx.exec("INSERT INTO cards(msg, key) VALUES(?1, ?2)", m.payload, SqliteBlob{m.key});
      sqlite3* db = tx.native_handle();
      // An interrupt makes SQLite roll the whole transaction back (as FULL, IOERR, NOMEM do).
      sqlite3_progress_handler(
          db, 1, [](void*) { return 1; }, nullptr);
      int rc = sqlite3_exec(db, "INSERT INTO cards(msg, key) VALUES('interrupted', x'00')", nullptr,
                            nullptr, nullptr);
      sqlite3_progress_handler(db, 0, nullptr, nullptr);
      EXPECT_EQ(rc & 0xff, SQLITE_INTERRUPT);
      EXPECT_NE(sqlite3_get_autocommit(db), 0);  // the transaction is gone
      // The handler swallows the error and writes on.
      if (through_native) {
        rc = sqlite3_exec(db, "INSERT INTO cards(msg, key) VALUES('after', x'01')", nullptr,
                          nullptr, nullptr);
        EXPECT_NE(rc, SQLITE_OK);  // vetoed: it would have committed on its own
      } else {
        try {
          tx.exec("INSERT INTO cards(msg, key) VALUES('after', x'01')");
          ADD_FAILURE() << "a statement ran outside the transaction";
        } catch (const idem::StoreUnavailable& e) {
          EXPECT_NE(std::string(e.what()).find("transaction is gone"), std::string::npos)
              << e.what();
        }
        EXPECT_THROW(tx.prepare("SELECT 1"), idem::StoreUnavailable);
      }
    });
    if (through_native) {
      EXPECT_THROW(consumer.consume({.key = key, .payload = "p"}), idem::Error);
    } else {
      EXPECT_THROW(consumer.consume({.key = key, .payload = "p"}), idem::StoreUnavailable);
    }
    EXPECT_EQ(cards(), 0);    // no write committed on its own
    EXPECT_EQ(records(), 0);  // and nothing is recorded as done
  }
  // Once SQLite is well again, the message is processed.
  int runs = 0;
  IdempotentConsumer consumer(store_, card_writer(runs));
  EXPECT_EQ(consumer.consume({.key = "tx", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(cards(), 1);
  EXPECT_EQ(records(), 1);
}

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

// --- Real processes --------------------------------------------------------------------------

TEST(SqliteProcesses, SigkilledConsumersLoseAndDuplicateNothing) {
  constexpr int kMinKills = 50;
  const std::int64_t n = 20'000;  // the count, sanitizers included (a few seconds)
  TempDir dir;
  const std::string path = dir.file("crash.db");
  {
    SqliteStore store(path);
    store.transaction([](SqliteTx& tx) {
      tx.exec("CREATE TABLE cards(msg INTEGER NOT NULL, key BLOB NOT NULL)");
    });
  }
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  int kills = 0, runs = 0, mid_run_kills = 0;
  std::int64_t done = 0;
  std::chrono::microseconds window = 3ms;  // kill at a random moment in [0, window)
  for (;;) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    // Kill rounds get a quota (what is left, spread over the kills still due), so every one of
    // them ends in a SIGKILL even if the machine suddenly speeds up; the last run finishes.
    const std::int64_t quota =
        kills < kMinKills ? std::max<std::int64_t>(50, (n - done) / (kMinKills - kills)) : 0;
    const pid_t pid = spawn_child({{"IDEM_SQLITE_CHILD", "crash"},
                                   {"IDEM_DB", path},
                                   {"IDEM_N", std::to_string(n)},
                                   {"IDEM_QUOTA", std::to_string(quota)},
                                   {"IDEM_BATCHED", runs % 2 ? "1" : "0"},
                                   {"IDEM_READY_FD", std::to_string(ready[1])}});
    ASSERT_GT(pid, 0);
    ::close(ready[1]);
    char byte = 0;
    const bool started = ::read(ready[0], &byte, 1) == 1;
    ::close(ready[0]);
    ++runs;
    if (started && kills < kMinKills) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % window.count()));
      ::kill(pid, SIGKILL);
    }
    const int code = wait_exit_code(pid);
    if (code == 128 + SIGKILL) {
      ++kills;
    } else {
      ASSERT_EQ(code, 0) << "child failed on run " << runs;
    }
    const std::int64_t now_done = RawDb(path).scalar("SELECT count(*) FROM cards");
    // Aim to kill most runs mid-way through their quota: shrink the window when a run got
    // through (nearly) all of it, widen it when a run barely started.
    const std::int64_t progress = now_done - done;
    // A run that did not get through its quota (less the replayed tail) was killed mid-way.
    if (code == 128 + SIGKILL && progress < quota - 25) ++mid_run_kills;
    if (quota > 0 && progress >= quota * 3 / 4) window = window / 2 + 100us;
    if (quota > 0 && progress < quota / 4) window = window * 5 / 4 + 200us;
    if (code == 0) break;
    done = now_done;
    ASSERT_LT(runs, 2000) << "no progress";
  }
  EXPECT_GE(kills, kMinKills);
  EXPECT_GE(mid_run_kills, kMinKills / 5) << "the kills must land while messages are consumed";
  RawDb raw(path);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM cards"), n);
  EXPECT_EQ(raw.scalar("SELECT count(DISTINCT msg) FROM cards"), n);
  EXPECT_EQ(raw.scalar("SELECT min(msg) FROM cards"), 0);
  EXPECT_EQ(raw.scalar("SELECT max(msg) FROM cards"), n - 1);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM idem_keys WHERE state = 1"), n);
  EXPECT_EQ(raw.scalar("SELECT next_offset FROM idem_offsets WHERE topic = 'crash'"), n);
  EXPECT_EQ(raw.text("PRAGMA integrity_check"), "ok");
  std::printf(
      "[          ] %d runs, %d SIGKILLs (%d mid-run), %lld messages, %lld done before the last "
      "run\n",
      runs, kills, mid_run_kills, static_cast<long long>(n), static_cast<long long>(done));
}

TEST(SqliteProcesses, AWaitingDuplicateGetsTheResponseOfAnotherProcessesHandler) {
  TempDir dir;
  const std::string path = dir.file("wait.db");
  { SqliteStore create(path); }
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {  // the first worker: claims, says so, handles slowly, completes
    ::close(fds[0]);
    SqliteStore store(path);
    IdempotentConsumer consumer(store, [&](const Message&) {
      (void)!::write(fds[1], "x", 1);
      std::this_thread::sleep_for(300ms);
      return std::string("card-from-child");
    });
    const bool ok =
        consumer.consume({.key = "pay-1", .payload = "p"}).outcome == Outcome::processed;
    ::_exit(ok ? 0 : 1);
  }
  ::close(fds[1]);
  char started = 0;
  ASSERT_EQ(::read(fds[0], &started, 1), 1);
  ::close(fds[0]);
  SqliteStore store(path);
  int runs = 0;
  IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = 60s});
  Result r = consumer.consume({.key = "pay-1", .payload = "p"});
  EXPECT_EQ(r.outcome, Outcome::duplicate);
  EXPECT_EQ(r.response, "card-from-child");
  EXPECT_EQ(runs, 0);
  EXPECT_EQ(wait_exit_code(pid), 0);
}

TEST(SqliteProcesses, TwoProcessesOfFourThreadsRunEachHandlerOnce) {
  const std::size_t keys = 2'000;
  TempDir dir;
  const std::string path = dir.file("race.db");
  {
    SqliteStore store(path);
    store.transaction([](SqliteTx& tx) {
      tx.exec("CREATE TABLE runs(msg INTEGER NOT NULL, pid INTEGER NOT NULL)");
    });
  }
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  std::vector<pid_t> pids;
  for (int p = 0; p < 2; ++p) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    pids.push_back(spawn_child({{"IDEM_SQLITE_CHILD", "race"},
                                {"IDEM_DB", path},
                                {"IDEM_N", std::to_string(keys)},
                                {"IDEM_OUT", dir.file("claims-" + std::to_string(p))},
                                {"IDEM_READY_FD", std::to_string(ready[1])},
                                {"IDEM_GO_FD", std::to_string(go[0])}}));
    ::close(ready[1]);
    char byte = 0;
    EXPECT_EQ(::read(ready[0], &byte, 1), 1);
    ::close(ready[0]);
  }
  ASSERT_EQ(::write(go[1], "gg", 2), 2);
  ::close(go[0]);
  ::close(go[1]);
  for (pid_t pid : pids) EXPECT_EQ(wait_exit_code(pid), 0);

  RawDb raw(path);
  EXPECT_EQ(raw.scalar("SELECT count(*) FROM runs"), static_cast<std::int64_t>(keys));
  EXPECT_EQ(raw.scalar("SELECT count(DISTINCT msg) FROM runs"), static_cast<std::int64_t>(keys));
  std::vector<int> claim_runs(keys, 0);
  for (int p = 0; p < 2; ++p) {
    std::ifstream in(dir.file("claims-" + std::to_string(p)));
    for (std::size_t i; in >> i;) ++claim_runs.at(i);
  }
  EXPECT_EQ(std::count(claim_runs.begin(), claim_runs.end(), 1), static_cast<std::ptrdiff_t>(keys));
  EXPECT_EQ(raw.text("PRAGMA integrity_check"), "ok");
}

}  // namespace
