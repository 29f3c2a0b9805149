// Purging expired records: a bounded sweep along the primary key (no index on expiry).

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "store_impl.hpp"

namespace idem {

// Examines the next `limit` records in key order from where the previous step stopped
// (wrapping at the end) and deletes the expired ones, at most max_delete: done past
// retention, released, or in progress past the lease. Both scans run inside SQLite; only
// the deleted rows come back.
std::size_t SqliteStore::Impl::purge_step(std::int64_t now, std::size_t limit,
                                          std::size_t max_delete) {
  const auto as_int = [](std::size_t n) {
    return static_cast<std::int64_t>(std::min<std::size_t>(n, INT64_MAX));
  };
  std::optional<std::string> end;  // first key after the slice; none: the slice ends the table
  {
    Step step(conn, sweep_end.get(), "purging expired records");
    step.blob(1, sweep_cursor).i64(2, as_int(limit));
    if (step.row()) end = std::string(step.column_blob(0));
  }
  std::vector<std::string> expired;  // in key order
  std::int64_t max_token = 0;
  {
    Step step(conn, end ? sweep_expired_range.get() : sweep_expired_tail.get(),
              "purging expired records");
    step.blob(1, sweep_cursor).i64(2, now).i64(3, as_int(max_delete));
    if (end) step.blob(4, *end);
    while (step.row()) {
      expired.emplace_back(step.column_blob(0));
      max_token = std::max(max_token, step.column_int64(1));
    }
  }
  for (const std::string& key : expired) {
    Step(conn, erase.get(), "purging expired records").blob(1, key).run();
  }
  const std::size_t deleted = expired.size();
  if (deleted > 0) raise_floor(max_token);
  if (deleted > 0 && deleted == max_delete) {
    sweep_cursor = std::move(expired.back());  // stopped early: resume right there
  } else if (end) {
    sweep_cursor = std::move(*end);
  } else {
    sweep_cursor.clear();  // reached the end: the next step starts over
  }
  return deleted;
}

// Bounded work per write transaction: a slice of purge_extra + 2 * (records inserted since
// the last step) rows. Sweeping twice as fast as records arrive, a full pass takes about
// two thirds of the retention, so an expired record goes within that time after expiring.
void SqliteStore::Impl::maybe_purge(std::int64_t now) {
  constexpr std::size_t kPurgeNowAfter = 64;  // inserted records: batches purge every time
  if (options.purge_interval == 0) return;
  if (++writes % options.purge_interval != 0 && inserted < kPurgeNowAfter) return;
  purge_step(now, options.purge_extra + 2 * inserted);
  inserted = 0;
}

std::size_t SqliteStore::purge_expired(std::size_t max_records) {
  // One pass over the whole table, 1000 records per transaction so each write lock is short.
  constexpr std::size_t kChunk = 1000;
  std::size_t total = 0;
  bool first = true;
  while (total < max_records) {
    Lock lock(*impl_);
    if (first) impl_->sweep_cursor.clear();
    first = false;
    const std::int64_t now = impl_->clock->now_ms();
    Impl::WriteTx tx(*impl_, now);
    total += impl_->purge_step(now, kChunk, max_records - total);
    tx.commit(/*housekeeping=*/false);
    if (impl_->sweep_cursor.empty()) break;  // reached the end of the table
  }
  return total;
}

}  // namespace idem
