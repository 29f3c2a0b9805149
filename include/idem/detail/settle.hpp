#pragma once
// The Result of a claim the handler does not run for (done, in progress, conflict).

#include <optional>
#include <utility>

#include "idem/claim.hpp"
#include "idem/result.hpp"

namespace idem::detail {

// nullopt for an acquired claim: the caller runs the handler.
inline std::optional<Result> settled(Claim& claim) {
  switch (claim.status) {
    case ClaimStatus::done:
      return Result{.outcome = Outcome::duplicate, .response = std::move(claim.response)};
    case ClaimStatus::in_progress:
      return Result{.outcome = Outcome::in_progress};
    case ClaimStatus::conflict:
      return Result{.outcome = Outcome::conflict};
    case ClaimStatus::acquired:
      break;
  }
  return std::nullopt;
}

}  // namespace idem::detail
