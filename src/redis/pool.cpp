#include "pool.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

namespace idem::redis_detail {

PooledConnection::~PooledConnection() {
  if (node_ != nullptr && conn_) node_->give_back(std::move(conn_), false);
}

void PooledConnection::broken() noexcept {
  if (node_ != nullptr && conn_) node_->give_back(std::move(conn_), true);
}

Node::Node(Endpoint endpoint, const RedisOptions& options, Counters& counters, OnConnect on_connect)
    : endpoint_(std::move(endpoint)),
      options_(options),
      counters_(counters),
      on_connect_(std::move(on_connect)) {}

Node::~Node() = default;

PooledConnection Node::acquire() {
  std::unique_lock lock(mutex_);
  const auto deadline = std::chrono::steady_clock::now() + options_.pool_wait_timeout;
  for (;;) {
    while (!idle_.empty()) {
      std::unique_ptr<Connection> conn = std::move(idle_.back());
      idle_.pop_back();
      // Opened before a failure on this node: probably dead too, do not hand it out.
      if (conn->generation == generation_) return PooledConnection(this, std::move(conn));
      --open_;
    }
    if (open_ < options_.pool_size) break;
    if (available_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
        open_ >= options_.pool_size) {
      throw_redis(Kind::timeout, "all " + std::to_string(options_.pool_size) +
                                     " connections to Redis at " + endpoint_.text() +
                                     " stayed busy for " +
                                     std::to_string(options_.pool_wait_timeout.count()) +
                                     " ms: raise RedisOptions::pool_size or pool_wait_timeout");
    }
  }
  const auto now = std::chrono::steady_clock::now();
  if (now < next_connect_) {
    // The same kind and first sentence as the failure that started the backoff, so logs group.
    throw_redis(last_connect_kind_, last_connect_error_,
                std::chrono::ceil<std::chrono::milliseconds>(next_connect_ - now));
  }
  ++open_;
  lock.unlock();
  try {
    std::unique_ptr<Connection> conn = connect();
    lock.lock();
    backoff_ = std::chrono::milliseconds{0};
    conn->generation = generation_;
    return PooledConnection(this, std::move(conn));
  } catch (const StoreUnavailable& e) {
    lock.lock();
    --open_;
    backoff_ = std::clamp(backoff_ * 2, options_.reconnect_backoff, options_.max_reconnect_backoff);
    next_connect_ = std::chrono::steady_clock::now() + backoff_;
    const auto* redis = dynamic_cast<const RedisUnavailable*>(&e);
    last_connect_kind_ = redis != nullptr ? redis->kind() : Kind::unavailable;
    last_connect_error_ = redis != nullptr ? redis->summary() : std::string(e.what());
    available_.notify_one();
    throw;
  }
}

void Node::give_back(std::unique_ptr<Connection> conn, bool broken) noexcept {
  std::lock_guard lock(mutex_);
  if (broken) {
    ++generation_;
    --open_;
    conn.reset();
  } else if (conn->generation != generation_) {
    --open_;
    conn.reset();
  } else {
    idle_.push_back(std::move(conn));
  }
  available_.notify_one();
}

std::unique_ptr<Connection> Node::connect() {
  counters_.reconnects.fetch_add(1, std::memory_order_relaxed);
  ContextPtr ctx = open_context(endpoint_, options_);
  authenticate(ctx.get(), endpoint_, options_);
  if (options_.db != 0) {
    SigpipeGuard sigpipe;
    Command select{"SELECT"};
    select.add_owned(std::to_string(options_.db));  // owned: a temporary would dangle
    void* raw = redisCommandArgv(ctx.get(), select.argc(), select.argv(), select.lens());
    if (raw == nullptr) throw_io(ctx.get(), "SELECT");
    ReplyPtr reply(static_cast<redisReply*>(raw));
    if (reply->type == REDIS_REPLY_ERROR) {
      throw_redis(Kind::reply, "Redis at " + endpoint_.text() + " refused SELECT " +
                                   std::to_string(options_.db) + " (" + reply_text(reply.get()) +
                                   "): check RedisOptions::db");
    }
  }
  if (on_connect_) {
    SigpipeGuard sigpipe;
    on_connect_(ctx.get(), endpoint_);
  }
  redisSetTimeout(ctx.get(), to_timeval(options_.command_timeout));
  auto conn = std::make_unique<Connection>();
  conn->ctx = std::move(ctx);
  return conn;
}

void Node::throw_io(redisContext* ctx, std::string_view during) const {
  throw_context_error(ctx, endpoint_, options_, during);
}

std::vector<ReplyPtr> Node::exchange(std::span<Command* const> commands,
                                     std::span<const char> asking) {
  PooledConnection conn = acquire();
  redisContext* ctx = conn.get();
  for (std::size_t i = 0; i < commands.size(); ++i) {
    if (!asking.empty() && asking[i]) {
      static const char* asking_argv[] = {"ASKING"};
      static const std::size_t asking_len[] = {6};
      redisAppendCommandArgv(ctx, 1, asking_argv, asking_len);
    }
    if (redisAppendCommandArgv(ctx, commands[i]->argc(), commands[i]->argv(),
                               commands[i]->lens()) != REDIS_OK) {
      conn.broken();
      throw_redis(Kind::unavailable, "cannot format a Redis command (out of memory)");
    }
  }
  if (!send_all(ctx)) {
    const int err = errno;
    conn.broken();
    std::string what = "Redis at " + endpoint_.text() + " failed while sending: ";
    const bool timed_out = err == EAGAIN || err == EWOULDBLOCK;
    if (timed_out) {
      what += "the send did not finish within RedisOptions::command_timeout (" +
              std::to_string(options_.command_timeout.count()) + " ms): the server is not reading";
    } else {
      what += std::string(std::strerror(err)) +
              ": the connection broke; Redis may be down or "
              "restarting";
    }
    throw_redis(timed_out ? Kind::timeout : Kind::io, what);
  }
  counters_.round_trips.fetch_add(1, std::memory_order_relaxed);
  counters_.commands.fetch_add(commands.size(), std::memory_order_relaxed);
  std::vector<ReplyPtr> replies;
  replies.reserve(commands.size());
  for (std::size_t i = 0; i < commands.size(); ++i) {
    void* raw = nullptr;
    if (!asking.empty() && asking[i]) {
      if (redisGetReply(ctx, &raw) != REDIS_OK) {
        try {
          throw_io(ctx, "ASKING");
        } catch (...) {
          conn.broken();
          throw;
        }
      }
      ReplyPtr asking_reply(static_cast<redisReply*>(raw));
      raw = nullptr;
    }
    if (redisGetReply(ctx, &raw) != REDIS_OK) {
      try {
        throw_io(ctx, commands[i]->arg(0) == "EVALSHA" ? "a script call" : commands[i]->arg(0));
      } catch (...) {
        conn.broken();
        throw;
      }
    }
    replies.emplace_back(static_cast<redisReply*>(raw));
  }
  return replies;
}

void Node::rerun_on_connect() {
  if (!on_connect_) return;
  PooledConnection conn = acquire();
  SigpipeGuard sigpipe;
  try {
    on_connect_(conn.get(), endpoint_);
  } catch (...) {
    conn.broken();
    throw;
  }
}

}  // namespace idem::redis_detail
