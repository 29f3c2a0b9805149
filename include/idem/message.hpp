#pragma once
/// @file
/// @brief idem::Message, a non-owning view of one delivery, and idem::MessageSource, where it
/// came from.

#include <cstdint>
#include <string_view>

namespace idem {

/// @brief Where a delivery came from, as the adapter that received it knows it. Fields a
/// transport does not have keep their defaults. Views are valid as long as the Message.
struct MessageSource {
  /// Kafka: the record's topic, partition and offset (-1: not from Kafka).
  std::string_view topic{};
  std::int32_t partition = -1;
  std::int64_t offset = -1;
  /// RabbitMQ: the delivery tag, the broker's redelivered flag, the exchange and routing key
  /// the message was published with.
  std::uint64_t delivery_tag = 0;
  bool redelivered = false;
  std::string_view exchange{};
  std::string_view routing_key{};
};

/// @brief A non-owning view of one delivery. The viewed bytes must outlive the consume() call.
struct Message {
  /// The biz-id (payment id, order id): 1..max_key_bytes arbitrary bytes, NUL included.
  std::string_view key{};
  /// The body; fingerprinted when Options::verify_payload is on.
  std::string_view payload{};
  /// The InnerMsgId text stamped by the producer; may be empty.
  std::string_view inner_id{};
  /// Where the adapter received it; empty when the application built the Message itself.
  MessageSource source{};
};

}  // namespace idem
