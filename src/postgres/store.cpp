// PostgresStore: construction, the DedupStore operations (claim with a lease, complete,
// release, ...), PostgresRows, and the helpers shared with the transactional inbox.

#include <algorithm>
#include <charconv>
#include <thread>
#include <unordered_map>

#include "inbox.hpp"
#include "store_impl.hpp"

namespace idem {
namespace detail::pg {
namespace {

constexpr std::int16_t kInProgress = 0;
constexpr std::int16_t kDone = 1;
// A claim whose key another transaction keeps changing is tried again this often.
constexpr int kMaxClaimAttempts = 16;

// The payload fingerprint as one bigint: the low half of the XXH3-128 digest (as SqliteStore
// and MemoryStore; a false "same payload" needs a 2^-64 collision). NULL: not fingerprinted.
struct CompactFingerprint {
  std::int64_t value = 0;
  bool present = false;

  explicit CompactFingerprint(const Fingerprint& fp) noexcept : present(!fp.empty()) {
    // 0 is a valid low half; map it to 1 so it never reads as "unchecked".
    value = static_cast<std::int64_t>(fp.low != 0 ? fp.low : 1);
  }
  bool compatible_with(bool stored_present, std::int64_t stored) const noexcept {
    return !present || !stored_present || stored == value;
  }
};

std::string ms_text(std::chrono::milliseconds value) {
  return std::to_string(value.count()) + " ms";
}

}  // namespace

std::string ms_setting(std::chrono::milliseconds value) {
  return value.count() <= 0 ? "0" : std::to_string(value.count()) + "ms";
}

namespace {
// [A-Za-z_][A-Za-z0-9_]{0,62}, not pg_...: safe to quote into SQL, within NAMEDATALEN.
bool valid_schema(std::string_view name) {
  auto letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; };
  if (name.empty() || name.size() > 63 || !letter(name.front())) return false;
  for (char c : name) {
    if (!letter(c) && !(c >= '0' && c <= '9')) return false;
  }
  return name.rfind("pg_", 0) != 0;
}
}  // namespace

PostgresOptions checked(PostgresOptions options) {
  const std::string who = "postgres store: ";
  if (!valid_schema(options.schema)) {
    throw ConfigError(who + "PostgresOptions::schema \"" + options.schema.substr(0, 100) +
                      "\" is not a schema name idem accepts: use 1 to 63 letters, digits and "
                      "underscores, not starting with a digit nor with pg_ (e.g. \"idem\")");
  }
  if (options.pool_size == 0) {
    throw ConfigError(who +
                      "PostgresOptions::pool_size is 0; use at least 1 (one connection "
                      "per thread using the store at a time)");
  }
  if (options.connect_timeout.count() <= 0) {
    throw ConfigError(who + "PostgresOptions::connect_timeout is " +
                      ms_text(options.connect_timeout) + "; use a positive duration");
  }
  if (options.statement_timeout.count() < 0) {
    throw ConfigError(who + "PostgresOptions::statement_timeout is " +
                      ms_text(options.statement_timeout) + "; use 0 (no limit) or more");
  }
  if (options.lock_wait.count() <= 0) {
    throw ConfigError(who + "PostgresOptions::lock_wait is " + ms_text(options.lock_wait) +
                      "; use a positive duration (how long a second worker waits for a key "
                      "held by an open transaction before answering in_progress)");
  }
  if (options.reconnect_backoff.count() < 0) {
    throw ConfigError(who + "PostgresOptions::reconnect_backoff is " +
                      ms_text(options.reconnect_backoff) + "; use 0 or more");
  }
  if (options.purge_batch == 0) {
    throw ConfigError(who + "PostgresOptions::purge_batch is 0; use at least 1");
  }
  if (options.purge_interval.count() < 0) {
    throw ConfigError(who + "PostgresOptions::purge_interval is " +
                      ms_text(options.purge_interval) + "; use 0 (no automatic purge) or more");
  }
  return options;
}

Params claim_params(std::span<const ClaimRequest* const> requests, bool inbox) {
  if (requests.size() == 1) {
    const ClaimRequest& request = *requests.front();
    const bool done = inbox || request.mark_done;
    const CompactFingerprint fp(request.fingerprint);
    Params params;
    params.bytea(request.key)
        .int2(done ? kDone : kInProgress)
        .int8((done ? request.retention : request.lease).count());
    if (fp.present) {
      params.int8(fp.value);
    } else {
      params.null(kInt8);
    }
    return params;
  }
  ArrayWriter keys(kBytea), states(kInt2), spans(kInt8), fingerprints(kInt8);
  for (const ClaimRequest* request : requests) {
    const bool done = inbox || request->mark_done;
    keys.bytes(request->key);
    states.int2(done ? kDone : kInProgress);
    spans.int8((done ? request->retention : request->lease).count());
    const CompactFingerprint fp(request->fingerprint);
    if (fp.present) {
      fingerprints.int8(fp.value);
    } else {
      fingerprints.null();
    }
  }
  Params params;
  params.array(kByteaArray, keys.finish())
      .array(kInt2Array, states.finish())
      .array(kInt8Array, spans.finish())
      .array(kInt8Array, fingerprints.finish());
  return params;
}

Sql claim_sql(std::span<const ClaimRequest* const> requests) {
  return requests.size() == 1 ? Sql::claim_one : Sql::claim;
}

std::vector<ClaimAnswer> read_claims(const Connection& conn, const PGresult* result,
                                     std::span<const ClaimRequest* const> requests) {
  const int rows = PQntuples(result);
  if (rows != static_cast<int>(requests.size()) || PQnfields(result) != 7) {
    throw_unavailable(conn.target(), "claiming",
                      "the claim statement answered " + std::to_string(rows) + " rows for " +
                          std::to_string(requests.size()) + " keys (a store bug)",
                      "");
  }
  std::vector<ClaimAnswer> answers(requests.size());
  for (int row = 0; row < rows; ++row) {
    const std::int64_t ord = get_int8(result, row, 0);
    if (ord < 1 || ord > rows) {
      throw_unavailable(conn.target(), "claiming", "a claim row out of range (a store bug)", "");
    }
    const ClaimRequest& request = *requests[static_cast<std::size_t>(ord - 1)];
    ClaimAnswer& answer = answers[static_cast<std::size_t>(ord - 1)];
    const std::int16_t kind = get_int2(result, row, 1);
    const auto token = static_cast<std::uint64_t>(get_int8(result, row, 2));
    const std::int16_t old_state = get_int2(result, row, 3);
    const bool live = get_bool(result, row, 4);
    // Field by field: assigning whole Claim temporaries trips GCC 12's -Wmaybe-uninitialized.
    Claim& claim = answer.claim;
    switch (kind) {
      case 0:  // a new record
        claim.status = ClaimStatus::acquired;
        claim.token = token;
        answer.fresh = true;
        break;
      case 1:  // took over an expired one
        claim.status = ClaimStatus::acquired;
        claim.token = token;
        claim.took_over = old_state == kInProgress;
        break;
      case 2: {
        if (!live) {  // expired in our snapshot, yet another transaction changed it since
          answer.raced = true;
          break;
        }
        const CompactFingerprint fp(request.fingerprint);
        const bool stored = !is_null(result, row, 5);
        if (!fp.compatible_with(stored, stored ? get_int8(result, row, 5) : 0)) {
          claim.status = ClaimStatus::conflict;
        } else if (old_state == kInProgress) {
          claim.status = ClaimStatus::in_progress;
        } else {
          claim.status = ClaimStatus::done;
          if (!is_null(result, row, 6)) claim.response.emplace(get_bytes(result, row, 6));
        }
        break;
      }
      default:  // committed by another transaction after our snapshot
        answer.raced = true;
    }
  }
  return answers;
}

bool contended(const PGresult* result) {
  const std::string state = sqlstate_of(result);
  return state == "55P03" || state == "40P01";
}

std::vector<std::vector<std::size_t>> rounds_of_distinct_keys(
    std::span<const std::string_view> keys) {
  std::vector<std::vector<std::size_t>> rounds;
  std::unordered_map<std::string_view, std::size_t> seen;
  seen.reserve(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const std::size_t round = seen[keys[i]]++;
    if (round == rounds.size()) rounds.emplace_back();
    rounds[round].push_back(i);
  }
  return rounds;
}

}  // namespace detail::pg

using detail::pg::ArrayWriter;
using detail::pg::Connection;
using detail::pg::Params;
using detail::pg::ResultPtr;
using detail::pg::Sql;
using detail::pg::Statement;

// --- Construction ----------------------------------------------------------------------------

PostgresStore::Impl::Impl(PostgresOptions opts)
    : options(detail::pg::checked(std::move(opts))),
      statements(options.schema),
      settings{
          options.conninfo,        detail::pg::describe_target(options.conninfo, options.schema),
          options.connect_timeout, options.statement_timeout,
          options.lock_wait,       &statements},
      pool(settings, options.pool_size, options.reconnect_backoff),
      next_purge_ns(0),
      listener(settings, options.reconnect_backoff, wait_counters) {
  std::unique_ptr<Connection> conn = Connection::open(settings);
  detail::pg::ensure_schema(*conn);
  conn->prepare_statements();
  pool.adopt(std::move(conn));
  // The first automatic purge step is one interval after the store is ready (creating the
  // tables may have waited for another instance).
  next_purge_ns.store(
      (detail::pg::Clock::now() + options.purge_interval).time_since_epoch().count(),
      std::memory_order_relaxed);
}

PostgresStore::PostgresStore(PostgresOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

PostgresStore::~PostgresStore() = default;

const PostgresOptions& PostgresStore::options() const noexcept {
  return impl_->options;
}

// --- Claims ----------------------------------------------------------------------------------

namespace {

// Claims requests[i] for the given indexes (distinct keys) in one statement, again for keys
// another transaction changed meanwhile, and one by one when the statement found a key held
// by an open transaction (each of those then waits up to lock_wait, then is in_progress).
void claim_distinct(Connection& conn, std::span<const ClaimRequest> requests,
                    std::vector<std::size_t> indexes, std::vector<Claim>& claims) {
  for (int attempt = 0; !indexes.empty(); ++attempt) {
    if (attempt == detail::pg::kMaxClaimAttempts) {
      detail::pg::throw_unavailable(conn.target(), "claiming",
                                    "other transactions kept changing the key's record", "");
    }
    std::vector<const ClaimRequest*> batch;
    batch.reserve(indexes.size());
    for (std::size_t i : indexes) batch.push_back(&requests[i]);
    ResultPtr result = conn.run(Statement::of(conn.statements(), detail::pg::claim_sql(batch)),
                                detail::pg::claim_params(batch, /*inbox=*/false), "claiming",
                                conn.idem_deadline());
    if (PQresultStatus(result.get()) != PGRES_TUPLES_OK) {
      if (detail::pg::contended(result.get())) {
        if (indexes.size() == 1) {
          claims[indexes.front()] = Claim{.status = ClaimStatus::in_progress};
          return;
        }
        for (std::size_t i : indexes) claim_distinct(conn, requests, {i}, claims);
        return;
      }
      if (detail::pg::unavailable_state(conn.get(), detail::pg::sqlstate_of(result.get()))) {
        conn.mark_broken();
      }
      detail::pg::throw_idem_error(conn.target(), "claiming", conn.get(), result.get());
    }
    std::vector<detail::pg::ClaimAnswer> answers =
        detail::pg::read_claims(conn, result.get(), batch);
    std::vector<std::size_t> raced;
    for (std::size_t k = 0; k < answers.size(); ++k) {
      if (answers[k].raced) {
        raced.push_back(indexes[k]);
      } else {
        claims[indexes[k]] = std::move(answers[k].claim);
      }
    }
    indexes = std::move(raced);
  }
}

std::vector<std::string_view> keys_of(std::span<const ClaimRequest> requests) {
  std::vector<std::string_view> keys;
  keys.reserve(requests.size());
  for (const ClaimRequest& request : requests) keys.push_back(request.key);
  return keys;
}

}  // namespace

Claim PostgresStore::do_claim(const ClaimRequest& request) {
  return do_claim_batch(std::span<const ClaimRequest>(&request, 1)).front();
}

std::vector<Claim> PostgresStore::do_claim_batch(std::span<const ClaimRequest> requests) {
  std::vector<Claim> claims(requests.size());
  if (requests.empty()) return claims;
  detail::pg::Lease conn = impl_->pool.acquire();
  // A key repeated in the batch is claimed in a later statement, so it sees the first claim.
  const std::vector<std::string_view> keys = keys_of(requests);
  for (std::vector<std::size_t>& round : detail::pg::rounds_of_distinct_keys(keys)) {
    claim_distinct(*conn, requests, std::move(round), claims);
  }
  impl_->maybe_purge(*conn);
  return claims;
}

// --- Completions -----------------------------------------------------------------------------

namespace {

void complete_distinct(Connection& conn, std::span<const Completion> completions,
                       const std::vector<std::size_t>& indexes, std::vector<bool>& done) {
  ArrayWriter keys(detail::pg::kBytea), tokens(detail::pg::kInt8), spans(detail::pg::kInt8),
      responses(detail::pg::kBytea), hashes(detail::pg::kInt8);
  for (std::size_t i : indexes) {
    const Completion& c = completions[i];
    keys.bytes(c.key);
    hashes.int8(conn.statements().wait_hash(c.key));
    tokens.int8(static_cast<std::int64_t>(c.token));
    spans.int8(std::clamp(c.retention, std::chrono::milliseconds{1}, kMaxDuration).count());
    if (c.response) {
      responses.bytes(*c.response);
    } else {
      responses.null();
    }
  }
  Params params;
  params.array(detail::pg::kByteaArray, keys.finish())
      .array(detail::pg::kInt8Array, tokens.finish())
      .array(detail::pg::kInt8Array, spans.finish())
      .array(detail::pg::kByteaArray, responses.finish())
      .array(detail::pg::kInt8Array, hashes.finish());
  ResultPtr result = conn.run(Statement::of(conn.statements(), Sql::complete), params,
                              "recording the key as done", conn.idem_deadline());
  if (PQresultStatus(result.get()) != PGRES_TUPLES_OK) {
    if (detail::pg::contended(result.get())) {
      // Another transaction holds a key's record: it took the key over after this claim's
      // lease ended. One by one, so only those keys answer "no longer owned".
      if (indexes.size() == 1) {
        done[indexes.front()] = false;
        return;
      }
      for (std::size_t i : indexes) complete_distinct(conn, completions, {i}, done);
      return;
    }
    if (detail::pg::unavailable_state(conn.get(), detail::pg::sqlstate_of(result.get()))) {
      conn.mark_broken();
    }
    detail::pg::throw_idem_error(conn.target(), "recording the key as done", conn.get(),
                                 result.get());
  }
  const int rows = PQntuples(result.get());
  for (int row = 0; row < rows; ++row) {
    const std::int64_t ord = detail::pg::get_int8(result.get(), row, 0);
    if (ord >= 1 && ord <= static_cast<std::int64_t>(indexes.size())) {
      done[indexes[static_cast<std::size_t>(ord - 1)]] = detail::pg::get_bool(result.get(), row, 1);
    }
  }
}

}  // namespace

bool PostgresStore::do_complete(const Completion& completion) {
  return do_complete_batch(std::span<const Completion>(&completion, 1)).front();
}

std::vector<bool> PostgresStore::do_complete_batch(std::span<const Completion> completions) {
  std::vector<bool> done(completions.size(), false);
  if (completions.empty()) return done;
  std::vector<std::string_view> keys;
  keys.reserve(completions.size());
  for (const Completion& c : completions) keys.push_back(c.key);
  detail::pg::Lease conn = impl_->pool.acquire();
  for (const std::vector<std::size_t>& round : detail::pg::rounds_of_distinct_keys(keys)) {
    complete_distinct(*conn, completions, round, done);
  }
  impl_->maybe_purge(*conn);
  return done;
}

bool PostgresStore::do_release(std::string_view key, std::uint64_t token) {
  detail::pg::Lease conn = impl_->pool.acquire();
  Params params;
  params.bytea(key).int8(static_cast<std::int64_t>(token)).int8(impl_->statements.wait_hash(key));
  ResultPtr result = conn->run(Statement::of(impl_->statements, Sql::release), params,
                               "releasing the claim", conn->idem_deadline());
  if (PQresultStatus(result.get()) != PGRES_TUPLES_OK) {
    // Held by another transaction: that one took the key over, so this token lost it.
    if (detail::pg::contended(result.get())) return false;
    if (detail::pg::unavailable_state(conn->get(), detail::pg::sqlstate_of(result.get()))) {
      conn->mark_broken();
    }
    detail::pg::throw_idem_error(conn->target(), "releasing the claim", conn->get(), result.get());
  }
  return PQntuples(result.get()) == 1;  // a row per deleted record
}

bool PostgresStore::do_forget(std::string_view key) {
  detail::pg::Lease conn = impl_->pool.acquire();
  Params params;
  params.bytea(key).int8(impl_->statements.wait_hash(key));
  ResultPtr result = conn->run_ok(Sql::forget, params, "forgetting the key");
  return PQntuples(result.get()) > 0;
}

// --- Waiting for a held key ------------------------------------------------------------------

bool PostgresStore::Impl::still_held(std::string_view key) {
  detail::pg::Lease conn = pool.acquire();
  Params params;
  params.bytea(key);
  ResultPtr result = conn->run(Statement::of(statements, Sql::held), params, "checking a held key",
                               conn->idem_deadline());
  if (PQresultStatus(result.get()) != PGRES_TUPLES_OK) {
    if (detail::pg::contended(result.get())) return true;
    if (detail::pg::unavailable_state(conn->get(), detail::pg::sqlstate_of(result.get()))) {
      conn->mark_broken();
    }
    detail::pg::throw_idem_error(conn->target(), "checking a held key", conn->get(), result.get());
  }
  return PQntuples(result.get()) == 1 && detail::pg::get_bool(result.get(), 0, 0);
}

void PostgresStore::do_await_change(std::string_view key, std::chrono::milliseconds max_wait) {
  using Listener = detail::pg::Listener;
  detail::pg::WaitCounters& counters = impl_->wait_counters;
  const auto deadline = detail::pg::Clock::now() + max_wait;
  Listener::Status status = Listener::Status::unavailable;
  {
    Listener::Waiter waiter(impl_->listener, impl_->statements.wait_hash(key));
    status = waiter.register_interest(deadline);
    if (status == Listener::Status::registered) {
      bool held = true;
      try {
        held = impl_->still_held(key);
      } catch (const Error&) {  // the caller's next call reports it
        counters.wait_fallbacks.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      if (!held) {
        counters.waits_settled.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      counters.waiting.fetch_add(1, std::memory_order_relaxed);
      status = waiter.await_notification(deadline);
      counters.waiting.fetch_sub(1, std::memory_order_relaxed);
      if (status == Listener::Status::notified) {
        counters.waits_woken.fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
  }
  if (status == Listener::Status::timed_out) {
    counters.waits_timed_out.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  // No connection (pause, as a store without notifications would), or it was lost meanwhile
  // (return: the caller asks again at once).
  counters.wait_fallbacks.fetch_add(1, std::memory_order_relaxed);
  if (status == Listener::Status::unavailable) std::this_thread::sleep_until(deadline);
}

PostgresStoreStats PostgresStore::counters() const {
  const detail::pg::WaitCounters& c = impl_->wait_counters;
  return PostgresStoreStats{
      .notifications = c.notifications.load(std::memory_order_relaxed),
      .waits_woken = c.waits_woken.load(std::memory_order_relaxed),
      .waits_settled = c.waits_settled.load(std::memory_order_relaxed),
      .waits_timed_out = c.waits_timed_out.load(std::memory_order_relaxed),
      .wait_fallbacks = c.wait_fallbacks.load(std::memory_order_relaxed),
      .waiting = c.waiting.load(std::memory_order_relaxed),
  };
}

// --- Operators -------------------------------------------------------------------------------

std::optional<RecordInfo> PostgresStore::do_inspect(std::string_view key) {
  detail::pg::Lease conn = impl_->pool.acquire();
  Params params;
  params.bytea(key);
  ResultPtr result = conn->run_ok(Sql::inspect, params, "reading the key's record");
  if (PQntuples(result.get()) == 0) return std::nullopt;
  RecordInfo info;
  info.state = detail::pg::get_int2(result.get(), 0, 0) == detail::pg::kInProgress
                   ? RecordInfo::State::in_progress
                   : RecordInfo::State::done;
  info.token = static_cast<std::uint64_t>(detail::pg::get_int8(result.get(), 0, 1));
  info.expires_in_ms = detail::pg::get_int8(result.get(), 0, 2);
  if (!detail::pg::is_null(result.get(), 0, 3)) {
    info.response = std::string(detail::pg::get_bytes(result.get(), 0, 3));
  }
  return info;
}

StoreStats PostgresStore::do_stats() {
  detail::pg::Lease conn = impl_->pool.acquire();
  ResultPtr result = conn->run_ok(Sql::stats, Params{}, "counting records");
  StoreStats stats;
  stats.records = static_cast<std::uint64_t>(detail::pg::get_int8(result.get(), 0, 0));
  stats.in_progress = static_cast<std::uint64_t>(detail::pg::get_int8(result.get(), 0, 1));
  stats.done = static_cast<std::uint64_t>(detail::pg::get_int8(result.get(), 0, 2));
  stats.bytes = static_cast<std::uint64_t>(detail::pg::get_int8(result.get(), 0, 3));
  return stats;
}

std::vector<PartitionOffset> PostgresStore::do_committed_offsets() {
  detail::pg::Lease conn = impl_->pool.acquire();
  ResultPtr result = conn->run_ok(Sql::offsets, Params{}, "reading the committed offsets");
  std::vector<PartitionOffset> offsets;
  for (int row = 0; row < PQntuples(result.get()); ++row) {
    offsets.push_back(PartitionOffset{
        .topic = std::string(detail::pg::get_bytes(result.get(), row, 0)),
        .partition = detail::pg::get_int4(result.get(), row, 1),
        .next_offset = detail::pg::get_int8(result.get(), row, 2),
    });
  }
  return offsets;
}

// --- PostgresRows ----------------------------------------------------------------------------

void PostgresRows::Clear::operator()(PGresult* result) const noexcept {
  PQclear(result);
}

PostgresRows::~PostgresRows() = default;

int PostgresRows::size() const noexcept {
  return result_ ? PQntuples(result_.get()) : 0;
}
int PostgresRows::columns() const noexcept {
  return result_ ? PQnfields(result_.get()) : 0;
}
bool PostgresRows::is_null(int row, int column) const noexcept {
  return !result_ || PQgetisnull(result_.get(), row, column) != 0;
}
std::string_view PostgresRows::text(int row, int column) const noexcept {
  if (!result_ || row < 0 || row >= size() || column < 0 || column >= columns()) return {};
  return {PQgetvalue(result_.get(), row, column),
          static_cast<std::size_t>(PQgetlength(result_.get(), row, column))};
}
std::int64_t PostgresRows::int64(int row, int column) const {
  const std::string_view value = text(row, column);
  std::int64_t n = 0;
  const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), n);
  if (value.empty() || error != std::errc{} || end != value.data() + value.size()) {
    throw PostgresError("postgres store: row " + std::to_string(row) + ", column " +
                            std::to_string(column) + " is \"" + std::string(value.substr(0, 40)) +
                            "\", not an integer",
                        "22P02");
  }
  return n;
}
std::int64_t PostgresRows::affected() const noexcept {
  return result_ ? detail::pg::affected_rows(result_.get()) : 0;
}

}  // namespace idem
