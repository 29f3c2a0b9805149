#include "errors.hpp"

#include <memory>

#include "idem/stores/postgres_store.hpp"

namespace idem::detail::pg {
namespace {

struct OptionsFree {
  void operator()(PQconninfoOption* options) const noexcept { PQconninfoFree(options); }
};
using OptionsPtr = std::unique_ptr<PQconninfoOption, OptionsFree>;

std::string option(const PQconninfoOption* options, std::string_view name) {
  for (const PQconninfoOption* o = options; o != nullptr && o->keyword != nullptr; ++o) {
    if (name == o->keyword && o->val != nullptr) return o->val;
  }
  return {};
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decoded(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size()) {
      const int hi = hex_value(text[i + 1]);
      const int lo = hex_value(text[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
        continue;
      }
    }
    out.push_back(text[i]);
  }
  return out;
}

void add_secret(std::vector<std::string>& secrets, std::string secret) {
  if (secret.empty()) return;
  for (const std::string& s : secrets) {
    if (s == secret) return;
  }
  secrets.push_back(std::move(secret));
}

// The password as written in the text, found without libpq (whose parser may have refused the
// string, yet its message may quote it): key=value "password = value" (quoted or not), the
// userinfo of a URI, and a URI's password= query parameter.
void find_secrets_by_hand(std::string_view conninfo, std::vector<std::string>& secrets) {
  const bool uri = conninfo.rfind("postgresql://", 0) == 0 || conninfo.rfind("postgres://", 0) == 0;
  if (uri) {
    const std::size_t start = conninfo.find("://") + 3;
    const std::size_t end = conninfo.find_first_of("/?", start);
    const std::string_view authority = conninfo.substr(
        start, end == std::string_view::npos ? std::string_view::npos : end - start);
    const std::size_t at = authority.rfind('@');
    if (at != std::string_view::npos) {
      const std::string_view userinfo = authority.substr(0, at);
      const std::size_t colon = userinfo.find(':');
      if (colon != std::string_view::npos) {
        add_secret(secrets, std::string(userinfo.substr(colon + 1)));
        add_secret(secrets, percent_decoded(userinfo.substr(colon + 1)));
      }
    }
  }
  for (std::size_t pos = conninfo.find("password"); pos != std::string_view::npos;
       pos = conninfo.find("password", pos + 1)) {
    std::size_t i = pos + 8;
    while (i < conninfo.size() && (conninfo[i] == ' ' || conninfo[i] == '\t')) ++i;
    if (i >= conninfo.size() || conninfo[i] != '=') continue;
    ++i;
    while (i < conninfo.size() && (conninfo[i] == ' ' || conninfo[i] == '\t')) ++i;
    std::string value;
    if (i < conninfo.size() && conninfo[i] == '\'') {
      for (++i; i < conninfo.size() && conninfo[i] != '\''; ++i) {
        if (conninfo[i] == '\\' && i + 1 < conninfo.size()) ++i;
        value.push_back(conninfo[i]);
      }
    } else {
      const std::size_t end = conninfo.find_first_of(uri ? "& \t\r\n" : " \t\r\n", i);
      value = std::string(conninfo.substr(i, end == std::string_view::npos ? end : end - i));
    }
    add_secret(secrets, value);
    if (uri) add_secret(secrets, percent_decoded(value));
  }
}

std::string trimmed(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ' || text.back() == '\r')) {
    text.pop_back();
  }
  for (char& c : text) {
    if (c == '\n') c = ' ';
  }
  return text;
}

}  // namespace

Target describe_target(const std::string& conninfo, const std::string& schema) {
  Target target;
  find_secrets_by_hand(conninfo, target.secrets);
  char* raw_error = nullptr;
  OptionsPtr parsed(PQconninfoParse(conninfo.c_str(), &raw_error));
  if (!parsed) {
    std::string error = raw_error != nullptr ? trimmed(raw_error) : "out of memory";
    PQfreemem(raw_error);
    throw ConfigError(
        "postgres store: PostgresOptions::conninfo is not a valid libpq "
        "connection string (" +
        scrub(error, target) +
        "): write key=value pairs (\"host=db port=5432 dbname=app user=app\") "
        "or a postgresql:// URI");
  }
  add_secret(target.secrets, option(parsed.get(), "password"));
  OptionsPtr defaults(PQconndefaults());
  auto value = [&](std::string_view name) {
    std::string v = option(parsed.get(), name);
    return v.empty() && defaults ? option(defaults.get(), name) : v;
  };
  std::string host = option(parsed.get(), "host");
  if (host.empty()) host = option(parsed.get(), "hostaddr");
  if (host.empty() && defaults) host = option(defaults.get(), "host");
  if (host.empty()) host = "localhost";
  std::string port = value("port");
  if (port.empty()) port = "5432";
  std::string user = value("user");
  std::string dbname = value("dbname");
  if (dbname.empty()) dbname = user;
  target.label = "postgres store at " + host + ":" + port + "/" + dbname + " (user " +
                 (user.empty() ? std::string("?") : user) + ", schema " + schema + ")";
  target.label = scrub(target.label, target);
  return target;
}

std::string scrub(std::string text, const Target& target) {
  for (const std::string& secret : target.secrets) {
    for (std::size_t pos = text.find(secret); pos != std::string::npos;
         pos = text.find(secret, pos + 3)) {
      text.replace(pos, secret.size(), "***");
    }
  }
  return text;
}

std::string sqlstate_of(const PGresult* result) {
  const char* state = result != nullptr ? PQresultErrorField(result, PG_DIAG_SQLSTATE) : nullptr;
  return state != nullptr ? state : "";
}

std::string server_message(const PGresult* result) {
  if (result == nullptr) return "no result (out of memory?)";
  const char* primary = PQresultErrorField(result, PG_DIAG_MESSAGE_PRIMARY);
  if (primary == nullptr) return trimmed(PQresultErrorMessage(result));
  std::string message = primary;
  if (const char* detail = PQresultErrorField(result, PG_DIAG_MESSAGE_DETAIL)) {
    message += " (" + trimmed(detail) + ")";
  }
  return message;
}

bool unavailable_state(PGconn* conn, std::string_view sqlstate) {
  if (conn != nullptr && PQstatus(conn) == CONNECTION_BAD) return true;
  if (sqlstate.size() != 5) return true;  // no SQLSTATE: a client-side or connection failure
  const std::string_view cls = sqlstate.substr(0, 2);
  return cls == "08" || cls == "53" || cls == "58" || cls == "XX" || sqlstate == "57P01" ||
         sqlstate == "57P02" || sqlstate == "57P03" || sqlstate == "57P04" || sqlstate == "25006";
}

bool names_missing_idem_statement(const PGresult* result) {
  return sqlstate_of(result) == kMissingStatement &&
         server_message(result).find("idem_") != std::string::npos;  // any lc_messages
}

bool stale_or_missing(const PGresult* result) {
  return sqlstate_of(result) == "0A000" || names_missing_idem_statement(result);
}

std::string advice(std::string_view sqlstate) {
  const std::string_view cls = sqlstate.substr(0, std::min<std::size_t>(2, sqlstate.size()));
  if (sqlstate == "28P01" || sqlstate == "28000") {
    return "check the user and password in PostgresOptions::conninfo (and pg_hba.conf on the "
           "server)";
  }
  if (sqlstate == "3D000") {
    return "the database does not exist: create it, or fix dbname in PostgresOptions::conninfo";
  }
  if (sqlstate == "57P01" || sqlstate == "57P02" || sqlstate == "57P03") {
    return "the server is shutting down, restarting or starting up: retry later (the store "
           "reconnects by itself)";
  }
  if (sqlstate == "57014") {
    return "the statement ran longer than PostgresOptions::statement_timeout or was cancelled: "
           "check the server's load and long-held locks, or raise statement_timeout";
  }
  if (sqlstate == "55P03") {
    return "another transaction kept the key's record locked longer than "
           "PostgresOptions::lock_wait: retry later";
  }
  if (sqlstate == "53300") {
    return "the server has no free connection slot: lower PostgresOptions::pool_size (summed "
           "over all processes) or raise the server's max_connections";
  }
  if (sqlstate == "53100") return "the server's disk is full: free some space";
  if (sqlstate == "42501") {
    return "the user lacks a privilege on idem's schema or tables: grant it, or let their "
           "owner create them (docs/stores/postgres.md lists the statements)";
  }
  if (sqlstate == "42P01" || sqlstate == "3F000") {
    return "idem's schema or tables are gone (dropped while the store runs?): create the store "
           "again so it recreates them";
  }
  if (sqlstate == "25006") {
    return "the server is read-only (a standby?): point conninfo at the primary, e.g. with "
           "target_session_attrs=read-write";
  }
  if (sqlstate == "40P01" || sqlstate == "40001") return "a transient conflict: retry";
  if (sqlstate == kMissingStatement) {
    return "idem's prepared statements are gone from this connection (did a handler run "
           "DEALLOCATE ALL through native_handle()?): the store closes it and opens another; "
           "retry";
  }
  if (cls == "08" || sqlstate.empty()) {
    return "the connection to the server failed or was lost: retry later (the store reconnects "
           "by itself)";
  }
  return {};
}

void throw_unavailable(const Target& target, std::string_view during, const std::string& detail,
                       const std::string& sqlstate) {
  std::string message =
      target.label + ": " + std::string(during) + " failed: " + scrub(detail, target);
  if (!sqlstate.empty()) message += " (SQLSTATE " + sqlstate + ")";
  const std::string what_to_do = advice(sqlstate);
  if (!what_to_do.empty()) message += "; " + what_to_do;
  message += "; nothing was recorded as done: do not ack the message, retry later";
  throw PostgresUnavailable(message, sqlstate);
}

void throw_idem_error(const Target& target, std::string_view during, PGconn* conn,
                      const PGresult* result) {
  std::string detail = server_message(result);
  if (conn != nullptr && PQstatus(conn) == CONNECTION_BAD && result == nullptr) {
    detail = trimmed(PQerrorMessage(conn));
  }
  throw_unavailable(target, during, detail, sqlstate_of(result));
}

void throw_user_error(const Target& target, std::string_view sql, PGconn* conn,
                      const PGresult* result) {
  const std::string state = sqlstate_of(result);
  if (unavailable_state(conn, state)) {
    throw_unavailable(target, "the handler's statement \"" + shown(sql) + "\"",
                      server_message(result), state);
  }
  throw PostgresError(target.label + ": statement \"" + shown(sql) + "\" failed: " +
                          scrub(server_message(result), target) + " (SQLSTATE " + state + ")",
                      state);
}

std::string shown(std::string_view sql) {
  return sql.size() > 200 ? std::string(sql.substr(0, 200)) + "..." : std::string(sql);
}

}  // namespace idem::detail::pg
