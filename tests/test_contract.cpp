// The public contract (shared/CONTRACT.md) spelled out as code: names, types and CTAD that
// users and outside acceptance tests rely on. Mostly compile-time; a failure here means an
// API break.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <unistd.h>
#include <filesystem>
#include <functional>
#include <type_traits>

#include <idem/idem.hpp>
#include <idem/redis.hpp>
#include <idem/sqlite.hpp>

namespace {

using namespace std::chrono_literals;

static_assert(std::is_base_of_v<std::runtime_error, idem::Error>);
static_assert(std::is_base_of_v<idem::Error, idem::InvalidMessage>);
static_assert(std::is_base_of_v<idem::Error, idem::StoreUnavailable>);
static_assert(std::is_base_of_v<idem::DedupStore, idem::MemoryStore>);
static_assert(std::is_base_of_v<idem::DedupStore, idem::SqliteStore>);
static_assert(std::is_base_of_v<idem::DedupStore, idem::RedisStore>);
static_assert(std::is_same_v<decltype(idem::Message{}.key), std::string_view>);
static_assert(std::is_same_v<decltype(idem::Message{}.payload), std::string_view>);
static_assert(std::is_same_v<decltype(idem::Message{}.inner_id), std::string_view>);
static_assert(std::is_same_v<decltype(idem::Result{}.response), std::optional<std::string>>);
static_assert(std::is_same_v<decltype(idem::Options{}.lease), std::chrono::milliseconds>);
static_assert(std::is_same_v<decltype(idem::Options{}.retention), std::chrono::milliseconds>);
static_assert(std::is_same_v<decltype(idem::Options{}.max_key_bytes), std::size_t>);
static_assert(
    std::is_same_v<decltype(&idem::SqliteTx::native_handle),
                   sqlite3* (idem::SqliteTx::*)() const> ||
    std::is_same_v<decltype(&idem::SqliteTx::native_handle),
                   sqlite3* (idem::SqliteTx::*)() const noexcept> ||
    std::is_same_v<decltype(&idem::SqliteTx::native_handle), sqlite3* (idem::SqliteTx::*)()> ||
    std::is_same_v<decltype(&idem::SqliteTx::native_handle),
                   sqlite3* (idem::SqliteTx::*)() noexcept>);
static_assert(idem::should_ack(idem::Outcome::processed) &&
              idem::should_ack(idem::Outcome::duplicate) &&
              !idem::should_ack(idem::Outcome::in_progress) &&
              !idem::should_ack(idem::Outcome::conflict) &&
              !idem::should_ack(idem::Outcome::failed));

TEST(Contract, OptionDefaults) {
  idem::Options o;
  EXPECT_EQ(o.lease, 30s);
  EXPECT_EQ(o.retention, 24h);
  EXPECT_EQ(o.max_key_bytes, 512u);
  EXPECT_TRUE(o.verify_payload);
  EXPECT_EQ(o.mark, idem::Mark::after_success);
  idem::Options designated{.lease = 5s, .mark = idem::Mark::before_processing};
  EXPECT_EQ(designated.lease, 5s);
}

TEST(Contract, CtadWithEveryStoreAndHandlerForm) {
  idem::MemoryStore memory;
  idem::IdempotentConsumer a(memory, [](const idem::Message&) {});
  static_assert(std::is_same_v<decltype(a.consume(idem::Message{})), idem::Result>);
  idem::IdempotentConsumer b(
      memory, [](const idem::Message&) { return std::string("r"); }, idem::Options{});
  idem::DedupStore& base = memory;
  idem::IdempotentConsumer c(base, [](const idem::Message&) {});
  std::vector<idem::Message> batch{{.key = "x"}, {.key = "x"}};
  std::vector<idem::Result> results = c.consume_batch(batch);
  EXPECT_EQ(results[1].outcome, idem::Outcome::duplicate);
  EXPECT_EQ(b.consume({.key = "y"}).response, "r");

  const std::string path = (std::filesystem::temp_directory_path() /
                            ("idem-contract-" + std::to_string(::getpid()) + ".db"))
                               .string();
  {
    idem::SqliteStore sqlite(path);
    idem::IdempotentConsumer tx_consumer(sqlite, [](const idem::Message&, idem::SqliteTx& tx) {
      EXPECT_NE(tx.native_handle(), nullptr);
    });
    EXPECT_EQ(tx_consumer.consume({.key = "k"}).outcome, idem::Outcome::processed);
    EXPECT_EQ(tx_consumer.consume({.key = "k"}).outcome, idem::Outcome::duplicate);
  }
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path + suffix);

  idem::RedisStore redis(idem::RedisOptions{.host = "127.0.0.1", .port = 1, .key_prefix = "c:"});
  idem::IdempotentConsumer r(redis, [](const idem::Message&) {});
  EXPECT_THROW(r.consume({.key = "k"}), idem::StoreUnavailable);  // nothing listens on port 1
}

TEST(Contract, InnerMsgId) {
  idem::InnerMsgIdGenerator gen;
  idem::InnerMsgId a = gen.next();
  idem::InnerMsgId b = gen.next();
  EXPECT_LT(a, b);
  EXPECT_EQ(a.to_string().size(), 36u);
  EXPECT_EQ(idem::InnerMsgId::parse(a.to_string()), a);
  EXPECT_FALSE(idem::InnerMsgId::parse("not-a-uuid"));
  EXPECT_GT(a.unix_ms(), 1'700'000'000'000u);
  EXPECT_NE(std::hash<idem::InnerMsgId>{}(a), std::hash<idem::InnerMsgId>{}(b));
}

}  // namespace
