#pragma once
// The change notifications RedisStore::await_change waits for: one dedicated pub/sub
// connection per Redis node (never a pooled one), opened on the first wait, shared by every
// waiting thread. Internal to idem::redis.
//
// Nobody owns a thread here: a waiting thread that finds no other reading the socket reads it
// (polls until its own deadline), hands out what it reads to the others, and gives the role
// up when its own wait ends. Channels are subscribed while someone waits on them and
// unsubscribed when the last waiter leaves, so messages are only sent to this connection while
// they are wanted.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "connection.hpp"
#include "counters.hpp"

namespace idem::redis_detail {

class Subscriber {
 public:
  using Clock = std::chrono::steady_clock;

  Subscriber(Endpoint endpoint, const RedisOptions& options, Counters& counters);
  ~Subscriber();
  Subscriber(const Subscriber&) = delete;
  Subscriber& operator=(const Subscriber&) = delete;

  enum class Status {
    subscribed,   // the channel is subscribed: every later message reaches the waiter
    notified,     // a message for the waiter's key arrived
    timed_out,    // the deadline passed
    unavailable,  // no connection, or the server refused the subscription
    interrupted,  // the connection was lost (or the slot moved) meanwhile
  };

  /// One waiter: registered on construction, unregistered (and the channel unsubscribed when
  /// it was the last one) on destruction.
  class Waiter {
   public:
    Waiter(Subscriber& subscriber, std::string channel, std::string message);
    ~Waiter();
    Waiter(const Waiter&) = delete;
    Waiter& operator=(const Waiter&) = delete;

    /// Subscribes the channel (unless it is already) and waits for the server's confirmation.
    Status subscribe(Clock::time_point deadline);
    /// After subscribe(): waits for a message carrying this waiter's message (one that
    /// arrived since the construction counts).
    Status await_message(Clock::time_point deadline);
    /// What the server answered when it refused the subscription.
    const std::string& refusal() const noexcept { return refusal_; }

   private:
    Subscriber& s_;
    std::string channel_;
    std::string message_;
    std::uint64_t seen_ = 0;        // the message's generation at registration
    std::uint64_t connection_ = 0;  // the connection subscribe() used
    std::string refusal_;
  };

 private:
  struct Channel {
    std::size_t waiters = 0;
    std::size_t in_flight = 0;  // (un)subscribe commands sent, not yet answered
    bool wanted = false;        // the last command sent was a subscribe
    bool confirmed = false;     // ... and the server answered every command sent
    std::string refused;        // the server's error for the last subscribe
  };
  struct Message {
    std::size_t waiters = 0;
    std::uint64_t generation = 0;  // messages received for it
  };
  struct Sent {
    bool subscribe;
    std::string channel;
  };

  bool connect(std::unique_lock<std::mutex>& lock, Clock::time_point deadline);
  void send(std::initializer_list<std::string_view> args);
  // Until done() or the deadline; reads the socket when no other thread does.
  template <class Done>
  bool wait_until(std::unique_lock<std::mutex>& lock, Clock::time_point deadline, Done done);
  void read_available();
  void handle(const redisReply* reply);
  void reset();
  void forget_channel_if_idle(const std::string& name);

  const Endpoint endpoint_;
  const RedisOptions& options_;
  Counters& counters_;

  std::mutex mutex_;
  std::condition_variable changed_;
  ContextPtr ctx_;
  std::uint64_t connection_ = 0;  // incremented by every connect and reset
  bool connecting_ = false;
  bool reading_ = false;  // a waiter polls the socket (without the mutex)
  bool broken_ = false;   // a write failed: reset once nobody polls the socket
  Clock::time_point next_connect_{};
  std::chrono::milliseconds backoff_{0};
  std::unordered_map<std::string, Channel> channels_;
  std::unordered_map<std::string, Message> messages_;
  std::deque<Sent> sent_;  // replies still due, in order
};

}  // namespace idem::redis_detail
