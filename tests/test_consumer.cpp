#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/idem.hpp"

namespace {

using namespace std::chrono_literals;
using idem::Message;
using idem::Outcome;

// A store that records calls and fails on demand (the "recording fake" of the style guide).
class FaultyStore final : public idem::DedupStore {
 public:
  idem::MemoryStore inner;
  bool fail_claim = false;
  bool fail_complete = false;
  bool refuse_complete = false;
  bool throw_foreign = false;
  int claims = 0, completes = 0, releases = 0, batch_claims = 0;
  std::atomic<int> awaits{0};

  std::string_view name() const noexcept override { return "faulty"; }

 protected:
  idem::Claim do_claim(const idem::ClaimRequest& r) override {
    ++claims;
    if (throw_foreign) throw std::runtime_error("connection reset by peer");
    if (fail_claim) throw idem::StoreUnavailable("faulty store is down");
    return inner.claim(r);
  }
  bool do_complete(const idem::Completion& c) override {
    ++completes;
    if (fail_complete) throw idem::StoreUnavailable("faulty store is down");
    if (refuse_complete) return false;
    return inner.complete(c);
  }
  bool do_release(std::string_view key, std::uint64_t token) override {
    ++releases;
    return inner.release(key, token);
  }
  bool do_forget(std::string_view key) override { return inner.forget(key); }
  void do_await_change(std::string_view key, std::chrono::milliseconds max_wait) override {
    ++awaits;
    inner.await_change(key, max_wait);
  }
  std::vector<idem::Claim> do_claim_batch(std::span<const idem::ClaimRequest> r) override {
    ++batch_claims;
    return DedupStore::do_claim_batch(r);
  }
};

TEST(Consumer, AcceptsEveryHandlerForm) {
  idem::MemoryStore store;
  idem::IdempotentConsumer void_form(store, [](const Message&) {});
  EXPECT_EQ(void_form.consume({.key = "a"}).response, std::nullopt);

  idem::IdempotentConsumer string_form(store, [](const Message&) { return std::string("s"); });
  EXPECT_EQ(string_form.consume({.key = "b"}).response, "s");

  idem::IdempotentConsumer c_string_form(store, [](const Message&) { return "c"; });
  EXPECT_EQ(c_string_form.consume({.key = "c"}).response, "c");

  idem::IdempotentConsumer optional_form(store, [](const Message& m) -> std::optional<std::string> {
    if (m.key == "none") return std::nullopt;
    return "some";
  });
  EXPECT_EQ(optional_form.consume({.key = "none"}).response, std::nullopt);
  EXPECT_EQ(optional_form.consume({.key = "d"}).response, "some");

  idem::IdempotentConsumer fenced_form(
      store, [](const Message&, idem::FencingToken t) { return std::to_string(t.value); });
  idem::Result r = fenced_form.consume({.key = "e"});
  EXPECT_EQ(r.response, std::to_string(r.fencing_token));

  struct FunctionObject {
    int calls = 0;
    void operator()(const Message&) { ++calls; }
  };
  idem::IdempotentConsumer object_form(store, FunctionObject{});
  object_form.consume({.key = "f"});
  object_form.consume({.key = "f"});
  EXPECT_EQ(object_form.handler().calls, 1);
}

std::string plain_function_handler(const Message& m) {
  return std::string(m.key);
}

TEST(Consumer, AcceptsAPlainFunctionPointer) {
  idem::MemoryStore store;
  idem::IdempotentConsumer consumer(store, &plain_function_handler);
  EXPECT_EQ(consumer.consume({.key = "k"}).response, "k");
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::duplicate);
}

TEST(Consumer, WorksThroughTheAbstractStore) {
  idem::MemoryStore memory;
  idem::DedupStore& store = memory;
  idem::IdempotentConsumer consumer(store, [](const Message&) {});
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::duplicate);
}

TEST(Consumer, PayloadVerificationCanBeTurnedOff) {
  idem::MemoryStore store;
  idem::IdempotentConsumer consumer(store, [](const Message&) {}, {.verify_payload = false});
  EXPECT_EQ(consumer.consume({.key = "k", .payload = "one"}).outcome, Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "k", .payload = "two"}).outcome, Outcome::duplicate);
}

TEST(Consumer, MaxKeyBytesComesFromTheOptions) {
  idem::MemoryStore store;
  idem::IdempotentConsumer consumer(store, [](const Message&) {}, {.max_key_bytes = 8});
  EXPECT_EQ(consumer.consume({.key = "12345678"}).outcome, Outcome::processed);
  try {
    consumer.consume({.key = "123456789"});
    FAIL();
  } catch (const idem::InvalidMessage& e) {
    EXPECT_STREQ(e.what(),
                 "key is 9 bytes; max_key_bytes is 8: use a shorter biz-id (or a digest of it) "
                 "or raise Options::max_key_bytes");
  }
}

TEST(Consumer, UnreachableStoreThrowsAndNeverRunsTheHandler) {
  FaultyStore store;
  store.fail_claim = true;
  int runs = 0;
  idem::IdempotentConsumer consumer(store, [&](const Message&) { ++runs; });
  EXPECT_THROW(consumer.consume({.key = "k"}), idem::StoreUnavailable);
  std::vector<Message> batch{{.key = "a"}, {.key = "b"}};
  EXPECT_THROW(consumer.consume_batch(batch), idem::StoreUnavailable);
  EXPECT_EQ(runs, 0);
  // Recovery is automatic once the store answers again.
  store.fail_claim = false;
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::processed);
}

TEST(Consumer, ForeignBackendExceptionsBecomeStoreUnavailableWithAHint) {
  FaultyStore store;
  store.throw_foreign = true;
  idem::IdempotentConsumer consumer(store, [](const Message&) {});
  try {
    consumer.consume({.key = "k"});
    FAIL();
  } catch (const idem::StoreUnavailable& e) {
    EXPECT_STREQ(e.what(),
                 "faulty store failed: connection reset by peer; the message was not recorded "
                 "as done: do not ack it, retry later");
  }
}

TEST(Consumer, StoreFailingAfterTheHandlerThrowsSoTheMessageIsNotAcked) {
  FaultyStore store;
  store.fail_complete = true;
  idem::IdempotentConsumer consumer(store, [](const Message&) {});
  EXPECT_THROW(consumer.consume({.key = "k"}), idem::StoreUnavailable);
}

TEST(Consumer, ALostLeaseStillCountsAsProcessed) {
  FaultyStore store;
  store.refuse_complete = true;
  idem::IdempotentConsumer consumer(store, [](const Message&) {});
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::processed);
}

TEST(Consumer, HandlerFailureReleasesTheClaimOnce) {
  FaultyStore store;
  idem::IdempotentConsumer consumer(store,
                                    [](const Message&) { throw std::runtime_error("boom"); });
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::failed);
  EXPECT_EQ(store.releases, 1);
  EXPECT_EQ(store.completes, 0);
}

TEST(Consumer, BatchClaimsInOneCallAndRepeatsAfterward) {
  FaultyStore store;
  idem::IdempotentConsumer consumer(store, [](const Message&) {});
  std::vector<Message> batch{{.key = "a"}, {.key = "b"}, {.key = "a"}};
  std::vector<idem::Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(store.batch_claims, 1);
  EXPECT_EQ(results[2].outcome, Outcome::duplicate);
}

TEST(Consumer, RethrowInABatchHappensAfterTheOthersAreRecorded) {
  idem::MemoryStore store;
  int runs = 0;
  idem::IdempotentConsumer consumer(store,
                                    [&](const Message& m) {
                                      ++runs;
                                      if (m.key == "bad") throw std::runtime_error("boom");
                                    },
                                    {.rethrow_handler_errors = true});
  std::vector<Message> batch{{.key = "bad"}, {.key = "good"}};
  EXPECT_THROW(consumer.consume_batch(batch), std::runtime_error);
  EXPECT_EQ(consumer.consume({.key = "good"}).outcome, Outcome::duplicate);
  EXPECT_EQ(runs, 2);
}

TEST(Outcome, OnlyProcessedAndDuplicateAreAcked) {
  EXPECT_TRUE(idem::should_ack(Outcome::processed));
  EXPECT_TRUE(idem::should_ack(Outcome::duplicate));
  EXPECT_FALSE(idem::should_ack(Outcome::in_progress));
  EXPECT_FALSE(idem::should_ack(Outcome::conflict));
  EXPECT_FALSE(idem::should_ack(Outcome::failed));
  EXPECT_EQ(idem::to_string(Outcome::in_progress), "in_progress");
}

}  // namespace

namespace {

class CountingMetrics final : public idem::Metrics {
 public:
  std::array<std::atomic<std::uint64_t>, idem::kCounterCount> counters{};
  std::array<std::atomic<std::uint64_t>, idem::kTimingCount> timings{};
  void add(idem::Counter c, std::uint64_t n) noexcept override {
    counters[static_cast<int>(c)] += n;
  }
  void observe(idem::Timing t, std::chrono::nanoseconds) noexcept override {
    timings[static_cast<int>(t)] += 1;
  }
  std::uint64_t operator[](idem::Counter c) const { return counters[static_cast<int>(c)]; }
  std::uint64_t operator[](idem::Timing t) const { return timings[static_cast<int>(t)]; }
};

class RecordingLogger final : public idem::Logger {
 public:
  std::vector<std::string> lines;
  void log(idem::LogLevel, std::string_view line) noexcept override { lines.emplace_back(line); }
};

TEST(ConsumerMetrics, CountsEveryOutcomeAndTimesStoreAndHandler) {
  idem::ManualClock clock;
  idem::MemoryStore store({.clock = &clock});
  CountingMetrics metrics;
  RecordingLogger logger;
  idem::IdempotentConsumer consumer(store,
                                    [](const Message& m) {
                                      if (m.key == "bad")
                                        throw std::runtime_error("card service down");
                                    },
                                    {.lease = 1000ms, .metrics = &metrics, .logger = &logger});
  consumer.consume({.key = "a", .payload = "1"});
  consumer.consume({.key = "a", .payload = "1"});
  consumer.consume({.key = "a", .payload = "2"});
  consumer.consume({.key = "bad"});
  ASSERT_EQ(store.claim({.key = "held", .lease = 1000ms}).status, idem::ClaimStatus::acquired);
  consumer.consume({.key = "held"});
  clock.advance(2000);
  consumer.consume({.key = "held"});
  std::vector<Message> batch{{.key = "b"}, {.key = "b"}, {.key = "c"}};
  consumer.consume_batch(batch);

  EXPECT_EQ(metrics[idem::Counter::processed], 4u);  // a, held (taken over), b, c
  EXPECT_EQ(metrics[idem::Counter::duplicate], 2u);  // a, b
  EXPECT_EQ(metrics[idem::Counter::conflict], 1u);
  EXPECT_EQ(metrics[idem::Counter::failed], 1u);
  EXPECT_EQ(metrics[idem::Counter::in_progress], 1u);
  EXPECT_EQ(metrics[idem::Counter::lease_takeovers], 1u);
  EXPECT_EQ(metrics[idem::Timing::handler], 5u);
  EXPECT_GE(metrics[idem::Timing::store_claim], 7u);
  ASSERT_EQ(logger.lines.size(), 1u);
  EXPECT_NE(logger.lines[0].find("card service down"), std::string::npos) << logger.lines[0];
}

TEST(ConsumerMetrics, CountsStoreErrorsAndLostLeases) {
  FaultyStore store;
  CountingMetrics metrics;
  RecordingLogger logger;
  idem::IdempotentConsumer consumer(store, [](const Message&) {},
                                    {.metrics = &metrics, .logger = &logger});
  store.fail_claim = true;
  EXPECT_THROW(consumer.consume({.key = "k"}), idem::StoreUnavailable);
  store.fail_claim = false;
  store.refuse_complete = true;
  consumer.consume({.key = "k2"});
  EXPECT_EQ(metrics[idem::Counter::store_errors], 1u);
  EXPECT_EQ(metrics[idem::Counter::lease_lost], 1u);
  ASSERT_EQ(logger.lines.size(), 2u);
  EXPECT_NE(logger.lines[1].find("raise Options::lease"), std::string::npos);
}

}  // namespace

namespace {

TEST(ConsumerOptions, NonPositiveDurationsAreRejectedAndForeverIsCapped) {
  idem::MemoryStore store;
  auto noop = [](const Message&) {};
  EXPECT_THROW(idem::IdempotentConsumer(store, noop, {.lease = 0ms}), idem::ConfigError);
  EXPECT_THROW(idem::IdempotentConsumer(store, noop, {.retention = -1ms}), idem::ConfigError);
  idem::IdempotentConsumer forever(store, noop, {.retention = std::chrono::milliseconds::max()});
  EXPECT_EQ(forever.options().retention, idem::kMaxDuration);
  EXPECT_EQ(forever.consume({.key = "k"}).outcome, Outcome::processed);
  EXPECT_EQ(forever.consume({.key = "k"}).outcome, Outcome::duplicate);
}

TEST(ConsumerBatch, ARepeatAfterALostLeaseIsStillADuplicate) {
  FaultyStore store;
  store.refuse_complete = true;  // the first occurrence's record is lost
  int runs = 0;
  idem::IdempotentConsumer consumer(store, [&](const Message&) {
    ++runs;
    return std::string("r");
  });
  std::vector<Message> batch{
      {.key = "a", .payload = "1"}, {.key = "a", .payload = "1"}, {.key = "a", .payload = "2"}};
  std::vector<idem::Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::duplicate);
  EXPECT_EQ(results[1].response, "r");
  EXPECT_EQ(results[2].outcome, Outcome::conflict);
  EXPECT_EQ(runs, 1);
}

TEST(ConsumerBatch, BeforeProcessingCompletesEvenAfterAFailure) {
  FaultyStore store;
  idem::IdempotentConsumer consumer(store, [](const Message&) { throw std::runtime_error("boom"); },
                                    {.mark = idem::Mark::before_processing});
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::failed);
  EXPECT_EQ(store.completes, 1);
  EXPECT_EQ(store.releases, 0);
  EXPECT_EQ(consumer.consume({.key = "k"}).outcome, Outcome::duplicate);
}

TEST(ConsumerBatch, AStoreAnsweringTheWrongNumberOfClaimsIsUnavailable) {
  class ShortStore final : public idem::DedupStore {
   public:
    std::string_view name() const noexcept override { return "short"; }

   protected:
    idem::Claim do_claim(const idem::ClaimRequest&) override { return {}; }
    bool do_complete(const idem::Completion&) override { return true; }
    bool do_release(std::string_view, std::uint64_t) override { return true; }
    bool do_forget(std::string_view) override { return true; }
    std::vector<idem::Claim> do_claim_batch(std::span<const idem::ClaimRequest>) override {
      return {};
    }
  } store;
  idem::IdempotentConsumer consumer(store, [](const Message&) {});
  std::vector<Message> batch{{.key = "a"}};
  EXPECT_THROW(consumer.consume_batch(batch), idem::StoreUnavailable);
}

}  // namespace

// --- Options::in_progress_wait -----------------------------------------------------------

namespace {

// Lets a test hold a handler until it says go.
struct Gate {
  std::atomic<bool> entered{false};
  std::atomic<bool> open{false};
  void wait_open() {
    entered = true;
    while (!open) std::this_thread::sleep_for(1ms);
  }
  void wait_entered() const {
    while (!entered) std::this_thread::sleep_for(1ms);
  }
};

}  // namespace

TEST(ConsumerWait, ADuplicateWaitsForTheHolderAndGetsItsResponse) {
  idem::MemoryStore store;
  Gate gate;
  std::atomic<int> runs{0};
  CountingMetrics metrics;
  idem::IdempotentConsumer consumer(
      store,
      [&](const Message&) {
        ++runs;
        gate.wait_open();
        return std::string("card-1");
      },
      idem::Options{.in_progress_wait = 60s, .metrics = &metrics});
  std::thread first([&] {
    EXPECT_EQ(consumer.consume({.key = "pay-1", .payload = "p"}).outcome, Outcome::processed);
  });
  gate.wait_entered();
  std::thread second([&] {
    idem::Result r = consumer.consume({.key = "pay-1", .payload = "p"});
    EXPECT_EQ(r.outcome, Outcome::duplicate);
    EXPECT_EQ(r.response, "card-1");
  });
  std::this_thread::sleep_for(50ms);  // let the second find the key held and wait
  gate.open = true;
  first.join();
  second.join();
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(metrics[idem::Counter::in_progress], 0u);  // the wait ended in a duplicate
  EXPECT_EQ(metrics[idem::Counter::duplicate], 1u);
}

TEST(ConsumerWait, AHolderThatDiedIsTakenOverWhenItsLeaseEnds) {
  idem::MemoryStore store;
  // A worker claimed the key and crashed: nobody completes or releases it.
  ASSERT_EQ(store.claim({.key = "pay-2", .lease = 200ms}).status, idem::ClaimStatus::acquired);
  int runs = 0;
  idem::IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = 60s});
  idem::Result r = consumer.consume({.key = "pay-2", .payload = "p"});
  EXPECT_EQ(r.outcome, Outcome::processed);
  EXPECT_EQ(runs, 1);
}

TEST(ConsumerWait, TheWaitRunsOutCleanlyAndCountsOneInProgress) {
  FaultyStore store;
  ASSERT_EQ(store.claim({.key = "pay-3", .lease = 600s}).status, idem::ClaimStatus::acquired);
  CountingMetrics metrics;
  int runs = 0;
  idem::IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; },
      idem::Options{.in_progress_wait = 100ms, .metrics = &metrics});
  EXPECT_EQ(consumer.consume({.key = "pay-3", .payload = "p"}).outcome, Outcome::in_progress);
  EXPECT_EQ(runs, 0);
  EXPECT_GT(store.awaits, 0);
  EXPECT_EQ(metrics[idem::Counter::in_progress], 1u);
}

TEST(ConsumerWait, ABatchNeverWaitsOnAKeyItHoldsItself) {
  FaultyStore store;
  int runs = 0;
  idem::IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = 600s});
  std::vector<Message> batch{
      {.key = "k", .payload = "p"}, {.key = "other", .payload = "p"}, {.key = "k", .payload = "p"}};
  std::vector<idem::Result> results = consumer.consume_batch(batch);
  EXPECT_EQ(results[0].outcome, Outcome::processed);
  EXPECT_EQ(results[1].outcome, Outcome::processed);
  EXPECT_EQ(results[2].outcome, Outcome::duplicate);
  EXPECT_EQ(runs, 2);
  EXPECT_EQ(store.awaits, 0);
}

TEST(ConsumerWait, ABatchWaitsForOtherHoldersOnlyAfterCompletingItsOwnKeys) {
  idem::MemoryStore store;
  idem::Claim held = store.claim({.key = "held", .lease = 600s});
  ASSERT_EQ(held.status, idem::ClaimStatus::acquired);
  int runs = 0;
  idem::IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; }, idem::Options{.in_progress_wait = 60s});
  std::thread holder([&] {
    // The batch's own key is recorded before the batch waits on "held".
    for (;;) {
      std::optional<idem::RecordInfo> mine = store.inspect("mine");
      if (mine && mine->state == idem::RecordInfo::State::done) break;
      std::this_thread::sleep_for(1ms);
    }
    store.complete({.key = "held", .token = held.token, .response = "r"});
  });
  std::vector<Message> batch{{.key = "held", .payload = "p"}, {.key = "mine", .payload = "p"}};
  std::vector<idem::Result> results = consumer.consume_batch(batch);
  holder.join();
  EXPECT_EQ(results[0].outcome, Outcome::duplicate);
  EXPECT_EQ(results[0].response, "r");
  EXPECT_EQ(results[1].outcome, Outcome::processed);
  EXPECT_EQ(runs, 1);
}

// --- Options::fingerprint_of -------------------------------------------------------------

namespace {

// The business fields of "amount=10;sent_at=..." payloads: everything before ";sent_at=".
idem::Fingerprint business_fields(const Message& message) {
  const std::size_t end = message.payload.find(";sent_at=");
  return idem::Fingerprint::of(message.payload.substr(0, end));
}

}  // namespace

TEST(ConsumerFingerprint, ATimestampOnlyResendIsADuplicateAndAChangedAmountAConflict) {
  idem::MemoryStore store;
  int runs = 0;
  idem::IdempotentConsumer consumer(
      store, [&](const Message&) { ++runs; }, idem::Options{.fingerprint_of = business_fields});
  EXPECT_EQ(consumer.consume({.key = "pay-4", .payload = "amount=10;sent_at=1"}).outcome,
            Outcome::processed);
  EXPECT_EQ(consumer.consume({.key = "pay-4", .payload = "amount=10;sent_at=2"}).outcome,
            Outcome::duplicate);
  EXPECT_EQ(consumer.consume({.key = "pay-4", .payload = "amount=99;sent_at=3"}).outcome,
            Outcome::conflict);
  EXPECT_EQ(runs, 1);
  // The whole payload, by default: the resend is a conflict.
  idem::MemoryStore other;
  idem::IdempotentConsumer whole(other, [](const Message&) {});
  whole.consume({.key = "pay-4", .payload = "amount=10;sent_at=1"});
  EXPECT_EQ(whole.consume({.key = "pay-4", .payload = "amount=10;sent_at=2"}).outcome,
            Outcome::conflict);
}

TEST(ConsumerFingerprint, IsIgnoredWhenVerificationIsOff) {
  idem::MemoryStore store;
  static int calls = 0;
  idem::IdempotentConsumer consumer(
      store, [](const Message&) {},
      idem::Options{.verify_payload = false, .fingerprint_of = [](const Message& m) {
                      ++calls;
                      return idem::Fingerprint::of(m.payload);
                    }});
  consumer.consume({.key = "pay-5", .payload = "a"});
  EXPECT_EQ(consumer.consume({.key = "pay-5", .payload = "b"}).outcome, Outcome::duplicate);
  EXPECT_EQ(calls, 0);
}
