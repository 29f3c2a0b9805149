// The installed conformance suites run the way docs/stores/writing-a-store.md tells a store's
// author to: the dedup suite on MemoryStore, and the inbox suite on SqliteStore when the sqlite
// component is linked (an in-memory database per store).
#include <idem/idem.hpp>
#include <idem/testing/inbox_conformance.hpp>
#include <idem/testing/store_conformance.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string_view>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <idem/sqlite.hpp>
#endif

namespace {

struct MemoryFactory {
  idem::ManualClock clock;
  std::unique_ptr<idem::DedupStore> make() {
    return std::make_unique<idem::MemoryStore>(idem::MemoryOptions{.clock = &clock});
  }
  void advance(std::chrono::milliseconds ms) { clock.advance(ms.count()); }
};

#ifdef IDEM_TEST_HAVE_SQLITE
struct SqliteInboxFactory {
  using Store = idem::SqliteStore;
  idem::ManualClock clock;
  std::unique_ptr<Store> make() {
    auto store = std::make_unique<Store>(":memory:", idem::SqliteOptions{.clock = &clock});
    store->transaction(
        [](idem::SqliteTx& tx) { tx.exec("CREATE TABLE effects(key BLOB NOT NULL)"); });
    return store;
  }
  void advance(std::chrono::milliseconds ms) { clock.advance(ms.count()); }
  static void write_effect(idem::SqliteTx& tx, std::string_view key) {
    tx.exec("INSERT INTO effects(key) VALUES(?1)", idem::SqliteBlob{key});
  }
  std::int64_t effects(Store& store, std::string_view key) {
    std::int64_t n = 0;
    store.transaction([&](idem::SqliteTx& tx) {
      n = tx.query_int64("SELECT count(*) FROM effects WHERE key = ?1", idem::SqliteBlob{key})
              .value();
    });
    return n;
  }
};
#endif

}  // namespace

namespace idem::testing {
INSTANTIATE_TYPED_TEST_SUITE_P(Installed, StoreConformance, MemoryFactory);
#ifdef IDEM_TEST_HAVE_SQLITE
INSTANTIATE_TYPED_TEST_SUITE_P(Installed, InboxConformance, SqliteInboxFactory);
#endif
}  // namespace idem::testing
