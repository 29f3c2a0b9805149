#include "idem/testing/mock_broker.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "idem/idem.hpp"

namespace {

using idem::Message;
using idem::Outcome;
using idem::testing::Delivery;
using idem::testing::FaultPlan;
using idem::testing::MockBroker;
using idem::testing::MockConsumerSession;
using idem::testing::MockPublisher;
using idem::testing::Verdict;

std::string key_of(int i) {
  return "pay-" + std::to_string(i);
}

void publish_n(MockPublisher& publisher, int n) {
  for (int i = 0; i < n; ++i) publisher.publish(key_of(i), "amount=" + std::to_string(i));
}

// Effects per biz-id: what a handler's side effect (a card issued, a row inserted) left behind.
using Effects = std::map<std::string, int, std::less<>>;

void record(Effects& effects, std::string_view key) {
  ++effects[std::string(key)];
}

int duplicate_effects(const Effects& effects) {
  int extra = 0;
  for (const auto& [key, count] : effects) extra += count - 1;
  return extra;
}

void expect_exactly_once(const Effects& effects, int n) {
  ASSERT_EQ(effects.size(), static_cast<std::size_t>(n)) << "messages lost";
  for (int i = 0; i < n; ++i) {
    auto it = effects.find(key_of(i));
    ASSERT_NE(it, effects.end()) << key_of(i) << " lost";
    EXPECT_EQ(it->second, 1) << key_of(i);
  }
}

// ---- First half: producer -> broker --------------------------------------------------------

TEST(MockBroker, LostPublishAcksAreRetriedWithTheSameInnerIdAndStoredOnce) {
  MockBroker broker({.faults = {.lost_publish_ack_rate = 0.3, .seed = 7}});
  MockPublisher publisher(broker);
  constexpr int n = 1000;
  int retried = 0;
  for (int i = 0; i < n; ++i) {
    MockPublisher::Receipt receipt = publisher.publish(key_of(i), "body");
    if (receipt.attempts > 1) ++retried;
    EXPECT_EQ(broker.at(receipt.offset).inner_id, receipt.inner_id.to_string());
  }
  const auto& stats = broker.stats();
  EXPECT_GT(retried, 100) << "the plan must really lose acks";
  EXPECT_EQ(broker.size(), static_cast<std::size_t>(n));
  EXPECT_EQ(stats.copies_stored, static_cast<std::uint64_t>(n));
  EXPECT_EQ(stats.copies_rejected, stats.lost_publish_acks);
  EXPECT_EQ(stats.publish_attempts, n + stats.lost_publish_acks);
  for (int i = 0; i < n; ++i) EXPECT_EQ(broker.copies_of(key_of(i)), 1u) << key_of(i);
}

TEST(MockBroker, WithoutInnerIdDedupEveryRetryIsAnotherCopy) {
  MockBroker broker(
      {.dedup_inner_ids = false, .faults = {.lost_publish_ack_rate = 0.3, .seed = 7}});
  MockPublisher publisher(broker);
  constexpr int n = 1000;
  publish_n(publisher, n);
  EXPECT_GT(broker.stats().lost_publish_acks, 100u);
  EXPECT_EQ(broker.size(), n + broker.stats().lost_publish_acks);
  EXPECT_EQ(broker.stats().copies_rejected, 0u);

  // The second half still holds: idem keys on the biz-id, not the inner id.
  idem::MemoryStore store;
  Effects effects;
  idem::IdempotentConsumer consumer(store, [&](const Message& m) { record(effects, m.key); });
  MockConsumerSession session(broker);
  EXPECT_TRUE(session.run([&](const Message& m) { return consumer.consume(m); }).drained);
  expect_exactly_once(effects, n);
}

TEST(MockBroker, MessagesWithoutInnerIdAreNeverDeduplicated) {
  MockBroker broker;
  broker.send("k", "v", "");
  broker.send("k", "v", "");
  EXPECT_EQ(broker.size(), 2u);
}

TEST(MockBroker, OffsetsStartWhereAsked) {
  MockBroker broker({.first_offset = 152});
  MockPublisher publisher(broker);
  EXPECT_EQ(publisher.publish("a", "1").offset, 152);
  EXPECT_EQ(publisher.publish("b", "2").offset, 153);
  EXPECT_EQ(broker.begin_offset(), 152);
  EXPECT_EQ(broker.end_offset(), 154);
  EXPECT_EQ(broker.committed_offset("any"), 152);
  EXPECT_EQ(broker.at(153).key, "b");
}

// ---- Second half: broker -> consumer ---------------------------------------------------------

// Offsets 152, 153, 154; the consumer handles 152 and 153 and is killed before its periodic
// commit; on restart the broker replays from the committed offset, 152.
struct ReplayStory {
  MockBroker broker{{.first_offset = 152}};
  std::vector<std::int64_t> offsets_seen;

  ReplayStory() {
    MockPublisher publisher(broker);
    publisher.publish("row-1", "data 1");
    publisher.publish("row-2", "data 2");
    publisher.publish("row-3", "data 3");
  }

  template <class Handler>
  void run(Handler handler) {
    MockConsumerSession session(broker, {.group = "story", .commit_every = 0});
    auto seen = [&](const Delivery& d) {
      offsets_seen.push_back(d.offset);
      return handler(d.message());
    };
    ASSERT_TRUE(session.poll(seen));  // 152
    ASSERT_TRUE(session.poll(seen));  // 153
    session.crash();                  // kill -9 before the commit
    EXPECT_EQ(session.position(), 152);
    EXPECT_TRUE(session.run(seen).drained);
    EXPECT_EQ(broker.committed_offset("story"), 155);
  }
};

TEST(MockBroker, CrashBeforeCommitReplaysFromTheCommittedOffset) {
  ReplayStory story;
  Effects table;
  story.run([&](const Message& m) { record(table, m.key); });  // a plain INSERT, no idem
  EXPECT_EQ(story.offsets_seen, (std::vector<std::int64_t>{152, 153, 152, 153, 154}));
  // Without idem the replay inserts rows 1 and 2 twice: the mock really duplicates.
  EXPECT_EQ(table, (Effects{{"row-1", 2}, {"row-2", 2}, {"row-3", 1}}));
  EXPECT_EQ(story.broker.stats().crashes, 1u);
  EXPECT_EQ(story.broker.stats().redeliveries, 2u);
}

TEST(MockBroker, CrashReplayWithIdemHasNoDoubleInsert) {
  ReplayStory story;
  idem::MemoryStore store;
  Effects table;
  std::vector<Outcome> outcomes;
  idem::IdempotentConsumer consumer(store, [&](const Message& m) { record(table, m.key); });
  story.run([&](const Message& m) {
    Outcome outcome = consumer.consume(m).outcome;
    outcomes.push_back(outcome);
    return outcome;
  });
  EXPECT_EQ(story.offsets_seen, (std::vector<std::int64_t>{152, 153, 152, 153, 154}));
  EXPECT_EQ(table, (Effects{{"row-1", 1}, {"row-2", 1}, {"row-3", 1}}));
  EXPECT_EQ(outcomes,
            (std::vector<Outcome>{Outcome::processed, Outcome::processed, Outcome::duplicate,
                                  Outcome::duplicate, Outcome::processed}));
}

TEST(MockBroker, LostCommitsAreRedeliveredAfterTheAckTimeout) {
  MockBroker broker({.faults = {.lost_commit_rate = 0.3, .seed = 11}});
  MockPublisher publisher(broker);
  constexpr int n = 500;
  publish_n(publisher, n);
  Effects plain;
  MockConsumerSession session(broker, {.redelivery_delay = 5});
  std::uint64_t redelivered_flags = 0;
  auto report = session.run([&](const Delivery& d) {
    if (d.redelivered()) ++redelivered_flags;
    record(plain, d.key);
  });
  EXPECT_TRUE(report.drained);
  const auto& stats = broker.stats();
  EXPECT_GT(stats.lost_commits, 50u);
  EXPECT_EQ(stats.redeliveries, stats.lost_commits);  // one commit per delivery, each retried
  EXPECT_EQ(redelivered_flags, stats.redeliveries);
  EXPECT_EQ(duplicate_effects(plain), static_cast<int>(stats.redeliveries));
  EXPECT_EQ(plain.size(), static_cast<std::size_t>(n));
  EXPECT_TRUE(session.drained());
  EXPECT_EQ(broker.committed_offset("default"), broker.end_offset());
}

TEST(MockBroker, NackedDeliveriesComeBackAndThrowingCallbacksNack) {
  MockBroker broker;
  MockPublisher publisher(broker);
  publisher.publish("a", "1");
  publisher.publish("b", "2");
  MockConsumerSession session(broker, {.redelivery_delay = 0});
  std::vector<std::pair<std::string, std::uint32_t>> seen;
  bool refused = false, thrown = false;
  auto callback = [&](const Delivery& d) -> bool {
    seen.emplace_back(d.key, d.delivery_count);
    if (d.key == "a" && !refused) return !(refused = true);
    if (d.key == "b" && !thrown) {
      thrown = true;
      throw std::runtime_error("handler bug");
    }
    return true;
  };
  EXPECT_TRUE(session.poll(callback));                       // a: nack
  EXPECT_TRUE(session.poll(callback));                       // a again (no delay): ack
  EXPECT_THROW(session.poll(callback), std::runtime_error);  // b: throws -> nack
  EXPECT_TRUE(session.run(callback).drained);                // b again
  EXPECT_EQ(seen, (std::vector<std::pair<std::string, std::uint32_t>>{
                      {"a", 1}, {"a", 2}, {"b", 1}, {"b", 2}}));
  EXPECT_EQ(broker.stats().nacks, 2u);
}

TEST(MockBroker, ConflictIsDeadLetteredAndCommitted) {
  MockBroker broker;
  MockPublisher publisher(broker);
  publisher.publish("pay-1", "amount=10");
  publisher.publish("pay-1", "amount=99");  // same biz-id, different body: a producer bug
  idem::MemoryStore store;
  int runs = 0;
  idem::IdempotentConsumer consumer(store, [&](const Message&) { ++runs; });
  MockConsumerSession session(broker);
  EXPECT_TRUE(session.run([&](const Message& m) { return consumer.consume(m); }).drained);
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(broker.stats().dead_letters, 1u);
}

TEST(MockBroker, AcceptsEveryCallbackForm) {
  MockBroker broker;
  MockPublisher publisher(broker);
  publish_n(publisher, 5);
  int calls = 0;
  MockConsumerSession s1(broker, {.group = "void"});
  EXPECT_TRUE(s1.run([&](const Message&) { ++calls; }).drained);
  MockConsumerSession s2(broker, {.group = "bool"});
  EXPECT_TRUE(s2.run([&](const Delivery&) { return ++calls > 0; }).drained);
  MockConsumerSession s3(broker, {.group = "verdict"});
  EXPECT_TRUE(s3.run([&](const Delivery&) { return ++calls, Verdict::ack; }).drained);
  MockConsumerSession s4(broker, {.group = "result"});
  EXPECT_TRUE(
      s4.run([&](const Message&) { return ++calls, idem::Result{Outcome::duplicate}; }).drained);
  EXPECT_EQ(calls, 20);  // groups read the log independently
}

TEST(MockBroker, RunStopsAtMaxDeliveries) {
  MockBroker broker({.faults = {.crash_rate = 1.0}});  // every delivery crashes: never drains
  MockPublisher publisher(broker);
  publish_n(publisher, 3);
  MockConsumerSession session(broker);
  auto report = session.run([](const Message&) {}, 100);
  EXPECT_EQ(report.deliveries, 100u);
  EXPECT_FALSE(report.drained);
  EXPECT_EQ(broker.stats().crashes, 100u);
  EXPECT_EQ(broker.committed_offset("default"), 0);
}

TEST(MockBroker, PublisherGivesUpWhenEveryAckIsLost) {
  MockBroker broker({.faults = {.lost_publish_ack_rate = 1.0}});
  MockPublisher publisher(broker, 5);
  EXPECT_THROW(publisher.publish("k", "v"), idem::Error);
  EXPECT_EQ(broker.size(), 1u);  // persisted once, all five acks lost
  EXPECT_EQ(broker.stats().publish_attempts, 5u);
}

// ---- Long randomized runs ---------------------------------------------------------------------

constexpr FaultPlan kStormy{
    .lost_publish_ack_rate = 0.15, .lost_commit_rate = 0.15, .crash_rate = 0.1, .seed = 2024};
constexpr int kStormMessages = 10'000;

// Publishes kStormMessages through a faulty broker while consuming with callback, then drains.
template <class Callback>
idem::testing::MockBrokerStats storm(const FaultPlan& plan, Callback callback) {
  MockBroker broker({.first_offset = 1000, .faults = plan});
  MockPublisher publisher(broker);
  MockConsumerSession session(broker, {.group = "cards", .commit_every = 4});
  // Interleave: the consumer often runs right behind the producer, as in production.
  for (int i = 0; i < kStormMessages; ++i) {
    publisher.publish(key_of(i), "amount=" + std::to_string(i));
    if (i % 7 == 0) session.poll(callback);
  }
  EXPECT_TRUE(session.run(callback, 10 * kStormMessages).drained);
  EXPECT_EQ(broker.size(), static_cast<std::size_t>(kStormMessages));
  return broker.stats();
}

TEST(MockBrokerStorm, EveryBusinessKeyTakesEffectExactlyOnceWithIdem) {
  idem::MemoryStore store;
  Effects effects;
  idem::IdempotentConsumer consumer(store, [&](const Message& m) { record(effects, m.key); });
  auto stats = storm(kStormy, [&](const Message& m) { return consumer.consume(m); });
  // The faults really happened, at roughly the planned rates...
  EXPECT_GT(stats.lost_publish_acks, 1000u);
  EXPECT_GT(stats.lost_commits, 200u);
  EXPECT_GT(stats.crashes, 500u);
  EXPECT_GT(stats.redeliveries, 1000u);
  // ...and still: none lost, none twice.
  expect_exactly_once(effects, kStormMessages);
}

TEST(MockBrokerStorm, WithoutIdemTheDuplicatesShow) {
  Effects effects;
  auto stats = storm(kStormy, [&](const Message& m) { record(effects, m.key); });
  EXPECT_EQ(effects.size(), static_cast<std::size_t>(kStormMessages));  // none lost
  EXPECT_GT(duplicate_effects(effects), 1000);
  EXPECT_EQ(static_cast<std::uint64_t>(duplicate_effects(effects)), stats.redeliveries);
}

TEST(MockBrokerStorm, SameSeedSameFaults) {
  Effects a_effects, b_effects, c_effects;
  auto a = storm(kStormy, [&](const Message& m) { record(a_effects, m.key); });
  auto b = storm(kStormy, [&](const Message& m) { record(b_effects, m.key); });
  EXPECT_EQ(a, b);
  EXPECT_EQ(a_effects, b_effects);

  FaultPlan other = kStormy;
  other.seed = 2025;
  auto c = storm(other, [&](const Message& m) { record(c_effects, m.key); });
  EXPECT_NE(a, c);
}

TEST(MockBrokerStorm, IdemAndPlainRunsSeeTheSameFaults) {
  // The callback's answer (always ack here) is all the broker sees, so one seed injects the
  // same faults with and without idem: the comparison above is like for like.
  idem::MemoryStore store;
  Effects with_effects, plain_effects;
  idem::IdempotentConsumer consumer(store, [&](const Message& m) { record(with_effects, m.key); });
  auto with_idem = storm(kStormy, [&](const Message& m) { return consumer.consume(m); });
  auto plain = storm(kStormy, [&](const Message& m) { record(plain_effects, m.key); });
  EXPECT_EQ(with_idem, plain);
  expect_exactly_once(with_effects, kStormMessages);
}

}  // namespace
