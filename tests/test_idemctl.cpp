// idemctl, run as a separate process: ids, exit codes, help, URLs, and a SQLite round trip
// through the DedupStore operator hooks. IDEMCTL_PATH is the built binary.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "idem/idem.hpp"
#include "idem/open_store.hpp"
#ifdef IDEM_HAVE_SQLITE
#include "idem/stores/sqlite_store.hpp"
#endif
#ifdef IDEM_HAVE_REDIS
#include "idem/stores/redis_store.hpp"
#include "support/redis_server.hpp"
#endif
#ifdef IDEM_HAVE_POSTGRES
#include "idem/stores/postgres_store.hpp"
#include "support/postgres_server.hpp"
#endif

extern char** environ;

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

struct Exited {
  int code = -1;
  std::string out;
  std::string err;
};

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// A scratch directory removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("idemctl-test-" + idem::InnerMsgIdGenerator().next().to_string());
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Runs idemctl with args, feeding stdin_text; stdout and stderr go through files so a large
// output cannot fill a pipe.
Exited idemctl(const std::vector<std::string>& args, const std::string& stdin_text = "") {
  TempDir dir;
  const fs::path in = dir.path / "in", out = dir.path / "out", err = dir.path / "err";
  std::ofstream(in, std::ios::binary) << stdin_text;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, in.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  std::vector<std::string> argv_strings = {IDEMCTL_PATH};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& arg : argv_strings) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  Exited run;
  const int spawned = posix_spawn(&pid, IDEMCTL_PATH, &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) {
    ADD_FAILURE() << "cannot run " << IDEMCTL_PATH;
    return run;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  run.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  run.out = slurp(out);
  run.err = slurp(err);
  return run;
}

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// A loopback port nothing listens on: bound, then closed.
int closed_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  socklen_t size = sizeof address;
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size);
  close(fd);
  return ntohs(address.sin_port);
}

TEST(Idemctl, GenIdPrintsOneUuidV7) {
  const Exited run = idemctl({"gen-id"});
  ASSERT_EQ(run.code, 0) << run.err;
  const auto ids = lines(run.out);
  ASSERT_EQ(ids.size(), 1u);
  const std::optional<idem::InnerMsgId> id = idem::InnerMsgId::parse(ids[0]);
  ASSERT_TRUE(id) << ids[0];
  EXPECT_EQ(ids[0].size(), 36u);
  EXPECT_EQ(ids[0][14], '7') << "version nibble";
  EXPECT_NE(std::string("89ab").find(ids[0][19]), std::string::npos) << "RFC 9562 variant";
  const auto now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  EXPECT_LE(static_cast<std::int64_t>(id->unix_ms()), now_ms);
  EXPECT_GT(static_cast<std::int64_t>(id->unix_ms()), now_ms - 60'000);
}

TEST(Idemctl, GenIdCountGivesIncreasingIds) {
  const Exited run = idemctl({"gen-id", "-n", "1000"});
  ASSERT_EQ(run.code, 0) << run.err;
  const auto ids = lines(run.out);
  ASSERT_EQ(ids.size(), 1000u);
  std::optional<idem::InnerMsgId> previous;
  for (const std::string& text : ids) {
    const std::optional<idem::InnerMsgId> id = idem::InnerMsgId::parse(text);
    ASSERT_TRUE(id) << text;
    if (previous) {
      ASSERT_LT(*previous, *id);
    }
    previous = id;
  }
  EXPECT_EQ(idemctl({"gen-id", "--count", "3"}).out.size(), 3 * 37u);
}

TEST(Idemctl, UsageErrorsExitTwo) {
  EXPECT_EQ(idemctl({}).code, 2);
  EXPECT_EQ(idemctl({"no-such-command"}).code, 2);
  EXPECT_EQ(idemctl({"gen-id", "-n", "0"}).code, 2);
  EXPECT_EQ(idemctl({"gen-id", "-n", "many"}).code, 2);
  const Exited missing = idemctl({"inspect", "sqlite:///tmp/x.db"});
  EXPECT_EQ(missing.code, 2);
  EXPECT_NE(missing.err.find("key"), std::string::npos) << missing.err;
}

TEST(Idemctl, HelpOnEverySubcommand) {
  const Exited top = idemctl({"--help"});
  EXPECT_EQ(top.code, 0);
  EXPECT_NE(top.out.find("Exit codes"), std::string::npos) << top.out;
  for (const char* sub : {"gen-id", "inspect", "stats", "forget", "purge-expired"}) {
    const Exited run = idemctl({sub, "--help"});
    EXPECT_EQ(run.code, 0) << sub;
    EXPECT_NE(run.out.find(std::string("idemctl ") + sub), std::string::npos) << run.out;
  }
  EXPECT_NE(idemctl({"forget", "--help"}).out.find("--yes"), std::string::npos);
}

TEST(Idemctl, BadUrlsExitTwoAndSayWhy) {
  struct Case {
    const char* url;
    const char* says;
  };
  for (const Case& c :
       {Case{"foo://x", "unknown scheme \"foo\""}, Case{"/var/lib/dedup.db", "no scheme"},
        Case{"sqlite://", "database path is missing"},
        Case{"redis://localhost:99999", "port \"99999\""},
        Case{"redis://localhost:6379/x", "database \"x\""},
        Case{"redis://:secret@localhost:6379?colour=red", "unknown parameter"},
        Case{"rediss://localhost", "TLS"}}) {
    const Exited run = idemctl({"stats", c.url});
    EXPECT_EQ(run.code, 2) << c.url << ": " << run.err;
    EXPECT_NE(run.err.find(c.says), std::string::npos) << run.err;
    EXPECT_NE(run.err.find("expected"), std::string::npos) << run.err;
    EXPECT_EQ(run.err.find("secret"), std::string::npos) << "password leaked: " << run.err;
    // The message a service gets from idem::open_store for the same URL.
    try {
      (void)idem::parse_store_url(c.url);
      ADD_FAILURE() << c.url << " parsed";
    } catch (const idem::BadStoreUrl& e) {
      EXPECT_EQ(run.err, "idemctl: " + std::string(e.what()) + "\n");
    }
  }
}

TEST(StoreUrl, ParsesRedisForms) {
  auto redis = [](std::string_view url) {
    return std::get<idem::RedisUrl>(idem::parse_store_url(url));
  };
  const idem::RedisUrl plain = redis("redis://cache.internal");
  EXPECT_EQ(plain.host, "cache.internal");
  EXPECT_EQ(plain.port, 6379);
  EXPECT_EQ(plain.db, 0);
  EXPECT_EQ(plain.prefix, "idem:");
  const idem::RedisUrl full =
      redis("redis://:p%40ss@10.0.0.5:7000/3?prefix=billing%3Aidem%3A&timeout_ms=250");
  EXPECT_EQ(full.host, "10.0.0.5");
  EXPECT_EQ(full.port, 7000);
  EXPECT_EQ(full.db, 3);
  EXPECT_EQ(full.user, "");
  EXPECT_EQ(full.password, "p@ss");
  EXPECT_EQ(full.prefix, "billing:idem:");
  EXPECT_EQ(full.timeout, 250ms);
  const idem::RedisUrl acl = redis("redis://ops:pw@[::1]:6380?db=2");
  EXPECT_EQ(acl.user, "ops");
  EXPECT_EQ(acl.password, "pw");
  EXPECT_EQ(acl.host, "::1");
  EXPECT_EQ(acl.port, 6380);
  EXPECT_EQ(acl.db, 2);
  EXPECT_EQ(idem::redact_store_url("redis://ops:pw@host:1/0"), "redis://ops:***@host:1/0");
  EXPECT_EQ(idem::redact_store_url("redis://:pw@host"), "redis://:***@host");
  EXPECT_EQ(idem::redact_store_url("redis://host/0"), "redis://host/0");

  EXPECT_EQ(std::get<idem::SqliteUrl>(idem::parse_store_url("sqlite:///var/lib/d b.db")).path,
            "/var/lib/d b.db");
  EXPECT_EQ(std::get<idem::SqliteUrl>(idem::parse_store_url("sqlite://rel/x.db")).path, "rel/x.db");
  EXPECT_THROW(idem::parse_store_url("redis://"), idem::BadStoreUrl);
  EXPECT_THROW(idem::parse_store_url("redis://h:"), idem::BadStoreUrl);
  EXPECT_THROW(idem::parse_store_url("redis://[::1"), idem::BadStoreUrl);
  EXPECT_THROW(idem::parse_store_url("redis://h?prefix=%zz"), idem::BadStoreUrl);
}

TEST(StoreUrl, ParsesPostgresForms) {
  auto url = std::get<idem::PostgresUrl>(
      idem::parse_store_url("postgres://app:p%40ss@db.example:6432/orders"));
  EXPECT_EQ(url.conninfo, "postgres://app:p%40ss@db.example:6432/orders");  // libpq decodes
  EXPECT_EQ(url.schema, "idem");
  url = std::get<idem::PostgresUrl>(idem::parse_store_url(
      "postgresql://app@host/orders?sslmode=disable&schema=dedup&connect_timeout=3"));
  EXPECT_EQ(url.conninfo, "postgresql://app@host/orders?sslmode=disable&connect_timeout=3");
  EXPECT_EQ(url.schema, "dedup");
  EXPECT_THROW(idem::parse_store_url("postgres://"), idem::BadStoreUrl);
  EXPECT_THROW(idem::parse_store_url("postgres://host/db?schema="), idem::BadStoreUrl);
  EXPECT_THROW(idem::parse_store_url("postgres://host/db?sslmode"), idem::BadStoreUrl);
  EXPECT_EQ(idem::redact_store_url("postgres://app:pw@host/db"), "postgres://app:***@host/db");
  EXPECT_EQ(idem::redact_store_url("postgresql://host/db?user=app&password=pw&sslmode=disable"),
            "postgresql://host/db?user=app&password=***&sslmode=disable");
}

TEST(Idemctl, UnreachableRedisExitsThree) {
  const std::string url = "redis://127.0.0.1:" + std::to_string(closed_port()) + "?timeout_ms=500";
  for (const char* sub : {"stats", "purge-expired"}) {
    const Exited run = idemctl({sub, url});
#ifdef IDEM_HAVE_REDIS
    EXPECT_EQ(run.code, 3) << run.err;
    EXPECT_NE(run.err.find("cannot reach"), std::string::npos) << run.err;
#else
    EXPECT_EQ(run.code, 4) << run.err;
#endif
  }
  const Exited run = idemctl({"inspect", url, "key"});
#ifdef IDEM_HAVE_REDIS
  EXPECT_EQ(run.code, 3) << run.err;
#else
  EXPECT_EQ(run.code, 4) << run.err;
#endif
}

#ifdef IDEM_HAVE_SQLITE
TEST(Idemctl, MissingSqliteDatabaseExitsThreeAndIsNotCreated) {
  TempDir dir;
  const fs::path db = dir.path / "absent.db";
  const Exited run = idemctl({"stats", "sqlite://" + db.string()});
  EXPECT_EQ(run.code, 3) << run.err;
  EXPECT_NE(run.err.find("no SQLite database"), std::string::npos) << run.err;
  EXPECT_FALSE(fs::exists(db));
}

// A database populated through the library, then inspected, counted, purged and edited by
// idemctl; each change checked through the library again.
TEST(Idemctl, SqliteRoundTrip) {
  TempDir dir;
  const std::string path = (dir.path / "dedup.db").string();
  const std::string url = "sqlite://" + path;
  {
    idem::SqliteStore store(path);
    idem::IdempotentConsumer consumer(
        store, [](const idem::Message& m) { return "card-for-" + std::string(m.key); });
    consumer.consume({.key = "pay-1", .payload = "a"});
    consumer.consume({.key = "pay-2", .payload = "b"});
    consumer.consume({.key = std::string_view("bin\0key", 7), .payload = "c"});
    // A record that expires at once, for purge-expired.
    idem::IdempotentConsumer brief(store, [](const idem::Message&) {},
                                   {.retention = std::chrono::milliseconds(1)});
    brief.consume({.key = "short-lived"});
    // A live claim.
    ASSERT_EQ(store.claim({.key = "held", .lease = std::chrono::hours(1)}).status,
              idem::ClaimStatus::acquired);
  }
  std::this_thread::sleep_for(20ms);

  Exited run = idemctl({"inspect", url, "pay-1"});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("state:    done"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("response: \"card-for-pay-1\""), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("expires:  in 23h59m"), std::string::npos) << run.out;

  run = idemctl({"inspect", url, "held"});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("state:    in_progress"), std::string::npos) << run.out;

  run = idemctl({"inspect", "--hex", url, "62696e006b6579"});  // "bin\0key"
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("key:      bin\\x00key"), std::string::npos) << run.out;
  EXPECT_EQ(idemctl({"inspect", "--hex", url, "6g"}).code, 2);

  run = idemctl({"inspect", url, "never-seen"});
  EXPECT_EQ(run.code, 1) << run.err;
  EXPECT_NE(run.err.find("no record of key \"never-seen\""), std::string::npos) << run.err;

  run = idemctl({"stats", url});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("store:       sqlite"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("records:     5"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("in_progress: 1"), std::string::npos) << run.out;

  run = idemctl({"purge-expired", url});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(run.out, "purged 1 expired record\n");
  EXPECT_EQ(idemctl({"inspect", url, "short-lived"}).code, 1);
  EXPECT_EQ(idemctl({"purge-expired", url}).out, "purged 0 expired records\n");

  // forget asks first; anything but y/yes leaves the record alone.
  run = idemctl({"forget", url, "pay-1"}, "n\n");
  EXPECT_EQ(run.code, 5) << run.err;
  EXPECT_NE(run.err.find("[y/N]"), std::string::npos) << run.err;
  EXPECT_EQ(idemctl({"forget", url, "pay-1"}, "").code, 5);
  EXPECT_EQ(idemctl({"inspect", url, "pay-1"}).code, 0);
  run = idemctl({"forget", url, "pay-1"}, "y\n");
  EXPECT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(idemctl({"inspect", url, "pay-1"}).code, 1);
  run = idemctl({"forget", "--yes", url, "pay-2"});
  EXPECT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(run.out, "forgot key \"pay-2\"\n");
  EXPECT_EQ(idemctl({"forget", "-y", url, "pay-2"}).code, 1);

  // The library agrees: a forgotten key is processed again, the others are not.
  idem::SqliteStore store(path);
  int runs = 0;
  idem::IdempotentConsumer consumer(store, [&](const idem::Message&) { ++runs; });
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "a"}).outcome, idem::Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "bin\0key", .payload = "c"}).outcome, idem::Outcome::processed)
      << "a C string stops at the NUL: a different key";
  EXPECT_EQ(consumer.consume({.key = std::string_view("bin\0key", 7), .payload = "c"}).outcome,
            idem::Outcome::duplicate);
  EXPECT_EQ(runs, 2);
}
#endif

#ifdef IDEM_HAVE_SQLITE
// Opening an existing store takes no write lock, so operators' read commands go through
// while a consumer is inside a write transaction (in WAL mode readers never wait for it).
TEST(Idemctl, SqliteReadCommandsDoNotWaitForAConsumersTransaction) {
  TempDir dir;
  const std::string path = (dir.path / "busy.db").string();
  idem::SqliteStore store(path);
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) { return "r"; });
  consumer.consume({.key = "pay-1", .payload = "a"});
  store.transaction([&](idem::SqliteTx&) {
    // The consumer's store holds SQLite's write lock until this returns.
    Exited run = idemctl({"inspect", "sqlite://" + path, "pay-1"});
    EXPECT_EQ(run.code, 0) << run.err;
    EXPECT_NE(run.out.find("state:    done"), std::string::npos) << run.out;
    run = idemctl({"stats", "--busy-timeout", "0", "sqlite://" + path});
    EXPECT_EQ(run.code, 0) << run.err;
    EXPECT_NE(run.out.find("done:        1"), std::string::npos) << run.out;
    // A write does need the lock: with --busy-timeout 0 it fails at once, saying why.
    run = idemctl({"purge-expired", "--busy-timeout", "0", "sqlite://" + path});
    EXPECT_EQ(run.code, 3) << run.out;
    EXPECT_NE(run.err.find("SQLITE_BUSY"), std::string::npos) << run.err;
    EXPECT_NE(run.err.find("--busy-timeout"), std::string::npos) << run.err;
    // A second store (another consumer process) opens too.
    EXPECT_NO_THROW(idem::SqliteStore second(path, {.busy_timeout = 0ms}));
  });
}

#endif

#ifdef IDEM_HAVE_POSTGRES
// A real PostgreSQL server; records written through PostgresStore in a schema of their own.
TEST(Idemctl, PostgresRoundTrip) {
  idem::test_support::PostgresServer server;
  const std::string url = "postgres://" + std::string(server.kUser) + ":" + server.kPassword +
                          "@127.0.0.1:" + std::to_string(server.port()) + "/" + server.kDatabase +
                          "?schema=ops&connect_timeout=5";
  {
    idem::PostgresStore store({.conninfo = server.conninfo(), .schema = "ops"});
    idem::IdempotentConsumer consumer(
        store, [](const idem::Message& m) { return "card-for-" + std::string(m.key); });
    consumer.consume({.key = "pay-1", .payload = "a"});
    consumer.consume({.key = std::string_view("bin\0key", 7), .payload = "c"});
    idem::IdempotentConsumer brief(store, [](const idem::Message&) {},
                                   {.retention = std::chrono::milliseconds(1)});
    brief.consume({.key = "short-lived"});
    ASSERT_EQ(store.claim({.key = "held", .lease = std::chrono::hours(1)}).status,
              idem::ClaimStatus::acquired);
  }
  std::this_thread::sleep_for(20ms);

  for (const std::string scheme : {"postgres", "postgresql"}) {
    const std::string u = scheme + url.substr(url.find("://"));
    Exited run = idemctl({"inspect", u, "pay-1"});
    ASSERT_EQ(run.code, 0) << run.err;
    EXPECT_NE(run.out.find("state:    done"), std::string::npos) << run.out;
    EXPECT_NE(run.out.find("response: \"card-for-pay-1\""), std::string::npos) << run.out;
  }
  Exited run = idemctl({"inspect", url, "held"});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("state:    in_progress"), std::string::npos) << run.out;
  run = idemctl({"inspect", "--hex", url, "62696e006b6579"});  // "bin\0key"
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(idemctl({"inspect", url, "never-seen"}).code, 1);

  run = idemctl({"stats", url});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("store:       postgres"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("in_progress: 1"), std::string::npos) << run.out;

  run = idemctl({"purge-expired", url});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(run.out, "purged 1 expired record\n");
  EXPECT_EQ(idemctl({"inspect", url, "short-lived"}).code, 1);

  run = idemctl({"forget", "--yes", url, "pay-1"});
  EXPECT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(idemctl({"inspect", url, "pay-1"}).code, 1);

  // A wrong password: the store is unreachable (3), and no password shows in the message.
  std::string wrong = url;
  wrong.replace(wrong.find(server.kPassword), std::strlen(server.kPassword), "not-the-pw");
  run = idemctl({"stats", wrong});
  EXPECT_EQ(run.code, 3) << run.err;
  EXPECT_EQ(run.err.find("not-the-pw"), std::string::npos) << "password leaked: " << run.err;
  EXPECT_EQ(run.err.find(server.kPassword), std::string::npos) << run.err;
}
#endif

#ifdef IDEM_HAVE_REDIS
// A real redis-server with a password; records written through RedisStore under a prefix.
TEST(Idemctl, RedisRoundTrip) {
  idem::test_support::RedisServer server({"--requirepass", "s3cret"});
  const std::string port = std::to_string(server.port());
  const std::string url = "redis://:s3cret@127.0.0.1:" + port + "/0?prefix=idemctl%3A";
  {
    idem::RedisStore store({.port = server.port(), .password = "s3cret", .key_prefix = "idemctl:"});
    idem::IdempotentConsumer consumer(store, [](const idem::Message&) { return "ok"; });
    ASSERT_EQ(consumer.consume({.key = "pay-1"}).outcome, idem::Outcome::processed);
    ASSERT_EQ(consumer.consume({.key = "pay-2"}).outcome, idem::Outcome::processed);
    // A live claim.
    ASSERT_EQ(store.claim({.key = "held", .lease = std::chrono::hours(1)}).status,
              idem::ClaimStatus::acquired);
  }

  Exited run = idemctl({"stats", "redis://:wrong@127.0.0.1:" + port});
  EXPECT_EQ(run.code, 3) << run.err;
  EXPECT_EQ(run.err.find("wrong"), std::string::npos) << "password leaked: " << run.err;

  // inspect / stats / purge-expired, as for SQLite.
  run = idemctl({"inspect", url, "pay-1"});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("state:    done"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("response: \"ok\""), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("expires:  in 23h59m"), std::string::npos) << run.out;
  run = idemctl({"inspect", url, "held"});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("state:    in_progress"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("expires:  in 59m"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("response: -"), std::string::npos) << run.out;
  run = idemctl({"inspect", url, "nope"});
  EXPECT_EQ(run.code, 1) << run.err;
  EXPECT_NE(run.err.find("no record of key \"nope\""), std::string::npos) << run.err;

  run = idemctl({"stats", url});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("store:       redis"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("records:     3"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("in_progress: 1"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("done:        2"), std::string::npos) << run.out;
  // Another prefix counts nothing of these.
  run = idemctl({"stats", "redis://:s3cret@127.0.0.1:" + port});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("records:     0"), std::string::npos) << run.out;

  // Redis expires records itself: nothing is ever left to purge.
  run = idemctl({"purge-expired", url});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(run.out, "purged 0 expired records\n");

  // forget works on every store.
  EXPECT_EQ(idemctl({"forget", url, "pay-1"}, "no\n").code, 5);
  run = idemctl({"forget", "--yes", url, "pay-1"});
  EXPECT_EQ(run.code, 0) << run.err;
  EXPECT_EQ(idemctl({"forget", "--yes", url, "pay-1"}).code, 1);
  // The wrong prefix sees nothing.
  EXPECT_EQ(idemctl({"forget", "--yes", "redis://:s3cret@127.0.0.1:" + port, "pay-2"}).code, 1);

  idem::RedisStore store({.port = server.port(), .password = "s3cret", .key_prefix = "idemctl:"});
  int runs = 0;
  idem::IdempotentConsumer consumer(store, [&](const idem::Message&) { ++runs; });
  EXPECT_EQ(consumer.consume({.key = "pay-1"}).outcome, idem::Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "pay-2"}).outcome, idem::Outcome::duplicate);
  EXPECT_EQ(runs, 1);
}

// A key under the prefix that another program wrote is not a passing outage: inspect says what
// it is without advising a retry, and stats counts it apart from the records.
TEST(Idemctl, RedisKeyThatIsNotAnIdemRecord) {
  idem::test_support::RedisServer server;
  const std::string url = "redis://127.0.0.1:" + std::to_string(server.port()) + "?prefix=ops:";
  server.cli("SET ops:k:stray hello");
  Exited run = idemctl({"inspect", url, "stray"});
  EXPECT_EQ(run.code, 4) << run.err;
  EXPECT_NE(run.err.find("does not hold an idem record"), std::string::npos) << run.err;
  EXPECT_EQ(run.err.find(": retry"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("retrying will not help"), std::string::npos) << run.err;
  run = idemctl({"stats", url});
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("records:     0"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("foreign:     1"), std::string::npos) << run.out;
}
#endif

TEST(Idemctl, FriendlyErrorsForBadArguments) {
  // A negative count: one line saying what to give, not CLI11's range up to DBL_MAX.
  Exited run = idemctl({"purge-expired", "sqlite:///tmp/x.db", "--max", "-5"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("\"-5\" is not a positive whole number"), std::string::npos) << run.err;
  EXPECT_LT(run.err.size(), 200u) << run.err;
  run = idemctl({"inspect", "--hex", "sqlite:///tmp/x.db", "zz"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("character 1 ('z') is not a hex digit"), std::string::npos) << run.err;
  run = idemctl({"inspect", "--hex", "sqlite:///tmp/x.db", "abc"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("not a whole number of bytes"), std::string::npos) << run.err;
  run = idemctl({"stats", "memory:"});
  EXPECT_EQ(run.code, 2);
  EXPECT_NE(run.err.find("inside one process"), std::string::npos) << run.err;
  run = idemctl({"stats", "sqlite", "--busy-timeout", "-1"});
  EXPECT_EQ(run.code, 2);
}

#ifdef IDEM_HAVE_SQLITE
// sqlite:/path (one slash) is the same store as sqlite:///path, not "no scheme".
TEST(Idemctl, SqliteUrlWithOneSlashNamesTheFile) {
  TempDir dir;
  const std::string path = (dir.path / "one-slash.db").string();
  Exited run = idemctl({"stats", "sqlite:" + path});
  EXPECT_EQ(run.code, 3);
  EXPECT_NE(run.err.find("no SQLite database at \"" + path + "\""), std::string::npos) << run.err;
  { idem::SqliteStore create(path); }
  run = idemctl({"stats", "sqlite:" + path});
  EXPECT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("store:       sqlite"), std::string::npos) << run.out;
}
#endif

}  // namespace
