// idem::open_store: a service takes its store from a URL in its configuration, for each kind of
// store this build has, against real servers; bad URLs are refused with what is wrong and the
// expected form (the same messages idemctl prints, see test_idemctl.cpp).

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "idem/idem.hpp"
#include "idem/open_store.hpp"
#include "support/temp_dir.hpp"
#ifdef IDEM_HAVE_REDIS
#include "support/redis_server.hpp"
#endif
#ifdef IDEM_HAVE_POSTGRES
#include "support/postgres_server.hpp"
#endif

namespace {

// What a service does with the store its configuration names: consume, then see a redelivery
// answered from the store.
void consume_twice(const std::string& url) {
  SCOPED_TRACE(url);
  std::unique_ptr<idem::DedupStore> store = idem::open_store(url);
  ASSERT_NE(store, nullptr);
  int runs = 0;
  idem::IdempotentConsumer consumer(*store, [&](const idem::Message&) {
    ++runs;
    return std::string("receipt");
  });
  EXPECT_EQ(consumer.consume({.key = "order-1", .payload = "p"}).outcome, idem::Outcome::processed);
  const idem::Result again = consumer.consume({.key = "order-1", .payload = "p"});
  EXPECT_EQ(again.outcome, idem::Outcome::duplicate);
  EXPECT_EQ(again.response, "receipt");
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(store->stats().done, 1u);
}

TEST(OpenStore, Memory) {
  consume_twice("memory:");
  EXPECT_EQ(idem::open_store("memory:")->name(), "memory");
}

#ifdef IDEM_HAVE_SQLITE
TEST(OpenStore, SqliteInEachSpelling) {
  idem::testing::TempDir dir("open-store");
  consume_twice("sqlite://" + dir.file("a.db"));  // sqlite:// + /abs/path
  consume_twice("sqlite:" + dir.file("b.db"));    // sqlite:/abs/path
  consume_twice("sqlite://" + dir.file("with space.db"));
  // must_exist: a typo leaves nothing behind.
  EXPECT_THROW(idem::open_store("sqlite://" + dir.file("missing.db"), {.must_exist = true}),
               idem::StoreUnavailable);
}
#endif

#ifdef IDEM_HAVE_REDIS
TEST(OpenStore, Redis) {
  idem::test_support::RedisServer server;
  consume_twice("redis://127.0.0.1:" + std::to_string(server.port()) + "/0?prefix=svc:");
}
#endif

#ifdef IDEM_HAVE_POSTGRES
TEST(OpenStore, PostgresBothSchemes) {
  idem::test_support::PostgresServer server;
  const std::string where = std::string(server.kUser) + ":" + server.kPassword +
                            "@127.0.0.1:" + std::to_string(server.port()) + "/" + server.kDatabase;
  consume_twice("postgres://" + where + "?schema=svc_a&connect_timeout=5");
  consume_twice("postgresql://" + where + "?schema=svc_b");
}
#endif

TEST(OpenStore, BadUrlsSayWhatIsWrongAndTheExpectedForm) {
  struct Case {
    const char* url;
    const char* says;
  };
  for (const Case& c :
       {Case{"foo://x", "unknown scheme \"foo\""}, Case{"/var/lib/dedup.db", "no scheme"},
        Case{"sqlite://", "database path is missing"}, Case{"memory:x", "nothing after"},
        Case{"redis://localhost:99999", "port \"99999\""}, Case{"redis://h:", "port after ':'"},
        Case{"redis://[::1", "not a valid URL"}, Case{"redis://h?prefix=%zz", "two hex digits"},
        Case{"redis://localhost:6379/x", "database \"x\""},
        Case{"redis://:secret@localhost:6379?colour=red", "unknown parameter"},
        Case{"rediss://localhost", "TLS"}, Case{"postgres://", "host is missing"},
        Case{"postgres://host/db?schema=", "schema is empty"}}) {
    try {
      idem::open_store(c.url);
      ADD_FAILURE() << c.url << " was opened";
    } catch (const idem::BadStoreUrl& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(c.says), std::string::npos) << what;
      EXPECT_NE(what.find("expected"), std::string::npos) << what;
      EXPECT_EQ(what.find("secret"), std::string::npos) << "password leaked: " << what;
    }
  }
}

}  // namespace
