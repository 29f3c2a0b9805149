#include "offset_tracker.hpp"

#include <algorithm>

namespace idem::kafka::detail {

std::vector<PartitionOffset> OffsetTracker::pending(bool include_in_flight) const {
  std::vector<PartitionOffset> out;
  for (const auto& [key, state] : partitions_) {
    if (state.next_offset < 0 || state.next_offset == state.committed) continue;
    if (!include_in_flight && state.next_offset == state.committing) continue;
    out.push_back({key.first, key.second, state.next_offset});
  }
  return out;
}

void OffsetTracker::mark_committing(std::span<const PartitionOffset> offsets) {
  for (const PartitionOffset& p : offsets) {
    if (PartitionState* state = find({p.topic, p.partition})) state->committing = p.next_offset;
  }
}

void OffsetTracker::mark_committed(std::span<const PartitionOffset> offsets) {
  for (const PartitionOffset& p : offsets) {
    if (PartitionState* state = find({p.topic, p.partition})) state->committed = p.next_offset;
  }
}

bool OffsetTracker::commit_result(const PartitionKey& key, std::int64_t offset, bool ok) {
  PartitionState* state = find(key);
  if (state == nullptr) return false;
  if (state->committing == offset) state->committing = -1;
  // Results may come back after a later synchronous commit: never move backwards.
  if (ok) state->committed = std::max(state->committed, offset);
  return true;
}

void OffsetTracker::forget_in_flight() {
  for (auto& entry : partitions_) entry.second.committing = -1;
}

std::vector<PartitionOffset> OffsetTracker::due_resumes(Clock::time_point now) {
  std::vector<PartitionOffset> out;
  for (auto& [key, state] : partitions_) {
    if (!state.paused || now < state.retry_at) continue;
    state.paused = false;
    out.push_back({key.first, key.second, state.blocked_at});
  }
  return out;
}

std::chrono::milliseconds OffsetTracker::until_next_retry(Clock::time_point now,
                                                          std::chrono::milliseconds timeout) const {
  for (const auto& [key, state] : partitions_) {
    if (!state.paused) continue;
    auto wait = std::chrono::ceil<std::chrono::milliseconds>(state.retry_at - now);
    timeout = std::clamp(wait, std::chrono::milliseconds{0}, timeout);
  }
  return timeout;
}

}  // namespace idem::kafka::detail
