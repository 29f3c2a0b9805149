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

}  // namespace

std::unique_ptr<idem::DedupStore> open_store(const StoreUrl& url) {
  return std::visit(
      [](const auto& u) -> std::unique_ptr<idem::DedupStore> {
        if constexpr (std::is_same_v<std::decay_t<decltype(u)>, SqliteUrl>) {
          return open_sqlite(u);
        } else {
          return open_redis(u);
        }
      },
      url);
}

std::string_view built_backends() noexcept {
#if defined(IDEM_HAVE_SQLITE) && defined(IDEM_HAVE_REDIS)
  return "sqlite, redis";
#elif defined(IDEM_HAVE_SQLITE)
  return "sqlite";
#elif defined(IDEM_HAVE_REDIS)
  return "redis";
#else
  return "none";
#endif
}

}  // namespace idemctl
