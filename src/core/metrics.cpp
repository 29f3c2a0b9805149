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
