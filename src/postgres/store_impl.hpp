#pragma once
// PostgresStore's state, shared by the files of idem::postgres, and the helpers the
// DedupStore operations and the transactional inbox have in common.

#include <atomic>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "connection.hpp"
#include "idem/stores/postgres_store.hpp"
#include "listener.hpp"
#include "statements.hpp"

namespace idem::detail::pg {

/// Validates options. @throws idem::ConfigError saying which value to change.
PostgresOptions checked(PostgresOptions options);

/// Creates idem's schema and tables when missing; refuses foreign or newer ones.
/// @throws idem::ConfigError, idem::PostgresUnavailable
void ensure_schema(Connection& conn);

/// One request's answer from the claim statement.
struct ClaimAnswer {
  Claim claim{};
  bool fresh = false;  // the statement created the record
  bool raced = false;  // another transaction changed the key meanwhile: claim it again
};

/// The claim statement's parameters for distinct keys. inbox: the record is written done
/// with the retention (the handler's writes commit with it); else in progress with the lease,
/// or done at once for mark_done.
Params claim_params(std::span<const ClaimRequest* const> requests, bool inbox);
/// The claim statement for that many keys (Sql::claim_one for one, whose parameters
/// claim_params() then makes scalars).
Sql claim_sql(std::span<const ClaimRequest* const> requests);

/// Reads the claim statement's rows into one answer per request.
std::vector<ClaimAnswer> read_claims(const Connection& conn, const PGresult* result,
                                     std::span<const ClaimRequest* const> requests);

/// The statement gave up on a row lock (lock_timeout = lock_wait) or lost a deadlock: the key
/// is held by another open transaction.
bool contended(const PGresult* result);

/// Indexes grouped so that no key repeats within a group (first occurrences first).
std::vector<std::vector<std::size_t>> rounds_of_distinct_keys(
    std::span<const std::string_view> keys);

/// "123ms" (or "0" for no limit), for SET and set_config().
std::string ms_setting(std::chrono::milliseconds value);

}  // namespace idem::detail::pg

namespace idem {

struct PostgresStore::Impl {
  explicit Impl(PostgresOptions opts);
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  /// After a write: one bounded purge step when purge_interval has passed since the last one
  /// this store started, or at once again after a step that deleted a full purge_batch (on
  /// the caller's connection; errors are left for the next one).
  void maybe_purge(detail::pg::Connection& conn) noexcept;

  /// await_change's check, after the waiter registered: is the key's record still in progress
  /// with a live lease? FOR SHARE waits for a transaction changing the row and reads its
  /// result; a row another open transaction keeps past lock_wait (an inbox transaction)
  /// counts as held. @throws PostgresUnavailable
  bool still_held(std::string_view key);

  PostgresOptions options;
  detail::pg::Statements statements;
  detail::pg::Settings settings;
  detail::pg::Pool pool;
  std::atomic<std::int64_t> next_purge_ns;  // steady clock
  detail::pg::WaitCounters wait_counters;
  detail::pg::Listener listener;  // await_change's connection, opened on the first wait
};

}  // namespace idem
