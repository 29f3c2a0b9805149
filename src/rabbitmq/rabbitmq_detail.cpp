#include "rabbitmq_detail.hpp"

#include <sys/time.h>

namespace idem::rabbitmq::detail {

std::string describe(const amqp_rpc_reply_t& reply) {
  switch (reply.reply_type) {
    case AMQP_RESPONSE_NORMAL:
      return "ok";
    case AMQP_RESPONSE_NONE:
      return "missing RPC reply";
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
      return amqp_error_string2(reply.library_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
      if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        const auto* m = static_cast<const amqp_connection_close_t*>(reply.reply.decoded);
        return "connection closed by the broker: " + std::to_string(m->reply_code) + " " +
               std::string(view(m->reply_text));
      }
      if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        const auto* m = static_cast<const amqp_channel_close_t*>(reply.reply.decoded);
        return "channel closed by the broker: " + std::to_string(m->reply_code) + " " +
               std::string(view(m->reply_text));
      }
      return "broker error, method " + std::to_string(reply.reply.id);
  }
  return "unknown reply";
}

void Table::add(std::string_view key, std::string_view value) {
  amqp_table_entry_t entry{};
  entry.key = bytes(key);
  entry.value.kind = AMQP_FIELD_KIND_UTF8;
  entry.value.value.bytes = bytes(value);
  entries_.push_back(entry);
}

amqp_table_t Table::get() noexcept {
  return amqp_table_t{static_cast<int>(entries_.size()), entries_.data()};
}

namespace {
timeval to_timeval(std::chrono::milliseconds ms) {
  return timeval{.tv_sec = static_cast<time_t>(ms.count() / 1000),
                 .tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}
}  // namespace

Connection::Connection(const ConnectionOptions& options) : state_(amqp_new_connection()) {
  const std::string where = options.host + ":" + std::to_string(options.port);
  {
    amqp_socket_t* socket = amqp_tcp_socket_new(get());  // owned by the connection
    if (socket == nullptr) throw RabbitError("cannot create a socket for " + where, -1);
    timeval timeout = to_timeval(options.connect_timeout);
    if (int rc = amqp_socket_open_noblock(socket, options.host.c_str(), options.port, &timeout)) {
      throw RabbitError("cannot connect to " + where + ": " + amqp_error_string2(rc), rc);
    }
    // A dead broker must not hang an RPC (ack, declare, close) forever.
    amqp_set_rpc_timeout(get(), &timeout);
    amqp_rpc_reply_t login =
        amqp_login(get(), options.vhost.c_str(), 0, 131072, options.heartbeat_seconds,
                   AMQP_SASL_METHOD_PLAIN, options.user.c_str(), options.password.c_str());
    if (login.reply_type != AMQP_RESPONSE_NORMAL) {
      broken_ = true;
      throw RabbitError("AMQP login to " + where + " failed: " + describe(login),
                        login.library_error);
    }
    open_ = true;
    amqp_channel_open(get(), channel);
    check_rpc("opening a channel on " + where);
  }
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
  broken_ = true;
  int code = reply.library_error;
  if (reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION) {
    if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
      code = static_cast<const amqp_connection_close_t*>(reply.reply.decoded)->reply_code;
    } else if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
      code = static_cast<const amqp_channel_close_t*>(reply.reply.decoded)->reply_code;
    }
  }
  throw RabbitError(std::string(what) + ": " + describe(reply), code);
}

}  // namespace idem::rabbitmq::detail
