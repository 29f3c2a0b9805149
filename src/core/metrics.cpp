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
    case Counter::retries:
      return "retries";
    case Counter::redeliveries:
      return "redeliveries";
    case Counter::dead_letters_conflict:
      return "dead_letters_conflict";
    case Counter::dead_letters_invalid:
      return "dead_letters_invalid";
    case Counter::dead_letters_missing_key:
      return "dead_letters_missing_key";
    case Counter::dead_letters_exhausted:
      return "dead_letters_exhausted";
    case Counter::dead_letter_failures:
      return "dead_letter_failures";
    case Counter::rebalances:
      return "rebalances";
    case Counter::commits:
      return "commits";
    case Counter::commit_failures:
      return "commit_failures";
    case Counter::reconnects:
      return "reconnects";
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
