// Deleting expired records in bounded steps: the oldest first through the expires_at index,
// one purger at a time across every instance on the schema (an advisory lock).

#include "store_impl.hpp"

namespace idem {

using detail::pg::Params;
using detail::pg::ResultPtr;
using detail::pg::Sql;
using detail::pg::Statement;

void PostgresStore::Impl::maybe_purge(detail::pg::Connection& conn) noexcept {
  if (options.purge_interval.count() <= 0) return;
  const std::int64_t now = detail::pg::Clock::now().time_since_epoch().count();
  std::int64_t due = next_purge_ns.load(std::memory_order_relaxed);
  if (now < due) return;
  const std::int64_t interval =
      std::chrono::duration_cast<detail::pg::Clock::duration>(options.purge_interval).count();
  if (!next_purge_ns.compare_exchange_strong(due, now + interval)) return;  // another thread
  try {
    Params params;
    params.int8(static_cast<std::int64_t>(std::min<std::size_t>(options.purge_batch, INT64_MAX)))
        .text(statements.schema_name());
    ResultPtr result = conn.run(Statement::of(statements, Sql::purge_gated), params,
                                "purging expired records", conn.idem_deadline());
    if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) {
      if (detail::pg::unavailable_state(conn.get(), detail::pg::sqlstate_of(result.get()))) {
        conn.mark_broken();
      }
      return;
    }
    // A full batch: more are probably waiting. The next write purges again, so the purge keeps
    // up with any traffic instead of deleting purge_batch per interval at most.
    if (detail::pg::affected_rows(result.get()) >=
        static_cast<std::int64_t>(std::min<std::size_t>(options.purge_batch, INT64_MAX))) {
      next_purge_ns.store(now, std::memory_order_relaxed);
    }
  } catch (...) {  // NOLINT(bugprone-empty-catch): the write succeeded; the next step retries
  }
}

std::size_t PostgresStore::do_purge_expired(std::size_t max_records) {
  if (max_records == 0) return 0;
  detail::pg::Lease conn = impl_->pool.acquire();
  Params lock;
  lock.text(impl_->statements.schema_name());
  ResultPtr locked = conn->run_ok(Sql::purge_lock, lock, "taking the purge lock");
  if (!detail::pg::get_bool(locked.get(), 0, 0)) return 0;  // another instance purges now
  std::size_t total = 0;
  try {
    while (total < max_records) {
      const std::size_t step = std::min(impl_->options.purge_batch, max_records - total);
      Params params;
      params.int8(static_cast<std::int64_t>(std::min<std::size_t>(step, INT64_MAX)));
      ResultPtr result = conn->run_ok(Sql::purge_step, params, "purging expired records");
      const auto deleted = static_cast<std::size_t>(detail::pg::affected_rows(result.get()));
      total += deleted;
      if (deleted < step) break;  // nothing more expired (or the rest is held right now)
    }
  } catch (...) {
    conn->mark_broken();  // closing the session releases its advisory lock
    throw;
  }
  try {
    (void)conn->run_ok(Sql::purge_unlock, lock, "releasing the purge lock");
  } catch (...) {
    conn->mark_broken();
    throw;
  }
  return total;
}

}  // namespace idem
