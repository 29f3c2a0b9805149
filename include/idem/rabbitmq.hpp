#pragma once
/// @file
/// @brief The RabbitMQ adapter (link idem::rabbitmq): rabbitmq::Consumer acks by outcome;
/// rabbitmq::Publisher publishes with confirms and one InnerMsgId per logical message;
/// rabbitmq::declare_queue_with_dead_letters declares a queue with its dead-letter queue.

#include "idem/adapters/rabbitmq_common.hpp"
#include "idem/adapters/rabbitmq_consumer.hpp"
#include "idem/adapters/rabbitmq_publisher.hpp"
#include "idem/adapters/rabbitmq_topology.hpp"
#include "idem/idem.hpp"
