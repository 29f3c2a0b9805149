#pragma once
/// @file
/// @brief idem::Clock: the time source of leases and retention, injectable for tests.

#include <atomic>
#include <cstdint>

namespace idem {

/// @brief A millisecond time source.
class Clock {
 public:
  virtual ~Clock() = default;
  /// @brief Milliseconds since the clock's epoch.
  virtual std::int64_t now_ms() const noexcept = 0;
};

/// @brief CLOCK_MONOTONIC_COARSE (a few ms resolution, a few ns per read): fine for leases
/// and retention inside one process.
const Clock& monotonic_clock() noexcept;

/// @brief CLOCK_REALTIME in Unix milliseconds: for records shared by processes or kept across
/// restarts.
const Clock& system_clock() noexcept;

/// @brief A clock that only moves when told to; for tests of leases and retention.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(std::int64_t start_ms = 1'000'000) noexcept : now_(start_ms) {}
  std::int64_t now_ms() const noexcept override { return now_.load(std::memory_order_acquire); }
  void advance(std::int64_t ms) noexcept { now_.fetch_add(ms, std::memory_order_acq_rel); }
  void set(std::int64_t ms) noexcept { now_.store(ms, std::memory_order_release); }

 private:
  std::atomic<std::int64_t> now_;
};

}  // namespace idem
