#pragma once
// The counters behind RedisStoreStats, shared by the pool, the router and the subscribers.
// Internal to idem::redis.

#include <atomic>
#include <cstdint>

namespace idem::redis_detail {

struct Counters {
  std::atomic<std::uint64_t> round_trips{0}, commands{0}, redirects{0}, reconnects{0},
      script_loads{0};
  // await_change: see RedisStoreStats.
  std::atomic<std::uint64_t> notifications{0}, waits_woken{0}, waits_settled{0}, waits_timed_out{0},
      wait_fallbacks{0}, waiting{0};
};

}  // namespace idem::redis_detail
