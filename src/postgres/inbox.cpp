// The transactional inbox: the dedup record is written done inside the transaction, the
// handler's statements follow in a savepoint, one COMMIT settles both. With deferral allowed,
// everything but the claims' answers and query() is sent in libpq pipeline mode and read at
// the next sync: a message whose handler writes with exec() costs no round trip of its own.

#include "inbox.hpp"

#include <algorithm>
#include <cctype>
#include <map>
#include <unordered_set>
#include <utility>

namespace idem {
namespace detail {
namespace {

constexpr int kMaxClaimAttempts = 16;

using pg::Origin;
using pg::Params;
using pg::Reply;
using pg::Sql;
using pg::Statement;

// Skips whitespace, empty statements (the server ignores a leading ";"), -- comments and
// (nested) /* */ comments.
std::string_view skip_blank(std::string_view sql) {
  for (;;) {
    std::size_t i = 0;
    while (i < sql.size() &&
           (std::isspace(static_cast<unsigned char>(sql[i])) != 0 || sql[i] == ';')) {
      ++i;
    }
    sql.remove_prefix(i);
    if (sql.rfind("--", 0) == 0) {
      const std::size_t end = sql.find('\n');
      sql.remove_prefix(end == std::string_view::npos ? sql.size() : end + 1);
    } else if (sql.rfind("/*", 0) == 0) {
      int depth = 0;
      std::size_t j = 0;
      while (j < sql.size()) {
        if (sql.compare(j, 2, "/*") == 0) {
          ++depth;
          j += 2;
        } else if (sql.compare(j, 2, "*/") == 0) {
          j += 2;
          if (--depth == 0) break;
        } else {
          ++j;
        }
      }
      sql.remove_prefix(j);
    } else {
      return sql;
    }
  }
}

// The next keyword, upper-cased, and the text after it.
std::string next_keyword(std::string_view& sql) {
  sql = skip_blank(sql);
  std::string word;
  std::size_t i = 0;
  while (i < sql.size() &&
         (std::isalnum(static_cast<unsigned char>(sql[i])) != 0 || sql[i] == '_')) {
    word.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(sql[i]))));
    ++i;
  }
  sql.remove_prefix(i);
  return word;
}

// Why a handler may not send sql through its PostgresTx, or null. The first keyword is read
// once (after blanks, comments and empty statements); each refusal needs at most two more.
const char* refusal_of(std::string_view sql) {
  const std::string first = next_keyword(sql);
  // Statements that would end idem's transaction or open another one; SAVEPOINT and
  // ROLLBACK TO SAVEPOINT of the handler's own are fine.
  constexpr const char* kEndsTransaction =
      "would end idem's transaction (or begin another): a handler must not COMMIT, ROLLBACK, "
      "BEGIN or RELEASE it, its writes commit together with the dedup record; SAVEPOINT and "
      "ROLLBACK TO SAVEPOINT of your own are fine";
  if (first == "COMMIT" || first == "END" || first == "ABORT" || first == "BEGIN" ||
      first == "START" || first == "RELEASE") {
    return kEndsTransaction;
  }
  if (first == "ROLLBACK") {
    std::string next = next_keyword(sql);
    if (next == "WORK" || next == "TRANSACTION") next = next_keyword(sql);
    return next != "TO" ? kEndsTransaction : nullptr;
  }
  if (first == "PREPARE") return next_keyword(sql) == "TRANSACTION" ? kEndsTransaction : nullptr;
  // Session-level settings (SET, SET SESSION, RESET) outlive idem's transaction: on a pooled
  // connection they would reach later messages' handlers and idem's own statements (whose
  // lock_timeout bounds a claim's wait). SET LOCAL and SET CONSTRAINTS end with it.
  constexpr const char* kSetsSession =
      "would change the session, which outlives idem's transaction: on a pooled connection it "
      "would reach later messages' handlers and idem's own statements; use SET LOCAL, which "
      "lasts until idem's commit";
  if (first == "RESET") return kSetsSession;
  if (first == "SET") {
    const std::string next = next_keyword(sql);
    if (next == "LOCAL" || next == "CONSTRAINTS") return nullptr;
    // SET TRANSACTION: READ ONLY would make idem's own writes later in the transaction fail,
    // and an isolation level or snapshot can no longer be set once statements ran.
    if (next == "TRANSACTION") {
      return "would change idem's transaction, which idem runs READ COMMITTED and read-write "
             "and needs so (its record is written in it); set what you need per statement, or "
             "use SET LOCAL for settings";
    }
    return kSetsSession;
  }
  // DEALLOCATE ALL drops idem's prepared statements along with the handler's own.
  if (first == "DEALLOCATE") {
    std::string next = next_keyword(sql);
    if (next == "PREPARE") next = next_keyword(sql);
    if (next == "ALL") {
      return "would drop idem's prepared statements along with yours: DEALLOCATE your own by "
             "name";
    }
  }
  return nullptr;
}

}  // namespace

PostgresSession::PostgresSession(PostgresStore::Impl& impl, pg::Lease lease, InboxMode mode,
                                 Kind kind)
    : impl_(impl),
      lease_(std::move(lease)),
      conn_(*lease_),
      tx_(*this),
      may_defer_(mode == InboxMode::optimistic),
      savepoints_(mode == InboxMode::careful),
      kind_(kind) {}

PostgresSession::~PostgresSession() {
  if (!open_) return;
  try {
    if (user_queued_) {
      // A handler's statement may still run: do not wait for it, drop the connection (the
      // server rolls the transaction back when it notices).
      conn_.mark_broken();
      return;
    }
    (void)conn_.drain(conn_.idem_deadline());
    conn_.leave_pipeline();
    if (PQtransactionStatus(conn_.get()) != PQTRANS_IDLE) {
      pg::ResultPtr result =
          conn_.run(Statement::text("ROLLBACK"), Params{}, "rolling back", conn_.idem_deadline());
      if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) conn_.mark_broken();
    }
  } catch (...) {
    conn_.mark_broken();  // closed instead of reused; the server rolls back
  }
}

// --- Plumbing --------------------------------------------------------------------------------

void PostgresSession::queue_text(std::string_view sql, std::string what) {
  conn_.queue(Statement::text(sql), Params{}, Origin::idem, std::move(what));
}

void PostgresSession::queue_idem(Sql which, const Params& params, std::string what) {
  conn_.queue(Statement::of(conn_.statements(), which), params, Origin::idem, std::move(what));
}

std::vector<Reply> PostgresSession::drain(std::size_t awaited) {
  const pg::Deadline deadline = user_queued_ ? pg::Deadline{} : conn_.idem_deadline();
  std::vector<Reply> replies = conn_.drain(deadline);
  user_queued_ = false;
  if (speculative_unread_) {
    speculative_unread_ = false;
    read_speculative_claim(replies[speculative_reply_]);
  }
  for (std::size_t i = 0; i < replies.size(); ++i) {
    const Reply& reply = replies[i];
    if (reply.ok() || reply.skipped()) continue;
    const bool deferred = reply.origin == Origin::user && i + awaited < replies.size();
    if (deferred) {
      const std::string state = pg::sqlstate_of(reply.result.get());
      if (pg::unavailable_state(conn_.get(), state)) {
        conn_.mark_broken();
        pg::throw_unavailable(conn_.target(),
                              "the handler's statement \"" + pg::shown(reply.what) + "\"",
                              pg::server_message(reply.result.get()), state);
      }
      deferred_failed_ = true;
      deferred_error_ = "statement \"" + pg::shown(reply.what) +
                        "\", sent pipelined by a handler, failed: " +
                        pg::scrub(pg::server_message(reply.result.get()), conn_.target()) +
                        " (SQLSTATE " + state + ")";
      refuse_if_deferred_failed();
    }
    break;  // the first failure decides; idem's are the caller's to report
  }
  return replies;
}

void PostgresSession::read_speculative_claim(const Reply& reply) {
  if (reply.ok()) {
    speculative_token_ = static_cast<std::uint64_t>(pg::get_int8(reply.result.get(), 0, 0));
    return;
  }
  const std::string state = pg::sqlstate_of(reply.result.get());
  if (pg::unavailable_state(conn_.get(), state)) fail_on(reply);
  // unique_violation (a record exists), lock_not_available (another transaction is writing
  // the key), or anything else: the careful rerun claims it properly and says what it is.
  speculation_missed_ = true;
  deferred_failed_ = true;
  deferred_error_ = "the speculative claim of the key was refused (" +
                    pg::scrub(pg::server_message(reply.result.get()), conn_.target()) +
                    ", SQLSTATE " + state + ")";
  refuse_if_deferred_failed();
}

void PostgresSession::refuse_if_deferred_failed() const {
  if (!deferred_failed_) return;
  if (speculation_missed_) {
    throw InboxRetryWithoutDeferral(
        conn_.target().label + ": " + deferred_error_ +
        ": the key is not new, so the transaction was rolled back with the handler's writes "
        "and the call runs again with the claim awaited");
  }
  throw InboxRetryWithoutDeferral(
      conn_.target().label + ": " + deferred_error_ +
      "; the transaction was rolled back and the batch runs again with every statement "
      "awaited, so the error reaches the handler that sent it");
}

void PostgresSession::fail_on(const Reply& reply) {
  if (pg::unavailable_state(conn_.get(), pg::sqlstate_of(reply.result.get()))) {
    conn_.mark_broken();
  }
  pg::throw_idem_error(conn_.target(), reply.what, conn_.get(), reply.result.get());
}

void PostgresSession::drain_ok() {
  for (const Reply& reply : drain()) {
    if (!reply.ok() && !reply.skipped()) fail_on(reply);
  }
}

void PostgresSession::use_idem_settings() {
  if (!user_settings_) return;
  Params params;
  params.text(pg::ms_setting(conn_.settings().lock_wait))
      .text(pg::ms_setting(conn_.settings().statement_timeout));
  conn_.queue(Statement::text("SELECT set_config('lock_timeout', $1, true), "
                              "set_config('statement_timeout', $2, true)"),
              params, Origin::idem, "setting idem's timeouts");
  user_settings_ = false;
}

void PostgresSession::use_user_settings() {
  if (user_settings_) return;
  // The handler's statements run with the session's own timeouts, not with idem's
  // statement_timeout nor with lock_wait as lock_timeout.
  Params params;
  params.text(conn_.user_lock_timeout()).text(conn_.user_statement_timeout());
  conn_.queue(Statement::text("SELECT set_config('lock_timeout', $1, true), "
                              "set_config('statement_timeout', $2, true)"),
              params, Origin::idem, "setting the handler's timeouts");
  user_settings_ = true;
}

void PostgresSession::open_pending_savepoint() {
  if (!savepoint_pending_) return;
  savepoint_pending_ = false;
  savepoint_open_ = true;
  queue_text("SAVEPOINT idem_message", "opening the message's savepoint");
}

// --- Transaction -----------------------------------------------------------------------------

void PostgresSession::begin() {
  if (may_defer_) conn_.enter_pipeline();
  queue_idem(Sql::begin, Params{}, "beginning a transaction");
  open_ = true;
  if (kind_ == Kind::work) use_user_settings();
  if (!conn_.pipelined()) drain_ok();
}

void PostgresSession::prepare(std::span<const ClaimRequest> requests) {
  prepared_base_ = requests.data();
  prepared_.assign(requests.size(), std::nullopt);
  // The first occurrence of every key in one statement; a repeat is claimed when its turn
  // comes, and then sees the first one's record.
  if (kind_ == Kind::inbox && may_defer_ && impl_.options.speculative_claims &&
      requests.size() == 1) {
    speculative_ = true;  // claimed by claim(), answered at the commit
    return;
  }
  std::vector<std::size_t> firsts;
  std::vector<const ClaimRequest*> group;
  std::unordered_set<std::string_view> seen;
  seen.reserve(requests.size());
  for (std::size_t i = 0; i < requests.size(); ++i) {
    if (seen.insert(requests[i].key).second) {
      firsts.push_back(i);
      group.push_back(&requests[i]);
    }
  }
  if (group.empty()) return;
  std::vector<std::optional<pg::ClaimAnswer>> answers;
  if (!claim_group(group, answers)) return;  // held keys: claimed one by one instead
  for (std::size_t k = 0; k < firsts.size(); ++k) prepared_[firsts[k]] = std::move(answers[k]);
}

bool PostgresSession::claim_group(std::span<const ClaimRequest* const> group,
                                  std::vector<std::optional<pg::ClaimAnswer>>& answers) {
  refuse_if_deferred_failed();
  // Inside a savepoint: a claim that gives up on a row lock (lock_timeout) aborts only it.
  use_idem_settings();
  queue_text("SAVEPOINT idem_claim", "opening the claim's savepoint");
  queue_idem(pg::claim_sql(group), pg::claim_params(group, /*inbox=*/true), "claiming the key");
  queue_text("RELEASE SAVEPOINT idem_claim", "closing the claim's savepoint");
  std::vector<Reply> replies = drain();
  const Reply& claimed = replies[replies.size() - 2];
  for (std::size_t i = 0; i + 2 < replies.size(); ++i) {
    if (!replies[i].ok()) fail_on(replies[i]);
  }
  if (!claimed.ok()) {
    if (!pg::contended(claimed.result.get())) fail_on(claimed);
    queue_text("ROLLBACK TO SAVEPOINT idem_claim", "rolling back the claim's savepoint");
    queue_text("RELEASE SAVEPOINT idem_claim", "closing the claim's savepoint");
    drain_ok();
    return false;
  }
  if (!replies.back().ok()) fail_on(replies.back());
  std::vector<pg::ClaimAnswer> read = pg::read_claims(conn_, claimed.result.get(), group);
  answers.clear();
  for (pg::ClaimAnswer& answer : read) {
    if (answer.raced) {
      answers.emplace_back();
    } else {
      answers.emplace_back(std::move(answer));
    }
  }
  return true;
}

Claim PostgresSession::claim(const ClaimRequest& request, bool& fresh) {
  fresh = false;
  if (prepared_base_ != nullptr && &request >= prepared_base_ &&
      &request < prepared_base_ + prepared_.size()) {
    std::optional<pg::ClaimAnswer>& prepared =
        prepared_[static_cast<std::size_t>(&request - prepared_base_)];
    if (prepared) {
      pg::ClaimAnswer answer = std::move(*prepared);
      prepared.reset();
      fresh = answer.fresh;
      return std::move(answer.claim);
    }
  }
  const ClaimRequest* one[] = {&request};
  if (speculative_) {
    // Not awaited: the handler runs now, its statements follow this INSERT in the pipeline,
    // and the server skips them all (COMMIT too) if the INSERT fails.
    speculative_reply_ = conn_.queued_count();
    Params params = pg::claim_params(one, /*inbox=*/true);
    params.text(conn_.user_lock_timeout()).text(conn_.user_statement_timeout());
    queue_idem(Sql::claim_new, params, "recording the key");
    speculative_unread_ = true;
    user_settings_ = true;  // the INSERT switched to them
    fresh = true;
    return Claim{.status = ClaimStatus::acquired};
  }
  for (int attempt = 0; attempt < kMaxClaimAttempts; ++attempt) {
    std::vector<std::optional<pg::ClaimAnswer>> answers;
    if (!claim_group(one, answers)) return Claim{.status = ClaimStatus::in_progress};
    if (answers.front()) {
      fresh = answers.front()->fresh;
      return std::move(answers.front()->claim);
    }
  }
  pg::throw_unavailable(conn_.target(), "claiming",
                        "other transactions kept changing the key's record", "");
}

void PostgresSession::begin_message() {
  refuse_if_deferred_failed();
  use_user_settings();
  awaited_error_ = false;
  savepoint_pending_ = savepoints_;
  savepoint_open_ = false;
  // A handler holding the raw connection may write without idem seeing it coming.
  if (native_taken_) {
    open_pending_savepoint();
    drain_ok();
  }
}

void PostgresSession::rollback() noexcept {
  if (!open_) return;
  open_ = false;
  try {
    // One round trip when pipelined; a handler's queued statements run first (bounded by
    // idem's deadline: past it the connection is dropped and the server rolls back).
    if (conn_.pipelined()) queue_text("ROLLBACK", "rolling back");
    (void)conn_.drain(conn_.idem_deadline());
    user_queued_ = false;
    conn_.leave_pipeline();
    if (PQtransactionStatus(conn_.get()) != PQTRANS_IDLE) {
      pg::ResultPtr result =
          conn_.run(Statement::text("ROLLBACK"), Params{}, "rolling back", conn_.idem_deadline());
      if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) conn_.mark_broken();
    }
  } catch (...) {
    conn_.mark_broken();  // closed instead of reused; the server rolls back
  }
}

void PostgresSession::release_message() {
  savepoint_pending_ = false;
  if (!savepoint_open_) return;
  savepoint_open_ = false;
  queue_text("RELEASE SAVEPOINT idem_message", "closing the message's savepoint");
}

void PostgresSession::rollback_message() {
  savepoint_pending_ = false;
  if (!savepoint_open_) return;
  savepoint_open_ = false;
  queue_text("ROLLBACK TO SAVEPOINT idem_message", "rolling back the failed handler's writes");
  queue_text("RELEASE SAVEPOINT idem_message", "closing the message's savepoint");
}

void PostgresSession::undo_claim(const ClaimRequest& request, std::uint64_t token, bool fresh) {
  // Fresh or taken over, the record goes: the next claim inserts a new one with a larger
  // token from the sequence, so the failed attempt's token is never handed out again.
  (void)fresh;
  Params params;
  params.bytea(request.key).int8(static_cast<std::int64_t>(token));
  queue_idem(Sql::undo, params, "dropping the failed message's record");
}

void PostgresSession::store_response(std::string_view key, std::string_view response) {
  Params params;
  params.bytea(key).bytea(response);
  queue_idem(Sql::response, params, "storing the handler's response");
}

void PostgresSession::save_offsets(std::span<const PartitionOffset> offsets) {
  if (offsets.empty()) return;
  // Last writer wins within the call, as row by row would (one statement cannot update a
  // row twice).
  std::map<std::pair<std::string_view, std::int32_t>, std::int64_t> last;
  for (const PartitionOffset& offset : offsets) {
    last[{offset.topic, offset.partition}] = offset.next_offset;
  }
  pg::ArrayWriter topics(pg::kText), partitions(pg::kInt4), nexts(pg::kInt8);
  for (const auto& [where, next] : last) {
    topics.bytes(where.first);
    partitions.int4(where.second);
    nexts.int8(next);
  }
  Params params;
  params.array(pg::kTextArray, topics.finish())
      .array(pg::kInt4Array, partitions.finish())
      .array(pg::kInt8Array, nexts.finish());
  queue_idem(Sql::save_offsets, params, "saving the offsets");
  if (!conn_.pipelined()) drain_ok();
}

void PostgresSession::save_offset(std::string_view topic, std::int32_t partition,
                                  std::int64_t next_offset) {
  const PartitionOffset offset{
      .topic = std::string(topic), .partition = partition, .next_offset = next_offset};
  save_offsets(std::span<const PartitionOffset>(&offset, 1));
}

void PostgresSession::commit() {
  if (deferred_failed_) refuse_if_deferred_failed();  // the destructor rolls back
  queue_text("COMMIT", "committing");
  std::vector<Reply> replies;
  try {
    replies = drain();
  } catch (const PostgresUnavailable&) {
    if (PQstatus(conn_.get()) != CONNECTION_BAD) throw;
    std::string error = PQerrorMessage(conn_.get());
    std::replace(error.begin(), error.end(), '\n', ' ');
    while (!error.empty() && error.back() == ' ') error.pop_back();
    throw PostgresUnavailable(
        conn_.target().label + ": the connection was lost while committing (" +
            pg::scrub(error, conn_.target()) +
            "), so whether the transaction committed is unknown: do not ack the messages; "
            "their redelivery finds them done if it did",
        "");
  }
  for (const Reply& reply : replies) {
    if (!reply.ok() && !reply.skipped()) fail_on(reply);
  }
  const PGresult* committed = replies.back().result.get();
  if (committed == nullptr ||
      std::string_view(PQcmdStatus(const_cast<PGresult*>(committed))) != "COMMIT") {
    pg::throw_unavailable(conn_.target(), "committing",
                          "PostgreSQL rolled the transaction back instead (a statement in it "
                          "had failed)",
                          "");
  }
  open_ = false;
  conn_.leave_pipeline();
  impl_.maybe_purge(conn_);
}

void PostgresSession::finish_work() {
  check_open("transaction() work");
  commit();
}

// --- Checks after the handler ----------------------------------------------------------------

void PostgresSession::check_status(std::string_view who, std::string_view error,
                                   bool after_failure) {
  const std::string label = conn_.target().label + ": ";
  const std::string failed = after_failure
                                 ? std::string(who) + " failed (" + std::string(error) + ") and "
                                 : std::string(who) + " returned, but ";
  switch (PQtransactionStatus(conn_.get())) {
    case PQTRANS_INTRANS:
      return;
    case PQTRANS_INERROR:
      // After a handler exception its savepoint's rollback repairs this.
      if (after_failure && savepoint_open_) return;
      throw PostgresUnavailable(
          label + failed +
              "one of its statements had failed and the handler caught the error: PostgreSQL "
              "aborted the transaction, so nothing of it can commit; nothing was recorded as "
              "done: do not ack; let such errors propagate (the message then fails alone), or "
              "wrap the statement in a SAVEPOINT of your own and ROLLBACK TO it",
          "25P02");
    case PQTRANS_IDLE:
      throw ConfigError(label + failed +
                        "the transaction was ended (COMMIT or ROLLBACK through "
                        "native_handle()): a handler must leave idem's transaction open, its "
                        "writes commit with the dedup record; use SAVEPOINTs of your own");
    case PQTRANS_ACTIVE:
      throw ConfigError(label + failed +
                        "a statement it sent through native_handle() is still running: read "
                        "all its results (PQgetResult until NULL) before returning");
    default:
      conn_.mark_broken();
      pg::throw_unavailable(
          conn_.target(), std::string(who),
          "the connection to the server was lost: " + std::string(PQerrorMessage(conn_.get())), "");
  }
}

void PostgresSession::check_open(std::string_view who) {
  refuse_if_deferred_failed();
  if (conn_.pipelined()) {
    // Without a round trip nothing is known; errors of deferred statements surface at the
    // commit. A statement the handler waited for failed: look now.
    if (!awaited_error_) return;
    drain_ok();
  } else {
    drain_ok();
  }
  check_status(who, {}, false);
}

void PostgresSession::check_alive_after_failure(std::string_view who, std::string_view error) {
  refuse_if_deferred_failed();
  if (conn_.pipelined()) return;
  drain_ok();
  check_status(who, error, true);
}

// --- The handler's statements ----------------------------------------------------------------

PGconn* PostgresSession::native_handle() {
  refuse_if_deferred_failed();
  if (conn_.pipelined()) {
    drain_ok();
    conn_.leave_pipeline();
  }
  native_taken_ = true;
  open_pending_savepoint();
  drain_ok();
  return conn_.get();
}

void PostgresSession::refuse_session_control(std::string_view sql) const {
  const char* why = refusal_of(sql);
  if (why == nullptr) return;
  throw ConfigError(conn_.target().label + ": \"" + pg::shown(sql) + "\" " + why +
                    ". Nothing was sent or committed");
}

void PostgresSession::user_exec(std::string_view sql, std::span<const PostgresParam> params) {
  refuse_session_control(sql);
  refuse_if_deferred_failed();
  if (!open_) {
    throw ConfigError(conn_.target().label +
                      ": a PostgresTx was used after its transaction ended: use it only inside "
                      "the handler or transaction() work it was given to");
  }
  open_pending_savepoint();
  Params bound;
  for (const PostgresParam& param : params) bound.user(param);
  conn_.queue(conn_.user_statement(sql, bound), bound, Origin::user, std::string(sql));
  if (conn_.pipelined()) {
    user_queued_ = true;
    return;
  }
  for (const Reply& reply : drain(/*awaited=*/1)) {
    if (reply.ok() || reply.skipped()) continue;
    if (reply.origin == Origin::idem) fail_on(reply);
    pg::throw_user_error(conn_.target(), sql, conn_.get(), reply.result.get());
  }
}

pg::ResultPtr PostgresSession::user_query(std::string_view sql,
                                          std::span<const PostgresParam> params) {
  refuse_session_control(sql);
  refuse_if_deferred_failed();
  if (!open_) {
    throw ConfigError(conn_.target().label +
                      ": a PostgresTx was used after its transaction ended: use it only inside "
                      "the handler or transaction() work it was given to");
  }
  open_pending_savepoint();
  Params bound;
  for (const PostgresParam& param : params) bound.user(param);
  const Statement statement = conn_.user_statement(sql, bound);
  conn_.queue(statement, bound, Origin::user, std::string(sql));
  user_queued_ = true;
  std::vector<Reply> replies = drain(/*awaited=*/1);
  for (const Reply& reply : replies) {
    if (reply.ok() || reply.skipped()) continue;
    if (reply.origin == Origin::idem) fail_on(reply);
    if (statement.prepared != nullptr && conn_.broken() &&
        pg::stale_or_missing(reply.result.get())) {
      // The statement prepared on this connection went stale (a table it reads changed) or is
      // gone (dropped through the raw handle): not the handler's error; the call runs again,
      // on another connection, with the statement sent as text.
      throw InboxRetryWithoutDeferral(conn_.target().label + ": the handler's prepared \"" +
                                      pg::shown(sql) +
                                      "\" went stale: " + pg::server_message(reply.result.get()));
    }
    awaited_error_ = true;
    pg::throw_user_error(conn_.target(), sql, conn_.get(), reply.result.get());
  }
  return std::move(replies.back().result);
}

}  // namespace detail

// --- PostgresTx and PostgresStore's transactional side ----------------------------------------

PGconn* PostgresTx::native_handle() {
  return session_->native_handle();
}

void PostgresTx::exec_params(std::string_view sql, std::span<const detail::PostgresParam> params) {
  session_->user_exec(sql, params);
}

PostgresRows PostgresTx::query_params(std::string_view sql,
                                      std::span<const detail::PostgresParam> params) {
  return PostgresRows(session_->user_query(sql, params).release());
}

void PostgresTx::save_offset(std::string_view topic, std::int32_t partition,
                             std::int64_t next_offset) {
  session_->save_offset(topic, partition, next_offset);
}

std::unique_ptr<InboxTransaction> PostgresStore::begin_inbox(InboxMode mode) {
  auto session = std::make_unique<detail::PostgresSession>(*impl_, impl_->pool.acquire(), mode,
                                                           detail::PostgresSession::Kind::inbox);
  session->begin();
  return session;
}

PostgresTx& PostgresStore::tx_of(InboxTransaction& transaction) {
  return static_cast<detail::PostgresSession&>(transaction).tx();
}

void PostgresStore::transaction(detail::FunctionRef<void(PostgresTx&)> work) {
  detail::PostgresSession session(*impl_, impl_->pool.acquire(), InboxMode::careful,
                                  detail::PostgresSession::Kind::work);
  session.begin();
  work(session.tx());
  session.finish_work();
}

}  // namespace idem
