#include "open_store.hpp"

#include <filesystem>
#include <string>
#include <system_error>
#include <type_traits>
#include <variant>

#include "idem/error.hpp"
#ifdef IDEM_HAVE_SQLITE
#include "idem/stores/sqlite_store.hpp"
#endif
#ifdef IDEM_HAVE_REDIS
#include "idem/stores/redis_store.hpp"
#endif
#ifdef IDEM_HAVE_POSTGRES
#include "idem/stores/postgres_store.hpp"
#endif

namespace idemctl {

namespace {

std::unique_ptr<idem::DedupStore> open_sqlite([[maybe_unused]] const SqliteUrl& url) {
#ifdef IDEM_HAVE_SQLITE
  // An operator's typo must not leave an empty database behind, so never create one.
  std::error_code ec;
  if (!std::filesystem::is_regular_file(url.path, ec)) {
    throw idem::StoreUnavailable("no SQLite database at \"" + url.path +
                                 "\": check the path (idemctl does not create databases)");
  }
  return std::make_unique<idem::SqliteStore>(url.path);
#else
  throw BackendNotBuilt(
      "this idemctl was built without the SQLite store (idem::sqlite); rebuild with "
      "-DIDEM_WITH_SQLITE=ON");
#endif
}

std::unique_ptr<idem::DedupStore> open_redis([[maybe_unused]] const RedisUrl& url) {
#ifdef IDEM_HAVE_REDIS
  auto store = std::make_unique<idem::RedisStore>(idem::RedisOptions{
      .host = url.host,
      .port = url.port,
      .user = url.user,
      .password = url.password,
      .db = url.db,
      .key_prefix = url.prefix,
      .connect_timeout = url.timeout,
      .command_timeout = url.timeout,
      .pool_size = 1,
  });
  store->ping();  // RedisStore connects lazily; fail here with the reason, before any command
  return store;
#else
  throw BackendNotBuilt(
      "this idemctl was built without the Redis store (idem::redis); rebuild with "
      "-DIDEM_WITH_REDIS=ON");
#endif
}

std::unique_ptr<idem::DedupStore> open_postgres([[maybe_unused]] const PostgresUrl& url) {
#ifdef IDEM_HAVE_POSTGRES
  // The constructor connects (and creates the tables when missing, as any consumer would).
  return std::make_unique<idem::PostgresStore>(idem::PostgresOptions{
      .conninfo = url.conninfo, .schema = url.schema, .pool_size = 1, .purge_interval = {}});
#else
  throw BackendNotBuilt(
      "this idemctl was built without the PostgreSQL store (idem::postgres); rebuild with "
      "-DIDEM_WITH_POSTGRES=ON");
#endif
}

}  // namespace

std::unique_ptr<idem::DedupStore> open_store(const StoreUrl& url) {
  return std::visit(
      [](const auto& u) -> std::unique_ptr<idem::DedupStore> {
        using Url = std::decay_t<decltype(u)>;
        if constexpr (std::is_same_v<Url, SqliteUrl>) {
          return open_sqlite(u);
        } else if constexpr (std::is_same_v<Url, RedisUrl>) {
          return open_redis(u);
        } else {
          return open_postgres(u);
        }
      },
      url);
}

std::string_view built_backends() noexcept {
  static const std::string names = [] {
    std::string out;
    const auto add = [&](const char* name) {
      out += out.empty() ? name : std::string(", ") + name;
    };
#ifdef IDEM_HAVE_SQLITE
    add("sqlite");
#endif
#ifdef IDEM_HAVE_REDIS
    add("redis");
#endif
#ifdef IDEM_HAVE_POSTGRES
    add("postgres");
#endif
    return out.empty() ? std::string("none") : out;
  }();
  return names;
}

}  // namespace idemctl
