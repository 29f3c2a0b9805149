#include "connection.hpp"

#include <pthread.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>

#include "idem/error.hpp"

namespace idem::redis_detail {
namespace {

timeval to_timeval(std::chrono::milliseconds ms) {
  if (ms.count() <= 0) ms = std::chrono::milliseconds{1};
  return timeval{.tv_sec = static_cast<time_t>(ms.count() / 1000),
                 .tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

// hiredis writes with write(2): a peer that vanished would raise SIGPIPE and kill the process.
// A library must not change the process's signal disposition. The hot path writes hiredis's
// output buffer itself with send(MSG_NOSIGNAL); the rare handshake commands, written by
// hiredis, block SIGPIPE in this thread and consume one they caused before unblocking.
class SigpipeGuard {
 public:
  SigpipeGuard() noexcept {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    if (!was_pending_) blocked_ = pthread_sigmask(SIG_BLOCK, &pipe_, &old_) == 0;
  }
  ~SigpipeGuard() {
    if (!blocked_) return;
    sigset_t pending;
    sigpending(&pending);
    if (sigismember(&pending, SIGPIPE) == 1) {
      timespec zero{0, 0};
      while (sigtimedwait(&pipe_, nullptr, &zero) == -1 && errno == EINTR) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeGuard(const SigpipeGuard&) = delete;
  SigpipeGuard& operator=(const SigpipeGuard&) = delete;

 private:
  sigset_t pipe_{}, old_{};
  bool was_pending_ = false;
  bool blocked_ = false;
};

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

}  // namespace

std::string Endpoint::text() const {
  return unix_socket.empty() ? host + ":" + std::to_string(port) : "unix:" + unix_socket;
}

std::string reply_text(const redisReply* reply) {
  if (reply == nullptr) return "no reply";
  if (reply->type == REDIS_REPLY_ERROR || reply->type == REDIS_REPLY_STATUS ||
      reply->type == REDIS_REPLY_STRING) {
    return std::string(reply->str, reply->len);
  }
  return "unexpected reply type " + std::to_string(reply->type);
}

bool is_error(const redisReply* reply, std::string_view prefix) {
  return reply != nullptr && reply->type == REDIS_REPLY_ERROR &&
         starts_with(std::string_view(reply->str, reply->len), prefix);
}

// --- Scripts ---------------------------------------------------------------------------------
//
// Record value: <state:1><fingerprint:32 hex><token decimal>:<tail>
//   state 'p' in progress, tail = lease ms (the record lives 2 x lease: the second half is the
//              grace in which a claim can tell a takeover from a fresh claim)
//   state 'd' done, tail empty;  state 'r' done, tail = stored response (binary)
// Fingerprint all zeros = not fingerprinted, matches anything.
// KEYS per claimed key: record, token counter (same hash slot). ARGV per key: fp, ttl, mark.
// Reply: a flat array, two entries per key: code, data.
//   1 acquired (data token), 5 acquired over an expired lease (data token),
//   2 done (data response or nil), 3 in progress, 4 conflict.
const std::string_view Scripts::claim = R"lua(
local Z = '00000000000000000000000000000000'
local out = {}
for i = 1, #KEYS / 2 do
  local rk, ck = KEYS[2 * i - 1], KEYS[2 * i]
  local fp, ttl, mark = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local v = redis.call('GET', rk)
  local took = 0
  if v then
    local st = string.sub(v, 1, 1)
    local c = string.find(v, ':', 34, true)
    if st == 'p' and redis.call('PTTL', rk) <= tonumber(string.sub(v, c + 1)) then
      took = 1
    else
      local sfp = string.sub(v, 2, 33)
      if fp ~= Z and sfp ~= Z and sfp ~= fp then
        out[2 * i - 1] = 4; out[2 * i] = 0
      elseif st == 'p' then
        out[2 * i - 1] = 3; out[2 * i] = 0
      elseif st == 'r' then
        out[2 * i - 1] = 2; out[2 * i] = string.sub(v, c + 1)
      else
        out[2 * i - 1] = 2; out[2 * i] = false
      end
    end
  end
  if out[2 * i - 1] == nil then
    local t = string.format('%d', redis.call('INCR', ck))
    if mark == '1' then
      redis.call('SET', rk, 'd' .. fp .. t .. ':', 'PX', ttl)
    else
      redis.call('SET', rk, 'p' .. fp .. t .. ':' .. ttl, 'PX', 2 * tonumber(ttl))
    end
    out[2 * i - 1] = 1 + 4 * took; out[2 * i] = tonumber(t)
  end
end
return out
)lua";

// KEYS: records. ARGV per key: token, retention ms, has response ('0'/'1'), response, channel.
// Reply: array of 1 (completed) / 0 (the token no longer owns the key).
// A completed key is announced on its channel (empty: the server has no SPUBLISH) with the
// record's key as message, for waiters (RedisStore::await_change). redis.pcall: a user
// without the right to publish there still completes; its waiters then ask again after pauses.
const std::string_view Scripts::complete = R"lua(
local out = {}
for i = 1, #KEYS do
  local rk = KEYS[i]
  local tok, ret, has, resp = ARGV[5 * i - 4], ARGV[5 * i - 3], ARGV[5 * i - 2], ARGV[5 * i - 1]
  local ch = ARGV[5 * i]
  local v = redis.call('GET', rk)
  out[i] = 0
  if v then
    local c = string.find(v, ':', 34, true)
    if c and string.sub(v, 34, c - 1) == tok then
      if has == '1' then
        redis.call('SET', rk, 'r' .. string.sub(v, 2, c) .. resp, 'PX', ret)
      else
        redis.call('SET', rk, 'd' .. string.sub(v, 2, c), 'PX', ret)
      end
      if ch ~= '' then redis.pcall('SPUBLISH', ch, rk) end
      out[i] = 1
    end
  end
end
return out
)lua";

// KEYS[1]: record. ARGV[1]: token, ARGV[2]: channel (as for complete). Deletes an in-progress
// record still owned by the token.
const std::string_view Scripts::release = R"lua(
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 1) ~= 'p' then return 0 end
local c = string.find(v, ':', 34, true)
if not c or string.sub(v, 34, c - 1) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' then redis.pcall('SPUBLISH', ARGV[2], KEYS[1]) end
return 1
)lua";

// KEYS[1]: record. ARGV[1]: channel (as for complete). Deletes the record whatever its state.
const std::string_view Scripts::forget = R"lua(
local n = redis.call('DEL', KEYS[1])
if n > 0 and ARGV[1] ~= '' then redis.pcall('SPUBLISH', ARGV[1], KEYS[1]) end
return n
)lua";

// --- Pool ------------------------------------------------------------------------------------

PooledConnection::~PooledConnection() {
  if (node_ != nullptr && conn_) node_->give_back(std::move(conn_), false);
}

void PooledConnection::broken() noexcept {
  if (node_ != nullptr && conn_) node_->give_back(std::move(conn_), true);
}

Node::Node(Endpoint endpoint, const RedisOptions& options, Scripts& scripts, Counters& counters)
    : endpoint_(std::move(endpoint)), options_(options), scripts_(scripts), counters_(counters) {}

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
      throw StoreUnavailable("all " + std::to_string(options_.pool_size) +
                             " connections to Redis at " + endpoint_.text() + " stayed busy for " +
                             std::to_string(options_.pool_wait_timeout.count()) +
                             " ms: raise RedisOptions::pool_size or pool_wait_timeout");
    }
  }
  const auto now = std::chrono::steady_clock::now();
  if (now < next_connect_) {
    throw StoreUnavailable(
        last_connect_error_ + " (next reconnect attempt in " +
        std::to_string(
            std::chrono::duration_cast<std::chrono::milliseconds>(next_connect_ - now).count()) +
        " ms)");
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
    backoff_ =
        std::clamp(backoff_ * 2, options_.reconnect_backoff_min, options_.reconnect_backoff_max);
    next_connect_ = std::chrono::steady_clock::now() + backoff_;
    last_connect_error_ = e.what();
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

ContextPtr open_context(const Endpoint& endpoint, const RedisOptions& options) {
  const timeval tv = to_timeval(options.connect_timeout);
  ContextPtr ctx(endpoint.unix_socket.empty()
                     ? redisConnectWithTimeout(endpoint.host.c_str(), endpoint.port, tv)
                     : redisConnectUnixWithTimeout(endpoint.unix_socket.c_str(), tv));
  if (!ctx) throw StoreUnavailable("cannot allocate a hiredis context (out of memory)");
  if (ctx->err != 0) {
    std::string err = ctx->errstr;
    std::string what = "cannot connect to Redis at " + endpoint.text() + ": " + err;
    if (err.find("refused") != std::string::npos || err.find("No such file") != std::string::npos) {
      what +=
          ": nothing listens there; is redis-server running, and are RedisOptions::host/port "
          "(or unix_socket) right?";
    } else if (err.find("timed out") != std::string::npos ||
               err.find("temporarily unavailable") != std::string::npos) {
      what += " after " + std::to_string(options.connect_timeout.count()) +
              " ms (RedisOptions::connect_timeout): check the address, firewalls and the network";
    } else if (err.find("resolve") != std::string::npos || err.find("Name") != std::string::npos) {
      what += ": check RedisOptions::host";
    }
    throw StoreUnavailable(what);
  }
  redisSetTimeout(ctx.get(), tv);
  return ctx;
}

namespace {

ReplyPtr run_blocking(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options,
                      Command cmd, std::string_view what) {
  void* raw = redisCommandArgv(ctx, cmd.argc(), cmd.argv(), cmd.lens());
  if (raw == nullptr) throw_context_error(ctx, endpoint, options, what);
  return ReplyPtr(static_cast<redisReply*>(raw));
}

}  // namespace

void authenticate(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options) {
  SigpipeGuard sigpipe;
  if (!options.password.empty()) {
    Command auth{"AUTH"};
    if (!options.user.empty()) auth.add(options.user);
    auth.add(options.password);
    ReplyPtr reply = run_blocking(ctx, endpoint, options, std::move(auth), "AUTH");
    if (reply->type == REDIS_REPLY_ERROR) {
      throw StoreUnavailable("Redis at " + endpoint.text() + " refused the credentials (" +
                             reply_text(reply.get()) +
                             "): check RedisOptions::user and RedisOptions::password");
    }
  }
  ReplyPtr pong = run_blocking(ctx, endpoint, options, Command{"PING"}, "PING");
  if (pong->type == REDIS_REPLY_ERROR) {
    std::string text = reply_text(pong.get());
    if (starts_with(text, "NOAUTH")) {
      throw StoreUnavailable("Redis at " + endpoint.text() + " requires authentication (" + text +
                             "): set RedisOptions::password (and user for an ACL user)");
    }
    throw StoreUnavailable("Redis at " + endpoint.text() + " answered PING with an error (" + text +
                           ")");
  }
  if (pong->type != REDIS_REPLY_STATUS || reply_text(pong.get()) != "PONG") {
    throw StoreUnavailable("the server at " + endpoint.text() +
                           " did not answer PING like Redis: check RedisOptions::host/port");
  }
}

bool send_bytes(int fd, const char* data, std::size_t len) {
  std::size_t off = 0;
  while (off < len) {
    ssize_t n = ::send(fd, data + off, len - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += static_cast<std::size_t>(n);
  }
  return true;
}

std::unique_ptr<Connection> Node::connect() {
  counters_.reconnects.fetch_add(1, std::memory_order_relaxed);
  ContextPtr ctx = open_context(endpoint_, options_);
  handshake(ctx.get());
  redisSetTimeout(ctx.get(), to_timeval(options_.command_timeout));
  auto conn = std::make_unique<Connection>();
  conn->ctx = std::move(ctx);
  return conn;
}

void Node::handshake(redisContext* ctx) {
  authenticate(ctx, endpoint_, options_);
  SigpipeGuard sigpipe;
  auto run = [&](Command cmd, std::string_view what) {
    void* raw = redisCommandArgv(ctx, cmd.argc(), cmd.argv(), cmd.lens());
    if (raw == nullptr) throw_io(ctx, what);
    return ReplyPtr(static_cast<redisReply*>(raw));
  };
  if (options_.db != 0) {
    ReplyPtr reply = run(Command{"SELECT", std::to_string(options_.db)}, "SELECT");
    if (reply->type == REDIS_REPLY_ERROR) {
      throw StoreUnavailable("Redis at " + endpoint_.text() + " refused SELECT " +
                             std::to_string(options_.db) + " (" + reply_text(reply.get()) +
                             "): check RedisOptions::db");
    }
  }
  learn_pubsub(ctx);
  std::string shas[3];
  const std::string_view texts[3] = {Scripts::claim, Scripts::complete, Scripts::release};
  for (int i = 0; i < 3; ++i) {
    ReplyPtr reply = run(Command{"SCRIPT", "LOAD", texts[i]}, "SCRIPT LOAD");
    counters_.script_loads.fetch_add(1, std::memory_order_relaxed);
    if (reply->type != REDIS_REPLY_STRING) {
      throw StoreUnavailable("Redis at " + endpoint_.text() + " refused SCRIPT LOAD (" +
                             reply_text(reply.get()) +
                             "): the store needs Lua scripting (EVALSHA, SCRIPT) allowed for its "
                             "user");
    }
    shas[i] = reply_text(reply.get());
  }
  std::lock_guard lock(scripts_.mutex);
  scripts_.claim_sha = shas[0];
  scripts_.complete_sha = shas[1];
  scripts_.release_sha = shas[2];
}

// Sharded pub/sub (SPUBLISH, Redis 7) carries the change notifications of await_change. HELLO
// (Redis 6+) names the version; a server that refuses it (older, or an ACL without
// @connection) is taken to have none: waiters then only pause.
void Node::learn_pubsub(redisContext* ctx) {
  void* raw = redisCommand(ctx, "HELLO 2");
  if (raw == nullptr) throw_io(ctx, "HELLO");
  ReplyPtr reply(static_cast<redisReply*>(raw));
  bool sharded = false;
  if (reply->type == REDIS_REPLY_ARRAY) {
    for (std::size_t i = 0; i + 1 < reply->elements; i += 2) {
      const redisReply* name = reply->element[i];
      const redisReply* value = reply->element[i + 1];
      if (name->type == REDIS_REPLY_STRING && reply_text(name) == "version" &&
          value->type == REDIS_REPLY_STRING) {
        sharded = std::atoi(value->str) >= 7;
      }
    }
  }
  std::lock_guard lock(scripts_.mutex);
  scripts_.sharded_pubsub = sharded;
}

void throw_context_error(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options,
                         std::string_view during) {
  const int saved_errno = errno;
  std::string err = ctx->errstr;
  std::string what =
      "Redis at " + endpoint.text() + " failed during " + std::string(during) + ": " + err;
  if (ctx->err == REDIS_ERR_IO && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK ||
                                   err.find("temporarily unavailable") != std::string::npos)) {
    what = "no reply from Redis at " + endpoint.text() + " to " + std::string(during) +
           " within RedisOptions::command_timeout (" +
           std::to_string(options.command_timeout.count()) +
           " ms): the server is overloaded, paused, unreachable, or not a Redis server";
  } else if (ctx->err == REDIS_ERR_EOF) {
    what += ": the server closed the connection (restarted, killed, or it is not Redis)";
  } else if (ctx->err == REDIS_ERR_PROTOCOL) {
    what = "the server at " + endpoint.text() + " did not answer " + std::string(during) +
           " like Redis (" + err + "): check RedisOptions::host/port";
  } else if (ctx->err == REDIS_ERR_IO) {
    what += ": the connection broke; Redis may be down or restarting";
  }
  throw StoreUnavailable(what);
}

void Node::throw_io(redisContext* ctx, std::string_view during) const {
  throw_context_error(ctx, endpoint_, options_, during);
}

// Writes the formatted commands with MSG_NOSIGNAL, leaving hiredis an empty output buffer so
// that redisGetReply only reads. False with errno set on failure (EAGAIN: send timeout).
bool send_all(redisContext* ctx) {
  if (!send_bytes(ctx->fd, ctx->obuf, sdslen(ctx->obuf))) return false;
  // sdsclear() without its symbol: hiredis.h declares sds.h outside its extern "C" block.
  sdssetlen(ctx->obuf, 0);
  ctx->obuf[0] = '\0';
  return true;
}

std::vector<ReplyPtr> Node::exchange_once(std::span<Command* const> commands,
                                          std::span<const bool> asking) {
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
      throw StoreUnavailable("cannot format a Redis command (out of memory)");
    }
  }
  if (!send_all(ctx)) {
    const int err = errno;
    conn.broken();
    std::string what = "Redis at " + endpoint_.text() + " failed while sending: ";
    if (err == EAGAIN || err == EWOULDBLOCK) {
      what += "the send did not finish within RedisOptions::command_timeout (" +
              std::to_string(options_.command_timeout.count()) + " ms): the server is not reading";
    } else {
      what += std::string(std::strerror(err)) +
              ": the connection broke; Redis may be down or "
              "restarting";
    }
    throw StoreUnavailable(what);
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

std::vector<ReplyPtr> Node::exchange(std::span<Command* const> commands,
                                     std::span<const bool> asking, bool resend_last) {
  std::vector<ReplyPtr> replies = exchange_once(commands, asking);
  // NOSCRIPT: the server lost its script cache (restart, SCRIPT FLUSH, failover). The command
  // did not run; load the scripts on a fresh handshake and resend just those commands.
  std::vector<std::size_t> again;
  for (std::size_t i = 0; i < replies.size(); ++i) {
    if (is_error(replies[i].get(), "NOSCRIPT")) again.push_back(i);
  }
  if (again.empty()) return replies;
  // The trailing WAIT answered for writes that had not run; it must follow the resent ones.
  if (resend_last && again.back() != replies.size() - 1) again.push_back(replies.size() - 1);
  {
    PooledConnection conn = acquire();
    SigpipeGuard sigpipe;
    for (std::string_view text : {Scripts::claim, Scripts::complete, Scripts::release}) {
      Command load{"SCRIPT", "LOAD", text};
      void* raw = redisCommandArgv(conn.get(), load.argc(), load.argv(), load.lens());
      if (raw == nullptr) {
        try {
          throw_io(conn.get(), "SCRIPT LOAD");
        } catch (...) {
          conn.broken();
          throw;
        }
      }
      ReplyPtr loaded(static_cast<redisReply*>(raw));
      counters_.script_loads.fetch_add(1, std::memory_order_relaxed);
    }
  }
  std::vector<Command*> resend;
  std::vector<char> resend_asking_storage;
  for (std::size_t i : again) {
    resend.push_back(commands[i]);
    resend_asking_storage.push_back(!asking.empty() && asking[i]);
  }
  std::unique_ptr<bool[]> resend_asking(new bool[again.size()]);
  for (std::size_t n = 0; n < again.size(); ++n) resend_asking[n] = resend_asking_storage[n];
  std::vector<ReplyPtr> second =
      exchange_once(resend, std::span<const bool>(resend_asking.get(), again.size()));
  for (std::size_t n = 0; n < again.size(); ++n) replies[again[n]] = std::move(second[n]);
  return replies;
}

}  // namespace idem::redis_detail
