#pragma once
/// @file
/// @brief The vocabulary between IdempotentConsumer and a DedupStore: claim requests,
/// claims, completions and fencing tokens.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "idem/fingerprint.hpp"

namespace idem {

/// @brief Identifies one ownership of a key. Strictly increases each time a key is claimed
/// again (after a release or a lease takeover), so a downstream system can refuse writes
/// from a stale holder: remember the highest token seen per key and reject lower ones.
struct FencingToken {
  std::uint64_t value = 0;
  friend auto operator<=>(const FencingToken&, const FencingToken&) = default;
};

/// @brief One attempt to take ownership of a key.
struct ClaimRequest {
  std::string_view key{};
  /// Payload digest; empty when payload verification is off.
  Fingerprint fingerprint{};
  /// Life of the in-progress claim.
  std::chrono::milliseconds lease{std::chrono::seconds{30}};
  /// Life of the done record (used at once when mark_done is set).
  std::chrono::milliseconds retention{std::chrono::hours{24}};
  /// Keys longer than this are rejected with idem::InvalidMessage.
  std::size_t max_key_bytes = 512;
  /// Record the key as done immediately (Mark::before_processing).
  bool mark_done = false;
};

/// @brief What the store found for a key.
enum class ClaimStatus {
  acquired,     ///< the caller owns the key now (token is set)
  done,         ///< the key was processed before (response may be set)
  in_progress,  ///< another holder's lease is live
  conflict,     ///< the key is done or held with a different payload fingerprint
};

/// @brief The answer to a ClaimRequest.
struct Claim {
  ClaimStatus status = ClaimStatus::in_progress;
  /// The fencing token of the new ownership (acquired only).
  std::uint64_t token = 0;
  /// The previous holder's lease had expired and was taken over (acquired only).
  bool took_over = false;
  /// The stored response of a done key.
  std::optional<std::string> response{};
};

/// @brief Marks a claimed key as done.
struct Completion {
  std::string_view key{};
  std::uint64_t token = 0;
  /// Stored and replayed to duplicates when set.
  std::optional<std::string_view> response{};
  std::chrono::milliseconds retention{std::chrono::hours{24}};
};

}  // namespace idem
