#pragma once
// hiredis handles owned by RAII, a per-node connection pool with bounded reconnect backoff,
// and the pipelined exchange every store call goes through. Internal to idem::redis.

#include <hiredis/hiredis.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

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

/// The Lua scripts and their SHA1s (learnt from SCRIPT LOAD), and whether the server has
/// sharded pub/sub (learnt from HELLO on the same handshake).
struct Scripts {
  static const std::string_view claim;
  static const std::string_view complete;
  static const std::string_view release;
  static const std::string_view forget;  // sent as EVAL: an operator command
  std::mutex mutex;
  std::string claim_sha, complete_sha, release_sha;
  bool sharded_pubsub = false;  // SPUBLISH/SSUBSCRIBE (Redis 7)
};

struct Counters {
  std::atomic<std::uint64_t> round_trips{0}, commands{0}, redirects{0}, reconnects{0},
      script_loads{0};
  // await_change: see RedisStoreStats.
  std::atomic<std::uint64_t> notifications{0}, waits_woken{0}, waits_settled{0}, waits_timed_out{0},
      wait_fallbacks{0}, waiting{0};
};

/// A connected context (connect_timeout applied, then command_timeout for replies), not yet
/// authenticated. @throws StoreUnavailable saying what to check.
ContextPtr open_context(const Endpoint& endpoint, const RedisOptions& options);

/// AUTH (when a password is set) and PING. @throws StoreUnavailable saying what to fix.
void authenticate(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options);

/// Throws StoreUnavailable describing the context's error (I/O, timeout, EOF, protocol).
[[noreturn]] void throw_context_error(redisContext* ctx, const Endpoint& endpoint,
                                      const RedisOptions& options, std::string_view during);

/// Writes the bytes with MSG_NOSIGNAL (no SIGPIPE from a vanished peer). False with errno set.
bool send_bytes(int fd, const char* data, std::size_t len);

/// A pooled connection to one node.
struct Connection {
  ContextPtr ctx;
  std::uint64_t generation = 0;
};

class Node;

/// A connection borrowed from a Node; returned on destruction unless marked broken.
class PooledConnection {
 public:
  PooledConnection(Node* node, std::unique_ptr<Connection> conn) noexcept
      : node_(node), conn_(std::move(conn)) {}
  PooledConnection(PooledConnection&&) noexcept = default;
  PooledConnection& operator=(PooledConnection&&) = delete;
  PooledConnection(const PooledConnection&) = delete;
  ~PooledConnection();
  redisContext* get() const noexcept { return conn_->ctx.get(); }
  /// The connection is in an unknown state: close it instead of returning it.
  void broken() noexcept;

 private:
  Node* node_;
  std::unique_ptr<Connection> conn_;
};

/// The pool of connections to one Redis node.
class Node {
 public:
  Node(Endpoint endpoint, const RedisOptions& options, Scripts& scripts, Counters& counters);
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  const Endpoint& endpoint() const noexcept { return endpoint_; }

  /// A connected, authenticated connection with the scripts loaded.
  /// @throws StoreUnavailable (refused, timeout, auth, backoff, pool exhausted).
  PooledConnection acquire();

  /// Sends the commands in one pipeline (each preceded by ASKING when asking[i]) and reads
  /// one reply each. Replies that are Redis errors are returned as such; NOSCRIPT replies are
  /// answered by reloading the scripts and resending those commands, followed again by the
  /// last command when resend_last (a trailing WAIT must follow the writes it confirms).
  /// @throws StoreUnavailable on I/O errors, timeouts, protocol errors.
  std::vector<ReplyPtr> exchange(std::span<Command* const> commands,
                                 std::span<const bool> asking = {}, bool resend_last = false);

  /// Throws StoreUnavailable describing the context's error (I/O, timeout, EOF, protocol).
  [[noreturn]] void throw_io(redisContext* ctx, std::string_view during) const;

 private:
  friend class PooledConnection;
  void give_back(std::unique_ptr<Connection> conn, bool broken) noexcept;
  std::unique_ptr<Connection> connect();
  void handshake(redisContext* ctx);
  void learn_pubsub(redisContext* ctx);
  std::vector<ReplyPtr> exchange_once(std::span<Command* const> commands,
                                      std::span<const bool> asking);

  const Endpoint endpoint_;
  const RedisOptions& options_;
  Scripts& scripts_;
  Counters& counters_;

  std::mutex mutex_;
  std::condition_variable available_;
  std::vector<std::unique_ptr<Connection>> idle_;
  std::size_t open_ = 0;  // idle + borrowed + being connected
  std::uint64_t generation_ = 0;
  std::chrono::steady_clock::time_point next_connect_{};
  std::chrono::milliseconds backoff_{0};
  std::string last_connect_error_;
};

/// Sends a reply's error text (or "unexpected reply type N") to a string.
std::string reply_text(const redisReply* reply);
bool is_error(const redisReply* reply, std::string_view prefix);

}  // namespace idem::redis_detail
