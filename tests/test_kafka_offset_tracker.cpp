// The Kafka consumer's offset bookkeeping on its own: no broker, no librdkafka.

#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "offset_tracker.hpp"

namespace {

using namespace std::chrono_literals;
using idem::PartitionOffset;
using idem::kafka::detail::OffsetTracker;
using idem::kafka::detail::PartitionState;
using Clock = OffsetTracker::Clock;

std::vector<std::int64_t> offsets_of(const std::vector<PartitionOffset>& list) {
  std::vector<std::int64_t> out;
  for (const PartitionOffset& p : list) out.push_back(p.next_offset);
  return out;
}

TEST(KafkaOffsetTracker, NothingIsPendingUntilARecordSettles) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  EXPECT_TRUE(tracker.pending(true).empty());
  tracker.find({"t", 0})->settle(41);
  const auto pending = tracker.pending(false);
  ASSERT_EQ(pending.size(), 1u);
  EXPECT_EQ(pending[0].topic, "t");
  EXPECT_EQ(pending[0].partition, 0);
  EXPECT_EQ(pending[0].next_offset, 42);  // the next record to read, as Kafka commits
}

TEST(KafkaOffsetTracker, CommittedOffsetsAreNotSentAgain) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  tracker.assign("t", 1);
  tracker.find({"t", 0})->settle(9);
  tracker.find({"t", 1})->settle(19);
  tracker.mark_committed(tracker.pending(true));
  EXPECT_TRUE(tracker.pending(true).empty());
  tracker.find({"t", 1})->settle(20);
  EXPECT_EQ(offsets_of(tracker.pending(true)), (std::vector<std::int64_t>{21}));
}

TEST(KafkaOffsetTracker, InFlightCommitsAreSkippedByAsyncAndResentBySync) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  tracker.find({"t", 0})->settle(4);
  tracker.mark_committing(tracker.pending(false));
  EXPECT_TRUE(tracker.pending(false).empty());  // already on its way
  EXPECT_EQ(offsets_of(tracker.pending(true)), (std::vector<std::int64_t>{5}));  // sync: again
  // The result comes back: no longer in flight, and committed.
  EXPECT_TRUE(tracker.commit_result({"t", 0}, 5, true));
  EXPECT_TRUE(tracker.pending(true).empty());
}

TEST(KafkaOffsetTracker, AFailedAsyncCommitLeavesTheOffsetPending) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  tracker.find({"t", 0})->settle(4);
  tracker.mark_committing(tracker.pending(false));
  EXPECT_TRUE(tracker.commit_result({"t", 0}, 5, false));
  EXPECT_EQ(offsets_of(tracker.pending(false)), (std::vector<std::int64_t>{5}));
  // A result for a partition given up meanwhile is ignored.
  EXPECT_FALSE(tracker.commit_result({"gone", 3}, 5, true));
}

TEST(KafkaOffsetTracker, ALateResultNeverMovesTheCommittedOffsetBack) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  PartitionState& state = *tracker.find({"t", 0});
  state.settle(9);
  tracker.mark_committed(tracker.pending(true));          // a sync commit of 10
  EXPECT_TRUE(tracker.commit_result({"t", 0}, 6, true));  // an older async one answers late
  EXPECT_EQ(state.committed, 10);
}

TEST(KafkaOffsetTracker, AnUnmatchedResultSendsEverythingInFlightAgain) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  tracker.find({"t", 0})->settle(1);
  tracker.mark_committing(tracker.pending(false));
  tracker.forget_in_flight();
  EXPECT_EQ(offsets_of(tracker.pending(false)), (std::vector<std::int64_t>{2}));
}

TEST(KafkaOffsetTracker, AHeldRecordBlocksEverythingAfterItAndCopiesBeforeIt) {
  PartitionState state;
  state.settle(9);
  EXPECT_FALSE(state.takes(5));  // settled already: a copy fetched before a seek-back
  EXPECT_TRUE(state.takes(10));
  state.hold(10, Clock::now(), 10ms, 100ms);
  EXPECT_TRUE(state.paused);
  EXPECT_TRUE(state.takes(10));
  EXPECT_FALSE(state.takes(11));  // behind the held record
  state.settle(10);
  EXPECT_TRUE(state.takes(11));
  EXPECT_EQ(state.blocked_at, -1);
}

TEST(KafkaOffsetTracker, FailuresCountPerRecordAndRestartForTheNext) {
  PartitionState state;
  EXPECT_EQ(state.count_failure(3), 1u);
  EXPECT_EQ(state.count_failure(3), 2u);
  state.hold(3, Clock::now(), 10ms, 100ms);  // a hold of the same record keeps the count
  EXPECT_EQ(state.count_failure(3), 3u);
  EXPECT_EQ(state.count_failure(4), 1u);  // another record: counted afresh
}

TEST(KafkaOffsetTracker, HoldsBackOffExponentiallyAndResumeWhenDue) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  tracker.assign("t", 1);
  const Clock::time_point t0 = Clock::now();
  PartitionState& state = *tracker.find({"t", 0});
  state.hold(7, t0, 10ms, 25ms);
  EXPECT_EQ(state.retry_at, t0 + 10ms);
  state.hold(7, t0, 10ms, 25ms);
  EXPECT_EQ(state.retry_at, t0 + 20ms);
  state.hold(7, t0, 10ms, 25ms);
  EXPECT_EQ(state.retry_at, t0 + 25ms);  // capped
  // The poll waits no longer than the first retry.
  EXPECT_EQ(tracker.until_next_retry(t0, 100ms), 25ms);
  EXPECT_EQ(tracker.until_next_retry(t0, 5ms), 5ms);
  EXPECT_TRUE(tracker.due_resumes(t0 + 24ms).empty());
  const auto due = tracker.due_resumes(t0 + 25ms);
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].partition, 0);
  EXPECT_EQ(due[0].next_offset, 7);  // resume at the held record
  EXPECT_FALSE(state.paused);
  EXPECT_TRUE(tracker.due_resumes(t0 + 1s).empty());  // resumed once
}

TEST(KafkaOffsetTracker, ForgottenPartitionsAreNotCommitted) {
  OffsetTracker tracker;
  tracker.assign("t", 0);
  tracker.find({"t", 0})->settle(3);
  tracker.erase(tracker.find_entry({"t", 0}));
  EXPECT_EQ(tracker.find({"t", 0}), nullptr);
  EXPECT_TRUE(tracker.pending(true).empty());
  tracker.assign("t", 0);  // assigned again: starts fresh
  EXPECT_EQ(tracker.find({"t", 0})->next_offset, -1);
}

}  // namespace
