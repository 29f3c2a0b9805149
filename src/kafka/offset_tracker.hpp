#pragma once
// The Kafka consumer's per-partition bookkeeping, free of librdkafka so it is tested without a
// broker: which records to take, what is settled, what is held back for a retry, and which
// offsets are due for a commit.

#include <chrono>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "idem/adapters/loop_core.hpp"
#include "idem/partition_offset.hpp"

namespace idem::kafka::detail {

using PartitionKey = std::pair<std::string, std::int32_t>;

// One assigned partition.
struct PartitionState {
  using Clock = std::chrono::steady_clock;
  std::int64_t next_offset = -1;  // offset after the last settled record; -1: none yet
  std::int64_t committed = -1;    // last committed next_offset
  std::int64_t committing = -1;   // next_offset of an asynchronous commit in flight
  std::int64_t blocked_at = -1;   // record held back for a retry; -1: none
  unsigned attempts = 0;          // failed handler runs of blocked_at
  unsigned retries = 0;           // holds of blocked_at (for the backoff)
  bool paused = false;
  Clock::time_point retry_at{};

  // False for a copy fetched before a seek-back: already settled, or behind a held record.
  bool takes(std::int64_t offset) const noexcept {
    return offset >= next_offset && (blocked_at < 0 || offset == blocked_at);
  }
  // The record at offset is done (processed, duplicate or dead-lettered).
  void settle(std::int64_t offset) noexcept {
    next_offset = offset + 1;
    blocked_at = -1;
    attempts = 0;
    retries = 0;
  }
  // Counts a failed handler run of the record at offset; returns the failures so far.
  unsigned count_failure(std::int64_t offset) noexcept {
    start_hold(offset);
    return ++attempts;
  }
  // Holds the record at offset back (paused) until its backoff has passed: first, doubled per
  // hold of the same record, at most max.
  void hold(std::int64_t offset, Clock::time_point now, std::chrono::milliseconds first,
            std::chrono::milliseconds max) noexcept {
    start_hold(offset);
    ++retries;
    retry_at = now + adapters::backoff(first, max, retries);
    paused = true;
  }

 private:
  void start_hold(std::int64_t offset) noexcept {
    if (blocked_at == offset) return;
    blocked_at = offset;
    attempts = 0;
    retries = 0;
  }
};

class OffsetTracker {
 public:
  using Clock = PartitionState::Clock;
  using Map = std::map<PartitionKey, PartitionState>;

  // A fresh state for a newly assigned partition.
  void assign(const std::string& topic, std::int32_t partition) {
    partitions_[{topic, partition}] = {};
  }
  PartitionState* find(const PartitionKey& key) {
    auto it = partitions_.find(key);
    return it == partitions_.end() ? nullptr : &it->second;
  }
  Map::iterator find_entry(const PartitionKey& key) { return partitions_.find(key); }
  Map::iterator end() { return partitions_.end(); }
  void erase(Map::iterator it) { partitions_.erase(it); }
  void clear() { partitions_.clear(); }
  Map& partitions() { return partitions_; }
  const Map& partitions() const { return partitions_; }

  // Settled offsets not yet committed, in partition order. In flight (committing) ones are
  // left out unless include_in_flight: a synchronous commit sends them again.
  std::vector<PartitionOffset> pending(bool include_in_flight) const;
  // Records that a commit of these offsets was sent (committing) or succeeded (committed).
  void mark_committing(std::span<const PartitionOffset> offsets);
  void mark_committed(std::span<const PartitionOffset> offsets);
  // The result of an asynchronous commit of one partition: in flight no more; committed when
  // ok. Returns whether the partition is still tracked.
  bool commit_result(const PartitionKey& key, std::int64_t offset, bool ok);
  // An asynchronous commit whose offsets are unknown: everything is sent again next time.
  void forget_in_flight();

  // Paused partitions whose retry time has come: they are marked unpaused and returned with
  // the offset to resume at.
  std::vector<PartitionOffset> due_resumes(Clock::time_point now);
  // timeout, shortened to the first retry time of a paused partition.
  std::chrono::milliseconds until_next_retry(Clock::time_point now,
                                             std::chrono::milliseconds timeout) const;

 private:
  Map partitions_;
};

}  // namespace idem::kafka::detail
