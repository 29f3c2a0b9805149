#include "idem/metrics.hpp"

namespace idem {

std::string_view to_string(Counter counter) noexcept {
  switch (counter) {
    case Counter::processed:
      return "processed";
    case Counter::duplicate:
      return "duplicate";
    case Counter::in_progress:
      return "in_progress";
    case Counter::conflict:
      return "conflict";
    case Counter::failed:
      return "failed";
    case Counter::store_errors:
      return "store_errors";
    case Counter::lease_takeovers:
      return "lease_takeovers";
    case Counter::lease_lost:
      return "lease_lost";
    case Counter::cache_hits:
      return "cache_hits";
    case Counter::cache_misses:
      return "cache_misses";
  }
  return "unknown";
}

std::string_view to_string(Timing timing) noexcept {
  switch (timing) {
    case Timing::store_claim:
      return "store_claim";
    case Timing::store_complete:
      return "store_complete";
    case Timing::handler:
      return "handler";
  }
  return "unknown";
}

}  // namespace idem
