#include "rabbitmq_detail.hpp"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>

namespace idem::rabbitmq::detail {

namespace {

using Clock = std::chrono::steady_clock;

timeval to_timeval(std::chrono::milliseconds ms) {
  ms = std::max(ms, std::chrono::milliseconds{0});
  return timeval{.tv_sec = static_cast<time_t>(ms.count() / 1000),
                 .tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

// strerror, lower-cased at the front: "connection refused".
std::string os_text(int error) {
  std::string text = std::strerror(error);
  if (!text.empty()) {
    text[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(text[0])));
  }
  return text;
}

std::string close_text(std::uint16_t code, amqp_bytes_t text) {
  return std::to_string(code) + " " + std::string(view(text));
}

// A hint for the errors people meet first.
std::string_view connect_hint(int error) {
  switch (error) {
    case ECONNREFUSED:
      return " (is RabbitMQ running and listening there?)";
    case EHOSTUNREACH:
    case ENETUNREACH:
      return " (check the host and the network route)";
    default:
      return "";
  }
}

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// Connects a non-blocking TCP socket (rabbitmq-c's own connect reports every failure as "a
// socket error occurred"; this one keeps errno). Returns the socket; throws ConnectionError.
int open_tcp(const ConnectionOptions& options, const std::string& where) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(options.port);
  if (int rc = ::getaddrinfo(options.host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    throw ConnectionError(
        "cannot resolve RabbitMQ host '" + options.host + "': " + ::gai_strerror(rc),
        AMQP_STATUS_HOSTNAME_RESOLUTION_FAILED, rc == EAI_SYSTEM ? errno : 0);
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(found, &::freeaddrinfo);
  const Clock::time_point deadline = Clock::now() + options.connect_timeout;
  int last_error = 0;
  for (const addrinfo* a = list.get(); a != nullptr; a = a->ai_next) {
    FdCloser s{
        ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol)};
    if (s.fd < 0) {
      last_error = errno;
      continue;
    }
    const int one = 1;
    (void)::setsockopt(s.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    (void)::setsockopt(s.fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    if (::connect(s.fd, a->ai_addr, a->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        last_error = errno;
        continue;
      }
      pollfd p{.fd = s.fd, .events = POLLOUT, .revents = 0};
      int ready = 0;
      do {
        const auto left =
            std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
        ready = ::poll(&p, 1, static_cast<int>(std::max<long long>(left, 0)));
      } while (ready < 0 && errno == EINTR);
      if (ready == 0) {
        throw ConnectionError("connecting to " + where + " timed out after " +
                                  std::to_string(options.connect_timeout.count()) +
                                  " ms (connect_timeout)",
                              AMQP_STATUS_TIMEOUT, ETIMEDOUT);
      }
      int error = 0;
      socklen_t len = sizeof error;
      if (ready < 0 || ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
      if (error != 0) {
        last_error = error;
        continue;
      }
    }
    const int fd = s.fd;
    s.fd = -1;
    return fd;
  }
  throw ConnectionError(
      os_text(last_error) + " on " + where + std::string(connect_hint(last_error)),
      AMQP_STATUS_SOCKET_ERROR, last_error);
}

}  // namespace

std::string endpoint(const ConnectionOptions& options) {
  return options.host + ":" + std::to_string(options.port);
}

std::string describe_status(int status, int os_error) {
  switch (status) {
    case AMQP_STATUS_SOCKET_ERROR:
      return os_error != 0 ? "socket error: " + os_text(os_error) : "socket error";
    case AMQP_STATUS_CONNECTION_CLOSED:
      return "the broker closed the TCP connection";
    case AMQP_STATUS_SOCKET_CLOSED:
      return "the socket is closed";
    case AMQP_STATUS_HEARTBEAT_TIMEOUT:
      return "no heartbeat from the broker within two heartbeat intervals "
             "(ConnectionOptions::heartbeat)";
    case AMQP_STATUS_TIMEOUT:
      return "timed out";
    default:
      return amqp_error_string2(status);
  }
}

std::string describe(const amqp_rpc_reply_t& reply, int os_error) {
  switch (reply.reply_type) {
    case AMQP_RESPONSE_NORMAL:
      return "ok";
    case AMQP_RESPONSE_NONE:
      return "missing RPC reply";
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
      return describe_status(reply.library_error, os_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
      if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        const auto* m = static_cast<const amqp_connection_close_t*>(reply.reply.decoded);
        return "connection closed by the broker: " + close_text(m->reply_code, m->reply_text);
      }
      if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        const auto* m = static_cast<const amqp_channel_close_t*>(reply.reply.decoded);
        return "channel closed by the broker: " + close_text(m->reply_code, m->reply_text);
      }
      return "broker error, method " + std::to_string(reply.reply.id);
  }
  return "unknown reply";
}

int code_of(const amqp_rpc_reply_t& reply) noexcept {
  if (reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION) {
    if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
      return static_cast<const amqp_connection_close_t*>(reply.reply.decoded)->reply_code;
    }
    if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
      return static_cast<const amqp_channel_close_t*>(reply.reply.decoded)->reply_code;
    }
  }
  return reply.library_error;
}

std::optional<std::int64_t> as_integer(const amqp_field_value_t& v) noexcept {
  switch (v.kind) {
    case AMQP_FIELD_KIND_I8:
      return v.value.i8;
    case AMQP_FIELD_KIND_U8:
      return v.value.u8;
    case AMQP_FIELD_KIND_I16:
      return v.value.i16;
    case AMQP_FIELD_KIND_U16:
      return v.value.u16;
    case AMQP_FIELD_KIND_I32:
      return v.value.i32;
    case AMQP_FIELD_KIND_U32:
      return v.value.u32;
    case AMQP_FIELD_KIND_I64:
      return v.value.i64;
    case AMQP_FIELD_KIND_U64:
      return static_cast<std::int64_t>(v.value.u64);
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: {
      const std::string_view text = view(v.value.bytes);
      std::int64_t n = 0;
      const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
      if (ec != std::errc{} || end != text.data() + text.size()) return std::nullopt;
      return n;
    }
    default:
      return std::nullopt;
  }
}

const amqp_table_entry_t* find(const amqp_table_t& table, std::string_view name) noexcept {
  for (int i = 0; i < table.num_entries; ++i) {
    if (view(table.entries[i].key) == name) return &table.entries[i];
  }
  return nullptr;
}

std::string_view kind_name(std::uint8_t kind) noexcept {
  switch (kind) {
    case AMQP_FIELD_KIND_BOOLEAN:
      return "boolean";
    case AMQP_FIELD_KIND_I8:
    case AMQP_FIELD_KIND_U8:
    case AMQP_FIELD_KIND_I16:
    case AMQP_FIELD_KIND_U16:
    case AMQP_FIELD_KIND_I32:
    case AMQP_FIELD_KIND_U32:
    case AMQP_FIELD_KIND_I64:
    case AMQP_FIELD_KIND_U64:
      return "integer";
    case AMQP_FIELD_KIND_F32:
    case AMQP_FIELD_KIND_F64:
      return "float";
    case AMQP_FIELD_KIND_DECIMAL:
      return "decimal";
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES:
      return "string";
    case AMQP_FIELD_KIND_ARRAY:
      return "array";
    case AMQP_FIELD_KIND_TIMESTAMP:
      return "timestamp";
    case AMQP_FIELD_KIND_TABLE:
      return "table";
    case AMQP_FIELD_KIND_VOID:
      return "void";
    default:
      return "unknown";
  }
}

void Table::add(std::string_view key, std::string_view value) {
  amqp_table_entry_t entry{};
  entry.key = bytes(key);
  entry.value.kind = AMQP_FIELD_KIND_UTF8;
  entry.value.value.bytes = bytes(value);
  entries_.push_back(entry);
}

void Table::add_all_except(const amqp_table_t& table,
                           std::initializer_list<std::string_view> skip) {
  for (int i = 0; i < table.num_entries; ++i) {
    const std::string_view name = view(table.entries[i].key);
    if (std::find(skip.begin(), skip.end(), name) == skip.end()) {
      entries_.push_back(table.entries[i]);
    }
  }
}

amqp_table_t Table::get() noexcept {
  return amqp_table_t{static_cast<int>(entries_.size()), entries_.data()};
}

Connection::Connection(const ConnectionOptions& options)
    : state_(amqp_new_connection()), where_(endpoint(options)) {
  if (!state_) throw RabbitError("cannot allocate a rabbitmq-c connection", AMQP_STATUS_NO_MEMORY);
  amqp_socket_t* socket = amqp_tcp_socket_new(get());  // owned by the connection
  if (socket == nullptr) {
    throw RabbitError("cannot create a socket for " + where_, AMQP_STATUS_NO_MEMORY);
  }
  amqp_tcp_socket_set_sockfd(socket, open_tcp(options, where_));  // closed with the state
  timeval timeout = to_timeval(options.connect_timeout);
  // A dead broker must not hang the handshake or an RPC (ack, declare, close) forever.
  amqp_set_handshake_timeout(get(), &timeout);
  amqp_set_rpc_timeout(get(), &timeout);
  amqp_rpc_reply_t login = amqp_login(
      get(), options.vhost.c_str(), 0, 131072, static_cast<int>(options.heartbeat.count()),
      AMQP_SASL_METHOD_PLAIN, options.user.c_str(), options.password.c_str());
  if (login.reply_type != AMQP_RESPONSE_NORMAL) {
    const int os_error = errno;
    broken_ = true;
    std::string why = describe(login, os_error);
    if (login.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
        login.library_error == AMQP_STATUS_CONNECTION_CLOSED) {
      why += " during the handshake (not an AMQP 0-9-1 port? too many connections?)";
    }
    throw ConnectionError("AMQP login to " + where_ + " as '" + options.user + "' on vhost '" +
                              options.vhost + "' failed: " + why,
                          code_of(login), os_error);
  }
  open_ = true;
  amqp_channel_open(get(), channel);
  check_rpc("opening a channel");
}

Connection::~Connection() {
  if (open_ && !broken_) {
    amqp_channel_close(get(), channel, AMQP_REPLY_SUCCESS);
    amqp_connection_close(get(), AMQP_REPLY_SUCCESS);
  }
}

void Connection::check_rpc(std::string_view what) {
  amqp_rpc_reply_t reply = amqp_get_rpc_reply(get());
  if (reply.reply_type == AMQP_RESPONSE_NORMAL) return;
  const int os_error = errno;
  broken_ = true;
  const std::string message =
      std::string(what) + " on " + where_ + ": " + describe(reply, os_error);
  if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
    throw ConnectionError(message, reply.library_error, os_error);
  }
  throw RabbitError(message, code_of(reply));
}

ConfirmChannel::ConfirmChannel(const ConnectionOptions& options) : conn_(options) {
  amqp_confirm_select(conn_.get(), channel);
  conn_.check_rpc("confirm.select");
}

std::uint64_t ConfirmChannel::publish(std::string_view exchange, std::string_view routing_key,
                                      bool mandatory, const amqp_basic_properties_t& properties,
                                      std::string_view body) {
  const int rc = amqp_basic_publish(conn_.get(), channel, bytes(exchange), bytes(routing_key),
                                    mandatory ? 1 : 0, 0, &properties, bytes(body));
  if (rc != AMQP_STATUS_OK) {
    const int os_error = errno;
    conn_.mark_broken();
    throw ConnectionError(
        "publishing on " + conn_.where() + " failed: " + describe_status(rc, os_error), rc,
        os_error);
  }
  return ++next_seq_;
}

ConfirmChannel::Event ConfirmChannel::next(Clock::time_point deadline) {
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::microseconds>(deadline - Clock::now());
    timeval tv{
        .tv_sec = static_cast<time_t>(std::max<std::int64_t>(left.count(), 0) / 1000000),
        .tv_usec = static_cast<suseconds_t>(std::max<std::int64_t>(left.count(), 0) % 1000000)};
    amqp_frame_t frame{};
    const int rc = amqp_simple_wait_frame_noblock(conn_.get(), &frame, &tv);
    if (rc == AMQP_STATUS_TIMEOUT) return {.kind = EventKind::timeout};
    if (rc != AMQP_STATUS_OK) {
      const int os_error = errno;
      conn_.mark_broken();
      return {
          .kind = EventKind::broken,
          .detail = "connection to " + conn_.where() + " lost: " + describe_status(rc, os_error)};
    }
    if (frame.frame_type != AMQP_FRAME_METHOD) continue;  // content of a returned message
    Event event;
    switch (frame.payload.method.id) {
      case AMQP_BASIC_ACK_METHOD: {
        const auto* m = static_cast<const amqp_basic_ack_t*>(frame.payload.method.decoded);
        event = {.kind = EventKind::ack, .tag = m->delivery_tag, .multiple = m->multiple != 0};
        break;
      }
      case AMQP_BASIC_NACK_METHOD: {
        const auto* m = static_cast<const amqp_basic_nack_t*>(frame.payload.method.decoded);
        event = {.kind = EventKind::nack, .tag = m->delivery_tag, .multiple = m->multiple != 0};
        break;
      }
      case AMQP_BASIC_RETURN_METHOD: {
        const auto* m = static_cast<const amqp_basic_return_t*>(frame.payload.method.decoded);
        event = {.kind = EventKind::returned,
                 .detail = close_text(m->reply_code, m->reply_text) + " (exchange '" +
                           std::string(view(m->exchange)) + "', routing key '" +
                           std::string(view(m->routing_key)) + "')"};
        break;
      }
      case AMQP_CHANNEL_CLOSE_METHOD: {
        const auto* m = static_cast<const amqp_channel_close_t*>(frame.payload.method.decoded);
        conn_.mark_broken();
        event = {.kind = EventKind::broken,
                 .detail = "channel closed by the broker on " + conn_.where() + ": " +
                           close_text(m->reply_code, m->reply_text)};
        break;
      }
      case AMQP_CONNECTION_CLOSE_METHOD: {
        const auto* m = static_cast<const amqp_connection_close_t*>(frame.payload.method.decoded);
        conn_.mark_broken();
        event = {.kind = EventKind::broken,
                 .detail = "connection closed by the broker on " + conn_.where() + ": " +
                           close_text(m->reply_code, m->reply_text)};
        break;
      }
      default:
        continue;
    }
    amqp_maybe_release_buffers(conn_.get());
    return event;
  }
}

}  // namespace idem::rabbitmq::detail
