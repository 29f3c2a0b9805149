#pragma once
// One Redis connection: hiredis handles owned by RAII, commands as argument vectors, where a
// node listens, connecting and authenticating, and what a failed context means. Internal to
// idem::redis; the pool (pool.hpp) and the subscriber (subscriber.hpp) build on it.

#include <hiredis/hiredis.h>
#include <signal.h>
#include <sys/time.h>

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "errors.hpp"
#include "idem/stores/redis_store.hpp"

namespace idem::redis_detail {

struct ContextDeleter {
  void operator()(redisContext* c) const noexcept { redisFree(c); }
};
struct ReplyDeleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using ContextPtr = std::unique_ptr<redisContext, ContextDeleter>;
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

/// One Redis command: arguments are views; owned() keeps computed ones alive.
class Command {
 public:
  Command() = default;
  Command(std::initializer_list<std::string_view> args) {
    for (std::string_view a : args) add(a);
  }
  void add(std::string_view arg) {
    argv_.push_back(arg.data());
    lens_.push_back(arg.size());
  }
  void add_owned(std::string arg) {
    owned_.push_back(std::move(arg));
    add(owned_.back());
  }
  void reserve(std::size_t n) {
    argv_.reserve(n);
    lens_.reserve(n);
  }
  int argc() const noexcept { return static_cast<int>(argv_.size()); }
  const char** argv() noexcept { return argv_.data(); }
  const std::size_t* lens() const noexcept { return lens_.data(); }
  std::string_view arg(std::size_t i) const noexcept { return {argv_[i], lens_[i]}; }

 private:
  std::vector<const char*> argv_;
  std::vector<std::size_t> lens_;
  std::deque<std::string> owned_;  // stable addresses
};

/// Where a node listens.
struct Endpoint {
  std::string host;
  int port = 0;
  std::string unix_socket;
  std::string text() const;
  bool operator==(const Endpoint&) const = default;
};

/// ms as a timeval for hiredis; at least 1 ms (0 would mean "no timeout").
timeval to_timeval(std::chrono::milliseconds ms);

/// A connected context (connect_timeout applied, then command_timeout for replies), not yet
/// authenticated. @throws RedisUnavailable (io, timeout) saying what to check.
ContextPtr open_context(const Endpoint& endpoint, const RedisOptions& options);

/// AUTH (when a password is set) and PING. @throws RedisUnavailable saying what to fix.
void authenticate(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options);

/// Throws the RedisUnavailable of the context's error (RedisTimeout, RedisIoError for
/// EOF and I/O, RedisProtocolError).
[[noreturn]] void throw_context_error(redisContext* ctx, const Endpoint& endpoint,
                                      const RedisOptions& options, std::string_view during);

/// Writes the bytes with MSG_NOSIGNAL (no SIGPIPE from a vanished peer). False with errno set.
bool send_bytes(int fd, const char* data, std::size_t len);

/// Writes the commands hiredis formatted into ctx's output buffer with send_bytes, leaving
/// hiredis an empty buffer so that redisGetReply only reads. False with errno set.
bool send_all(redisContext* ctx);

/// Blocks SIGPIPE in this thread while hiredis itself writes (the rare handshake commands), and
/// consumes one it caused: a library must not change the process's signal disposition.
class SigpipeGuard {
 public:
  SigpipeGuard() noexcept;
  ~SigpipeGuard();
  SigpipeGuard(const SigpipeGuard&) = delete;
  SigpipeGuard& operator=(const SigpipeGuard&) = delete;

 private:
  sigset_t pipe_{}, old_{};
  bool was_pending_ = false;
  bool blocked_ = false;
};

/// Sends a reply's error text (or "unexpected reply type N") to a string.
std::string reply_text(const redisReply* reply);
bool is_error(const redisReply* reply, std::string_view prefix);

}  // namespace idem::redis_detail
