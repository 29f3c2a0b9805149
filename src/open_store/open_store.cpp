#include "idem/open_store.hpp"

#include <filesystem>
#include <string>
#include <system_error>
#include <type_traits>
#include <variant>

#include "idem/error.hpp"
#include "idem/stores/memory_store.hpp"
#ifdef IDEM_HAVE_SQLITE
#include "idem/stores/sqlite_store.hpp"
#endif
#ifdef IDEM_HAVE_REDIS
#include "idem/stores/redis_store.hpp"
#endif
#ifdef IDEM_HAVE_POSTGRES
#include "idem/stores/postgres_store.hpp"
#endif

namespace idem {

namespace {

std::unique_ptr<DedupStore> open_sqlite([[maybe_unused]] const SqliteUrl& url,
                                        [[maybe_unused]] const OpenStoreOptions& options) {
#ifdef IDEM_HAVE_SQLITE
  std::error_code ec;
  if ((options.must_exist || options.read_only) &&
      !std::filesystem::is_regular_file(url.path, ec)) {
    throw StoreUnavailable("no SQLite database at \"" + url.path +
                           "\": check the path (it is not created here)");
  }
  return std::make_unique<SqliteStore>(url.path, SqliteOptions{.busy_timeout = options.busy_timeout,
                                                               .read_only = options.read_only});
#else
  throw StoreBackendNotBuilt(
      "this idem was built without the SQLite store (sqlite); rebuild with "
      "-DIDEM_WITH_SQLITE=ON");
#endif
}

std::unique_ptr<DedupStore> open_redis([[maybe_unused]] const RedisUrl& url,
                                       [[maybe_unused]] const OpenStoreOptions& options) {
#ifdef IDEM_HAVE_REDIS
  auto store = std::make_unique<RedisStore>(RedisOptions{
      .host = url.host,
      .port = url.port,
      .user = url.user,
      .password = url.password,
      .db = url.db,
      .key_prefix = url.prefix,
      .connect_timeout = url.timeout,
      .command_timeout = url.timeout,
      .pool_size = options.pool_size == 0 ? RedisOptions{}.pool_size : options.pool_size,
  });
  if (options.ping)
    store->ping();  // RedisStore connects lazily; fail here with the reason, before any command
  return store;
#else
  throw StoreBackendNotBuilt(
      "this idem was built without the Redis store (redis); rebuild with "
      "-DIDEM_WITH_REDIS=ON");
#endif
}

std::unique_ptr<DedupStore> open_postgres([[maybe_unused]] const PostgresUrl& url,
                                          [[maybe_unused]] const OpenStoreOptions& options) {
#ifdef IDEM_HAVE_POSTGRES
  // The constructor connects (and creates the tables when missing, as any consumer would).
  PostgresOptions o{.conninfo = url.conninfo, .schema = url.schema};
  if (options.pool_size != 0) o.pool_size = options.pool_size;
  return std::make_unique<PostgresStore>(std::move(o));
#else
  throw StoreBackendNotBuilt(
      "this idem was built without the PostgreSQL store (postgres); rebuild with "
      "-DIDEM_WITH_POSTGRES=ON");
#endif
}

}  // namespace

std::unique_ptr<DedupStore> open_store(const StoreUrl& url, const OpenStoreOptions& options) {
  return std::visit(
      [&](const auto& u) -> std::unique_ptr<DedupStore> {
        using Url = std::decay_t<decltype(u)>;
        if constexpr (std::is_same_v<Url, MemoryUrl>) {
          return std::make_unique<MemoryStore>();
        } else if constexpr (std::is_same_v<Url, SqliteUrl>) {
          return open_sqlite(u, options);
        } else if constexpr (std::is_same_v<Url, RedisUrl>) {
          return open_redis(u, options);
        } else {
          return open_postgres(u, options);
        }
      },
      url);
}

std::unique_ptr<DedupStore> open_store(std::string_view url, const OpenStoreOptions& options) {
  return open_store(parse_store_url(url), options);
}

std::string_view open_store_backends() noexcept {
  static const std::string names = [] {
    std::string out = "memory";
    const auto add = [&](const char* name) { out += std::string(", ") + name; };
#ifdef IDEM_HAVE_SQLITE
    add("sqlite");
#endif
#ifdef IDEM_HAVE_REDIS
    add("redis");
#endif
#ifdef IDEM_HAVE_POSTGRES
    add("postgres");
#endif
    return out;
  }();
  return names;
}

}  // namespace idem
