// idem::SqliteStore shared by real processes: SIGKILLed consumers lose and duplicate nothing,
// processes race on one file, a duplicate waits for another process's handler.
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
using idem::test_support::env_or;
using idem::test_support::signal_fd;
using idem::test_support::spawn_child;
using idem::test_support::wait_exit_code;

using idem::test_support::sqlite::RawDb;
using idem::test_support::sqlite::TempDir;
using idem::testing::kSanitized;

std::int64_t index_of(std::string_view key) {
  return std::stoll(std::string(key.substr(key.find('-') + 1)));
}

// --- Child processes -------------------------------------------------------------------------

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
  const SqliteOptions options{.busy_timeout = 60s, .synchronous = idem::SqliteSync::normal};
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
