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
    case Counter::outbox_published:
      return "outbox_published";
    case Counter::outbox_publish_failed:
      return "outbox_publish_failed";
    case Counter::outbox_purged:
      return "outbox_purged";
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
    case Timing::outbox_publish:
      return "outbox_publish";
  }
  return "unknown";
}

std::string_view to_string(Gauge gauge) noexcept {
  switch (gauge) {
    case Gauge::outbox_pending:
      return "outbox_pending";
    case Gauge::outbox_oldest_pending_seconds:
      return "outbox_oldest_pending_seconds";
  }
  return "unknown";
}

}  // namespace idem
