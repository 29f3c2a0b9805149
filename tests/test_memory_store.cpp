#include <gtest/gtest.h>

#include <string>

#include "idem/idem.hpp"
#include "store_conformance.hpp"

namespace {

using namespace std::chrono_literals;
using idem::ClaimRequest;
using idem::ClaimStatus;
using idem::MemoryStore;
using idem::MemoryStoreOptions;

struct MemoryStoreFactory {
  idem::ManualClock clock;
  std::unique_ptr<idem::DedupStore> make() {
    return std::make_unique<MemoryStore>(MemoryStoreOptions{.clock = &clock});
  }
  void advance(std::chrono::milliseconds ms) { clock.advance(ms.count()); }
};

}  // namespace

namespace idem::testing {
INSTANTIATE_TYPED_TEST_SUITE_P(Memory, StoreConformance, MemoryStoreFactory);
}

namespace {

ClaimRequest request(std::string_view key) {
  return ClaimRequest{.key = key, .lease = 1000ms, .retention = 10'000ms};
}

void claim_and_complete(MemoryStore& store, std::string_view key) {
  idem::Claim c = store.claim(request(key));
  ASSERT_EQ(c.status, ClaimStatus::acquired) << key;
  ASSERT_TRUE(store.complete({.key = key, .token = c.token, .retention = 10'000ms}));
}

TEST(MemoryStore, EvictsTheOldestDoneRecordsPastMaxKeysAndCountsThem) {
  idem::ManualClock clock;
  MemoryStore store({.max_keys = 100, .shards = 1, .clock = &clock});
  for (int i = 0; i < 1000; ++i) claim_and_complete(store, "k" + std::to_string(i));
  idem::MemoryStoreStats stats = store.stats();
  EXPECT_LE(stats.keys, 100u);
  EXPECT_EQ(stats.evictions, 1000u - stats.keys);
  // The newest are kept, the oldest are gone (and would be processed again: documented).
  EXPECT_EQ(store.claim(request("k999")).status, ClaimStatus::done);
  EXPECT_EQ(store.claim(request("k0")).status, ClaimStatus::acquired);
}

TEST(MemoryStore, NeverEvictsALiveClaim) {
  idem::ManualClock clock;
  MemoryStore store({.max_keys = 10, .shards = 1, .clock = &clock});
  std::vector<idem::Claim> held;
  for (int i = 0; i < 10; ++i) held.push_back(store.claim(request("held" + std::to_string(i))));
  for (int i = 0; i < 100; ++i) claim_and_complete(store, "done" + std::to_string(i));
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(store.claim(request("held" + std::to_string(i))).status, ClaimStatus::in_progress);
  }
}

TEST(MemoryStore, RespectsMaxBytes) {
  idem::ManualClock clock;
  MemoryStore store({.max_bytes = 64 * 1024, .shards = 1, .clock = &clock});
  for (int i = 0; i < 10'000; ++i) claim_and_complete(store, "key-" + std::to_string(i));
  idem::MemoryStoreStats stats = store.stats();
  EXPECT_LE(stats.bytes, 64u * 1024u);
  EXPECT_GT(stats.evictions, 0u);
}

TEST(MemoryStore, ExpiredRecordsArePurgedIncrementallyAndOnRequest) {
  idem::ManualClock clock;
  MemoryStore store({.shards = 1, .clock = &clock});
  for (int i = 0; i < 100; ++i) claim_and_complete(store, "old" + std::to_string(i));
  clock.advance(20'000);
  // Each insert drops a couple of expired records from the front.
  for (int i = 0; i < 10; ++i) claim_and_complete(store, "new" + std::to_string(i));
  idem::MemoryStoreStats stats = store.stats();
  EXPECT_GE(stats.expired, 10u);
  EXPECT_LT(stats.keys, 110u);
  std::size_t purged = store.purge_expired();
  EXPECT_EQ(stats.expired + purged, 100u);
  EXPECT_EQ(store.stats().keys, 10u);
}

TEST(MemoryStore, CountsLeaseTakeovers) {
  idem::ManualClock clock;
  MemoryStore store({.clock = &clock});
  ASSERT_EQ(store.claim(request("k")).status, ClaimStatus::acquired);
  clock.advance(2000);
  idem::Claim c = store.claim(request("k"));
  EXPECT_EQ(c.status, ClaimStatus::acquired);
  EXPECT_TRUE(c.took_over);
  EXPECT_EQ(store.stats().takeovers, 1u);
}

TEST(MemoryStore, StoredResponsesCountAgainstBytesAndAreFreed) {
  idem::ManualClock clock;
  MemoryStore store({.shards = 1, .clock = &clock});
  idem::Claim c = store.claim(request("k"));
  std::size_t before = store.stats().bytes;
  ASSERT_TRUE(store.complete({.key = "k", .token = c.token, .response = std::string(1000, 'r')}));
  EXPECT_EQ(store.stats().bytes, before + 1000);
  EXPECT_TRUE(store.forget("k"));
  EXPECT_EQ(store.stats().bytes, before);
}

}  // namespace

namespace {

TEST(MemoryStore, InspectAndStatsSummaryForOperators) {
  idem::ManualClock clock;
  MemoryStore store({.clock = &clock});
  idem::Claim c = store.claim(request("k"));
  std::optional<idem::RecordInfo> held = store.inspect("k");
  ASSERT_TRUE(held);
  EXPECT_EQ(held->state, idem::RecordInfo::State::in_progress);
  EXPECT_EQ(held->token, c.token);
  EXPECT_EQ(held->expires_in_ms, 1000);
  ASSERT_TRUE(store.complete({.key = "k", .token = c.token, .response = "r", .retention = 5000ms}));
  std::optional<idem::RecordInfo> done = store.inspect("k");
  EXPECT_EQ(done->state, idem::RecordInfo::State::done);
  EXPECT_EQ(done->response, "r");
  EXPECT_FALSE(store.inspect("absent"));
  store.claim(request("other"));
  idem::StoreStats summary = store.stats_summary();
  EXPECT_EQ(summary.records, 2u);
  EXPECT_EQ(summary.done, 1u);
  EXPECT_EQ(summary.in_progress, 1u);
  clock.advance(10'000);
  EXPECT_EQ(store.purge_expired_records(100), 2u);
}

}  // namespace
