#pragma once
// The pool of connections to one Redis node: bounded, shared by threads, with a reconnect
// backoff, and the pipelined exchange every store call goes through. It knows nothing of what
// the store sends: what a new connection needs beyond AUTH and SELECT (the store loads its
// scripts) is the on-connect hook. Internal to idem::redis.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "connection.hpp"
#include "counters.hpp"

namespace idem::redis_detail {

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

/// Runs on every new connection after AUTH and SELECT, under a SigpipeGuard; throws
/// RedisUnavailable to refuse the connection.
using OnConnect = std::function<void(redisContext*, const Endpoint&)>;

/// The pool of connections to one Redis node.
class Node {
 public:
  Node(Endpoint endpoint, const RedisOptions& options, Counters& counters, OnConnect on_connect);
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  const Endpoint& endpoint() const noexcept { return endpoint_; }

  /// A connected, authenticated connection on which on_connect has run.
  /// @throws RedisUnavailable (refused, timeout, auth, backoff, pool exhausted).
  PooledConnection acquire();

  /// Sends the commands in one pipeline (each preceded by ASKING when asking[i]) and reads one
  /// reply each. Replies that are Redis errors are returned as such.
  /// @throws RedisUnavailable on I/O errors, timeouts, protocol errors.
  std::vector<ReplyPtr> exchange(std::span<Command* const> commands,
                                 std::span<const char> asking = {});

  /// Runs the on-connect hook again on a pooled connection: the server lost what it set up
  /// (a restart or a failover behind the same address).
  void rerun_on_connect();

  /// Throws the RedisUnavailable of the context's error (I/O, timeout, EOF, protocol).
  [[noreturn]] void throw_io(redisContext* ctx, std::string_view during) const;

 private:
  friend class PooledConnection;
  void give_back(std::unique_ptr<Connection> conn, bool broken) noexcept;
  std::unique_ptr<Connection> connect();

  const Endpoint endpoint_;
  const RedisOptions& options_;
  Counters& counters_;
  const OnConnect on_connect_;

  std::mutex mutex_;
  std::condition_variable available_;
  std::vector<std::unique_ptr<Connection>> idle_;
  std::size_t open_ = 0;  // idle + borrowed + being connected
  std::uint64_t generation_ = 0;
  std::chrono::steady_clock::time_point next_connect_{};
  std::chrono::milliseconds backoff_{0};
  Kind last_connect_kind_ = Kind::unavailable;
  std::string last_connect_error_;
};

}  // namespace idem::redis_detail
