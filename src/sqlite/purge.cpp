// Purging expired records: a bounded sweep along the primary key (no index on expiry).

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "store_impl.hpp"

namespace idem {

// Examines the next `limit` records in key order from where the previous step stopped
// (wrapping at the end) and deletes the expired ones, at most max_delete: done past
// retention, released, or in progress past the lease. One scan; only the expired keys are
// copied out, and deleted once the scan is done.
std::size_t SqliteStore::Impl::purge_step(std::int64_t now, std::size_t limit,
                                          std::size_t max_delete) {
  if (limit == 0 || max_delete == 0) return 0;
  std::vector<std::string> expired;  // in key order
  std::int64_t max_token = 0;
  std::string last;  // the last key examined
  std::size_t examined = 0;
  {
    Step step(conn, sweep.get(), "purging expired records");
    step.blob(1, sweep_cursor)
        .i64(2, static_cast<std::int64_t>(std::min<std::size_t>(limit, INT64_MAX)));
    while (expired.size() < max_delete && step.row()) {
      ++examined;
      const std::string_view key = step.column_blob(0);
      if (step.column_int64(1) == detail::sqlite::kReleased || step.column_int64(2) <= now) {
        expired.emplace_back(key);
        max_token = std::max(max_token, step.column_int64(3));
      }
      last.assign(key);
    }
  }
  for (const std::string& key : expired) {
    Step(conn, erase.get(), "purging expired records").blob(1, key).run();
  }
  const std::size_t deleted = expired.size();
  if (deleted > 0) raise_floor(max_token);
  if (deleted > 0 && deleted == max_delete) {
    sweep_cursor = std::move(expired.back());  // stopped early: resume right there
  } else if (examined == limit) {
    sweep_cursor = std::move(last);
    sweep_cursor.push_back('\0');  // the smallest key after the last one examined
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

std::size_t SqliteStore::do_purge_expired(std::size_t max_records) {
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
