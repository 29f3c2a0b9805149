#include "connection.hpp"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "idem/stores/postgres_store.hpp"
#include "store_impl.hpp"

namespace idem::detail::pg {
namespace {

// A server that stops answering altogether (not even statement_timeout fires) is given up
// after statement_timeout plus this.
constexpr std::chrono::milliseconds kGrace{2000};

void quiet(void*, const char*) {}  // NOTICEs ("relation already exists, skipping") stay quiet

std::string trimmed_error(PGconn* conn) {
  std::string text = conn != nullptr ? PQerrorMessage(conn) : "out of memory";
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  for (char& c : text) {
    if (c == '\n') c = ' ';
  }
  return text;
}

int remaining_ms(const Deadline& deadline) {
  if (!deadline) return -1;
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - Clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(std::min<std::int64_t>(left.count(), 1 << 30));
}

// What to do about a failed login, from libpq's text (no SQLSTATE reaches the caller then).
std::string connect_advice(const std::string& error) {
  if (error.find("password") != std::string::npos ||
      error.find("authentication") != std::string::npos) {
    return "check the user and password in PostgresOptions::conninfo (and pg_hba.conf on the "
           "server)";
  }
  if (error.find("database") != std::string::npos &&
      error.find("does not exist") != std::string::npos) {
    return "the database does not exist: create it, or fix dbname in PostgresOptions::conninfo";
  }
  if (error.find("role") != std::string::npos &&
      error.find("does not exist") != std::string::npos) {
    return "the user does not exist: create it, or fix user in PostgresOptions::conninfo";
  }
  if (error.find("too many clients") != std::string::npos ||
      error.find("remaining connection slots") != std::string::npos) {
    return "the server has no free connection slot: lower PostgresOptions::pool_size (summed "
           "over all processes) or raise the server's max_connections";
  }
  if (error.find("starting up") != std::string::npos ||
      error.find("shutting down") != std::string::npos ||
      error.find("recovery") != std::string::npos) {
    return "the server is starting up or shutting down: retry later";
  }
  return "check that a PostgreSQL server runs there and accepts connections, and the host and "
         "port in PostgresOptions::conninfo; retry later";
}

}  // namespace

bool Reply::ok() const noexcept {
  if (!result) return false;
  const ExecStatusType status = PQresultStatus(result.get());
  return status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK;
}

bool Reply::skipped() const noexcept {
  return !result || PQresultStatus(result.get()) == PGRES_PIPELINE_ABORTED;
}

// --- Connecting ------------------------------------------------------------------------------

std::unique_ptr<Connection> Connection::open(const Settings& settings) {
  const Deadline deadline = Clock::now() + settings.connect_timeout;
  // connect_timeout is passed to libpq too (whole seconds, at least 2), but PQconnectPoll does
  // not enforce it: the poll loop below enforces ours, to the millisecond, over all hosts.
  const std::string seconds =
      std::to_string(std::max<std::int64_t>(2, (settings.connect_timeout.count() + 999) / 1000));
  const char* keywords[] = {"dbname", "fallback_application_name", "connect_timeout", nullptr};
  const char* values[] = {settings.conninfo.c_str(), "idem", seconds.c_str(), nullptr};
  ConnPtr conn(PQconnectStartParams(keywords, values, /*expand_dbname=*/1));
  auto refuse = [&](const std::string& why) {
    throw PostgresUnavailable(
        settings.target.label + ": cannot connect: " + scrub(why, settings.target) + "; " +
            connect_advice(why) + "; nothing was recorded as done: do not ack the message",
        "");
  };
  if (!conn) refuse("out of memory");
  if (PQstatus(conn.get()) == CONNECTION_BAD) refuse(trimmed_error(conn.get()));
  PostgresPollingStatusType state = PGRES_POLLING_WRITING;
  while (state != PGRES_POLLING_OK) {
    if (state == PGRES_POLLING_FAILED) refuse(trimmed_error(conn.get()));
    pollfd fd{PQsocket(conn.get()),
              static_cast<short>(state == PGRES_POLLING_READING ? POLLIN : POLLOUT), 0};
    const int left = remaining_ms(deadline);
    const int rc = left == 0 ? 0 : ::poll(&fd, 1, left);
    if (rc < 0 && errno == EINTR) continue;
    if (rc == 0) {
      refuse("no answer within connect_timeout (" +
             std::to_string(settings.connect_timeout.count()) +
             " ms): the server is down, unreachable, overloaded, or not a PostgreSQL server");
    }
    state = PQconnectPoll(conn.get());
  }
  PQsetNoticeProcessor(conn.get(), &quiet, nullptr);
  auto connection = std::make_unique<Connection>(std::move(conn), settings);
  connection->setup(deadline);
  return connection;
}

void Connection::setup(Deadline deadline) {
  // Remember the session's own timeouts (a handler's statements run with them), then set
  // idem's: statement_timeout bounds idem's statements, lock_timeout is lock_wait (a claim of
  // a key another open transaction holds answers in_progress instead of waiting). idem's
  // autocommit statements run READ COMMITTED whatever the database's default.
  const std::string sql =
      "SELECT current_setting('statement_timeout'), "
      "current_setting('lock_timeout'); SET statement_timeout = '" +
      ms_setting(settings_.statement_timeout) + "'; SET lock_timeout = '" +
      ms_setting(settings_.lock_wait) + "'; SET default_transaction_isolation = 'read committed'";
  std::vector<ResultPtr> results = run_script(sql, "setting the session up", deadline);
  for (const ResultPtr& result : results) {
    const ExecStatusType status = PQresultStatus(result.get());
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
      throw_idem_error(target(), "setting the session up", get(), result.get());
    }
  }
  if (!results.empty() && PQntuples(results.front().get()) == 1) {
    user_statement_timeout_ = PQgetvalue(results.front().get(), 0, 0);
    user_lock_timeout_ = PQgetvalue(results.front().get(), 0, 1);
  }
}

void Connection::prepare_statements() {
  if (prepared_) return;
  enter_pipeline();
  for (std::size_t i = 0; i < kSqlCount; ++i) {
    const Sql which = static_cast<Sql>(i);
    const std::string text(statements().text(which));
    if (PQsendPrepare(get(), Statements::name(which), text.c_str(), 0, nullptr) == 0) {
      fail("preparing idem's statements");
    }
    queue_.push_back({Origin::idem, "preparing idem's statements", {}, false});
  }
  std::vector<Reply> replies = drain(idem_deadline());
  leave_pipeline();
  for (const Reply& reply : replies) {
    if (!reply.ok()) {
      throw_idem_error(target(), "preparing idem's statements", get(), reply.result.get());
    }
  }
  prepared_ = true;
}

// --- Health ----------------------------------------------------------------------------------

bool Connection::usable() noexcept {
  PGconn* conn = get();
  if (broken_ || PQstatus(conn) != CONNECTION_OK) return false;
  // A server that restarted closed this socket meanwhile (after a FATAL message): read what
  // is there, up to the end of file, which turns the connection bad.
  for (int i = 0; i < 4; ++i) {
    pollfd fd{PQsocket(conn), POLLIN, 0};
    if (::poll(&fd, 1, 0) <= 0) break;
    if (PQconsumeInput(conn) == 0) return false;
  }
  return PQstatus(conn) == CONNECTION_OK && PQtransactionStatus(conn) == PQTRANS_IDLE;
}

bool Connection::reusable() const noexcept {
  return !broken_ && !pipelined_ && queue_.empty() && PQstatus(get()) == CONNECTION_OK &&
         PQtransactionStatus(get()) == PQTRANS_IDLE;
}

Deadline Connection::idem_deadline() const {
  if (settings_.statement_timeout.count() <= 0) return std::nullopt;
  return Clock::now() + settings_.statement_timeout + kGrace;
}

[[noreturn]] void Connection::fail(std::string_view during) {
  broken_ = true;
  throw_unavailable(target(), during, trimmed_error(get()), "");
}

// --- Sending and receiving -------------------------------------------------------------------

void Connection::send(const Statement& statement, const Params& params, std::string_view what) {
  const int format = statement.binary_result ? 1 : 0;
  int sent = 0;
  if (statement.prepared != nullptr) {
    sent = PQsendQueryPrepared(get(), statement.prepared, params.size(), params.values(),
                               params.lengths(), params.formats(), format);
  } else {
    const std::string sql(statement.sql);
    sent = PQsendQueryParams(get(), sql.c_str(), params.size(), params.types(), params.values(),
                             params.lengths(), params.formats(), format);
  }
  if (sent == 0) fail(what);
}

void Connection::wait_socket(bool for_write, Deadline deadline, std::string_view what) {
  for (;;) {
    const int left = remaining_ms(deadline);
    if (left == 0) {
      broken_ = true;
      throw_unavailable(target(), what,
                        "no answer from the server within statement_timeout (" +
                            std::to_string(settings_.statement_timeout.count()) + " ms) + " +
                            std::to_string(kGrace.count()) +
                            " ms: the server or the network stopped responding",
                        "");
    }
    pollfd fd{PQsocket(get()), static_cast<short>(for_write ? POLLOUT : POLLIN), 0};
    const int rc = ::poll(&fd, 1, left);
    if (rc > 0) return;
    if (rc < 0 && errno != EINTR) fail(what);
  }
}

ResultPtr Connection::next_result(Deadline deadline, std::string_view what) {
  while (PQisBusy(get()) != 0) {
    wait_socket(false, deadline, what);
    if (PQconsumeInput(get()) == 0) fail(what);
  }
  ResultPtr result(PQgetResult(get()));
  if (!result && PQstatus(get()) == CONNECTION_BAD) fail(what);
  return result;
}

ResultPtr Connection::finish_command(Deadline deadline, std::string_view what) {
  ResultPtr kept;
  while (ResultPtr result = next_result(deadline, what)) {
    switch (PQresultStatus(result.get())) {
      case PGRES_COPY_IN:
        // COPY ... FROM STDIN cannot be fed through PostgresTx: end it with an error.
        if (PQputCopyEnd(get(),
                         "COPY FROM STDIN is not supported through idem::PostgresTx; "
                         "use native_handle()") < 0) {
          fail(what);
        }
        continue;
      case PGRES_COPY_OUT:
        for (;;) {
          char* buffer = nullptr;
          const int n = PQgetCopyData(get(), &buffer, 0);
          if (buffer != nullptr) PQfreemem(buffer);
          if (n == -1) break;
          if (n == -2) fail(what);
        }
        continue;
      default:
        kept = std::move(result);  // the last one: an error after a COPY wins over its start
    }
  }
  if (!kept) fail(what);
  if (PQresultStatus(kept.get()) == PGRES_FATAL_ERROR) retire_if_statement_missing(kept.get());
  return kept;
}

Statement Connection::user_statement(std::string_view sql, const Params& params) {
  if (!pipelined_) return Statement::text(sql);
  user_key_.assign(sql);
  user_key_.push_back('\0');
  user_key_.append(reinterpret_cast<const char*>(params.types()),
                   static_cast<std::size_t>(params.size()) * sizeof(Oid));
  auto found = user_statements_.find(user_key_);
  if (found == user_statements_.end()) {
    if (user_statements_.size() >= kMaxUserStatements) return Statement::text(sql);
    std::string name = "idem_user_" + std::to_string(++user_statements_made_);
    const std::string text(sql);
    if (PQsendPrepare(get(), name.c_str(), text.c_str(), params.size(), params.types()) == 0) {
      fail("preparing the handler's statement");
    }
    queue_.push_back({Origin::user, text, user_key_, false});
    found = user_statements_.emplace(user_key_, std::move(name)).first;
  }
  // The name stays valid until the next prepare: queue() sends it before that.
  return Statement{found->second.c_str(), sql, false};
}

void Connection::queue(const Statement& statement, const Params& params, Origin origin,
                       std::string what) {
  if (pipelined_) {
    send(statement, params, what);
    const bool by_name = origin == Origin::user && statement.prepared != nullptr;
    queue_.push_back({origin, std::move(what), {}, by_name});
    return;
  }
  if (queue_failed_) {  // as a pipeline would: skip everything after an error until drain()
    finished_.push_back({origin, std::move(what), nullptr});
    return;
  }
  send(statement, params, what);
  Reply reply{origin, std::move(what), nullptr};
  const bool unlimited = origin == Origin::user;
  reply.result = finish_command(unlimited ? Deadline{} : idem_deadline(), reply.what);
  if (!reply.ok()) queue_failed_ = true;
  finished_.push_back(std::move(reply));
}

void Connection::forget_failed_statement(const Queued& queued, const Reply& reply) {
  if (reply.ok()) return;
  retire_if_statement_missing(reply.result.get());
  // A prepare that failed or was skipped left no statement behind.
  if (!queued.prepared_key.empty()) user_statements_.erase(queued.prepared_key);
  if (reply.skipped()) return;
  // A handler's prepared statement went stale (the table changed under a statement whose
  // result type it fixed): start over on a fresh connection.
  if (queued.by_name && sqlstate_of(reply.result.get()) == "0A000") broken_ = true;
}

void Connection::retire_if_statement_missing(const PGresult* result) {
  // A statement idem prepared, its own or a handler's, is gone (DEALLOCATE through the raw
  // handle): this connection is closed after the call instead of failing every later one.
  if (names_missing_idem_statement(result)) broken_ = true;
}

std::vector<Reply> Connection::drain(Deadline deadline) {
  std::vector<Reply> replies;
  if (!pipelined_) {
    replies.swap(finished_);
    queue_failed_ = false;
    return replies;
  }
  if (queue_.empty()) return replies;
  if (PQpipelineSync(get()) == 0) fail("sending a pipeline sync");
  replies.reserve(queue_.size());
  for (Queued& queued : queue_) {
    Reply reply{queued.origin, std::move(queued.what), nullptr};
    reply.result = next_result(deadline, reply.what);
    if (!reply.result) fail(reply.what);
    forget_failed_statement(queued, reply);
    // COPY cannot run in pipeline mode; libpq reports it as an error result.
    if (next_result(deadline, reply.what) != nullptr) {
      broken_ = true;
      throw_unavailable(target(), reply.what, "more than one result for one statement", "");
    }
    replies.push_back(std::move(reply));
  }
  queue_.clear();
  ResultPtr sync = next_result(deadline, "reading a pipeline sync");
  if (!sync || PQresultStatus(sync.get()) != PGRES_PIPELINE_SYNC) {
    broken_ = true;
    throw_unavailable(target(), "reading a pipeline sync", "unexpected result", "");
  }
  return replies;
}

ResultPtr Connection::run(const Statement& statement, const Params& params, std::string_view what,
                          Deadline deadline) {
  if (!pipelined_) {
    send(statement, params, what);
    return finish_command(deadline, what);
  }
  queue(statement, params, Origin::idem, std::string(what));
  std::vector<Reply> replies = drain(deadline);
  return std::move(replies.back().result);
}

ResultPtr Connection::run_ok(Sql which, const Params& params, std::string_view what) {
  ResultPtr result = run(Statement::of(statements(), which), params, what, idem_deadline());
  const ExecStatusType status = PQresultStatus(result.get());
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    if (unavailable_state(get(), sqlstate_of(result.get()))) broken_ = true;
    throw_idem_error(target(), what, get(), result.get());
  }
  return result;
}

std::vector<ResultPtr> Connection::run_script(const std::string& sql, std::string_view what,
                                              Deadline deadline) {
  if (PQsendQuery(get(), sql.c_str()) == 0) fail(what);
  std::vector<ResultPtr> results;
  while (ResultPtr result = next_result(deadline, what)) results.push_back(std::move(result));
  return results;
}

void Connection::enter_pipeline() {
  if (pipelined_) return;
  if (PQenterPipelineMode(get()) == 0) fail("entering pipeline mode");
  pipelined_ = true;
}

void Connection::leave_pipeline() {
  if (!pipelined_) return;
  if (PQexitPipelineMode(get()) == 0) fail("leaving pipeline mode");
  pipelined_ = false;
}

// --- The pool --------------------------------------------------------------------------------

Lease::~Lease() {
  if (pool_ != nullptr && conn_) pool_->give_back(std::move(conn_));
}

Pool::~Pool() = default;

void Pool::adopt(std::unique_ptr<Connection> conn) {
  std::lock_guard lock(mutex_);
  ++open_;
  idle_.push_back(std::move(conn));
}

Lease Pool::acquire() {
  std::unique_lock lock(mutex_);
  const auto deadline = Clock::now() + settings_.connect_timeout;
  for (;;) {
    while (!idle_.empty()) {
      std::unique_ptr<Connection> conn = std::move(idle_.back());
      idle_.pop_back();
      lock.unlock();
      if (conn->usable()) {
        try {
          conn->prepare_statements();
          return Lease(this, std::move(conn));
        } catch (const PostgresUnavailable&) {
          conn.reset();
          lock.lock();
          --open_;
          available_.notify_one();
          throw;
        }
      }
      conn.reset();  // the server closed it (restart, idle timeout): open another
      lock.lock();
      --open_;
    }
    if (open_ < size_) break;
    if (available_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
        open_ >= size_) {
      throw PostgresUnavailable(
          settings_.target.label + ": all " + std::to_string(size_) +
              " connections of the pool stayed busy for connect_timeout (" +
              std::to_string(settings_.connect_timeout.count()) +
              " ms): raise PostgresOptions::pool_size, or do not call the store from inside its "
              "own transactional handler (use the PostgresTx); nothing was recorded as done: "
              "do not ack the message, retry later",
          "");
    }
  }
  const auto now = Clock::now();
  if (now < next_connect_) {
    throw PostgresUnavailable(
        last_connect_error_ + " (the next connection attempt is in " +
            std::to_string(
                std::chrono::ceil<std::chrono::milliseconds>(next_connect_ - now).count()) +
            " ms)",
        "");
  }
  ++open_;
  lock.unlock();
  try {
    std::unique_ptr<Connection> conn = Connection::open(settings_);
    conn->prepare_statements();
    return Lease(this, std::move(conn));
  } catch (const std::exception& e) {
    lock.lock();
    --open_;
    if (dynamic_cast<const PostgresUnavailable*>(&e) != nullptr) {
      next_connect_ = Clock::now() + backoff_;
      last_connect_error_ = e.what();
    }
    available_.notify_one();
    throw;
  }
}

void Pool::give_back(std::unique_ptr<Connection> conn) noexcept {
  if (!conn->reusable()) {
    conn.reset();  // PQfinish outside the lock
    std::lock_guard lock(mutex_);
    --open_;
    available_.notify_one();
    return;
  }
  std::lock_guard lock(mutex_);
  idle_.push_back(std::move(conn));
  available_.notify_one();
}

}  // namespace idem::detail::pg
