#include "idem/outcome.hpp"

namespace idem {

std::string_view to_string(Outcome outcome) noexcept {
  switch (outcome) {
    case Outcome::processed:
      return "processed";
    case Outcome::duplicate:
      return "duplicate";
    case Outcome::in_progress:
      return "in_progress";
    case Outcome::conflict:
      return "conflict";
    case Outcome::failed:
      return "failed";
  }
  return "unknown";
}

}  // namespace idem
