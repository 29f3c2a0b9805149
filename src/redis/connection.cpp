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

namespace idem::redis_detail {
namespace {

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

}  // namespace

timeval to_timeval(std::chrono::milliseconds ms) {
  if (ms.count() <= 0) ms = std::chrono::milliseconds{1};
  return timeval{.tv_sec = static_cast<time_t>(ms.count() / 1000),
                 .tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

// hiredis writes with write(2): a peer that vanished would raise SIGPIPE and kill the process.
// The hot path writes hiredis's output buffer itself with send(MSG_NOSIGNAL) (send_all); the
// rare handshake commands, written by hiredis, run under a SigpipeGuard.
SigpipeGuard::SigpipeGuard() noexcept {
  sigemptyset(&pipe_);
  sigaddset(&pipe_, SIGPIPE);
  sigset_t pending;
  sigpending(&pending);
  was_pending_ = sigismember(&pending, SIGPIPE) == 1;
  if (!was_pending_) blocked_ = pthread_sigmask(SIG_BLOCK, &pipe_, &old_) == 0;
}

SigpipeGuard::~SigpipeGuard() {
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

ContextPtr open_context(const Endpoint& endpoint, const RedisOptions& options) {
  const timeval tv = to_timeval(options.connect_timeout);
  ContextPtr ctx(endpoint.unix_socket.empty()
                     ? redisConnectWithTimeout(endpoint.host.c_str(), endpoint.port, tv)
                     : redisConnectUnixWithTimeout(endpoint.unix_socket.c_str(), tv));
  if (!ctx) throw_redis(Kind::unavailable, "cannot allocate a hiredis context (out of memory)");
  if (ctx->err != 0) {
    std::string err = ctx->errstr;
    std::string what = "cannot connect to Redis at " + endpoint.text() + ": " + err;
    Kind kind = Kind::io;
    if (err.find("refused") != std::string::npos || err.find("No such file") != std::string::npos) {
      what +=
          ": nothing listens there; is redis-server running, and are RedisOptions::host/port "
          "(or unix_socket) right?";
    } else if (err.find("timed out") != std::string::npos ||
               err.find("temporarily unavailable") != std::string::npos) {
      kind = Kind::timeout;
      what += " after " + std::to_string(options.connect_timeout.count()) +
              " ms (RedisOptions::connect_timeout): check the address, firewalls and the network";
    } else if (err.find("resolve") != std::string::npos || err.find("Name") != std::string::npos) {
      what += ": check RedisOptions::host";
    }
    throw_redis(kind, what);
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
      throw_redis(Kind::reply, "Redis at " + endpoint.text() + " refused the credentials (" +
                                   reply_text(reply.get()) +
                                   "): check RedisOptions::user and RedisOptions::password");
    }
  }
  ReplyPtr pong = run_blocking(ctx, endpoint, options, Command{"PING"}, "PING");
  if (pong->type == REDIS_REPLY_ERROR) {
    std::string text = reply_text(pong.get());
    if (starts_with(text, "NOAUTH")) {
      throw_redis(Kind::reply, "Redis at " + endpoint.text() + " requires authentication (" + text +
                                   "): set RedisOptions::password (and user for an ACL user)");
    }
    throw_redis(Kind::reply,
                "Redis at " + endpoint.text() + " answered PING with an error (" + text + ")");
  }
  if (pong->type != REDIS_REPLY_STATUS || reply_text(pong.get()) != "PONG") {
    throw_redis(Kind::protocol,
                "the server at " + endpoint.text() +
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

void throw_context_error(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options,
                         std::string_view during) {
  const int saved_errno = errno;
  std::string err = ctx->errstr;
  std::string what =
      "Redis at " + endpoint.text() + " failed during " + std::string(during) + ": " + err;
  Kind kind = Kind::io;
  if (ctx->err == REDIS_ERR_IO && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK ||
                                   err.find("temporarily unavailable") != std::string::npos)) {
    kind = Kind::timeout;
    what = "no reply from Redis at " + endpoint.text() + " to " + std::string(during) +
           " within RedisOptions::command_timeout (" +
           std::to_string(options.command_timeout.count()) +
           " ms): the server is overloaded, paused, unreachable, or not a Redis server";
  } else if (ctx->err == REDIS_ERR_EOF) {
    what += ": the server closed the connection (restarted, killed, or it is not Redis)";
  } else if (ctx->err == REDIS_ERR_PROTOCOL) {
    kind = Kind::protocol;
    what = "the server at " + endpoint.text() + " did not answer " + std::string(during) +
           " like Redis (" + err + "): check RedisOptions::host/port";
  } else if (ctx->err == REDIS_ERR_IO) {
    what += ": the connection broke; Redis may be down or restarting";
  }
  throw_redis(kind, what);
}

bool send_all(redisContext* ctx) {
  if (!send_bytes(ctx->fd, ctx->obuf, sdslen(ctx->obuf))) return false;
  // sdsclear() without its symbol: hiredis.h declares sds.h outside its extern "C" block.
  sdssetlen(ctx->obuf, 0);
  ctx->obuf[0] = '\0';
  return true;
}

}  // namespace idem::redis_detail
