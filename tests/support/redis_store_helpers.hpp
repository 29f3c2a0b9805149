#pragma once
// What the RedisStore tests share: a server per test binary, prefixes of their own, requests,
// raw reads, the kind of a failure, waiting for waiters, and a consumer loop that drains a
// stream of deliveries (with redeliveries) the way a broker would.

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <deque>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "idem/redis.hpp"
#include "support/redis_server.hpp"

namespace idem::test_support::redis {

using namespace std::chrono_literals;
using idem::ClaimRequest;
using idem::Message;
using idem::RedisOptions;
using idem::RedisStore;

// One server for the conformance suite and the small tests; each store gets its own prefix.
inline RedisServer& shared_server() {
  static RedisServer server;
  return server;
}

inline std::string unique_prefix(const std::string& what) {
  static std::atomic<int> n{0};
  return "t" + std::to_string(::getpid()) + "-" + what + std::to_string(n++) + ":";
}

inline RedisOptions options_for(int port, const std::string& what) {
  return RedisOptions{.port = port, .key_prefix = unique_prefix(what)};
}

inline ClaimRequest request(std::string_view key, std::chrono::milliseconds lease = 30s) {
  return ClaimRequest{.key = key, .fingerprint = idem::Fingerprint::of("p"), .lease = lease};
}

// Raw redis command through the store's escape hatch.
inline std::string raw_get(RedisStore& store, const std::string& key) {
  std::string value = "<nil>";
  store.with_connection(key, [&](redisContext* c) {
    auto* r = static_cast<redisReply*>(redisCommand(c, "GET %b", key.data(), key.size()));
    ASSERT_NE(r, nullptr);
    if (r->type == REDIS_REPLY_STRING) value.assign(r->str, r->len);
    freeReplyObject(r);
  });
  return value;
}

// The message of the exception f throws, which must be an Expected (the kind of failure).
template <class Expected, class F>
std::string unavailable_message(F&& f) {
  try {
    f();
  } catch (const Expected& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not the expected kind of error: " << e.what();
    return {};
  }
  ADD_FAILURE() << "no exception";
  return {};
}

template <class F>
std::string unavailable_message(F&& f) {
  return unavailable_message<idem::StoreUnavailable>(std::forward<F>(f));
}

// --- waiting -----------------------------------------------------------------------------------

// Waits until `n` threads of the store wait for a notification (subscribed, record checked):
// a change made from now on can only reach them as a notification.
inline void wait_for_waiters(const RedisStore& store, std::uint64_t n) {
  const auto give_up = std::chrono::steady_clock::now() + 30s;
  while (store.counters().waiting < n) {
    if (std::chrono::steady_clock::now() > give_up) {
      ADD_FAILURE() << "no waiter subscribed within 30 s";
      return;
    }
    std::this_thread::sleep_for(1ms);
  }
}

// Subscribers of the key's notification channel, as the server counts them.
inline long long channel_subscribers(RedisStore& store, std::string_view key) {
  const std::string channel = store.notification_channel(key);
  long long n = -1;
  store.with_connection(store.record_key(key), [&](redisContext* c) {
    auto* r = static_cast<redisReply*>(
        redisCommand(c, "PUBSUB SHARDNUMSUB %b", channel.data(), channel.size()));
    ASSERT_NE(r, nullptr);
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2) n = r->element[1]->integer;
    freeReplyObject(r);
  });
  return n;
}

// A wait longer than any test: only a notification ends it in time. The counters, not the
// clock, tell which ended it.
inline constexpr auto kLongWait = 60s;

// --- many consumers ------------------------------------------------------------------------------

// Shared between forked processes.
template <class T>
T* shared_array(std::size_t n) {
  void* p =
      ::mmap(nullptr, sizeof(T) * n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
  T* a = static_cast<T*>(p);
  for (std::size_t i = 0; i < n; ++i) new (&a[i]) T(0);
  return a;
}

// The deliveries one worker sees: its own keys, plus a redelivery of 30% of its neighbour's
// keys at the same position in the stream, so each duplicate races its original.
inline std::vector<std::size_t> worker_stream(std::size_t keys, std::size_t workers,
                                              std::size_t w) {
  std::vector<std::size_t> stream;
  std::size_t neighbour = (w + workers - 1) % workers;
  for (std::size_t i = 0; i < keys; ++i) {
    if (i % workers == w) stream.push_back(i);
    if (i % workers == neighbour && (i / workers) % 10 < 3) stream.push_back(i);
  }
  return stream;
}

// Consumes the stream until every delivery is acked; in_progress and StoreUnavailable are
// redelivered later. Threads with an odd index use consume_batch.
// With runs and thrown_after_run: marks keys whose handler ran in a call that then failed.
template <class Consumer>
void drain(Consumer& consumer, const std::vector<std::string>& names,
           const std::vector<std::size_t>& stream, bool batched, std::atomic<int>* acks,
           std::atomic<int>* runs = nullptr, std::atomic<int>* thrown_after_run = nullptr) {
  std::deque<std::size_t> queue(stream.begin(), stream.end());
  // A broken store must fail the test, not hang it.
  const auto give_up = std::chrono::steady_clock::now() + 120s;
  std::string last_error = "none";
  while (!queue.empty() && std::chrono::steady_clock::now() < give_up) {
    std::vector<std::size_t> take;
    const std::size_t n = batched ? std::min<std::size_t>(50, queue.size()) : 1;
    for (std::size_t i = 0; i < n; ++i) {
      take.push_back(queue.front());
      queue.pop_front();
    }
    std::vector<Message> batch;
    for (std::size_t i : take) batch.push_back({.key = names[i], .payload = "p"});
    std::vector<idem::Result> results;
    std::vector<int> runs_before;
    if (runs != nullptr) {
      for (std::size_t i : take) runs_before.push_back(runs[i].load());
    }
    try {
      results = batched ? consumer.consume_batch(batch)
                        : std::vector<idem::Result>{consumer.consume(batch[0])};
    } catch (const idem::StoreUnavailable& e) {
      last_error = e.what();
      if (runs != nullptr) {
        for (std::size_t k = 0; k < take.size(); ++k) {
          if (runs[take[k]].load() > runs_before[k]) thrown_after_run[take[k]]++;
        }
      }
      for (std::size_t i : take) queue.push_back(i);
      std::this_thread::sleep_for(20ms);
      continue;
    }
    bool waited = false;
    for (std::size_t k = 0; k < take.size(); ++k) {
      if (results[k].should_ack()) {
        acks[take[k]].fetch_add(1);
      } else {
        if (results[k].error) {
          try {
            std::rethrow_exception(results[k].error);
          } catch (const std::exception& e) {
            last_error = e.what();
          }
        }
        queue.push_back(take[k]);
        if (!waited && queue.size() < 8) {
          std::this_thread::sleep_for(2ms);
          waited = true;
        }
      }
    }
  }
  if (!queue.empty()) {
    std::printf("drain: gave up with %zu deliveries left; last store error: %s\n", queue.size(),
                last_error.c_str());
  }
}

}  // namespace idem::test_support::redis
