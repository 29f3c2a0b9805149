// The consume-loop pieces both broker adapters share.

#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include "idem/adapters/loop_core.hpp"
#include "idem/prometheus_metrics.hpp"

namespace {

using namespace std::chrono_literals;
using idem::Counter;
using idem::LogLevel;

class RecordingLogger final : public idem::Logger {
 public:
  void log(LogLevel level, std::string_view line) noexcept override {
    lines.emplace_back(level, std::string(line));
  }
  std::vector<std::pair<LogLevel, std::string>> lines;
};

TEST(LoopCore, BackoffDoublesPerRetryUpToTheCap) {
  EXPECT_EQ(idem::adapters::backoff(100ms, 1s, 1), 100ms);
  EXPECT_EQ(idem::adapters::backoff(100ms, 1s, 2), 200ms);
  EXPECT_EQ(idem::adapters::backoff(100ms, 1s, 4), 800ms);
  EXPECT_EQ(idem::adapters::backoff(100ms, 1s, 5), 1s);
  EXPECT_EQ(idem::adapters::backoff(100ms, 1s, 1000), 1s);  // no overflow
  EXPECT_EQ(idem::adapters::backoff(2s, 1s, 1), 1s);
}

TEST(LoopCore, AttemptsAreExhaustedAtTheLimitAndNeverWithoutOne) {
  EXPECT_FALSE(idem::adapters::attempts_exhausted(2, 3));
  EXPECT_TRUE(idem::adapters::attempts_exhausted(3, 3));
  EXPECT_FALSE(idem::adapters::attempts_exhausted(1000, 0));
}

TEST(LoopCore, ReporterLogsEveryLineAndPassesWarningsAndErrorsToOnError) {
  RecordingLogger logger;
  std::vector<std::string> errors;
  idem::adapters::Reporter reporter{.on_error = [&](std::string_view e) { errors.emplace_back(e); },
                                    .logger = &logger};
  reporter.note(LogLevel::debug, "in progress elsewhere");
  reporter.note(LogLevel::info, "rebalance");
  reporter.note(LogLevel::warning, "retry");
  reporter.note(LogLevel::error, "dead-lettered");
  EXPECT_EQ(logger.lines.size(), 4u);
  EXPECT_EQ(errors, (std::vector<std::string>{"retry", "dead-lettered"}));
  reporter.count(Counter::retries);  // no metrics set: nothing happens
}

TEST(LoopCore, ReporterSurvivesAThrowingOnError) {
  idem::adapters::Reporter reporter{.on_error = [](std::string_view) { throw 1; }};
  EXPECT_NO_THROW(reporter.note(LogLevel::error, "x"));
}

TEST(LoopCore, DeadLettersCountByReason) {
  idem::PrometheusMetrics metrics;
  idem::adapters::Reporter reporter{.metrics = &metrics};
  using idem::DeadLetterReason;
  for (DeadLetterReason r :
       {DeadLetterReason::conflict, DeadLetterReason::invalid, DeadLetterReason::missing_key,
        DeadLetterReason::attempts_exhausted, DeadLetterReason::attempts_exhausted}) {
    reporter.count(idem::adapters::counter_of(r));
  }
  EXPECT_EQ(metrics.value(Counter::dead_letters_conflict), 1u);
  EXPECT_EQ(metrics.value(Counter::dead_letters_invalid), 1u);
  EXPECT_EQ(metrics.value(Counter::dead_letters_missing_key), 1u);
  EXPECT_EQ(metrics.value(Counter::dead_letters_exhausted), 2u);
  const std::string text = metrics.render();
  EXPECT_NE(text.find("idem_dead_letters_total{reason=\"attempts_exhausted\"} 2"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("idem_commits_total{result=\"failed\"} 0"), std::string::npos);
}

TEST(LoopCore, VerdictsSayWhyTheyDeadLetter) {
  const idem::Verdict conflict =
      idem::decide([] { return idem::Result{.outcome = idem::Outcome::conflict}; });
  EXPECT_EQ(conflict.cause, idem::DeadLetterReason::conflict);
  const idem::Verdict invalid =
      idem::decide([]() -> idem::Result { throw idem::InvalidMessage("key is empty"); });
  EXPECT_EQ(invalid.cause, idem::DeadLetterReason::invalid);
  const idem::Verdict failed =
      idem::decide([] { return idem::Result{.outcome = idem::Outcome::failed}; });
  EXPECT_EQ(failed.cause, idem::DeadLetterReason::none);
}

TEST(LoopCore, RunLoopPollsUntilStoppedThenCloses) {
  std::atomic<bool> stop{false};
  const std::atomic<bool> requested{false};
  int polls = 0;
  bool closed = false;
  idem::adapters::run_loop(
      stop, requested,
      [&] {
        if (++polls == 3) stop = true;
      },
      [&] { closed = true; });
  EXPECT_EQ(polls, 3);
  EXPECT_TRUE(closed);
  // A stop requested before the loop starts: no poll, still closed.
  const std::atomic<bool> never{false};
  const std::atomic<bool> asked{true};
  polls = 0;
  closed = false;
  idem::adapters::run_loop(
      never, asked, [&] { ++polls; }, [&] { closed = true; });
  EXPECT_EQ(polls, 0);
  EXPECT_TRUE(closed);
}

}  // namespace
