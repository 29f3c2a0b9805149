#pragma once
/// @file
/// @brief The RabbitMQ adapter (link idem::rabbitmq): rabbitmq::Consumer acks by outcome;
/// rabbitmq::Publisher publishes with confirms and one InnerMsgId per logical message.

#include "idem/adapters/rabbitmq_common.hpp"
#include "idem/adapters/rabbitmq_consumer.hpp"
#include "idem/adapters/rabbitmq_publisher.hpp"
#include "idem/idem.hpp"
