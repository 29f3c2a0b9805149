// The crash-point matrix, observed: for every store and mode, a real consumer process is
// SIGKILLed at each step of one message's life, a fresh process redelivers it, and the test
// counts the effects (0: lost, 1: once, 2: dup). The observed table must equal the tables in
// docs/guarantees.md and README.md (between <!-- crash-matrix --> markers); on a mismatch the
// test prints the observed table in the same form, ready to paste after review.
//
// Child processes are this binary re-executed with IDEM_CRASH_CHILD set; the static
// initializer below runs the child's work and _exits before GoogleTest starts.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "idem/idem.hpp"
#include "idem/postgres.hpp"
#include "idem/redis.hpp"
#include "idem/sqlite.hpp"
#include "support/postgres_server.hpp"
#include "support/redis_server.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace std::chrono_literals;

constexpr auto kLease = 400ms;  // a killed holder's claim is taken over after this

const std::vector<std::string> kPoints{"before claim", "in handler", "after effect, before record",
                                       "after record, before ack"};

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

[[noreturn]] void die() {
  std::fflush(nullptr);
  ::kill(::getpid(), SIGKILL);
  ::_exit(99);  // not reached
}

// --- The child: one consumer process -------------------------------------------------------

// The effect of the handler outside a transaction: a line appended to a file.
void append_effect() {
  const int fd = ::open(env("IDEM_CRASH_EFFECTS").c_str(), O_WRONLY | O_APPEND | O_CREAT, 0644);
  (void)!::write(fd, "effect\n", 7);
  ::close(fd);
}

template <class Store>
int consume_once(Store& store) {
  const std::string point = env("IDEM_CRASH_POINT");
  const std::string mode = env("IDEM_CRASH_MODE");
  const bool inbox = mode.starts_with("inbox");
  idem::Options options{.lease = kLease, .in_progress_wait = 10s};
  if (mode.ends_with("before_processing")) options.mark = idem::Mark::before_processing;
  const idem::Message message{.key = "pay-1", .payload = "amount=10"};
  if (point == "before claim") die();
  idem::Result result;
  if constexpr (idem::TransactionalStore<Store>) {
    if (inbox) {
      idem::IdempotentConsumer consumer(
          store,
          [&](const idem::Message& m, typename Store::Transaction& tx) {
            if (point == "in handler") die();
            // SQLite: the store's own database; PostgreSQL: the cell's schema.
            constexpr bool sqlite = std::is_same_v<Store, idem::SqliteStore>;
            tx.exec(sqlite ? std::string("INSERT INTO effects(key) VALUES(?1)")
                           : "INSERT INTO " + env("IDEM_CRASH_PREFIX") + ".effects(key) VALUES($1)",
                    std::string(m.key));
            if (point == "after effect, before record") die();
          },
          options);
      result = consumer.consume(message);
    }
  }
  if (!inbox) {
    idem::IdempotentConsumer consumer(
        store,
        [&](const idem::Message&) {
          if (point == "in handler") die();
          append_effect();
          if (point == "after effect, before record") die();
        },
        options);
    result = consumer.consume(message);
  }
  if (point == "after record, before ack") die();
  return idem::should_ack(result.outcome) ? 0 : 1;
}

int crash_child() {
  const std::string store = env("IDEM_CRASH_STORE");
  const std::string where = env("IDEM_CRASH_WHERE");
  if (store == "memory") {
    idem::MemoryStore memory;
    return consume_once(memory);
  }
  if (store == "sqlite") {
    idem::SqliteStore sqlite(where, {.synchronous = idem::SqliteSync::normal});
    return consume_once(sqlite);
  }
  if (store == "redis") {
    idem::RedisStore redis({.port = std::stoi(where), .key_prefix = env("IDEM_CRASH_PREFIX")});
    return consume_once(redis);
  }
  if (store == "postgres") {
    idem::PostgresStore postgres({.conninfo = where, .schema = env("IDEM_CRASH_PREFIX")});
    return consume_once(postgres);
  }
  return 3;
}

const bool kIsChild = [] {
  if (std::getenv("IDEM_CRASH_CHILD") == nullptr) return false;
  int code = 2;
  try {
    code = crash_child();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "crash child: %s\n", e.what());
  }
  std::fflush(nullptr);
  ::_exit(code);
}();

// --- The parent ----------------------------------------------------------------------------

idem::test_support::PostgresServer& postgres() {
  static idem::test_support::PostgresServer instance;
  return instance;
}
idem::test_support::RedisServer& redis() {
  static idem::test_support::RedisServer instance;
  return instance;
}

// Servers start on the main thread, before the tests (see postgres_server.hpp).
class Servers : public ::testing::Environment {
 public:
  void SetUp() override {
    (void)postgres();
    (void)redis();
  }
};
const auto* const kServers = ::testing::AddGlobalTestEnvironment(new Servers);

int run_child(const std::map<std::string, std::string>& vars) {
  std::vector<std::string> entries;
  for (char** e = environ; *e != nullptr; ++e) entries.emplace_back(*e);
  entries.emplace_back("IDEM_CRASH_CHILD=1");
  for (const auto& [name, value] : vars) entries.push_back(name + "=" + value);
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
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

struct Row {
  std::string store, mode;
};

// A fresh place for one cell's records and effects, the child's environment for it, and a
// way to count the effects afterwards.
class Cell {
 public:
  Cell(const Row& row, const std::string& point, int n)
      : row_(row), dir_("crash-matrix"), prefix_("cm" + std::to_string(n)) {
    vars_ = {{"IDEM_CRASH_STORE", row.store},
             {"IDEM_CRASH_MODE", row.mode},
             {"IDEM_CRASH_POINT", point},
             {"IDEM_CRASH_EFFECTS", dir_.file("effects.txt")},
             {"IDEM_CRASH_PREFIX", prefix_ + (row.store == "redis" ? ":" : "")}};
    if (row.store == "sqlite") {
      vars_["IDEM_CRASH_WHERE"] = dir_.file("store.db");
      idem::SqliteStore store(dir_.file("store.db"));
      store.transaction([](idem::SqliteTx& tx) { tx.exec("CREATE TABLE effects(key TEXT)"); });
    } else if (row.store == "redis") {
      vars_["IDEM_CRASH_WHERE"] = std::to_string(redis().port());
    } else if (row.store == "postgres") {
      vars_["IDEM_CRASH_WHERE"] = postgres().conninfo();
      idem::PostgresStore store({.conninfo = postgres().conninfo(), .schema = prefix_});
      store.transaction(
          [&](idem::PostgresTx& tx) { tx.exec("CREATE TABLE " + prefix_ + ".effects(key text)"); });
    }
  }

  // Kills a consumer at the point, redelivers in a fresh process; returns lost/once/dup.
  std::string observe() {
    const int crashed = run_child(vars_);
    if (crashed != 128 + SIGKILL)
      return "error: the crashing child exited " + std::to_string(crashed);
    std::map<std::string, std::string> redeliver = vars_;
    redeliver["IDEM_CRASH_POINT"] = "none";
    const int redelivered = run_child(redeliver);
    if (redelivered != 0) return "error: the redelivery exited " + std::to_string(redelivered);
    const std::int64_t n = effects();
    return n == 0 ? "lost" : n == 1 ? "once" : n == 2 ? "dup" : "error: " + std::to_string(n);
  }

 private:
  std::int64_t effects() {
    if (!row_.mode.starts_with("inbox")) {
      std::ifstream in(dir_.file("effects.txt"));
      std::int64_t lines = 0;
      for (std::string line; std::getline(in, line);) ++lines;
      return lines;
    }
    std::int64_t n = -1;
    if (row_.store == "sqlite") {
      idem::SqliteStore store(dir_.file("store.db"));
      store.transaction([&](idem::SqliteTx& tx) {
        n = tx.query_int64("SELECT count(*) FROM effects").value_or(-1);
      });
    } else {
      idem::PostgresStore store({.conninfo = postgres().conninfo(), .schema = prefix_});
      store.transaction([&](idem::PostgresTx& tx) {
        n = tx.query_int64("SELECT count(*) FROM " + prefix_ + ".effects").value_or(-1);
      });
    }
    return n;
  }

  Row row_;
  idem::testing::TempDir dir_;
  std::string prefix_;
  std::map<std::string, std::string> vars_;
};

const std::vector<Row> kRows{
    {"memory", "after_success"},
    {"sqlite", "after_success"},
    {"redis", "after_success"},
    {"postgres", "after_success"},
    {"memory", "before_processing"},
    {"sqlite", "before_processing"},
    {"redis", "before_processing"},
    {"postgres", "before_processing"},
    {"sqlite", "inbox"},
    {"postgres", "inbox"},
    {"sqlite", "inbox, before_processing"},
    {"postgres", "inbox, before_processing"},
};

std::string table(const std::vector<std::vector<std::string>>& cells) {
  std::ostringstream out;
  out << "| store | mode |";
  for (const std::string& point : kPoints) out << " " << point << " |";
  out << "\n|---|---|";
  for (std::size_t i = 0; i < kPoints.size(); ++i) out << "---|";
  out << "\n";
  for (std::size_t r = 0; r < kRows.size(); ++r) {
    out << "| " << kRows[r].store << " | " << kRows[r].mode << " |";
    for (const std::string& cell : cells[r]) out << " " << cell << " |";
    out << "\n";
  }
  return out.str();
}

// The text between "<!-- crash-matrix -->" and "<!-- /crash-matrix -->" in a source file.
std::string documented(const std::string& relative) {
  std::ifstream in(std::string(IDEM_SOURCE_DIR) + "/" + relative);
  std::stringstream text;
  text << in.rdbuf();
  const std::string all = text.str();
  const std::string open = "<!-- crash-matrix -->\n", close = "<!-- /crash-matrix -->";
  const auto begin = all.find(open);
  const auto end = all.find(close);
  if (begin == std::string::npos || end == std::string::npos) return "(no crash-matrix markers)";
  return all.substr(begin + open.size(), end - begin - open.size());
}

TEST(CrashMatrix, EveryStoreModeAndCrashPointBehavesAsDocumented) {
  std::vector<std::vector<std::string>> cells;
  int n = 0;
  for (const Row& row : kRows) {
    std::vector<std::string>& line = cells.emplace_back();
    for (const std::string& point : kPoints) {
      Cell cell(row, point, n++);
      line.push_back(cell.observe());
    }
  }
  const std::string observed = table(cells);
  std::printf("observed crash-point matrix (effects after a SIGKILL and a redelivery):\n%s",
              observed.c_str());
  EXPECT_EQ(documented("docs/guarantees.md"), observed)
      << "docs/guarantees.md's table differs from what was observed (above)";
  EXPECT_EQ(documented("README.md"), observed)
      << "README.md's table differs from what was observed (above)";
}

}  // namespace
