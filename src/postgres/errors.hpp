#pragma once
// libpq and SQLSTATE failures turned into idem's exceptions, with messages that say where the
// store connects (host, port, dbname, user: never the password) and what to do.

#include <libpq-fe.h>

#include <string>
#include <string_view>
#include <vector>

namespace idem::detail::pg {

/// Where a store connects, as error messages show it.
struct Target {
  /// "postgres store at 127.0.0.1:5432/app (user app, schema idem)"
  std::string label;
  /// Forms of the password that libpq might echo; scrubbed from every message.
  std::vector<std::string> secrets;
};

/// Parses conninfo (key=value or URI) for the label and the secrets.
/// @throws idem::ConfigError when libpq cannot parse it (the message holds no password).
Target describe_target(const std::string& conninfo, const std::string& schema);

/// text with every secret replaced by "***".
std::string scrub(std::string text, const Target& target);

/// The SQLSTATE of an error result; empty when there is none.
std::string sqlstate_of(const PGresult* result);

/// invalid_sql_statement_name: a prepared statement the connection no longer has.
inline constexpr std::string_view kMissingStatement = "26000";

/// 26000 naming one of the statements idem prepares (idem_...), idem's own or a handler's it
/// prepared; not a handler's EXECUTE of a name of its own.
bool names_missing_idem_statement(const PGresult* result);

/// A prepared statement that went stale (0A000: a table it reads changed its result type) or
/// that idem prepared and is missing: the connection's fault, not the statement's.
bool stale_or_missing(const PGresult* result);

/// The server's primary message (and detail) of an error result, without trailing newlines.
std::string server_message(const PGresult* result);

/// Whether an error leaves the connection unusable or says the server cannot serve now
/// (class 08, 57P0x, 53xxx, 58xxx, XX000, or the connection itself is bad).
bool unavailable_state(PGconn* conn, std::string_view sqlstate);

/// What to do about an SQLSTATE, for messages; empty when there is nothing specific to say.
std::string advice(std::string_view sqlstate);

/// Throws PostgresUnavailable: "<label>: <during> failed: <detail>; <advice>; nothing was
/// recorded as done: do not ack the message, retry later".
[[noreturn]] void throw_unavailable(const Target& target, std::string_view during,
                                    const std::string& detail, const std::string& sqlstate);

/// Throws for an error result of one of idem's own statements: PostgresUnavailable.
[[noreturn]] void throw_idem_error(const Target& target, std::string_view during, PGconn* conn,
                                   const PGresult* result);

/// Throws for an error result of a handler's statement: PostgresUnavailable for connection
/// and server-availability failures, else PostgresError.
[[noreturn]] void throw_user_error(const Target& target, std::string_view sql, PGconn* conn,
                                   const PGresult* result);

/// The first 200 bytes of a statement, for messages.
std::string shown(std::string_view sql);

}  // namespace idem::detail::pg
