#pragma once
// What PostgresStore::await_change waits on: one dedicated connection per store (never a
// pooled one), opened on the first wait, that LISTENs on the schema's channel and holds a
// shared advisory lock (the wait lock) for every key a thread of the store waits for. The
// lock is the registration the completing statements probe; they NOTIFY only when they find
// one (see announce() in schema.cpp). Internal to idem::postgres.
//
// Nobody owns a thread here: a waiting thread that finds no other reading the socket reads it
// (polls until its own deadline), hands out the notifications it reads, and gives the role up
// when its own wait ends.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "connection.hpp"

namespace idem::detail::pg {

/// await_change's counters (PostgresStoreStats).
struct WaitCounters {
  std::atomic<std::uint64_t> notifications{0}, waits_woken{0}, waits_settled{0}, waits_timed_out{0},
      wait_fallbacks{0}, waiting{0};
};

class Listener {
 public:
  Listener(const Settings& settings, std::chrono::milliseconds backoff, WaitCounters& counters)
      : settings_(settings), backoff_(backoff), counters_(counters) {}
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  enum class Status {
    registered,   // listening, and the key's wait lock is held: later changes are announced
    notified,     // a notification for the key arrived
    timed_out,    // the deadline passed
    unavailable,  // no connection (or the wait lock could not be taken)
    interrupted,  // the connection was lost meanwhile
  };

  /// One waiting thread: registered on construction, unregistered on destruction (the wait
  /// lock is released when it was the key's last waiter).
  class Waiter {
   public:
    Waiter(Listener& listener, std::int64_t hash);
    ~Waiter();
    Waiter(const Waiter&) = delete;
    Waiter& operator=(const Waiter&) = delete;

    /// Connects and LISTENs (when not yet), then takes the key's wait lock (unless another
    /// waiter of the key holds it already).
    Status register_interest(Clock::time_point deadline);
    /// After register_interest(): waits for a notification of the key (one that arrived since
    /// the construction counts).
    Status await_notification(Clock::time_point deadline);

   private:
    Listener& l_;
    std::int64_t hash_;
    std::uint64_t seen_ = 0;
    std::uint64_t connection_ = 0;
  };

 private:
  struct Interest {
    std::size_t waiters = 0;
    std::uint64_t generation = 0;  // notifications received for it
    bool locked = false;           // its wait lock is held on the current connection
  };

  bool connect(std::unique_lock<std::mutex>& lock, Clock::time_point deadline);
  // Runs one of the wait statements under the mutex; false (and the connection broken) when
  // it failed. Dispatches the notifications read meanwhile.
  bool run(Sql which, std::int32_t lock_id);
  template <class Done>
  void wait_until(std::unique_lock<std::mutex>& lock, Clock::time_point deadline, Done done);
  void dispatch();
  void reset();

  const Settings& settings_;
  const std::chrono::milliseconds backoff_;
  WaitCounters& counters_;

  std::mutex mutex_;
  std::condition_variable changed_;
  std::unique_ptr<Connection> conn_;
  std::uint64_t connection_ = 0;  // incremented by every connect and reset
  bool connecting_ = false;
  bool reading_ = false;  // a waiter polls the socket (without the mutex)
  bool broken_ = false;   // reset once nobody polls the socket
  Clock::time_point next_connect_{};
  std::unordered_map<std::int64_t, Interest> interests_;
};

}  // namespace idem::detail::pg
