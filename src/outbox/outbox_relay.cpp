#include "idem/outbox/outbox_relay.hpp"

#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <random>
#include <thread>

#include "idem/error.hpp"

namespace idem {

namespace {
using Steady = std::chrono::steady_clock;

std::string default_holder() {
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
  std::random_device random;
  return std::string(host) + ":" + std::to_string(::getpid()) + ":" + std::to_string(random());
}

// Sleeps for d unless stop is requested first.
void pause(std::stop_token stop, std::chrono::milliseconds d) {
  std::mutex mutex;
  std::condition_variable_any cv;
  std::unique_lock lock(mutex);
  cv.wait_for(lock, stop, d, [] { return false; });
}
}  // namespace

OutboxRelay::OutboxRelay(OutboxSource& source, OutboxSink& sink, OutboxRelayOptions options)
    : source_(source), sink_(sink), options_(std::move(options)) {
  if (options_.lease.count() <= 0) {
    throw ConfigError("OutboxRelayOptions::lease must be positive (it is " +
                      std::to_string(options_.lease.count()) + " ms)");
  }
  if (options_.batch_size == 0) throw ConfigError("OutboxRelayOptions::batch_size must be > 0");
  if (options_.holder.empty()) options_.holder = default_holder();
  rows_.reserve(options_.batch_size);
  seqs_.reserve(options_.batch_size);
}

OutboxRelay::~OutboxRelay() {
  if (active_) source_.release_lease(options_.holder);
}

void OutboxRelay::log(LogLevel level, const std::string& line) const noexcept {
  if (options_.logger != nullptr)
    options_.logger->log(level, "outbox relay " + options_.holder + ": " + line);
}

bool OutboxRelay::hold_lease() {
  const auto now = Steady::now();
  // Renewed every lease / 3 (local clock); the database judges expiry on its own clock.
  if (active_ && now - lease_renewed_ < options_.lease / 3) return true;
  const bool held = source_.acquire_lease(options_.holder, options_.lease);
  if (held && !active_) {
    ++stats_.leases_taken;
    log(LogLevel::info, "took the lease: this relay is now the active one");
  } else if (!held && active_) {
    log(LogLevel::warning, "lost the lease to another relay (renewed too late?); standing by");
  }
  active_ = held;
  if (held) lease_renewed_ = now;
  return held;
}

void OutboxRelay::report_backlog(bool force) {
  if (options_.metrics == nullptr) return;
  const auto now = Steady::now();
  if (!force && now - last_backlog_ < options_.backlog_interval) return;
  last_backlog_ = now;
  const OutboxSource::Backlog b = source_.backlog();
  options_.metrics->set(Gauge::outbox_pending, static_cast<double>(b.pending));
  double age = 0;
  if (b.oldest_ms) {
    const auto wall = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
    age = std::max<double>(0, static_cast<double>(wall - *b.oldest_ms) / 1000.0);
  }
  options_.metrics->set(Gauge::outbox_oldest_pending_seconds, age);
}

OutboxRelayStep OutboxRelay::run_once() {
  OutboxRelayStep step;
  ++stats_.rounds;
  std::size_t attempted = 0;
  try {
    if (!hold_lease()) return step;
    step.active = true;
    rows_ = source_.fetch_pending(options_.batch_size);
    if (!rows_.empty()) {
      attempted = rows_.size();
      const auto t0 = Steady::now();
      const std::size_t confirmed = std::min(sink_.publish(rows_), rows_.size());
      if (options_.metrics != nullptr)
        options_.metrics->observe(Timing::outbox_publish, Steady::now() - t0);
      seqs_.clear();
      for (std::size_t i = 0; i < confirmed; ++i) seqs_.push_back(rows_[i].seq);
      if (!seqs_.empty()) source_.mark_sent(seqs_);
      step.published = confirmed;
      step.unconfirmed = rows_.size() - confirmed;
      attempted = 0;
      if (step.unconfirmed > 0) {
        step.failed = true;
        log(LogLevel::warning, std::to_string(step.unconfirmed) + " of " +
                                   std::to_string(rows_.size()) +
                                   " rows were not confirmed by the broker; they will be "
                                   "published again with the same inner ids");
      }
    }
    const auto now = Steady::now();
    if (now - last_purge_ >= options_.purge_interval) {
      last_purge_ = now;
      step.purged = source_.purge_sent(options_.retention, options_.purge_batch);
    }
    report_backlog(false);
  } catch (const std::exception& e) {
    step.failed = true;
    step.unconfirmed += attempted;
    // Rows in flight: the broker failed (counted below); none: the database did.
    if (attempted == 0 && options_.metrics != nullptr) options_.metrics->add(Counter::store_errors);
    log(LogLevel::error, std::string("round failed (") + e.what() +
                             "); unmarked rows stay pending and are published again after a "
                             "backoff");
  }
  stats_.published += step.published;
  stats_.unconfirmed += step.unconfirmed;
  stats_.purged += step.purged;
  if (step.failed) ++stats_.failed_rounds;
  if (options_.metrics != nullptr) {
    if (step.published > 0) options_.metrics->add(Counter::outbox_published, step.published);
    if (step.unconfirmed > 0)
      options_.metrics->add(Counter::outbox_publish_failed, step.unconfirmed);
    if (step.purged > 0) options_.metrics->add(Counter::outbox_purged, step.purged);
  }
  return step;
}

void OutboxRelay::run(std::stop_token stop) {
  while (!stop.stop_requested()) {
    const OutboxRelayStep step = run_once();
    if (step.failed) {
      next_backoff_ = next_backoff_.count() == 0
                          ? options_.backoff
                          : std::min(next_backoff_ * 2, options_.max_backoff);
      pause(stop, next_backoff_);
      continue;
    }
    next_backoff_ = std::chrono::milliseconds{0};
    if (!step.active || step.published == 0) pause(stop, options_.idle_wait);
  }
}

bool OutboxRelay::drain(std::chrono::milliseconds timeout) {
  const auto deadline = Steady::now() + timeout;
  std::stop_source never;
  while (Steady::now() < deadline) {
    const OutboxRelayStep step = run_once();
    if (step.active && !step.failed && step.published == 0) return true;
    if (step.failed || !step.active)
      pause(never.get_token(), step.failed ? options_.backoff : options_.idle_wait);
  }
  return false;
}

}  // namespace idem
