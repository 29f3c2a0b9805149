#pragma once
/// @file
/// @brief idem::Message, a non-owning view of one delivery.

#include <string_view>

namespace idem {

/// @brief A non-owning view of one delivery. The viewed bytes must outlive the consume() call.
struct Message {
  /// The biz-id (payment id, order id): 1..max_key_bytes arbitrary bytes, NUL included.
  std::string_view key{};
  /// The body; fingerprinted when Options::verify_payload is on.
  std::string_view payload{};
  /// The InnerMsgId text stamped by the producer; may be empty.
  std::string_view inner_id{};
};

}  // namespace idem
