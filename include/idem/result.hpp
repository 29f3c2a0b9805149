#pragma once
/// @file
/// @brief idem::Result, what consume() returns.

#include <cstdint>
#include <exception>
#include <optional>
#include <string>

#include "idem/outcome.hpp"

namespace idem {

/// @brief The outcome of consuming one message.
struct Result {
  Outcome outcome = Outcome::failed;
  /// What the handler returned, if it returns something convertible to std::string;
  /// replayed from the store for Outcome::duplicate.
  std::optional<std::string> response{};
  /// The handler's exception, for Outcome::failed.
  std::exception_ptr error{};
  /// The fencing token the claim ran under (0 when the handler did not run).
  std::uint64_t fencing_token = 0;

  /// @brief Same as idem::should_ack(outcome).
  bool should_ack() const noexcept { return idem::should_ack(outcome); }
};

}  // namespace idem
