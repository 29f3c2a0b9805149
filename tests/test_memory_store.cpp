#include <gtest/gtest.h>

#include <string>

#include "idem/idem.hpp"
#include "idem/testing/store_conformance.hpp"

namespace {

using namespace std::chrono_literals;
using idem::ClaimRequest;
using idem::ClaimStatus;
using idem::MemoryOptions;
using idem::MemoryStore;

struct MemoryStoreFactory {
  idem::ManualClock clock;
  std::unique_ptr<idem::DedupStore> make() {
    return std::make_unique<MemoryStore>(MemoryOptions{.clock = &clock});
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
  idem::MemoryStoreStats stats = store.counters();
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
  idem::MemoryStoreStats stats = store.counters();
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
  idem::MemoryStoreStats stats = store.counters();
  EXPECT_GE(stats.expired, 10u);
  EXPECT_LT(stats.keys, 110u);
  std::size_t purged = store.purge_expired();
  EXPECT_EQ(stats.expired + purged, 100u);
  EXPECT_EQ(store.counters().keys, 10u);
}

TEST(MemoryStore, CountsLeaseTakeovers) {
  idem::ManualClock clock;
  MemoryStore store({.clock = &clock});
  ASSERT_EQ(store.claim(request("k")).status, ClaimStatus::acquired);
  clock.advance(2000);
  idem::Claim c = store.claim(request("k"));
  EXPECT_EQ(c.status, ClaimStatus::acquired);
  EXPECT_TRUE(c.took_over);
  EXPECT_EQ(store.counters().takeovers, 1u);
}

TEST(MemoryStore, StoredResponsesCountAgainstBytesAndAreFreed) {
  idem::ManualClock clock;
  MemoryStore store({.shards = 1, .clock = &clock});
  idem::Claim c = store.claim(request("k"));
  std::size_t before = store.counters().bytes;
  ASSERT_TRUE(store.complete({.key = "k", .token = c.token, .response = std::string(1000, 'r')}));
  EXPECT_EQ(store.counters().bytes, before + 1000);
  EXPECT_TRUE(store.forget("k"));
  EXPECT_EQ(store.counters().bytes, before);
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
  idem::StoreStats summary = store.stats();
  EXPECT_EQ(summary.records, 2u);
  EXPECT_EQ(summary.done, 1u);
  EXPECT_EQ(summary.in_progress, 1u);
  clock.advance(10'000);
  EXPECT_EQ(store.purge_expired(100), 2u);
}

}  // namespace

namespace {

TEST(MemoryStore, NeverEvictsABeforeProcessingRecordWhoseHandlerRuns) {
  idem::ManualClock clock;
  MemoryStore store({.max_keys = 2, .shards = 1, .clock = &clock});
  ClaimRequest first = request("a");
  first.mark_done = true;
  idem::Claim running = store.claim(first);
  ASSERT_EQ(running.status, ClaimStatus::acquired);
  for (int i = 0; i < 10; ++i) claim_and_complete(store, "other" + std::to_string(i));
  EXPECT_EQ(store.claim(request("a")).status, ClaimStatus::done);
  // Once its handler completed, it is an ordinary done record and may be evicted.
  ASSERT_TRUE(store.complete({.key = "a", .token = running.token, .retention = 10'000ms}));
  for (int i = 10; i < 20; ++i) claim_and_complete(store, "other" + std::to_string(i));
  EXPECT_EQ(store.claim(request("a")).status, ClaimStatus::acquired);
}

TEST(MemoryStore, CompleteWritesAgainARecordPurgedAfterItsLease) {
  idem::ManualClock clock;
  MemoryStore store({.shards = 1, .clock = &clock});
  idem::Claim slow = store.claim(request("slow"));
  clock.advance(5000);  // the lease ran out; nobody took over
  EXPECT_EQ(store.purge_expired(), 1u);
  EXPECT_TRUE(store.complete({.key = "slow", .token = slow.token, .response = "r"}));
  idem::Claim again = store.claim(request("slow"));
  EXPECT_EQ(again.status, ClaimStatus::done);
  EXPECT_EQ(again.response, "r");
  // A newer owner's record is never overwritten by a stale holder.
  idem::Claim old_owner = store.claim(request("taken"));
  clock.advance(5000);
  idem::Claim new_owner = store.claim(request("taken"));
  EXPECT_FALSE(store.complete({.key = "taken", .token = old_owner.token}));
  EXPECT_TRUE(store.complete({.key = "taken", .token = new_owner.token}));
}

TEST(MemoryStore, ReleasedRecordsAtTheFrontArePurgedPromptly) {
  idem::ManualClock clock;
  MemoryStore store({.shards = 1, .clock = &clock});
  claim_and_complete(store, "head");  // retention 10 s: the front stays live a long time
  ASSERT_TRUE(store.forget("head"));
  for (int i = 0; i < 1000; ++i) {
    std::string key = "failed" + std::to_string(i);
    idem::Claim c = store.claim(request(key));
    ASSERT_TRUE(store.release(key, c.token));
  }
  EXPECT_GT(store.counters().expired, 900u);
}

TEST(MemoryStore, RejectsNonPositiveOrHugeDurations) {
  MemoryStore store;
  ClaimRequest zero_lease = request("k");
  zero_lease.lease = 0ms;
  EXPECT_THROW(store.claim(zero_lease), idem::ConfigError);
  ClaimRequest huge = request("k");
  huge.retention = std::chrono::milliseconds::max();
  EXPECT_THROW(store.claim(huge), idem::ConfigError);
}

}  // namespace
