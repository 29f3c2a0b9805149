#pragma once
/// @file
/// @brief idem::rabbitmq::declare_queue_with_dead_letters: a work queue, its dead-letter
/// exchange and its dead-letter queue, declared in one call.

#include <cstdint>
#include <string>
#include <string_view>

#include "idem/adapters/rabbitmq_common.hpp"

// rabbitmq-c's connection handle, forward-declared: this header does not include amqp.h.
typedef struct amqp_connection_state_t_* amqp_connection_state_t;  // NOLINT(modernize-use-using)

namespace idem::rabbitmq {

/// @brief The kind of queue to declare (x-queue-type).
enum class QueueType {
  classic,  ///< a classic durable queue
  quorum,   ///< a replicated quorum queue; redeliveries carry x-delivery-count
};

/// @brief What declare_queue_with_dead_letters() declares. Designated-initialiser friendly.
struct DeadLetterOptions {
  QueueType type = QueueType::classic;
  /// The dead-letter exchange (fanout, durable). Empty: "<queue>.dlx".
  std::string dead_letter_exchange{};
  /// The queue bound to it (durable, same type as the queue). Empty: "<queue>.dlq".
  std::string dead_letter_queue{};
  /// Quorum queues only: x-delivery-limit, deliveries of one message after which the broker
  /// itself dead-letters it — the guard against a message that crashes every consumer before
  /// it can fail cleanly. 0: not set.
  unsigned delivery_limit = 0;
};

/// @brief The names declared; pass them to ConsumerOptions (.queue, .dead_letter_exchange).
struct DeadLetterTopology {
  std::string queue;
  std::string dead_letter_exchange;
  std::string dead_letter_queue;
};

/// @brief Declares (idempotently) the dead-letter exchange, the dead-letter queue bound to it,
/// and the queue with x-dead-letter-exchange pointing there (plus x-queue-type and
/// x-delivery-limit as options say), all durable. Opens and closes its own connection.
/// @throws idem::rabbitmq::ConnectionError when the broker cannot be reached;
/// idem::rabbitmq::RabbitError when a declaration is refused, e.g. 406 PRECONDITION_FAILED
/// for a queue that exists with other arguments (what() names it).
DeadLetterTopology declare_queue_with_dead_letters(const ConnectionOptions& connection,
                                                   std::string_view queue,
                                                   DeadLetterOptions options = {});

/// @brief The same on a channel you opened on your own rabbitmq-c connection. After an error
/// the broker has closed that channel.
/// @throws idem::rabbitmq::RabbitError when a declaration fails.
DeadLetterTopology declare_queue_with_dead_letters(amqp_connection_state_t connection,
                                                   std::uint16_t channel, std::string_view queue,
                                                   DeadLetterOptions options = {});

}  // namespace idem::rabbitmq
