#pragma once
/// @file
/// @brief The Kafka adapter (link idem::kafka): kafka::Consumer runs records through an
/// idem::IdempotentConsumer and commits by outcome; kafka::Producer stamps InnerMsgIds.

#include "idem/adapters/kafka_common.hpp"
#include "idem/adapters/kafka_consumer.hpp"
#include "idem/adapters/kafka_producer.hpp"
#include "idem/idem.hpp"
