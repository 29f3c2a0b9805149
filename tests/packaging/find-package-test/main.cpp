// Consumes a message through MemoryStore (and each linked component) with an installed idem.
// IDEM_TEST_HAVE_<COMPONENT> says which components are linked; none need a server.
#include <idem/idem.hpp>
#include <idem/prometheus_metrics.hpp>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <variant>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <idem/sqlite.hpp>
#endif
#ifdef IDEM_TEST_HAVE_REDIS
#include <idem/redis.hpp>
#endif
#ifdef IDEM_TEST_HAVE_POSTGRES
#include <idem/postgres.hpp>
#endif
#ifdef IDEM_TEST_HAVE_LOG
#include <idem/stderr_logger.hpp>
#endif
#ifdef IDEM_TEST_HAVE_OPEN_STORE
#include <idem/open_store.hpp>
#include <idem/store_url.hpp>
#endif

namespace {

int check(bool ok, const char* what) {
  if (!ok) std::fprintf(stderr, "FAILED: %s\n", what);
  return ok ? 0 : 1;
}

template <class Store>
int consume_twice(Store& store, idem::Metrics* metrics) {
  int runs = 0;
  idem::IdempotentConsumer consumer(
      store, [&](const idem::Message&) { return std::string("card-") + std::to_string(++runs); },
      {.metrics = metrics});
  const idem::Result first = consumer.consume({.key = "payment-1", .payload = "42.00"});
  const idem::Result second = consumer.consume({.key = "payment-1", .payload = "42.00"});
  return check(first.outcome == idem::Outcome::processed, "first delivery processed") +
         check(second.outcome == idem::Outcome::duplicate, "redelivery is a duplicate") +
         check(second.response == "card-1", "response replayed") +
         check(runs == 1, "handler ran once");
}

}  // namespace

int main() {
  int failures = 0;
  idem::PrometheusMetrics metrics;
  idem::MemoryStore memory;
  failures += consume_twice(memory, &metrics);
  failures += check(
      metrics.render().find("idem_messages_total{outcome=\"duplicate\"} 1") != std::string::npos,
      "metrics rendered");
#ifdef IDEM_TEST_HAVE_SQLITE
  const auto path = std::filesystem::temp_directory_path() /
                    ("idem-find-package-" + idem::InnerMsgIdGenerator().next().to_string() + ".db");
  {
    idem::SqliteStore sqlite(path.string());
    failures += consume_twice(sqlite, nullptr);
  }
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + suffix);
#endif
#ifdef IDEM_TEST_HAVE_REDIS
  idem::RedisStore redis({.port = 1});  // connects lazily: constructing it proves it links
  failures += check(redis.name() == "redis", "redis store");
#endif
#ifdef IDEM_TEST_HAVE_POSTGRES
  // Options are checked before any connection: a pool of 0 is refused without a server.
  bool refused = false;
  try {
    idem::PostgresStore postgres(
        idem::PostgresOptions{.conninfo = "host=127.0.0.1 port=1", .pool_size = 0});
  } catch (const idem::ConfigError&) {
    refused = true;
  }
  failures += check(refused, "postgres store refuses pool_size 0");
#endif
#ifdef IDEM_TEST_HAVE_OPEN_STORE
  const idem::StoreUrl url = idem::parse_store_url("sqlite:///tmp/x.db");
  const auto* sqlite_url = std::get_if<idem::SqliteUrl>(&url);
  failures += check(sqlite_url != nullptr && sqlite_url->path == "/tmp/x.db", "sqlite URL parsed");
  bool bad_url = false;
  try {
    idem::parse_store_url("nosuchscheme://x");
  } catch (const idem::BadStoreUrl&) {
    bad_url = true;
  }
  failures += check(bad_url, "bad store URL refused");
  const std::unique_ptr<idem::DedupStore> opened = idem::open_store("memory:");
  failures += consume_twice(*opened, nullptr);
  std::printf("open_store backends: %s\n", std::string(idem::open_store_backends()).c_str());
#endif
#ifdef IDEM_TEST_HAVE_LOG
  idem::StderrLogger logger({.min_level = idem::LogLevel::error});
  logger.log(idem::LogLevel::debug, "not shown");
#endif
  std::printf("%s\n", failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}
