#pragma once
/// @file
/// @brief idem::OutboxMessage and idem::OutboxRow: a message written to the transactional
/// outbox with the business writes, and the pending row the relay publishes. See
/// docs/outbox.md.

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "idem/inner_msg_id.hpp"

namespace idem {

/// @brief One outgoing message, stored in the outbox inside the business transaction.
struct OutboxMessage {
  /// Kafka: the topic. RabbitMQ: the exchange ("" is the default exchange).
  std::string destination{};
  /// RabbitMQ: the routing key (the queue name on the default exchange). Kafka: unused, empty.
  std::string routing_key{};
  /// The biz-id (1 byte or more, any bytes): sent in the biz-id header; Kafka's record key, so
  /// one biz-id stays on one partition.
  std::string key{};
  std::string payload{};
  /// Extra headers, sent as they are.
  std::vector<std::pair<std::string, std::string>> headers{};
};

/// @brief A row of the outbox as the relay reads it: the message, its InnerMsgId (assigned
/// once, at insert) and its place in the table.
struct OutboxRow {
  std::int64_t seq = 0;  ///< insert order (the table's primary key)
  InnerMsgId inner_id{};
  OutboxMessage message{};
  std::int64_t created_ms = 0;  ///< Unix ms of the insert (the database's clock)
};

namespace detail {
/// Headers as one blob: for each, a 4-byte big-endian name length, the name, a 4-byte value
/// length, the value. Empty list: empty blob.
std::string encode_outbox_headers(const std::vector<std::pair<std::string, std::string>>& headers);
/// @throws idem::Error for a blob encode_outbox_headers() did not write.
std::vector<std::pair<std::string, std::string>> decode_outbox_headers(std::string_view blob);
/// @throws idem::InvalidMessage for an empty key.
void validate_outbox_message(const OutboxMessage& message);
/// @throws idem::ConfigError unless name is 1..63 characters of [A-Za-z0-9_], not starting
/// with a digit (what is accepted as an outbox table or schema name).
void validate_outbox_identifier(std::string_view what, std::string_view name);
}  // namespace detail

}  // namespace idem
