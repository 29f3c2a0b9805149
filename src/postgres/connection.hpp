#pragma once
// One libpq connection with its session set-up, idem's prepared statements and a queue of
// statements that is sent in libpq pipeline mode (one round trip per drain) or statement by
// statement; and the pool the store's threads share. Internal to idem::postgres.

#include <libpq-fe.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <absl/container/flat_hash_map.h>

#include "errors.hpp"
#include "params.hpp"
#include "statements.hpp"

namespace idem::detail::pg {

struct ConnFinish {
  void operator()(PGconn* conn) const noexcept { PQfinish(conn); }
};
struct ResultClear {
  void operator()(PGresult* result) const noexcept { PQclear(result); }
};
using ConnPtr = std::unique_ptr<PGconn, ConnFinish>;
using ResultPtr = std::unique_ptr<PGresult, ResultClear>;

using Clock = std::chrono::steady_clock;
/// When to give up waiting for the server; none: wait as long as it takes.
using Deadline = std::optional<Clock::time_point>;

/// Who sent a statement: idem (its errors mean "unavailable") or a handler.
enum class Origin { idem, user };

/// What every connection of a store is opened with.
struct Settings {
  std::string conninfo;
  Target target;
  std::chrono::milliseconds connect_timeout;
  std::chrono::milliseconds statement_timeout;
  std::chrono::milliseconds lock_wait;
  const Statements* statements = nullptr;
};

/// A statement to send: one of idem's prepared ones, or text.
struct Statement {
  const char* prepared = nullptr;  // name; null: send sql as text
  std::string_view sql;
  bool binary_result = false;

  static Statement of(const Statements& statements, Sql which) {
    return {Statements::name(which), statements.text(which), true};
  }
  static Statement text(std::string_view sql) { return {nullptr, sql, false}; }
};

/// The answer to one queued statement.
struct Reply {
  Origin origin = Origin::idem;
  std::string what;  // for messages: "recording the key", or the handler's SQL
  ResultPtr result;  // null when the statement was skipped after an earlier error
  bool ok() const noexcept;
  bool skipped() const noexcept;
};

class Connection {
 public:
  /// Connects within connect_timeout and sets the session up (statement_timeout, lock_timeout).
  /// @throws PostgresUnavailable when the server cannot be reached or refuses the login.
  static std::unique_ptr<Connection> open(const Settings& settings);

  Connection(ConnPtr conn, const Settings& settings) noexcept
      : conn_(std::move(conn)), settings_(settings) {}
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  PGconn* get() const noexcept { return conn_.get(); }
  const Settings& settings() const noexcept { return settings_; }
  const Target& target() const noexcept { return settings_.target; }
  const Statements& statements() const noexcept { return *settings_.statements; }
  /// The session's statement_timeout and lock_timeout before idem set its own (what a
  /// handler's statements run with).
  const std::string& user_statement_timeout() const noexcept { return user_statement_timeout_; }
  const std::string& user_lock_timeout() const noexcept { return user_lock_timeout_; }

  /// The connection is in an unknown state: close it instead of reusing it.
  void mark_broken() noexcept { broken_ = true; }
  bool broken() const noexcept { return broken_; }
  /// Before reuse from the pool: still connected (the server may have restarted meanwhile),
  /// idle, outside any transaction.
  bool usable() noexcept;
  /// On return to the pool: healthy, idle and outside pipeline mode.
  bool reusable() const noexcept;

  /// Prepares idem's statements (once per connection, after the schema exists).
  void prepare_statements();
  bool prepared() const noexcept { return prepared_; }

  /// statement_timeout plus a grace period, for idem's own waits (a server that stopped
  /// answering altogether); none when statement_timeout is 0.
  Deadline idem_deadline() const;

  /// Queues a statement: in pipeline mode it is only sent; otherwise it runs now, unless an
  /// earlier queued statement failed (then it is skipped, as in a pipeline).
  void queue(const Statement& statement, const Params& params, Origin origin, std::string what);
  /// A handler's statement as it is best sent: in pipeline mode by name, prepared on this
  /// connection with its first use (the prepare is queued ahead of it, its reply Origin::user);
  /// as text outside pipeline mode or once kMaxUserStatements are prepared. Keyed by the SQL
  /// and the parameters' types, which decide the types the server infers.
  Statement user_statement(std::string_view sql, const Params& params);
  static constexpr std::size_t kMaxUserStatements = 256;

  /// Sends a sync (pipeline mode) and returns the reply of every queued statement in order.
  /// @throws PostgresUnavailable when the connection fails or the deadline passes.
  std::vector<Reply> drain(Deadline deadline);
  bool queued() const noexcept { return !queue_.empty(); }
  /// Statements queued and not yet drained: the index the next queued one's reply gets.
  std::size_t queued_count() const noexcept { return queue_.size(); }

  /// queue + drain for one statement; returns its result (an error result too).
  ResultPtr run(const Statement& statement, const Params& params, std::string_view what,
                Deadline deadline);
  /// Runs one of idem's statements and throws PostgresUnavailable on any error.
  ResultPtr run_ok(Sql which, const Params& params, std::string_view what);
  /// Runs text without parameters through the simple protocol (several statements allowed);
  /// returns every result.
  std::vector<ResultPtr> run_script(const std::string& sql, std::string_view what,
                                    Deadline deadline);

  void enter_pipeline();
  /// Requires nothing queued.
  void leave_pipeline();
  bool pipelined() const noexcept { return pipelined_; }

  /// Marks the connection broken and throws PostgresUnavailable with libpq's message.
  [[noreturn]] void fail(std::string_view during);

 private:
  void setup(Deadline deadline);
  void send(const Statement& statement, const Params& params, std::string_view what);
  ResultPtr next_result(Deadline deadline, std::string_view what);
  // The result of the command just sent (non-pipeline), read to its end.
  ResultPtr finish_command(Deadline deadline, std::string_view what);
  void wait_socket(bool for_write, Deadline deadline, std::string_view what);
  struct Queued;
  void forget_failed_statement(const Queued& queued, const Reply& reply);
  void retire_if_statement_missing(const PGresult* result);

  struct Queued {
    Origin origin;
    std::string what;
    std::string prepared_key;  // a handler statement's prepare: forgotten unless it succeeds
    bool by_name = false;      // a handler statement sent by the name it was prepared under
  };

  ConnPtr conn_;
  const Settings& settings_;
  std::string user_statement_timeout_ = "0";
  std::string user_lock_timeout_ = "0";
  bool broken_ = false;
  bool prepared_ = false;
  bool pipelined_ = false;
  std::vector<Queued> queue_;    // sent, awaiting results (pipeline mode)
  std::vector<Reply> finished_;  // already answered (non-pipeline mode)
  bool queue_failed_ = false;    // non-pipeline: an earlier queued statement failed
  absl::flat_hash_map<std::string, std::string> user_statements_;  // key -> prepared name
  std::size_t user_statements_made_ = 0;
  std::string user_key_;         // user_statement()'s key, built without an allocation
  std::string sending_by_name_;  // the name user_statement() returned last
};

class Pool;

/// A connection borrowed from the pool; returned (or closed, when no longer reusable) on
/// destruction.
class Lease {
 public:
  Lease(Pool* pool, std::unique_ptr<Connection> conn) noexcept
      : pool_(pool), conn_(std::move(conn)) {}
  Lease(Lease&& other) noexcept = default;
  Lease& operator=(Lease&&) = delete;
  Lease(const Lease&) = delete;
  ~Lease();
  Connection& operator*() const noexcept { return *conn_; }
  Connection* operator->() const noexcept { return conn_.get(); }

 private:
  Pool* pool_;
  std::unique_ptr<Connection> conn_;
};

/// Up to pool_size connections, opened lazily, shared by the store's threads.
class Pool {
 public:
  Pool(const Settings& settings, std::size_t size, std::chrono::milliseconds backoff) noexcept
      : settings_(settings), size_(size), backoff_(backoff) {}
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  /// A live connection with idem's statements prepared. Waits up to connect_timeout for a
  /// free one. @throws PostgresUnavailable (pool exhausted, server unreachable, backoff).
  Lease acquire();
  /// Adopts an open connection (the one the constructor checked the schema with).
  void adopt(std::unique_ptr<Connection> conn);

 private:
  friend class Lease;
  void give_back(std::unique_ptr<Connection> conn) noexcept;

  const Settings& settings_;
  const std::size_t size_;
  const std::chrono::milliseconds backoff_;
  std::mutex mutex_;
  std::condition_variable available_;
  std::vector<std::unique_ptr<Connection>> idle_;
  std::size_t open_ = 0;  // idle + borrowed + being connected
  Clock::time_point next_connect_{};
  std::string last_connect_error_;
};

}  // namespace idem::detail::pg
