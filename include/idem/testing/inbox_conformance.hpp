#pragma once
/// @file
/// @brief idem::testing::InboxConformance: the behaviour every transactional store (an
/// idem::InboxStore: SqliteStore, PostgresStore, or one of your own) must have, as one typed
/// GoogleTest suite. Installed with idem; see docs/stores/writing-a-store.md. Link GoogleTest.
//
// Usage:
//
//   struct MyInboxFactory {
//     using Store = my::Store;                  // derives from idem::InboxStore<my::Tx>
//     // A fresh, empty store, and an empty business table for write_effect. Once per test.
//     std::unique_ptr<Store> make();
//     // Makes `ms` pass for the store's leases (advance a ManualClock, or sleep).
//     void advance(std::chrono::milliseconds ms);
//     // Writes one business row for key (any bytes) through the handler's transaction.
//     static void write_effect(Store::Transaction& tx, std::string_view key);
//     // Committed business rows for key.
//     std::int64_t effects(Store& store, std::string_view key);
//     // Optional: true when the store runs handlers before their key's claim is answered
//     // (e.g. PostgresOptions::speculative_claims). Handlers then also run for duplicates,
//     // their writes discarded: the suite counts effects exactly and handler runs as a floor.
//     static constexpr bool speculative = false;
//   };
//   namespace idem::testing {
//   INSTANTIATE_TYPED_TEST_SUITE_P(MyStore, InboxConformance, MyInboxFactory);
//   }

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "idem/idem.hpp"

namespace idem::testing {

using namespace std::chrono_literals;

/// @brief Counts what a consumer reports, for the suites' metric and log checks.
class RecordingMetrics final : public Metrics, public Logger {
 public:
  void add(Counter counter, std::uint64_t n) noexcept override {
    counters_[static_cast<std::size_t>(counter)] += n;
  }
  void observe(Timing, std::chrono::nanoseconds) noexcept override {}
  void log(LogLevel, std::string_view line) noexcept override {
    std::lock_guard lock(mutex_);
    lines_.emplace_back(line);
  }
  std::uint64_t count(Counter counter) const noexcept {
    return counters_[static_cast<std::size_t>(counter)].load();
  }
  std::vector<std::string> lines() const {
    std::lock_guard lock(mutex_);
    return lines_;
  }

 private:
  std::array<std::atomic<std::uint64_t>, kCounterCount> counters_{};
  mutable std::mutex mutex_;
  std::vector<std::string> lines_;
};

template <class Factory>
class InboxConformance : public ::testing::Test {
 protected:
  using Store = typename Factory::Store;
  using Tx = typename Store::Transaction;

  void SetUp() override { store_ = factory_.make(); }

  static constexpr bool kSpeculative = [] {
    if constexpr (requires { Factory::speculative; }) {
      return static_cast<bool>(Factory::speculative);
    } else {
      return false;
    }
  }();

  Store& store() { return *store_; }
  // Handlers ran exactly n times; at least n times for a speculative store, whose handlers
  // also run for keys that turn out not to be new.
  void expect_runs(int n) {
    if constexpr (kSpeculative) {
      EXPECT_GE(runs_, n);
    } else {
      EXPECT_EQ(runs_, n);
    }
  }
  std::int64_t effects(std::string_view key) { return factory_.effects(*store_, key); }

  // A consumer whose handler writes one business row per message, then throws for the keys
  // in fail_keys (once each when fail_once).
  auto consumer(Options options = kOptions) {
    return IdempotentConsumer(
        store(),
        [this](const Message& m, Tx& tx) -> std::string {
          ++runs_;
          Factory::write_effect(tx, m.key);
          if (fails(m.key)) throw std::runtime_error("card service down");
          return "card-for-" + std::string(m.key);
        },
        options);
  }
  bool fails(std::string_view key) {
    for (std::string& k : fail_keys_) {
      if (k == key) {
        if (fail_once_) k.clear();
        return true;
      }
    }
    return false;
  }

  static constexpr std::chrono::milliseconds kLease{1500};
  static constexpr std::chrono::milliseconds kRetention{60'000};
  static constexpr Options kOptions{.lease = kLease, .retention = kRetention};

  Factory factory_;
  std::unique_ptr<Store> store_;
  std::atomic<int> runs_{0};
  std::vector<std::string> fail_keys_;
  bool fail_once_ = true;
};

TYPED_TEST_SUITE_P(InboxConformance);

TYPED_TEST_P(InboxConformance, EffectAndRecordCommitTogetherOnce) {
  auto consumer = this->consumer();
  Message m{.key = "pay-1", .payload = "{\"amount\":10}"};
  Result first = consumer.consume(m);
  EXPECT_EQ(first.outcome, Outcome::processed);
  EXPECT_EQ(first.response, "card-for-pay-1");
  EXPECT_GT(first.fencing_token, 0u);
  Result again = consumer.consume(m);
  EXPECT_EQ(again.outcome, Outcome::duplicate);
  EXPECT_EQ(again.response, "card-for-pay-1");
  EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "{\"amount\":99}"}).outcome,
            Outcome::conflict);
  EXPECT_EQ(this->effects("pay-1"), 1);
  this->expect_runs(1);
  std::optional<RecordInfo> info = this->store().inspect("pay-1");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, RecordInfo::State::done);
}

TYPED_TEST_P(InboxConformance, HandlerFailureRollsBackEffectAndRecord) {
  this->fail_keys_ = {"pay-2"};
  auto consumer = this->consumer();
  Message m{.key = "pay-2", .payload = "p"};
  Result failed = consumer.consume(m);
  EXPECT_EQ(failed.outcome, Outcome::failed);
  ASSERT_TRUE(failed.error);
  EXPECT_THROW(std::rethrow_exception(failed.error), std::runtime_error);
  EXPECT_EQ(this->effects("pay-2"), 0);
  std::optional<RecordInfo> info = this->store().inspect("pay-2");
  EXPECT_TRUE(!info || info->state == RecordInfo::State::released);
  Result retried = consumer.consume(m);
  EXPECT_EQ(retried.outcome, Outcome::processed);
  EXPECT_GT(retried.fencing_token, failed.fencing_token);
  EXPECT_EQ(this->effects("pay-2"), 1);
}

TYPED_TEST_P(InboxConformance, BatchRollsBackOnlyTheFailedMessage) {
  this->fail_keys_ = {"b"};
  auto consumer = this->consumer();
  std::vector<Message> batch{{.key = "a", .payload = "1"}, {.key = "b", .payload = "2"},
                             {.key = "a", .payload = "1"}, {.key = "c", .payload = "3"},
                             {.key = "b", .payload = "2"}, {.key = "c", .payload = "x"}};
  std::vector<Result> results = consumer.consume_batch(batch);
  ASSERT_EQ(results.size(), batch.size());
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::failed);
  EXPECT_EQ(results[2].outcome, Outcome::duplicate);
  EXPECT_EQ(results[2].response, "card-for-a");
  EXPECT_EQ(results[3].outcome, Outcome::processed);
  EXPECT_EQ(results[4].outcome, Outcome::processed);  // the earlier failure was undone
  EXPECT_EQ(results[5].outcome, Outcome::conflict);
  for (const char* key : {"a", "b", "c"}) EXPECT_EQ(this->effects(key), 1) << key;
}

TYPED_TEST_P(InboxConformance, OffsetsAreSavedOnlyWhenTheWholeBatchIsAckable) {
  auto consumer = this->consumer();
  const std::vector<PartitionOffset> first{{.topic = "pay", .partition = 0, .next_offset = 2},
                                           {.topic = "pay", .partition = 1, .next_offset = 7}};
  std::vector<Message> batch{{.key = "o1", .payload = "p"}, {.key = "o2", .payload = "p"}};
  bool saved = false;
  consumer.consume_batch_with_offsets(batch, first, &saved);
  EXPECT_TRUE(saved);
  EXPECT_EQ(this->store().committed_offsets(), first);
  EXPECT_EQ(this->store().committed_offset("pay", 1), 7);
  EXPECT_EQ(this->store().committed_offset("pay", 2), std::nullopt);

  this->fail_keys_ = {"o4"};
  const std::vector<PartitionOffset> later{{.topic = "pay", .partition = 0, .next_offset = 4}};
  std::vector<Message> failing{{.key = "o3", .payload = "p"}, {.key = "o4", .payload = "p"}};
  std::vector<Result> results = consumer.consume_batch_with_offsets(failing, later, &saved);
  EXPECT_FALSE(saved);
  EXPECT_EQ(results[0].outcome, Outcome::processed);  // still committed
  EXPECT_EQ(this->effects("o3"), 1);
  EXPECT_EQ(this->store().committed_offset("pay", 0), 2);
  this->store().save_offsets(later);
  EXPECT_EQ(this->store().committed_offset("pay", 0), 4);
}

TYPED_TEST_P(InboxConformance, KeyHeldByAClaimIsInProgress) {
  ASSERT_EQ(this->store()
                .claim({.key = "held", .lease = this->kLease, .retention = this->kRetention})
                .status,
            ClaimStatus::acquired);
  auto consumer = this->consumer();
  EXPECT_EQ(consumer.consume({.key = "held", .payload = "p"}).outcome, Outcome::in_progress);
  EXPECT_EQ(this->effects("held"), 0);
  this->factory_.advance(this->kLease + 500ms);
  EXPECT_EQ(consumer.consume({.key = "held", .payload = "p"}).outcome, Outcome::processed);
  EXPECT_EQ(this->effects("held"), 1);
}

TYPED_TEST_P(InboxConformance, BeforeProcessingKeepsTheRecordButNotTheWrites) {
  this->fail_keys_ = {"once"};
  Options options = this->kOptions;
  options.mark = Mark::before_processing;
  auto consumer = this->consumer(options);
  EXPECT_EQ(consumer.consume({.key = "once", .payload = "p"}).outcome, Outcome::failed);
  EXPECT_EQ(this->effects("once"), 0);
  EXPECT_EQ(consumer.consume({.key = "once", .payload = "p"}).outcome, Outcome::duplicate);
  EXPECT_EQ(this->runs_, 1);
}

TYPED_TEST_P(InboxConformance, BadRequestsAreRefusedBeforeAnythingRuns) {
  auto consumer = this->consumer();
  EXPECT_THROW(consumer.consume({.key = "", .payload = "p"}), InvalidMessage);
  EXPECT_THROW(consumer.consume({.key = std::string(513, 'k'), .payload = "p"}), InvalidMessage);
  std::vector<Message> batch{{.key = "fine"}, {.key = ""}};
  EXPECT_THROW(consumer.consume_batch(batch), InvalidMessage);
  auto handler = [](typename TestFixture::Tx&) -> std::optional<std::string> {
    return std::nullopt;
  };
  EXPECT_THROW(
      this->store().consume_in_transaction(
          {.key = "k", .lease = this->kLease, .retention = std::chrono::milliseconds{-1}}, handler),
      ConfigError);
  EXPECT_THROW(this->store().consume_in_transaction(
                   {.key = "k", .lease = std::chrono::milliseconds{0}}, handler),
               ConfigError);
  EXPECT_EQ(this->runs_, 0);
  EXPECT_EQ(this->effects("fine"), 0);
}

TYPED_TEST_P(InboxConformance, KeysAreBinarySafe) {
  auto consumer = this->consumer();
  const std::vector<std::string> keys{
      std::string("a\0b", 3), std::string("a\0c", 3),        "x\r\ny", "\xff\xfe",
      std::string(512, 'k'),  "'); DROP TABLE idem_keys; --"};
  for (const std::string& key : keys) {
    EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, Outcome::processed);
  }
  for (const std::string& key : keys) {
    EXPECT_EQ(consumer.consume({.key = key, .payload = "p"}).outcome, Outcome::duplicate);
    EXPECT_EQ(this->effects(key), 1);
  }
  EXPECT_EQ(this->effects("a"), 0);
}

TYPED_TEST_P(InboxConformance, HandlerMayNotEndTheTransaction) {
  for (const char* sql : {"COMMIT", "ROLLBACK", "BEGIN"}) {
    IdempotentConsumer consumer(
        this->store(),
        [&](const Message& m, typename TestFixture::Tx& tx) {
          TypeParam::write_effect(tx, m.key);
          tx.exec(sql);
        },
        this->kOptions);
    EXPECT_THROW(consumer.consume({.key = "ends", .payload = "p"}), ConfigError) << sql;
    EXPECT_EQ(this->effects("ends"), 0) << sql;
    EXPECT_FALSE(this->store().inspect("ends").has_value()) << sql;
  }
}

TYPED_TEST_P(InboxConformance, FailuresAreLoggedAndEveryPathIsCounted) {
  RecordingMetrics metrics;
  Options options = this->kOptions;
  options.metrics = &metrics;
  options.logger = &metrics;
  this->fail_keys_ = {"bad"};
  auto consumer = this->consumer(options);
  EXPECT_EQ(consumer.consume({.key = "bad", .payload = "p"}).outcome, Outcome::failed);
  std::vector<Message> batch{{.key = "x", .payload = "p"}, {.key = "x", .payload = "p"}};
  const std::vector<PartitionOffset> offsets{{.topic = "t", .partition = 0, .next_offset = 1}};
  consumer.consume_batch_with_offsets(batch, offsets);
  EXPECT_EQ(metrics.count(Counter::failed), 1u);
  EXPECT_EQ(metrics.count(Counter::processed), 1u);
  EXPECT_EQ(metrics.count(Counter::duplicate), 1u);
  const std::vector<std::string> lines = metrics.lines();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("card service down"), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find("rolled back"), std::string::npos) << lines[0];
}

TYPED_TEST_P(InboxConformance, FourThreadsOnTheSameKeysWriteEachEffectOnce) {
  constexpr int kKeys = 200;
  constexpr int kThreads = 4;
  auto consumer = this->consumer();
  std::vector<std::thread> threads;
  std::atomic<int> unacked{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int n = 0; n < kKeys; ++n) {
        const std::string key = "race-" + std::to_string((n + t * 50) % kKeys);
        // A key whose first delivery is still in flight is redelivered until it settles.
        for (;;) {
          Result r = consumer.consume({.key = key, .payload = "p"});
          if (should_ack(r.outcome)) break;
          ++unacked;
          std::this_thread::yield();
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  this->expect_runs(kKeys);
  const int step = TestFixture::kSpeculative ? 1 : 37;  // then runs prove nothing: count all
  for (int i = 0; i < kKeys; i += step) {
    EXPECT_EQ(this->effects("race-" + std::to_string(i)), 1);
  }
}

// One transaction of 1000 messages settles each message as consuming it alone would: done
// keys are duplicates with their response (conflicts with another payload), expired claims
// are taken over with a newer token, live claims are in progress, keys repeat within the
// batch, and some handlers always fail. The expected outcome of every message comes from a
// model of the contract, applied in order.
TYPED_TEST_P(InboxConformance, LargeMixedBatchSettlesEachMessageAsAloneItWould) {
  constexpr int kKeys = 700;
  constexpr int kMessages = 1000;
  auto key_of = [](int k) { return "m-" + std::to_string(k); };
  auto always_fails = [](int k) { return k % 37 == 0; };
  for (int k = 0; k < kKeys; k += 37) this->fail_keys_.push_back(key_of(k));
  this->fail_once_ = false;
  auto consumer = this->consumer();

  // The model: what the store holds for each key, as the contract says it evolves. A key
  // with no entry (never seen, failed, or its claim expired) is processed when it comes.
  struct Record {
    enum Kind { done, live_claim } kind;
    std::string payload;  // of a done record
  };
  std::map<std::string, Record> model;
  // History: m-0..m-199 consumed; m-200..m-299 claimed, their leases run out; m-300..m-349
  // claimed with a live lease.
  for (int k = 0; k < 200; ++k) {
    const std::string payload = "p" + std::to_string(k);
    ASSERT_EQ(consumer.consume({.key = key_of(k), .payload = payload}).outcome,
              always_fails(k) ? Outcome::failed : Outcome::processed);
    if (!always_fails(k)) model[key_of(k)] = {Record::done, payload};
  }
  std::map<std::string, std::uint64_t> expired_tokens;
  for (int k = 200; k < 300; ++k) {
    const Claim claim = this->store().claim(
        {.key = key_of(k), .lease = this->kLease, .retention = this->kRetention});
    ASSERT_EQ(claim.status, ClaimStatus::acquired);
    expired_tokens[key_of(k)] = claim.token;
  }
  this->factory_.advance(this->kLease + 500ms);
  for (int k = 300; k < 350; ++k) {
    ASSERT_EQ(this->store().claim({.key = key_of(k), .lease = 1h}).status, ClaimStatus::acquired);
    model[key_of(k)] = {Record::live_claim, ""};
  }

  // Every key once in a shuffled order, then 300 repeats, one in five with another payload.
  std::mt19937 random(20261206);
  std::vector<int> order(kKeys);
  for (int k = 0; k < kKeys; ++k) order[k] = k;
  std::shuffle(order.begin(), order.end(), random);
  std::vector<std::string> keys, payloads;  // Messages view them: filled first
  std::vector<int> key_numbers;
  for (int n = 0; n < kMessages; ++n) {
    const int k = n < kKeys ? order[n] : static_cast<int>(random() % kKeys);
    key_numbers.push_back(k);
    keys.push_back(key_of(k));
    const bool changed = n >= kKeys && random() % 5 == 0;
    payloads.push_back(changed ? "changed" : "p" + std::to_string(k));
  }
  std::vector<Message> batch;
  for (int n = 0; n < kMessages; ++n) batch.push_back({.key = keys[n], .payload = payloads[n]});

  const std::vector<Result> results = consumer.consume_batch(batch);
  ASSERT_EQ(results.size(), batch.size());
  std::map<Outcome, int> seen;
  for (int n = 0; n < kMessages; ++n) {
    SCOPED_TRACE("message " + std::to_string(n) + ", key " + keys[n]);
    const Message& m = batch[n];
    Outcome expected = Outcome::processed;
    const auto found = model.find(keys[n]);
    if (found != model.end() && found->second.kind == Record::done) {
      expected = found->second.payload == m.payload ? Outcome::duplicate : Outcome::conflict;
    } else if (found != model.end() && found->second.kind == Record::live_claim) {
      expected = Outcome::in_progress;
    } else if (always_fails(key_numbers[n])) {
      expected = Outcome::failed;
    }
    EXPECT_EQ(results[n].outcome, expected);
    ++seen[results[n].outcome];
    if (expected == Outcome::duplicate) {
      EXPECT_EQ(results[n].response, "card-for-" + keys[n]);
    }
    if (expected == Outcome::processed) {
      EXPECT_EQ(results[n].response, "card-for-" + keys[n]);
      const auto old = expired_tokens.find(keys[n]);
      if (old != expired_tokens.end()) {
        EXPECT_GT(results[n].fencing_token, old->second);  // taken over: a newer token
      }
      model[keys[n]] = {Record::done, std::string(m.payload)};
    }
  }
  EXPECT_GT(seen[Outcome::processed], 300);  // the mix really is mixed
  EXPECT_GT(seen[Outcome::duplicate], 200);
  EXPECT_GT(seen[Outcome::in_progress], 40);
  EXPECT_GT(seen[Outcome::conflict], 10);
  EXPECT_GT(seen[Outcome::failed], 10);
  const int step = TestFixture::kSpeculative ? 1 : 7;
  for (int k = 0; k < kKeys; k += step) {
    const auto found = model.find(key_of(k));
    const bool done = found != model.end() && found->second.kind == Record::done;
    EXPECT_EQ(this->effects(key_of(k)), done ? 1 : 0) << key_of(k);
  }
}

REGISTER_TYPED_TEST_SUITE_P(
    InboxConformance, EffectAndRecordCommitTogetherOnce, HandlerFailureRollsBackEffectAndRecord,
    BatchRollsBackOnlyTheFailedMessage, OffsetsAreSavedOnlyWhenTheWholeBatchIsAckable,
    KeyHeldByAClaimIsInProgress, BeforeProcessingKeepsTheRecordButNotTheWrites,
    BadRequestsAreRefusedBeforeAnythingRuns, KeysAreBinarySafe, HandlerMayNotEndTheTransaction,
    FailuresAreLoggedAndEveryPathIsCounted, FourThreadsOnTheSameKeysWriteEachEffectOnce,
    LargeMixedBatchSettlesEachMessageAsAloneItWould);

}  // namespace idem::testing
