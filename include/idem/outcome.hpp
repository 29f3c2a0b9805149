#pragma once
/// @file
/// @brief idem::Outcome: what consume() did with a message, and whether to ack it.

#include <string_view>

namespace idem {

/// @brief What consume() did with one message.
enum class Outcome {
  processed,    ///< handler ran and succeeded; key recorded as done      -> ack
  duplicate,    ///< key already done; handler not run                     -> ack
  in_progress,  ///< another worker holds a live claim; handler not run    -> redeliver later
  conflict,     ///< key seen with a different payload; handler not run    -> dead-letter
  failed,       ///< handler threw; claim released so a redelivery retries -> nack / redeliver
};

/// @brief True for processed and duplicate only: the only outcomes that may be acked.
constexpr bool should_ack(Outcome outcome) noexcept {
  return outcome == Outcome::processed || outcome == Outcome::duplicate;
}

/// @brief The enumerator's name, e.g. "in_progress".
std::string_view to_string(Outcome outcome) noexcept;

}  // namespace idem
