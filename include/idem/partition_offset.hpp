#pragma once
/// @file
/// @brief idem::PartitionOffset: a position in a partitioned log (Kafka), one type for the
/// whole library: stores keep it in the inbox transaction, adapters seek to it.

#include <cstdint>
#include <string>

namespace idem {

/// @brief (topic, partition) -> the next offset to consume.
struct PartitionOffset {
  /// "No offset": an adapter falls back to the group's committed offset (librdkafka's
  /// RD_KAFKA_OFFSET_INVALID).
  static constexpr std::int64_t kUnset = -1001;

  std::string topic{};
  std::int32_t partition = 0;
  /// The offset of the next message to consume (Kafka's committed-offset convention).
  std::int64_t next_offset = kUnset;

  friend bool operator==(const PartitionOffset&, const PartitionOffset&) = default;
};

}  // namespace idem
