#include "idem/adapters/rabbitmq_topology.hpp"

#include <cerrno>
#include <span>
#include <utility>
#include <vector>

#include "rabbitmq_detail.hpp"

namespace idem::rabbitmq {

namespace {

using detail::bytes;

void check(amqp_connection_state_t c, const std::string& what) {
  const amqp_rpc_reply_t reply = amqp_get_rpc_reply(c);
  if (reply.reply_type == AMQP_RESPONSE_NORMAL) return;
  const int os_error = errno;
  std::string message = what + ": " + detail::describe(reply, os_error);
  if (detail::code_of(reply) == AMQP_PRECONDITION_FAILED) {
    message +=
        " (it exists with other arguments: declare it with the same type and "
        "dead-letter exchange, or delete it first)";
  }
  if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
    throw ConnectionError(message, reply.library_error, os_error);
  }
  throw RabbitError(message, detail::code_of(reply));
}

amqp_table_entry_t long_entry(std::string_view key, std::int64_t value) {
  amqp_table_entry_t e{};
  e.key = bytes(key);
  e.value.kind = AMQP_FIELD_KIND_I64;
  e.value.value.i64 = value;
  return e;
}

amqp_table_entry_t string_entry(std::string_view key, std::string_view value) {
  amqp_table_entry_t e{};
  e.key = bytes(key);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = bytes(value);
  return e;
}

void declare_queue(amqp_connection_state_t c, amqp_channel_t ch, const std::string& name,
                   std::span<amqp_table_entry_t> args) {
  amqp_queue_declare(c, ch, bytes(name), /*passive=*/0, /*durable=*/1, /*exclusive=*/0,
                     /*auto_delete=*/0, amqp_table_t{static_cast<int>(args.size()), args.data()});
  check(c, "declaring queue '" + name + "'");
}

}  // namespace

DeadLetterTopology declare_queue_with_dead_letters(amqp_connection_state_t connection,
                                                   std::uint16_t channel, std::string_view queue,
                                                   DeadLetterOptions options) {
  if (queue.empty())
    throw RabbitError("declare_queue_with_dead_letters: the queue name is empty", -1);
  DeadLetterTopology t{
      .queue = std::string(queue),
      .dead_letter_exchange = options.dead_letter_exchange.empty() ? std::string(queue) + ".dlx"
                                                                   : options.dead_letter_exchange,
      .dead_letter_queue = options.dead_letter_queue.empty() ? std::string(queue) + ".dlq"
                                                             : options.dead_letter_queue,
  };
  const bool quorum = options.type == QueueType::quorum;

  amqp_exchange_declare(connection, channel, bytes(t.dead_letter_exchange), bytes("fanout"),
                        /*passive=*/0, /*durable=*/1, /*auto_delete=*/0, /*internal=*/0,
                        amqp_empty_table);
  check(connection, "declaring exchange '" + t.dead_letter_exchange + "'");

  std::vector<amqp_table_entry_t> args;
  if (quorum) args.push_back(string_entry("x-queue-type", "quorum"));
  declare_queue(connection, channel, t.dead_letter_queue, args);
  amqp_queue_bind(connection, channel, bytes(t.dead_letter_queue), bytes(t.dead_letter_exchange),
                  amqp_empty_bytes, amqp_empty_table);
  check(connection,
        "binding queue '" + t.dead_letter_queue + "' to exchange '" + t.dead_letter_exchange + "'");

  args.push_back(string_entry("x-dead-letter-exchange", t.dead_letter_exchange));
  if (quorum && options.delivery_limit != 0) {
    args.push_back(long_entry("x-delivery-limit", options.delivery_limit));
  }
  declare_queue(connection, channel, t.queue, args);
  return t;
}

DeadLetterTopology declare_queue_with_dead_letters(const ConnectionOptions& connection,
                                                   std::string_view queue,
                                                   DeadLetterOptions options) {
  detail::Connection conn(connection);
  try {
    return declare_queue_with_dead_letters(conn.get(), detail::channel, queue, std::move(options));
  } catch (const ConnectionError& e) {
    conn.mark_broken();
    throw ConnectionError(std::string(e.what()) + " (on " + conn.where() + ")", e.code(),
                          e.os_error());
  } catch (const RabbitError& e) {
    conn.mark_broken();  // the broker closed the channel: no polite close
    throw RabbitError(std::string(e.what()) + " (on " + conn.where() + ")", e.code(), e.os_error());
  }
}

}  // namespace idem::rabbitmq
