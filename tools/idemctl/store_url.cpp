#include "store_url.hpp"

#include <charconv>
#include <string>

namespace idemctl {

namespace {

constexpr std::string_view kSqliteForm =
    "sqlite:///path/to/db (absolute) or sqlite://path (relative)";
constexpr std::string_view kRedisForm =
    "redis://[[user]:password@]host[:port][/db][?prefix=P&timeout_ms=N]";
constexpr std::string_view kPostgresForm =
    "postgres://[user[:password]@]host[:port]/dbname[?libpq-param=value&schema=S]";

[[noreturn]] void bad(std::string_view url, std::string_view what, std::string_view form) {
  throw BadUrl("bad store url \"" + redacted(url) + "\": " + std::string(what) + "; expected " +
               std::string(form));
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string decode(std::string_view url, std::string_view text, std::string_view form) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out += text[i];
      continue;
    }
    const int hi = i + 2 < text.size() ? hex_digit(text[i + 1]) : -1;
    const int lo = hi >= 0 ? hex_digit(text[i + 2]) : -1;
    if (lo < 0) bad(url, "a '%' must be followed by two hex digits", form);
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

// A decimal integer in [min, max], or nothing.
bool parse_int(std::string_view text, long long min, long long max, long long& value) {
  if (text.empty()) return false;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  return ec == std::errc{} && end == text.data() + text.size() && value >= min && value <= max;
}

SqliteUrl parse_sqlite(std::string_view url, std::string_view rest) {
  if (const auto query = rest.find('?'); query != std::string_view::npos) {
    bad(url, "sqlite urls take no query parameters", kSqliteForm);
  }
  std::string path = decode(url, rest, kSqliteForm);
  if (path.empty() || path == "/") bad(url, "the database path is missing", kSqliteForm);
  return SqliteUrl{std::move(path)};
}

RedisUrl parse_redis(std::string_view url, std::string_view rest) {
  RedisUrl out;
  std::string_view query;
  if (const auto q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  std::string_view authority = rest;
  std::string_view path;
  if (const auto slash = rest.find('/'); slash != std::string_view::npos) {
    authority = rest.substr(0, slash);
    path = rest.substr(slash + 1);
  }
  // The password may contain '@' only percent-encoded; the last '@' ends the credentials.
  if (const auto at = authority.rfind('@'); at != std::string_view::npos) {
    const std::string_view credentials = authority.substr(0, at);
    authority = authority.substr(at + 1);
    if (const auto colon = credentials.find(':'); colon != std::string_view::npos) {
      out.user = decode(url, credentials.substr(0, colon), kRedisForm);
      out.password = decode(url, credentials.substr(colon + 1), kRedisForm);
    } else {
      // redis://secret@host is how several clients spell a password without a user.
      out.password = decode(url, credentials, kRedisForm);
    }
  }
  std::string_view port;
  if (authority.starts_with('[')) {  // [::1]:6379
    const auto close = authority.find(']');
    if (close == std::string_view::npos) bad(url, "an IPv6 host needs a closing ']'", kRedisForm);
    out.host = std::string(authority.substr(1, close - 1));
    const std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') bad(url, "expected ':port' after ']'", kRedisForm);
      port = after.substr(1);
      if (port.empty()) bad(url, "the port after ':' is empty", kRedisForm);
    }
  } else if (const auto colon = authority.rfind(':'); colon != std::string_view::npos) {
    out.host = std::string(authority.substr(0, colon));
    port = authority.substr(colon + 1);
    if (port.empty()) bad(url, "the port after ':' is empty", kRedisForm);
  } else {
    out.host = std::string(authority);
  }
  if (out.host.empty()) bad(url, "the host is missing", kRedisForm);
  long long number = 0;
  if (!port.empty()) {
    if (!parse_int(port, 1, 65535, number)) {
      bad(url, "port \"" + std::string(port) + "\" is not a number in 1..65535", kRedisForm);
    }
    out.port = static_cast<int>(number);
  }
  if (!path.empty()) {
    if (!parse_int(path, 0, 1 << 20, number)) {
      bad(url, "database \"" + std::string(path) + "\" is not a non-negative number", kRedisForm);
    }
    out.db = static_cast<int>(number);
  }
  while (!query.empty()) {
    const auto amp = query.find('&');
    const std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (pair.empty()) continue;
    const auto eq = pair.find('=');
    const std::string_view name = pair.substr(0, eq);
    const std::string value =
        eq == std::string_view::npos ? std::string{} : decode(url, pair.substr(eq + 1), kRedisForm);
    if (name == "prefix") {
      out.prefix = value;
    } else if (name == "timeout_ms") {
      if (!parse_int(value, 1, 3'600'000, number)) {
        bad(url, "timeout_ms \"" + value + "\" is not a number of milliseconds in 1..3600000",
            kRedisForm);
      }
      out.timeout = std::chrono::milliseconds(number);
    } else if (name == "db") {
      if (!parse_int(value, 0, 1 << 20, number)) {
        bad(url, "db \"" + value + "\" is not a non-negative number", kRedisForm);
      }
      out.db = static_cast<int>(number);
    } else {
      bad(url, "unknown parameter \"" + std::string(name) + "\" (known: prefix, timeout_ms, db)",
          kRedisForm);
    }
  }
  return out;
}

// libpq parses the URI itself (when the store connects); idemctl only takes out its own
// parameter, so no SQL or identifier is built here.
PostgresUrl parse_postgres(std::string_view url, std::string_view scheme, std::string_view rest) {
  PostgresUrl out;
  const auto query_start = rest.find('?');
  out.conninfo = std::string(scheme) + "://" + std::string(rest.substr(0, query_start));
  if (rest.substr(0, query_start).empty()) bad(url, "the host is missing", kPostgresForm);
  if (query_start == std::string_view::npos) return out;
  std::string kept;
  std::string_view query = rest.substr(query_start + 1);
  while (!query.empty()) {
    const auto amp = query.find('&');
    const std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    const auto eq = pair.find('=');
    if (eq == std::string_view::npos) bad(url, "a parameter has no '='", kPostgresForm);
    if (pair.substr(0, eq) == "schema") {
      out.schema = decode(url, pair.substr(eq + 1), kPostgresForm);
      if (out.schema.empty()) bad(url, "schema is empty", kPostgresForm);
      continue;
    }
    kept += kept.empty() ? "?" : "&";
    kept += pair;
  }
  out.conninfo += kept;
  return out;
}

}  // namespace

StoreUrl parse_store_url(std::string_view url) {
  const auto scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) {
    throw BadUrl("bad store url \"" + redacted(url) + "\": no scheme; expected " +
                 std::string(kSqliteForm) + ", " + std::string(kRedisForm) + ", or " +
                 std::string(kPostgresForm));
  }
  const std::string_view scheme = url.substr(0, scheme_end);
  const std::string_view rest = url.substr(scheme_end + 3);
  if (scheme == "sqlite") return parse_sqlite(url, rest);
  if (scheme == "redis") return parse_redis(url, rest);
  if (scheme == "postgres" || scheme == "postgresql") return parse_postgres(url, scheme, rest);
  if (scheme == "rediss") {
    bad(url, "TLS (rediss://) is not supported by idem's Redis store", kRedisForm);
  }
  throw BadUrl("bad store url \"" + redacted(url) + "\": unknown scheme \"" + std::string(scheme) +
               "\"; expected " + std::string(kSqliteForm) + ", " + std::string(kRedisForm) +
               ", or " + std::string(kPostgresForm));
}

namespace {
// Masks the value of every "password=" parameter (libpq accepts one in the query).
std::string redact_query(std::string text) {
  constexpr std::string_view kKey = "password=";
  for (std::size_t at = text.find(kKey); at != std::string::npos; at = text.find(kKey, at)) {
    if (at != 0 && text[at - 1] != '?' && text[at - 1] != '&') {
      at += kKey.size();
      continue;
    }
    const std::size_t value = at + kKey.size();
    const std::size_t end = text.find('&', value);
    text.replace(value, end == std::string::npos ? std::string::npos : end - value, "***");
    at = value + 3;
  }
  return text;
}
}  // namespace

std::string redacted(std::string_view url) {
  const auto scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) return std::string(url);
  const auto start = scheme_end + 3;
  const auto end = url.find_first_of("/?", start);
  const std::string_view authority =
      url.substr(start, end == std::string_view::npos ? end : end - start);
  const auto at = authority.rfind('@');
  if (at == std::string_view::npos) return redact_query(std::string(url));
  const auto colon = authority.substr(0, at).find(':');
  const std::size_t secret = colon == std::string_view::npos ? 0 : colon + 1;
  std::string out(url.substr(0, start + secret));
  out += "***";
  out += url.substr(start + at);
  return redact_query(std::move(out));
}

}  // namespace idemctl
