// CachedStore: the store conformance suite over it (in front of MemoryStore and SQLite), and
// what the cache itself promises: duplicates it knows cost no store call, it never answers
// for a record that expired or was forgotten through it, payload conflicts still reach the
// store, and it stays within its bounds.

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "idem/idem.hpp"
#include "idem/sqlite.hpp"
#include "idem/testing/store_conformance.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace std::chrono_literals;
using idem::CachedOptions;
using idem::CachedStore;
using idem::Claim;
using idem::ClaimRequest;
using idem::ClaimStatus;
using idem::Fingerprint;
using idem::ManualClock;
using idem::MemoryStore;

struct CachedMemoryFactory {
  ManualClock clock;
  std::unique_ptr<MemoryStore> inner;
  std::unique_ptr<idem::DedupStore> make() {
    inner = std::make_unique<MemoryStore>(idem::MemoryOptions{.clock = &clock});
    return std::make_unique<CachedStore>(*inner, CachedOptions{.clock = &clock});
  }
  void advance(std::chrono::milliseconds ms) { clock.advance(ms.count()); }
};

struct CachedSqliteFactory {
  idem::testing::TempDir dir{"cached-store"};
  ManualClock clock;
  std::unique_ptr<idem::SqliteStore> inner;
  std::unique_ptr<idem::DedupStore> make() {
    inner = std::make_unique<idem::SqliteStore>(
        dir.file("cached.db"),
        idem::SqliteOptions{.synchronous = idem::SqliteSync::normal, .clock = &clock});
    return std::make_unique<CachedStore>(*inner, CachedOptions{.clock = &clock});
  }
  void advance(std::chrono::milliseconds ms) { clock.advance(ms.count()); }
  static constexpr std::size_t race_keys = 5'000;
};

}  // namespace

namespace idem::testing {
INSTANTIATE_TYPED_TEST_SUITE_P(CachedMemory, StoreConformance, CachedMemoryFactory);
INSTANTIATE_TYPED_TEST_SUITE_P(CachedSqlite, StoreConformance, CachedSqliteFactory);
}  // namespace idem::testing

namespace {

// Counts the calls that reach the store behind the cache.
class CountingStore final : public idem::DedupStore {
 public:
  explicit CountingStore(idem::DedupStore& inner) : inner_(inner) {}
  std::string_view name() const noexcept override { return "counting"; }
  std::atomic<int> claims{0}, completes{0}, inspects{0}, forgets{0};
  int calls() const { return claims + completes + inspects + forgets; }

 private:
  Claim do_claim(const ClaimRequest& request) override {
    ++claims;
    return inner_.claim(request);
  }
  bool do_complete(const idem::Completion& completion) override {
    ++completes;
    return inner_.complete(completion);
  }
  bool do_release(std::string_view key, std::uint64_t token) override {
    return inner_.release(key, token);
  }
  bool do_forget(std::string_view key) override {
    ++forgets;
    return inner_.forget(key);
  }
  std::optional<idem::RecordInfo> do_inspect(std::string_view key) override {
    ++inspects;
    return inner_.inspect(key);
  }
  idem::DedupStore& inner_;
};

// Records the counters a CachedStore reports.
class CountingMetrics final : public idem::Metrics {
 public:
  void add(idem::Counter counter, std::uint64_t n) noexcept override {
    counts[static_cast<std::size_t>(counter)] += n;
  }
  void observe(idem::Timing, std::chrono::nanoseconds) noexcept override {}
  std::uint64_t operator[](idem::Counter counter) const {
    return counts[static_cast<std::size_t>(counter)];
  }
  std::array<std::atomic<std::uint64_t>, idem::kCounterCount> counts{};
};

ClaimRequest request(std::string_view key, std::string_view payload = "amount=10") {
  return ClaimRequest{
      .key = key, .fingerprint = Fingerprint::of(payload), .lease = 1000ms, .retention = 10'000ms};
}

class CachedStoreTest : public ::testing::Test {
 protected:
  ManualClock clock;
  MemoryStore memory{idem::MemoryOptions{.clock = &clock}};
  CountingStore counting{memory};
  CountingMetrics metrics;
  CachedStore cached{counting, CachedOptions{.metrics = &metrics, .clock = &clock}};

  void process(std::string_view key, std::optional<std::string_view> response = std::nullopt) {
    Claim c = cached.claim(request(key));
    ASSERT_EQ(c.status, ClaimStatus::acquired) << key;
    ASSERT_TRUE(
        cached.complete({.key = key, .token = c.token, .response = response, .retention = 10s}));
  }
};

TEST_F(CachedStoreTest, ADuplicateOfAKeyCompletedHereMakesNoStoreCall) {
  process("pay-1", "card-7");
  const int before = counting.calls();
  for (int i = 0; i < 100; ++i) {
    Claim again = cached.claim(request("pay-1"));
    ASSERT_EQ(again.status, ClaimStatus::done);
    EXPECT_EQ(again.response, "card-7");
  }
  EXPECT_EQ(counting.calls(), before);
  EXPECT_EQ(cached.counters().hits, 100u);
  EXPECT_EQ(metrics[idem::Counter::cache_hits], 100u);
  EXPECT_EQ(metrics[idem::Counter::cache_misses], 1u);  // the first claim
}

TEST_F(CachedStoreTest, ADoneKeyLearntFromTheStoreIsCachedForWhatIsLeftOfTheRecord) {
  // Another process completed the key 8 s ago with a 10 s retention.
  Claim c = memory.claim(request("pay-2"));
  ASSERT_TRUE(memory.complete({.key = "pay-2", .token = c.token, .retention = 10s}));
  clock.advance(8000);
  EXPECT_EQ(cached.claim(request("pay-2")).status, ClaimStatus::done);  // store, then inspect
  EXPECT_EQ(counting.claims, 1);
  EXPECT_EQ(counting.inspects, 1);
  EXPECT_EQ(cached.claim(request("pay-2")).status, ClaimStatus::done);  // from the cache
  EXPECT_EQ(counting.claims, 1);
  clock.advance(2000);  // the record expires now; the entry must not outlive it
  Claim after = cached.claim(request("pay-2"));
  EXPECT_EQ(after.status, ClaimStatus::acquired);
  EXPECT_EQ(counting.claims, 2);
}

TEST_F(CachedStoreTest, NeverAnswersForARecordThatExpired) {
  process("pay-3");
  clock.advance(9999);
  EXPECT_EQ(cached.claim(request("pay-3")).status, ClaimStatus::done);
  clock.advance(1);
  EXPECT_EQ(cached.claim(request("pay-3")).status, ClaimStatus::acquired);
}

TEST_F(CachedStoreTest, ForgetThroughTheCacheDropsTheEntry) {
  process("pay-4");
  EXPECT_TRUE(cached.forget("pay-4"));
  EXPECT_EQ(cached.claim(request("pay-4")).status, ClaimStatus::acquired);
}

TEST_F(CachedStoreTest, AForgetElsewhereIsSeenOnceMaxTtlEnds) {
  CachedStore short_lived(counting, CachedOptions{.max_ttl = 2s, .clock = &clock});
  Claim c = short_lived.claim(request("pay-5"));
  ASSERT_TRUE(short_lived.complete({.key = "pay-5", .token = c.token, .retention = 10s}));
  memory.forget("pay-5");  // an operator, through another process
  EXPECT_EQ(short_lived.claim(request("pay-5")).status, ClaimStatus::done);  // documented
  clock.advance(2000);
  EXPECT_EQ(short_lived.claim(request("pay-5")).status, ClaimStatus::acquired);
}

TEST_F(CachedStoreTest, ADifferentPayloadGoesToTheStoreAndIsAConflict) {
  process("pay-6");
  const int claims = counting.claims;
  EXPECT_EQ(cached.claim(request("pay-6", "amount=99")).status, ClaimStatus::conflict);
  EXPECT_EQ(counting.claims, claims + 1);
  // Without a fingerprint (verification off) the entry answers.
  ClaimRequest unverified = request("pay-6");
  unverified.fingerprint = {};
  EXPECT_EQ(cached.claim(unverified).status, ClaimStatus::done);
  EXPECT_EQ(counting.claims, claims + 1);
}

TEST_F(CachedStoreTest, InProgressAndReleasedKeysAreNeverCached) {
  Claim held = cached.claim(request("pay-7"));
  ASSERT_EQ(held.status, ClaimStatus::acquired);
  EXPECT_EQ(cached.claim(request("pay-7")).status, ClaimStatus::in_progress);
  ASSERT_TRUE(cached.release("pay-7", held.token));
  Claim again = cached.claim(request("pay-7"));
  EXPECT_EQ(again.status, ClaimStatus::acquired);
  EXPECT_GT(again.token, held.token);
  EXPECT_EQ(cached.counters().entries, 0u);
}

TEST_F(CachedStoreTest, ALostLeaseIsNotCached) {
  Claim stale = cached.claim(request("pay-8"));
  clock.advance(1001);
  Claim taker = memory.claim(request("pay-8"));  // another worker takes over
  ASSERT_EQ(taker.status, ClaimStatus::acquired);
  EXPECT_FALSE(cached.complete({.key = "pay-8", .token = stale.token, .retention = 10s}));
  EXPECT_EQ(cached.claim(request("pay-8")).status, ClaimStatus::in_progress);
}

TEST_F(CachedStoreTest, BatchesServeHitsAndAskTheStoreForTheRest) {
  process("b-1");
  process("b-2");
  const int claims = counting.claims;
  std::vector<ClaimRequest> requests{request("b-1"), request("b-new"), request("b-2")};
  std::vector<Claim> claims_out = cached.claim_batch(requests);
  EXPECT_EQ(claims_out[0].status, ClaimStatus::done);
  EXPECT_EQ(claims_out[1].status, ClaimStatus::acquired);
  EXPECT_EQ(claims_out[2].status, ClaimStatus::done);
  EXPECT_EQ(counting.claims, claims + 1);  // one key asked of the store
  std::vector<idem::Completion> completions{
      {.key = "b-new", .token = claims_out[1].token, .retention = 10s}};
  EXPECT_EQ(cached.complete_batch(completions), std::vector<bool>{true});
  EXPECT_EQ(cached.claim(request("b-new")).status, ClaimStatus::done);
  EXPECT_EQ(counting.claims, claims + 1);
}

TEST(CachedStoreReplace, ATooBigResponseDropsTheEntryInsteadOfKeepingAStaleOne) {
  MemoryStore memory;
  CachedStore cached(memory, CachedOptions{.max_bytes = 512});
  idem::IdempotentConsumer consumer(
      cached, [](const idem::Message&) { return std::string(1000, 'r'); },
      idem::Options{.mark = idem::Mark::before_processing});
  consumer.consume({.key = "big", .payload = "p"});  // cached at the claim, without response
  idem::Result again = consumer.consume({.key = "big", .payload = "p"});
  EXPECT_EQ(again.outcome, idem::Outcome::duplicate);
  ASSERT_TRUE(again.response.has_value());
  EXPECT_EQ(again.response->size(), 1000u);  // from the store: the entry could not hold it
}

// A store whose completion lets a forget run in the middle of it, as another thread would.
class ForgetDuringComplete final : public idem::DedupStore {
 public:
  explicit ForgetDuringComplete(idem::DedupStore& inner) : inner_(inner) {}
  std::string_view name() const noexcept override { return "racing"; }
  std::function<void()> during_complete;

 private:
  Claim do_claim(const ClaimRequest& request) override { return inner_.claim(request); }
  bool do_complete(const idem::Completion& completion) override {
    const bool done = inner_.complete(completion);
    if (during_complete) during_complete();
    return done;
  }
  bool do_release(std::string_view key, std::uint64_t token) override {
    return inner_.release(key, token);
  }
  bool do_forget(std::string_view key) override { return inner_.forget(key); }
  idem::DedupStore& inner_;
};

TEST(CachedStoreReplace, AForgetRacingACompletionIsNotUndoneByIt) {
  MemoryStore memory;
  ForgetDuringComplete racing(memory);
  CachedStore cached(racing);
  racing.during_complete = [&] { cached.forget("k"); };
  Claim c = cached.claim(request("k"));
  ASSERT_TRUE(cached.complete({.key = "k", .token = c.token, .retention = 10s}));
  racing.during_complete = nullptr;
  EXPECT_EQ(cached.counters().entries, 0u);
  EXPECT_EQ(cached.claim(request("k")).status, ClaimStatus::acquired);  // the store forgot it
}

TEST(CachedStoreBounds, EntriesAndBytesStayWithinTheirBounds) {
  MemoryStore memory;
  CachedStore by_entries(memory, CachedOptions{.max_entries = 100});
  CachedStore by_bytes(memory, CachedOptions{.max_bytes = 16 * 1024});
  const std::string response(200, 'r');
  for (int i = 0; i < 2000; ++i) {
    for (CachedStore* store : {&by_entries, &by_bytes}) {
      const std::string key = std::string(store == &by_entries ? "e-" : "b-") + std::to_string(i);
      Claim c = store->claim(request(key));
      ASSERT_EQ(c.status, ClaimStatus::acquired);
      ASSERT_TRUE(store->complete({.key = key, .token = c.token, .response = response}));
    }
  }
  EXPECT_EQ(by_entries.counters().entries, 100u);
  EXPECT_LE(by_bytes.counters().bytes, 16u * 1024);
  EXPECT_GT(by_bytes.counters().entries, 10u);
  // The most recent keys are the ones kept.
  const int claims_before = static_cast<int>(by_entries.counters().misses);
  EXPECT_EQ(by_entries.claim(request("e-1999")).status, ClaimStatus::done);
  EXPECT_EQ(static_cast<int>(by_entries.counters().misses), claims_before);
}

TEST(CachedStoreBounds, ZeroBoundsAreAConfigError) {
  MemoryStore memory;
  EXPECT_THROW(CachedStore(memory, CachedOptions{.max_entries = 0}), idem::ConfigError);
  EXPECT_THROW(CachedStore(memory, CachedOptions{.max_ttl = 0ms}), idem::ConfigError);
}

TEST(CachedStoreConsumer, DuplicatesReplayTheResponseFromTheCache) {
  MemoryStore memory;
  CountingStore counting(memory);
  CountingMetrics metrics;
  CachedStore cached(counting, CachedOptions{.metrics = &metrics});
  int cards = 0;
  idem::IdempotentConsumer consumer(cached, [&](const idem::Message& m) {
    ++cards;
    return "card-for-" + std::string(m.key);
  });
  for (int i = 0; i < 10; ++i) {
    idem::Result r = consumer.consume({.key = "pay-9", .payload = "amount=10"});
    EXPECT_EQ(r.outcome, i == 0 ? idem::Outcome::processed : idem::Outcome::duplicate);
    EXPECT_EQ(r.response, "card-for-pay-9");
  }
  EXPECT_EQ(cards, 1);
  EXPECT_EQ(counting.claims, 1);
  EXPECT_EQ(metrics[idem::Counter::cache_hits], 9u);
}

TEST(CachedStoreConsumer, EightThreadsOnSharedKeysRunEachHandlerOnce) {
  MemoryStore memory;
  CachedStore cached(memory, CachedOptions{.max_entries = 500});
  constexpr int kKeys = 2000;
  std::vector<std::atomic<int>> runs(kKeys);
  idem::IdempotentConsumer consumer(
      cached, [&](const idem::Message& m) { runs[std::stoi(std::string(m.key))].fetch_add(1); });
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int round = 0; round < 3; ++round) {
        for (int k = 0; k < kKeys; ++k) {
          idem::Result r = consumer.consume({.key = std::to_string(k), .payload = "p"});
          ASSERT_NE(r.outcome, idem::Outcome::failed);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int k = 0; k < kKeys; ++k) {
    // in_progress answers may leave a key unprocessed by this loop only if every thread saw
    // it held; the first holder always completes it.
    EXPECT_EQ(runs[k].load(), 1) << k;
  }
}

}  // namespace
