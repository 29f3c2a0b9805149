#pragma once
/// @file
/// @brief idem::testing::StoreConformance: the behaviour every DedupStore must have, as one
/// typed GoogleTest suite. Installed with idem, so a store written outside idem can run it
/// (see docs/stores/writing-a-store.md). Link GoogleTest.
//
// Usage, in tests/test_<backend>_store.cpp:
//
//   struct MyStoreFactory {
//     // A fresh, empty store (its own file, key prefix, ...). Called once per test.
//     std::unique_ptr<idem::DedupStore> make();
//     // Makes `ms` pass for the store's leases and retention (advance a ManualClock the store
//     // was given, or sleep for stores whose clock is a server's).
//     void advance(std::chrono::milliseconds ms);
//     // Optional: distinct keys of the 8-thread race (default 100'000).
//     static constexpr std::size_t race_keys = 100'000;
//   };
//   namespace idem::testing {
//   INSTANTIATE_TYPED_TEST_SUITE_P(MyStore, StoreConformance, MyStoreFactory);
//   }

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "idem/idem.hpp"

namespace idem::testing {

using namespace std::chrono_literals;

template <class Factory>
constexpr std::size_t race_keys() {
  if constexpr (requires { Factory::race_keys; }) {
    return Factory::race_keys;
  } else {
    return 100'000;
  }
}

template <class Factory>
class StoreConformance : public ::testing::Test {
 protected:
  void SetUp() override { store_ = factory_.make(); }

  DedupStore& store() { return *store_; }
  void advance(std::chrono::milliseconds ms) { factory_.advance(ms); }

  static ClaimRequest request(std::string_view key, std::string_view payload = "p") {
    return ClaimRequest{.key = key,
                        .fingerprint = Fingerprint::of(payload),
                        .lease = kLease,
                        .retention = kRetention};
  }

  // Long enough that a slow (sanitised) run never sees a lease expire by accident; short
  // enough that stores on a real clock make the takeover tests quick.
  static constexpr std::chrono::milliseconds kLease{1500};
  static constexpr std::chrono::milliseconds kRetention{60'000};
  static constexpr Options kOptions{.lease = kLease, .retention = kRetention};

  Factory factory_;
  std::unique_ptr<DedupStore> store_;
};

TYPED_TEST_SUITE_P(StoreConformance);

TYPED_TEST_P(StoreConformance, FirstClaimAcquiresThenDoneAfterComplete) {
  Claim first = this->store().claim(this->request("order-1"));
  ASSERT_EQ(first.status, ClaimStatus::acquired);
  EXPECT_GT(first.token, 0u);
  EXPECT_EQ(this->store().claim(this->request("order-1")).status, ClaimStatus::in_progress);
  ASSERT_TRUE(this->store().complete(
      {.key = "order-1", .token = first.token, .retention = this->kRetention}));
  Claim again = this->store().claim(this->request("order-1"));
  EXPECT_EQ(again.status, ClaimStatus::done);
  EXPECT_FALSE(again.response.has_value());
}

TYPED_TEST_P(StoreConformance, ResponseIsStoredAndReplayed) {
  Claim c = this->store().claim(this->request("r"));
  ASSERT_EQ(c.status, ClaimStatus::acquired);
  std::string response("card\0#42", 8);
  ASSERT_TRUE(this->store().complete(
      {.key = "r", .token = c.token, .response = response, .retention = this->kRetention}));
  Claim again = this->store().claim(this->request("r"));
  ASSERT_EQ(again.status, ClaimStatus::done);
  EXPECT_EQ(again.response, response);
}

TYPED_TEST_P(StoreConformance, DifferentPayloadIsAConflict) {
  Claim c = this->store().claim(this->request("k", "amount=10"));
  ASSERT_EQ(c.status, ClaimStatus::acquired);
  EXPECT_EQ(this->store().claim(this->request("k", "amount=99")).status, ClaimStatus::conflict);
  ASSERT_TRUE(
      this->store().complete({.key = "k", .token = c.token, .retention = this->kRetention}));
  EXPECT_EQ(this->store().claim(this->request("k", "amount=99")).status, ClaimStatus::conflict);
  EXPECT_EQ(this->store().claim(this->request("k", "amount=10")).status, ClaimStatus::done);
  // Without a fingerprint nothing is compared.
  ClaimRequest unchecked = this->request("k");
  unchecked.fingerprint = {};
  EXPECT_EQ(this->store().claim(unchecked).status, ClaimStatus::done);
}

TYPED_TEST_P(StoreConformance, ReleaseLetsTheNextClaimInWithALargerToken) {
  Claim first = this->store().claim(this->request("k"));
  ASSERT_EQ(first.status, ClaimStatus::acquired);
  ASSERT_TRUE(this->store().release("k", first.token));
  Claim second = this->store().claim(this->request("k"));
  ASSERT_EQ(second.status, ClaimStatus::acquired);
  EXPECT_GT(second.token, first.token);
  EXPECT_FALSE(this->store().complete({.key = "k", .token = first.token}));
  EXPECT_FALSE(this->store().release("k", first.token));
  EXPECT_TRUE(this->store().complete({.key = "k", .token = second.token}));
}

TYPED_TEST_P(StoreConformance, ExpiredLeaseIsTakenOverAndTheStaleHolderIsRefused) {
  Claim stale = this->store().claim(this->request("k"));
  ASSERT_EQ(stale.status, ClaimStatus::acquired);
  this->advance(this->kLease + 500ms);
  Claim fresh = this->store().claim(this->request("k"));
  ASSERT_EQ(fresh.status, ClaimStatus::acquired);
  EXPECT_GT(fresh.token, stale.token);
  EXPECT_FALSE(this->store().complete({.key = "k", .token = stale.token}));
  EXPECT_FALSE(this->store().release("k", stale.token));
  EXPECT_EQ(this->store().claim(this->request("k")).status, ClaimStatus::in_progress);
  EXPECT_TRUE(this->store().complete({.key = "k", .token = fresh.token}));
  EXPECT_EQ(this->store().claim(this->request("k")).status, ClaimStatus::done);
}

TYPED_TEST_P(StoreConformance, DoneKeyIsForgottenAfterRetention) {
  Claim c = this->store().claim(this->request("k"));
  ASSERT_TRUE(this->store().complete({.key = "k", .token = c.token, .retention = 1000ms}));
  EXPECT_EQ(this->store().claim(this->request("k")).status, ClaimStatus::done);
  this->advance(1500ms);
  Claim again = this->store().claim(this->request("k"));
  EXPECT_EQ(again.status, ClaimStatus::acquired);
  EXPECT_GT(again.token, c.token);
}

TYPED_TEST_P(StoreConformance, MarkDoneRecordsAtOnce) {
  ClaimRequest r = this->request("k");
  r.mark_done = true;
  ASSERT_EQ(this->store().claim(r).status, ClaimStatus::acquired);
  EXPECT_EQ(this->store().claim(this->request("k")).status, ClaimStatus::done);
}

TYPED_TEST_P(StoreConformance, ForgetDropsTheRecord) {
  Claim c = this->store().claim(this->request("k"));
  ASSERT_TRUE(this->store().complete({.key = "k", .token = c.token}));
  EXPECT_TRUE(this->store().forget("k"));
  EXPECT_FALSE(this->store().forget("k"));
  EXPECT_EQ(this->store().claim(this->request("k")).status, ClaimStatus::acquired);
}

TYPED_TEST_P(StoreConformance, KeysAreBinarySafe) {
  const std::string nul_a("a\0b", 3), nul_c("a\0c", 3), crlf("x\r\ny"), not_utf8("\xff\xfe\xc3");
  for (const std::string& key : {nul_a, nul_c, crlf, not_utf8}) {
    Claim c = this->store().claim(this->request(key));
    ASSERT_EQ(c.status, ClaimStatus::acquired) << "key of " << key.size() << " bytes";
    ASSERT_TRUE(this->store().complete({.key = key, .token = c.token}));
  }
  EXPECT_EQ(this->store().claim(this->request(std::string("a", 1))).status, ClaimStatus::acquired);
  EXPECT_EQ(this->store().claim(this->request(nul_c)).status, ClaimStatus::done);
}

TYPED_TEST_P(StoreConformance, BadKeysAreRejectedWithAClearMessage) {
  try {
    this->store().claim(this->request(""));
    FAIL() << "empty key accepted";
  } catch (const InvalidMessage& e) {
    EXPECT_NE(std::string(e.what()).find("key is empty"), std::string::npos) << e.what();
  }
  const std::string long_key(600, 'k');
  try {
    this->store().claim(this->request(long_key));
    FAIL() << "600-byte key accepted";
  } catch (const InvalidMessage& e) {
    EXPECT_NE(std::string(e.what()).find("key is 600 bytes; max_key_bytes is 512"),
              std::string::npos)
        << e.what();
  }
  const std::string max_key(512, 'k');
  EXPECT_EQ(this->store().claim(this->request(max_key)).status, ClaimStatus::acquired);
}

TYPED_TEST_P(StoreConformance, BatchAnswersEachRequestInOrder) {
  Claim done = this->store().claim(this->request("done"));
  ASSERT_TRUE(this->store().complete({.key = "done", .token = done.token, .response = "r"}));
  ASSERT_EQ(this->store().claim(this->request("held")).status, ClaimStatus::acquired);
  std::vector<ClaimRequest> requests{this->request("new-1"), this->request("done"),
                                     this->request("held"), this->request("done", "other"),
                                     this->request("new-2")};
  std::vector<Claim> claims = this->store().claim_batch(requests);
  ASSERT_EQ(claims.size(), 5u);
  EXPECT_EQ(claims[0].status, ClaimStatus::acquired);
  EXPECT_EQ(claims[1].status, ClaimStatus::done);
  EXPECT_EQ(claims[1].response, "r");
  EXPECT_EQ(claims[2].status, ClaimStatus::in_progress);
  EXPECT_EQ(claims[3].status, ClaimStatus::conflict);
  EXPECT_EQ(claims[4].status, ClaimStatus::acquired);
  std::vector<Completion> completions{{.key = "new-1", .token = claims[0].token},
                                      {.key = "new-2", .token = claims[4].token + 1000}};
  std::vector<bool> completed = this->store().complete_batch(completions);
  EXPECT_EQ(completed, (std::vector<bool>{true, false}));
  EXPECT_THROW(
      this->store().claim_batch(std::vector<ClaimRequest>{this->request("ok"), this->request("")}),
      InvalidMessage);
  // Nothing of a rejected batch was claimed.
  EXPECT_EQ(this->store().claim(this->request("ok")).status, ClaimStatus::acquired);
}

// The sequence that once made SQLite hand out a token twice: a late completion of a claim
// whose record was purged must not let an old token come back.
TYPED_TEST_P(StoreConformance, TokensKeepRisingAcrossPurgesAndLateCompletions) {
  constexpr auto kShortRetention = 2000ms;
  Claim stalled = this->store().claim(this->request("k"));  // worker A, then it stalls
  ASSERT_EQ(stalled.status, ClaimStatus::acquired);
  this->advance(this->kLease + 500ms);
  this->store().purge_expired(SIZE_MAX);
  Claim second = this->store().claim(this->request("k"));  // worker B
  ASSERT_EQ(second.status, ClaimStatus::acquired);
  EXPECT_GT(second.token, stalled.token);
  ASSERT_TRUE(
      this->store().complete({.key = "k", .token = second.token, .retention = kShortRetention}));
  this->advance(kShortRetention + 500ms);
  this->store().purge_expired(SIZE_MAX);
  // A's late completion: a store may record it or refuse it; either way...
  (void)this->store().complete({.key = "k", .token = stalled.token, .retention = kShortRetention});
  this->advance(kShortRetention + 500ms);
  // ...the next claim of the key (its expired record not purged yet) gets a token above every
  // token handed out before.
  Claim third = this->store().claim(this->request("k"));
  ASSERT_EQ(third.status, ClaimStatus::acquired);
  EXPECT_GT(third.token, second.token);
}

// --- Through the consumer -------------------------------------------------------------------

TYPED_TEST_P(StoreConformance, ConsumerProcessesOnceAndReplaysTheResponse) {
  int runs = 0;
  IdempotentConsumer consumer(
      this->store(),
      [&](const Message& m) {
        ++runs;
        return "card-for-" + std::string(m.key);
      },
      this->kOptions);
  Message m{.key = "pay-1", .payload = "{\"amount\":10}"};
  Result first = consumer.consume(m);
  EXPECT_EQ(first.outcome, Outcome::processed);
  EXPECT_EQ(first.response, "card-for-pay-1");
  Result second = consumer.consume(m);
  EXPECT_EQ(second.outcome, Outcome::duplicate);
  EXPECT_EQ(second.response, "card-for-pay-1");
  EXPECT_TRUE(should_ack(second.outcome));
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "{\"amount\":99}"}).outcome,
            Outcome::conflict);
  EXPECT_EQ(runs, 1);
}

TYPED_TEST_P(StoreConformance, ConsumerReportsInProgressWhileAnotherHolds) {
  ASSERT_EQ(this->store().claim(this->request("busy")).status, ClaimStatus::acquired);
  int runs = 0;
  IdempotentConsumer consumer(
      this->store(), [&](const Message&) { ++runs; }, this->kOptions);
  Result r = consumer.consume({.key = "busy", .payload = "p"});
  EXPECT_EQ(r.outcome, Outcome::in_progress);
  EXPECT_FALSE(should_ack(r.outcome));
  EXPECT_EQ(runs, 0);
}

TYPED_TEST_P(StoreConformance, HandlerFailureReleasesSoARedeliverySucceeds) {
  int attempts = 0;
  IdempotentConsumer consumer(
      this->store(),
      [&](const Message&) {
        if (++attempts == 1) throw std::runtime_error("card service down");
      },
      this->kOptions);
  Message m{.key = "pay-2", .payload = "p"};
  Result failed = consumer.consume(m);
  EXPECT_EQ(failed.outcome, Outcome::failed);
  ASSERT_TRUE(failed.error);
  EXPECT_THROW(std::rethrow_exception(failed.error), std::runtime_error);
  EXPECT_EQ(consumer.consume(m).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume(m).outcome, Outcome::duplicate);
  EXPECT_EQ(attempts, 2);
}

TYPED_TEST_P(StoreConformance, RethrowOptionLetsTheHandlerErrorOutAfterReleasing) {
  Options options = this->kOptions;
  options.rethrow_handler_errors = true;
  int attempts = 0;
  IdempotentConsumer consumer(
      this->store(),
      [&](const Message&) {
        if (++attempts == 1) throw std::logic_error("bug");
      },
      options);
  Message m{.key = "k", .payload = "p"};
  EXPECT_THROW(consumer.consume(m), std::logic_error);
  EXPECT_EQ(consumer.consume(m).outcome, Outcome::processed);
}

TYPED_TEST_P(StoreConformance, BeforeProcessingIsAtMostOnce) {
  Options options = this->kOptions;
  options.mark = Mark::before_processing;
  int attempts = 0;
  IdempotentConsumer consumer(
      this->store(),
      [&](const Message& m) -> std::string {
        ++attempts;
        if (m.key == "crashy") throw std::runtime_error("crash mid-handler");
        return "ok";
      },
      options);
  EXPECT_EQ(consumer.consume({.key = "crashy", .payload = "p"}).outcome, Outcome::failed);
  // The key was recorded before the handler ran: the redelivery is not processed again.
  EXPECT_EQ(consumer.consume({.key = "crashy", .payload = "p"}).outcome, Outcome::duplicate);
  Result r = consumer.consume({.key = "fine", .payload = "p"});
  EXPECT_EQ(r.outcome, Outcome::processed);
  Result again = consumer.consume({.key = "fine", .payload = "p"});
  EXPECT_EQ(again.outcome, Outcome::duplicate);
  EXPECT_EQ(again.response, "ok");
  EXPECT_EQ(attempts, 2);
}

TYPED_TEST_P(StoreConformance, HandlerSeesTheFencingToken) {
  std::vector<std::uint64_t> tokens;
  IdempotentConsumer consumer(
      this->store(),
      [&](const Message&, FencingToken token) {
        tokens.push_back(token.value);
        if (tokens.size() == 1) throw std::runtime_error("retry me");
      },
      this->kOptions);
  Message m{.key = "k", .payload = "p"};
  EXPECT_EQ(consumer.consume(m).outcome, Outcome::failed);
  Result r = consumer.consume(m);
  EXPECT_EQ(r.outcome, Outcome::processed);
  ASSERT_EQ(tokens.size(), 2u);
  EXPECT_GT(tokens[1], tokens[0]);
  EXPECT_EQ(r.fencing_token, tokens[1]);
}

TYPED_TEST_P(StoreConformance, BatchWithRepeatedKeysProcessesEachKeyOnce) {
  std::unordered_map<std::string, int> runs;
  IdempotentConsumer consumer(
      this->store(),
      [&](const Message& m) {
        ++runs[std::string(m.key)];
        if (m.key == "bad") throw std::runtime_error("boom");
        return std::string("r-") + std::string(m.key);
      },
      this->kOptions);
  std::vector<Message> batch{{.key = "a", .payload = "1"},     {.key = "b", .payload = "2"},
                             {.key = "a", .payload = "1"},     {.key = "bad", .payload = "3"},
                             {.key = "b", .payload = "other"}, {.key = "a", .payload = "1"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  ASSERT_EQ(results.size(), batch.size());
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::processed);
  EXPECT_EQ(results[2].outcome, Outcome::duplicate);
  EXPECT_EQ(results[2].response, "r-a");
  EXPECT_EQ(results[3].outcome, Outcome::failed);
  EXPECT_EQ(results[4].outcome, Outcome::conflict);
  EXPECT_EQ(results[5].outcome, Outcome::duplicate);
  EXPECT_EQ(runs["a"], 1);
  EXPECT_EQ(runs["b"], 1);
  EXPECT_EQ(runs["bad"], 1);
  // The failed one was released: a later batch retries it.
  std::vector<Message> retry{{.key = "bad", .payload = "3"}};
  runs.clear();
  EXPECT_EQ(consumer.consume_batch(retry)[0].outcome, Outcome::failed);
  EXPECT_EQ(runs["bad"], 1);
}

TYPED_TEST_P(StoreConformance, ConsumerRejectsBadInputWithoutRunningTheHandler) {
  int runs = 0;
  IdempotentConsumer consumer(
      this->store(), [&](const Message&) { ++runs; }, this->kOptions);
  EXPECT_THROW(consumer.consume({.key = "", .payload = "p"}), InvalidMessage);
  const std::string long_key(513, 'x');
  EXPECT_THROW(consumer.consume({.key = long_key, .payload = "p"}), InvalidMessage);
  std::vector<Message> batch{{.key = "fine"}, {.key = ""}};
  EXPECT_THROW(consumer.consume_batch(batch), InvalidMessage);
  EXPECT_EQ(runs, 0);
  // A 1 MiB payload is fingerprinted and processed like any other.
  const std::string big(1 << 20, 'x');
  EXPECT_EQ(consumer.consume({.key = "big", .payload = big}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "big", .payload = big}).outcome, Outcome::duplicate);
  EXPECT_EQ(runs, 1);
}

TYPED_TEST_P(StoreConformance, EightThreadsRunEachKeysHandlerExactlyOnce) {
  constexpr std::size_t kKeys = race_keys<TypeParam>();
  constexpr int kThreads = 8;
  std::vector<std::string> keys;
  keys.reserve(kKeys);
  for (std::size_t i = 0; i < kKeys; ++i) keys.push_back("race-" + std::to_string(i));
  auto runs = std::make_unique<std::atomic<int>[]>(kKeys);
  IdempotentConsumer consumer(
      this->store(),
      [&](const Message& m) { runs[std::stoul(std::string(m.key.substr(5)))].fetch_add(1); },
      this->kOptions);

  std::atomic<std::size_t> acked{0}, not_acked{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Every thread walks the same keys from a different start: 30% of its deliveries are
      // repeats of keys it already saw, and every key is raced by all threads.
      std::size_t local_acked = 0, local_other = 0;
      for (std::size_t n = 0; n < kKeys; ++n) {
        std::size_t i = (n + t * kKeys / kThreads) % kKeys;
        int repeats = (i % 10) < 3 ? 2 : 1;
        for (int r = 0; r < repeats; ++r) {
          Result result = consumer.consume({.key = keys[i], .payload = "p"});
          (should_ack(result.outcome) ? local_acked : local_other)++;
        }
      }
      acked += local_acked;
      not_acked += local_other;
    });
  }
  for (std::thread& t : threads) t.join();
  std::size_t never = 0, twice = 0;
  for (std::size_t i = 0; i < kKeys; ++i) {
    never += runs[i] == 0;
    twice += runs[i] > 1;
  }
  EXPECT_EQ(never, 0u);
  EXPECT_EQ(twice, 0u);
  EXPECT_GT(acked.load(), kKeys);
}

// --- Operator hooks (idemctl inspect / stats / forget / purge-expired) -------------------------

TYPED_TEST_P(StoreConformance, OperatorInspectShowsEachState) {
  DedupStore& store = this->store();
  EXPECT_FALSE(store.inspect("op-absent").has_value());
  const Claim held = store.claim(this->request("op-held"));
  ASSERT_EQ(held.status, ClaimStatus::acquired);
  std::optional<RecordInfo> info = store.inspect("op-held");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, RecordInfo::State::in_progress);
  EXPECT_EQ(info->token, held.token);
  EXPECT_GT(info->expires_in_ms, 0);
  EXPECT_LE(info->expires_in_ms, this->kLease.count());
  ASSERT_TRUE(store.complete({.key = "op-held",
                              .token = held.token,
                              .response = "receipt",
                              .retention = this->kRetention}));
  info = store.inspect("op-held");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, RecordInfo::State::done);
  EXPECT_EQ(info->response, "receipt");
  EXPECT_GT(info->expires_in_ms, this->kLease.count());
  EXPECT_LE(info->expires_in_ms, this->kRetention.count());
}

// StoreStats means the same for every store: in_progress and done count only live records
// (a running lease, a retention not over); records counts what the store still holds.
TYPED_TEST_P(StoreConformance, OperatorStatsCountOnlyLiveRecordsAsInProgressOrDone) {
  DedupStore& store = this->store();
  constexpr std::chrono::milliseconds kShort{200};
  ASSERT_EQ(store.claim(this->request("st-held")).status, ClaimStatus::acquired);
  const Claim done = store.claim(this->request("st-done"));
  ASSERT_TRUE(
      store.complete({.key = "st-done", .token = done.token, .retention = this->kRetention}));
  ClaimRequest short_lease = this->request("st-lease-ran-out");
  short_lease.lease = kShort;
  ASSERT_EQ(store.claim(short_lease).status, ClaimStatus::acquired);
  const Claim old = store.claim(this->request("st-retention-ran-out"));
  ASSERT_TRUE(
      store.complete({.key = "st-retention-ran-out", .token = old.token, .retention = kShort}));
  const Claim released = store.claim(this->request("st-released"));
  ASSERT_TRUE(store.release("st-released", released.token));
  this->advance(2 * kShort + 100ms);
  const StoreStats stats = store.stats();
  EXPECT_EQ(stats.in_progress, 1u);
  EXPECT_EQ(stats.done, 1u);
  EXPECT_GE(stats.records, 2u);
  EXPECT_LE(stats.records, 5u);
  EXPECT_EQ(stats.foreign, 0u);
}

TYPED_TEST_P(StoreConformance, OperatorForgetSaysWhetherARecordExisted) {
  DedupStore& store = this->store();
  EXPECT_FALSE(store.forget("fg-absent"));
  const Claim c = store.claim(this->request("fg-done"));
  ASSERT_TRUE(store.complete({.key = "fg-done", .token = c.token, .retention = this->kRetention}));
  EXPECT_TRUE(store.forget("fg-done"));
  // Gone, or kept as a released tombstone (a store may keep one so tokens keep rising).
  const std::optional<RecordInfo> info = store.inspect("fg-done");
  EXPECT_TRUE(!info || info->state == RecordInfo::State::released);
  EXPECT_FALSE(store.forget("fg-done"));
  EXPECT_EQ(store.claim(this->request("fg-done")).status, ClaimStatus::acquired);
}

// After purge_expired() only live records are left (a store whose records expire by
// themselves, like Redis, has nothing to purge and returns 0).
TYPED_TEST_P(StoreConformance, OperatorPurgeLeavesOnlyLiveRecords) {
  DedupStore& store = this->store();
  constexpr std::chrono::milliseconds kShort{200};
  const Claim keep = store.claim(this->request("pg-keep"));
  ASSERT_TRUE(
      store.complete({.key = "pg-keep", .token = keep.token, .retention = this->kRetention}));
  for (const char* key : {"pg-old-1", "pg-old-2"}) {
    const Claim c = store.claim(this->request(key));
    ASSERT_TRUE(store.complete({.key = key, .token = c.token, .retention = kShort}));
  }
  this->advance(2 * kShort + 100ms);
  EXPECT_LE(store.purge_expired(), 2u);
  EXPECT_EQ(store.purge_expired(), 0u) << "nothing expired is left to purge";
  const StoreStats stats = store.stats();
  EXPECT_EQ(stats.records, 1u);
  EXPECT_EQ(stats.done, 1u);
  EXPECT_TRUE(store.inspect("pg-keep").has_value());
  EXPECT_FALSE(store.inspect("pg-old-1").has_value());
}

REGISTER_TYPED_TEST_SUITE_P(
    StoreConformance, FirstClaimAcquiresThenDoneAfterComplete, ResponseIsStoredAndReplayed,
    DifferentPayloadIsAConflict, ReleaseLetsTheNextClaimInWithALargerToken,
    ExpiredLeaseIsTakenOverAndTheStaleHolderIsRefused, DoneKeyIsForgottenAfterRetention,
    MarkDoneRecordsAtOnce, ForgetDropsTheRecord, KeysAreBinarySafe,
    BadKeysAreRejectedWithAClearMessage, BatchAnswersEachRequestInOrder,
    TokensKeepRisingAcrossPurgesAndLateCompletions, ConsumerProcessesOnceAndReplaysTheResponse,
    ConsumerReportsInProgressWhileAnotherHolds, HandlerFailureReleasesSoARedeliverySucceeds,
    RethrowOptionLetsTheHandlerErrorOutAfterReleasing, BeforeProcessingIsAtMostOnce,
    HandlerSeesTheFencingToken, BatchWithRepeatedKeysProcessesEachKeyOnce,
    ConsumerRejectsBadInputWithoutRunningTheHandler, EightThreadsRunEachKeysHandlerExactlyOnce,
    OperatorInspectShowsEachState, OperatorStatsCountOnlyLiveRecordsAsInProgressOrDone,
    OperatorForgetSaysWhetherARecordExisted, OperatorPurgeLeavesOnlyLiveRecords);

}  // namespace idem::testing
