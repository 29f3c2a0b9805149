#include "subscriber.hpp"

#include <poll.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "idem/error.hpp"

namespace idem::redis_detail {
namespace {

std::string_view text_of(const redisReply* reply) {
  return reply->type == REDIS_REPLY_STRING || reply->type == REDIS_REPLY_STATUS
             ? std::string_view(reply->str, reply->len)
             : std::string_view{};
}

int poll_ms(Subscriber::Clock::time_point deadline) {
  const auto left =
      std::chrono::ceil<std::chrono::milliseconds>(deadline - Subscriber::Clock::now());
  return static_cast<int>(std::clamp<std::int64_t>(left.count(), 0, 1 << 30));
}

}  // namespace

Subscriber::Subscriber(Endpoint endpoint, const RedisOptions& options, Counters& counters)
    : endpoint_(std::move(endpoint)), options_(options), counters_(counters) {}

Subscriber::~Subscriber() = default;

// --- Waiter ----------------------------------------------------------------------------------

Subscriber::Waiter::Waiter(Subscriber& subscriber, std::string channel, std::string message)
    : s_(subscriber), channel_(std::move(channel)), message_(std::move(message)) {
  std::lock_guard lock(s_.mutex_);
  ++s_.channels_[channel_].waiters;
  Message& m = s_.messages_[message_];
  ++m.waiters;
  seen_ = m.generation;
}

Subscriber::Waiter::~Waiter() {
  std::lock_guard lock(s_.mutex_);
  if (auto m = s_.messages_.find(message_); m != s_.messages_.end() && --m->second.waiters == 0) {
    s_.messages_.erase(m);
  }
  auto c = s_.channels_.find(channel_);
  if (c == s_.channels_.end() || --c->second.waiters > 0) return;
  // The last waiter: stop the server sending this channel's messages (the reply is read by
  // the next reader; until then the entry stays, to match it).
  if (c->second.wanted && s_.ctx_ && !s_.broken_) {
    c->second.wanted = false;
    c->second.confirmed = false;
    ++c->second.in_flight;
    try {
      s_.sent_.push_back({false, channel_});
      s_.send({"SUNSUBSCRIBE", channel_});  // may reset (and erase the entry)
    } catch (...) {  // out of memory: drop the connection, whose reset clears the state
      s_.broken_ = true;
      if (!s_.reading_) s_.reset();
    }
  }
  s_.forget_channel_if_idle(channel_);
}

Subscriber::Status Subscriber::Waiter::subscribe(Clock::time_point deadline) {
  std::unique_lock lock(s_.mutex_);
  // A connection lost while subscribing (one that had lain idle until a restarted server
  // closed it, say) is replaced once.
  for (int attempt = 0;; ++attempt) {
    if (!s_.connect(lock, deadline)) {
      return Clock::now() >= deadline ? Status::timed_out : Status::unavailable;
    }
    connection_ = s_.connection_;
    Channel& ch = s_.channels_[channel_];  // ours holds a waiter: it stays while we wait
    if (!ch.refused.empty()) {
      refusal_ = ch.refused;
      return Status::unavailable;
    }
    if (!ch.wanted) {
      ch.wanted = true;
      ch.confirmed = false;
      ++ch.in_flight;
      s_.sent_.push_back({true, channel_});
      s_.send({"SSUBSCRIBE", channel_});
    }
    s_.wait_until(lock, deadline, [&] {
      return s_.connection_ != connection_ || ch.confirmed || !ch.refused.empty();
    });
    if (s_.connection_ != connection_) {
      if (attempt == 0) continue;
      return Status::interrupted;
    }
    if (!ch.refused.empty()) {
      refusal_ = ch.refused;
      return Status::unavailable;
    }
    return ch.confirmed ? Status::subscribed : Status::timed_out;
  }
}

Subscriber::Status Subscriber::Waiter::await_message(Clock::time_point deadline) {
  std::unique_lock lock(s_.mutex_);
  const Message& m = s_.messages_[message_];  // ours holds a waiter: it stays while we wait
  s_.wait_until(lock, deadline,
                [&] { return m.generation != seen_ || s_.connection_ != connection_; });
  if (m.generation != seen_) return Status::notified;
  return s_.connection_ != connection_ ? Status::interrupted : Status::timed_out;
}

// --- The connection --------------------------------------------------------------------------

bool Subscriber::connect(std::unique_lock<std::mutex>& lock, Clock::time_point deadline) {
  for (;;) {
    if (broken_ && !reading_) reset();
    if (ctx_ && !broken_ && !reading_) {
      // An idle connection may have been closed by the server (its `timeout`, a restart):
      // read what is there (stale replies, or the end of the stream) before relying on it.
      for (int reads = 0; reads < 8 && !broken_; ++reads) {
        pollfd fd{ctx_->fd, POLLIN, 0};
        if (::poll(&fd, 1, 0) <= 0) break;
        read_available();
      }
      if (broken_) {
        reset();
        continue;
      }
      return true;
    }
    if (ctx_ && !broken_) return true;  // another thread reads it
    if (connecting_ || reading_) {      // another thread connects, or resets once its poll ends
      if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) return false;
      continue;
    }
    if (Clock::now() < next_connect_) return false;
    connecting_ = true;
    lock.unlock();
    ContextPtr ctx;
    try {
      ctx = open_context(endpoint_, options_);
      authenticate(ctx.get(), endpoint_, options_);
    } catch (const StoreUnavailable&) {
      ctx.reset();
    }
    lock.lock();
    connecting_ = false;
    changed_.notify_all();
    if (!ctx) {  // the next waits only pause, for a backoff like the pool's
      backoff_ =
          std::clamp(backoff_ * 2, options_.reconnect_backoff, options_.max_reconnect_backoff);
      next_connect_ = Clock::now() + backoff_;
      return false;
    }
    backoff_ = std::chrono::milliseconds{0};
    // Writes (SSUBSCRIBE, SUNSUBSCRIBE) give up after command_timeout; reads follow a poll.
    const auto ms = std::max<std::int64_t>(1, options_.command_timeout.count());
    redisSetTimeout(ctx.get(), timeval{.tv_sec = static_cast<time_t>(ms / 1000),
                                       .tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000)});
    ctx_ = std::move(ctx);
    ++connection_;
  }
}

void Subscriber::send(std::initializer_list<std::string_view> args) {
  if (!ctx_ || broken_) return;  // the coming reset clears the bookkeeping
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  for (std::string_view a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  char* command = nullptr;
  const int len =
      redisFormatCommandArgv(&command, static_cast<int>(argv.size()), argv.data(), lens.data());
  if (len < 0) {
    broken_ = true;
  } else {
    broken_ = !send_bytes(ctx_->fd, command, static_cast<std::size_t>(len));
    redisFreeCommand(command);
  }
  if (broken_ && !reading_) reset();
}

template <class Done>
bool Subscriber::wait_until(std::unique_lock<std::mutex>& lock, Clock::time_point deadline,
                            Done done) {
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    if (broken_ && !reading_) {
      reset();
      continue;
    }
    if (!ctx_ || reading_) {
      changed_.wait_until(lock, deadline);
      continue;
    }
    // Nobody reads: this thread does, until its own deadline, for everyone.
    reading_ = true;
    pollfd fd{ctx_->fd, POLLIN, 0};
    lock.unlock();
    const int rc = ::poll(&fd, 1, poll_ms(deadline));
    const int poll_errno = errno;
    lock.lock();
    reading_ = false;
    if (rc > 0 && !broken_) {
      read_available();
    } else if (rc < 0 && poll_errno != EINTR) {
      broken_ = true;
    }
    if (broken_) reset();
    changed_.notify_all();  // someone else may take the socket over
  }
  return true;
}

void Subscriber::read_available() {
  if (redisBufferRead(ctx_.get()) != REDIS_OK) {  // EOF or an error: the server is gone
    broken_ = true;
    return;
  }
  for (;;) {
    void* raw = nullptr;
    if (redisGetReplyFromReader(ctx_.get(), &raw) != REDIS_OK) {
      broken_ = true;
      return;
    }
    if (raw == nullptr) return;
    ReplyPtr reply(static_cast<redisReply*>(raw));
    handle(reply.get());
    if (broken_) return;
  }
}

void Subscriber::handle(const redisReply* reply) {
  if (reply->type == REDIS_REPLY_ERROR) {  // only a subscription can be refused (NOPERM, MOVED)
    if (sent_.empty() || !sent_.front().subscribe) {
      broken_ = true;
      return;
    }
    const std::string name = std::move(sent_.front().channel);
    sent_.pop_front();
    auto c = channels_.find(name);
    if (c == channels_.end()) {
      broken_ = true;
      return;
    }
    --c->second.in_flight;
    c->second.wanted = false;
    c->second.confirmed = false;
    c->second.refused = std::string(reply->str, reply->len);
    forget_channel_if_idle(name);
    changed_.notify_all();
    return;
  }
  if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 3) {
    broken_ = true;
    return;
  }
  const std::string_view kind = text_of(reply->element[0]);
  if (kind == "smessage") {
    counters_.notifications.fetch_add(1, std::memory_order_relaxed);
    auto m = messages_.find(std::string(text_of(reply->element[2])));
    if (m != messages_.end()) {
      ++m->second.generation;
      changed_.notify_all();
    }
    return;
  }
  const bool subscribed = kind == "ssubscribe";
  if (!subscribed && kind != "sunsubscribe") return;  // nothing else is sent to us
  const std::string_view name = text_of(reply->element[1]);
  // An answer out of turn: the server dropped the channel itself (its slot moved to another
  // node). Start over: the waiters return and ask again.
  if (sent_.empty() || sent_.front().subscribe != subscribed || sent_.front().channel != name) {
    broken_ = true;
    return;
  }
  const std::string channel = std::move(sent_.front().channel);
  sent_.pop_front();
  auto c = channels_.find(channel);
  if (c == channels_.end()) {
    broken_ = true;
    return;
  }
  --c->second.in_flight;
  c->second.confirmed = c->second.in_flight == 0 && c->second.wanted;
  forget_channel_if_idle(channel);
  changed_.notify_all();
}

void Subscriber::reset() {
  ctx_.reset();
  broken_ = false;
  ++connection_;
  sent_.clear();
  for (auto c = channels_.begin(); c != channels_.end();) {
    const std::size_t waiters = c->second.waiters;
    c->second = Channel{};
    c->second.waiters = waiters;
    c = c->second.waiters == 0 ? channels_.erase(c) : std::next(c);
  }
  changed_.notify_all();
}

void Subscriber::forget_channel_if_idle(const std::string& name) {
  auto c = channels_.find(name);
  if (c != channels_.end() && c->second.waiters == 0 && c->second.in_flight == 0) {
    channels_.erase(c);
  }
}

}  // namespace idem::redis_detail
