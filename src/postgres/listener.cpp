#include "listener.hpp"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <string>

namespace idem::detail::pg {
namespace {

int poll_ms(Clock::time_point deadline) {
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::clamp<std::int64_t>(left.count(), 0, 1 << 30));
}

}  // namespace

Listener::~Listener() = default;

// --- Waiter ----------------------------------------------------------------------------------

Listener::Waiter::Waiter(Listener& listener, std::int64_t hash) : l_(listener), hash_(hash) {
  std::lock_guard lock(l_.mutex_);
  Interest& interest = l_.interests_[hash_];
  ++interest.waiters;
  seen_ = interest.generation;
}

Listener::Waiter::~Waiter() {
  std::unique_lock lock(l_.mutex_);
  auto it = l_.interests_.find(hash_);
  if (it == l_.interests_.end() || --it->second.waiters > 0) return;
  // The last waiter of the key: its changes need not be announced any more. (The mutex
  // serialises libpq calls; a reader polling the socket meanwhile is harmless.)
  if (it->second.locked && l_.conn_ && !l_.broken_) {
    (void)l_.run(Sql::wait_unlock, Statements::wait_lock_id(hash_));
  }
  l_.interests_.erase(hash_);
  if (l_.broken_ && !l_.reading_) l_.reset();
}

Listener::Status Listener::Waiter::register_interest(Clock::time_point deadline) {
  std::unique_lock lock(l_.mutex_);
  // A connection found lost here (one that had lain idle until the server closed it, say) is
  // replaced once.
  for (int attempt = 0;; ++attempt) {
    if (!l_.connect(lock, deadline)) {
      return Clock::now() >= deadline ? Status::timed_out : Status::unavailable;
    }
    connection_ = l_.connection_;
    Interest& interest = l_.interests_[hash_];  // ours holds a waiter: it stays while we wait
    if (interest.locked) return Status::registered;
    // Blocks only while a completing statement probes this very lock (microseconds), or up to
    // lock_wait (lock_timeout) when something else holds it exclusively.
    if (l_.run(Sql::wait_lock, Statements::wait_lock_id(hash_))) {
      interest.locked = true;
      return Status::registered;
    }
    const bool lost = l_.broken_;
    if (lost && !l_.reading_) l_.reset();
    if (!lost || attempt > 0) return Status::unavailable;
  }
}

Listener::Status Listener::Waiter::await_notification(Clock::time_point deadline) {
  std::unique_lock lock(l_.mutex_);
  const Interest& interest = l_.interests_[hash_];
  l_.wait_until(lock, deadline,
                [&] { return interest.generation != seen_ || l_.connection_ != connection_; });
  if (interest.generation != seen_) return Status::notified;
  return l_.connection_ != connection_ ? Status::interrupted : Status::timed_out;
}

// --- The connection --------------------------------------------------------------------------

bool Listener::connect(std::unique_lock<std::mutex>& lock, Clock::time_point deadline) {
  for (;;) {
    if (broken_ && !reading_) reset();
    if (conn_ && !broken_ && !reading_) {
      // An idle session may have been closed by the server (a restart, an idle timeout):
      // usable() reads what is there, notifications included, and sees the end.
      if (!conn_->usable()) broken_ = true;
      dispatch();
      if (broken_) {
        reset();
        continue;
      }
      return true;
    }
    if (conn_ && !broken_) return true;  // another thread reads it
    if (connecting_ || reading_) {       // another thread connects, or resets once its poll ends
      if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) return false;
      continue;
    }
    if (Clock::now() < next_connect_) return false;
    connecting_ = true;
    lock.unlock();
    std::unique_ptr<Connection> conn;
    try {
      conn = Connection::open(settings_);
      conn->prepare_statements();
      const std::string listen = "LISTEN \"" + settings_.statements->channel() + "\"";
      for (const ResultPtr& result : conn->run_script(listen, "listening", conn->idem_deadline())) {
        if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) conn.reset();
      }
    } catch (const std::exception&) {  // PostgresUnavailable, ConfigError: waits only pause
      conn.reset();
    }
    lock.lock();
    connecting_ = false;
    changed_.notify_all();
    if (!conn) {
      next_connect_ = Clock::now() + backoff_;
      return false;
    }
    conn_ = std::move(conn);
    ++connection_;
  }
}

bool Listener::run(Sql which, std::int32_t lock_id) {
  try {
    Params params;
    params.int4(lock_id);
    ResultPtr result = conn_->run(Statement::of(*settings_.statements, which), params,
                                  "waiting for a key", conn_->idem_deadline());
    dispatch();
    if (PQresultStatus(result.get()) == PGRES_TUPLES_OK) return true;
    // Lost, or a session whose wait locks are in doubt: not kept. A wait lock not taken in
    // time (lock_timeout) leaves the session as it was.
    if (conn_->broken() || PQstatus(conn_->get()) != CONNECTION_OK || which != Sql::wait_lock) {
      broken_ = true;
    }
  } catch (const std::exception&) {
    broken_ = true;
  }
  return false;
}

template <class Done>
void Listener::wait_until(std::unique_lock<std::mutex>& lock, Clock::time_point deadline,
                          Done done) {
  while (!done()) {
    if (Clock::now() >= deadline) return;
    if (broken_ && !reading_) {
      reset();
      continue;
    }
    if (!conn_ || reading_) {
      changed_.wait_until(lock, deadline);
      continue;
    }
    // Nobody reads: this thread does, until its own deadline, for everyone.
    reading_ = true;
    pollfd fd{PQsocket(conn_->get()), POLLIN, 0};
    lock.unlock();
    const int rc = ::poll(&fd, 1, poll_ms(deadline));
    const int poll_errno = errno;
    lock.lock();
    reading_ = false;
    if (rc > 0 && !broken_) {
      // Never blocks (libpq's socket is non-blocking); 0: the connection is gone.
      if (PQconsumeInput(conn_->get()) == 0) broken_ = true;
      dispatch();
    } else if (rc < 0 && poll_errno != EINTR) {
      broken_ = true;
    }
    if (broken_) reset();
    changed_.notify_all();  // someone else may take the socket over
  }
}

void Listener::dispatch() {
  if (!conn_) return;
  while (PGnotify* n = PQnotifies(conn_->get())) {
    counters_.notifications.fetch_add(1, std::memory_order_relaxed);
    std::int64_t hash = 0;
    const std::string_view payload(n->extra);
    const auto [end, ec] = std::from_chars(payload.data(), payload.data() + payload.size(), hash);
    if (ec == std::errc{} && end == payload.data() + payload.size()) {
      auto it = interests_.find(hash);
      if (it != interests_.end()) {
        ++it->second.generation;
        changed_.notify_all();
      }
    }
    PQfreemem(n);
  }
}

void Listener::reset() {
  conn_.reset();  // its wait locks and LISTEN end with the session
  broken_ = false;
  ++connection_;
  for (auto& [hash, interest] : interests_) interest.locked = false;
  changed_.notify_all();
}

}  // namespace idem::detail::pg
