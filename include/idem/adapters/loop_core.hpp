#pragma once
/// @file
/// @brief The pieces every broker adapter's consume loop shares: the consume step's type, where
/// its events go (on_error, a Logger, idem::Metrics), the retry backoff, the attempt limit and
/// the run/request_stop loop. kafka::Consumer and rabbitmq::Consumer are built on it.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "idem/adapters/verdict.hpp"
#include "idem/message.hpp"
#include "idem/metrics.hpp"
#include "idem/result.hpp"

namespace idem {

/// @brief The consume step of a broker adapter: normally IdempotentConsumer::consume. It may
/// throw idem::InvalidMessage (dead-letter) and idem::StoreUnavailable (hold, retry later).
using ConsumeFunction = std::function<Result(const Message&)>;

namespace adapters {

/// @brief Where an adapter's events go: every line to the logger, warnings and errors also to
/// on_error; counters to metrics. Each may be unset.
struct Reporter {
  std::function<void(std::string_view)> on_error{};
  Logger* logger = nullptr;
  Metrics* metrics = nullptr;

  void note(LogLevel level, const std::string& line) const noexcept {
    if (logger != nullptr) logger->log(level, line);
    if (level < LogLevel::warning || !on_error) return;
    try {
      on_error(line);
    } catch (...) {  // NOLINT(bugprone-empty-catch): a logger must not break the loop
    }
  }

  void count(Counter counter, std::uint64_t n = 1) const noexcept {
    if (metrics != nullptr) metrics->add(counter, n);
  }
};

/// @brief The counter of a dead-letter reason.
constexpr Counter counter_of(DeadLetterReason reason) noexcept {
  switch (reason) {
    case DeadLetterReason::conflict:
      return Counter::dead_letters_conflict;
    case DeadLetterReason::invalid:
      return Counter::dead_letters_invalid;
    case DeadLetterReason::missing_key:
      return Counter::dead_letters_missing_key;
    case DeadLetterReason::attempts_exhausted:
    case DeadLetterReason::none:
      break;
  }
  return Counter::dead_letters_exhausted;
}

/// @brief The delay before retry number n (1-based): first, doubled per retry, at most max.
inline std::chrono::milliseconds backoff(std::chrono::milliseconds first,
                                         std::chrono::milliseconds max, unsigned n) noexcept {
  auto delay = first;
  for (unsigned i = 1; i < n && delay < max; ++i) delay *= 2;
  return std::min(delay, max);
}

/// @brief Whether a delivery that failed `failed` times has used up max_attempts (0: never).
constexpr bool attempts_exhausted(unsigned failed, unsigned max_attempts) noexcept {
  return max_attempts != 0 && failed >= max_attempts;
}

/// @brief The run() of every adapter: poll until stop or request_stop(), then close.
template <class Poll, class Close>
void run_loop(const std::atomic<bool>& stop, const std::atomic<bool>& requested, Poll&& poll,
              Close&& close) {
  while (!stop.load(std::memory_order_relaxed) && !requested.load(std::memory_order_relaxed)) {
    poll();
  }
  close();
}

}  // namespace adapters
}  // namespace idem
