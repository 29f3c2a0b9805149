#include "idem/store_url.hpp"

#include <uriparser/Uri.h>

#include <charconv>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace idem {

namespace {

constexpr std::string_view kMemoryForm = "memory:";
constexpr std::string_view kSqliteForm =
    "sqlite:///path/to/db or sqlite:/path/to/db (absolute) or sqlite://path (relative)";
constexpr std::string_view kRedisForm =
    "redis://[[user]:password@]host[:port][/db][?prefix=P&timeout_ms=N]";
constexpr std::string_view kPostgresForm =
    "postgres://[user[:password]@]host[:port]/dbname[?libpq-param=value&schema=S]";

std::string all_forms() {
  return std::string(kMemoryForm) + ", " + std::string(kSqliteForm) + ", " +
         std::string(kRedisForm) + ", or " + std::string(kPostgresForm);
}

[[noreturn]] void bad(std::string_view url, std::string_view what, std::string_view form) {
  throw BadStoreUrl("bad store url \"" + redact_store_url(url) + "\": " + std::string(what) +
                    "; expected " + std::string(form));
}

std::string_view text(const UriTextRangeA& range) {
  if (range.first == nullptr) return {};
  return {range.first, static_cast<std::size_t>(range.afterLast - range.first)};
}

// Percent-decoding (uriparser's); the URL was validated first, so every '%' has two hex digits.
std::string decode(std::string_view escaped) {
  std::string out(escaped);
  out.push_back('\0');
  const char* end = uriUnescapeInPlaceExA(out.data(), URI_FALSE, URI_BR_DONT_TOUCH);
  out.resize(static_cast<std::size_t>(end - out.data()));
  return out;
}

// A decimal integer in [min, max], or nothing.
bool parse_int(std::string_view digits, long long min, long long max, long long& value) {
  if (digits.empty()) return false;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  return ec == std::errc{} && end == digits.data() + digits.size() && value >= min && value <= max;
}

// The parsed URL and the text its ranges point into, freed together.
struct Parsed {
  std::string text;
  UriUriA uri{};
  Parsed() = default;
  Parsed(const Parsed&) = delete;
  Parsed& operator=(const Parsed&) = delete;
  ~Parsed() { uriFreeUriMembersA(&uri); }
};

// Validates the whole URL against RFC 3986; a space (common in file paths) is taken as %20.
const std::string& parse_into(std::string_view url, Parsed& parsed, std::string_view form) {
  std::string& escaped = parsed.text;
  for (char c : url) {
    if (c == ' ') {
      escaped += "%20";
    } else {
      escaped += c;
    }
  }
  const char* error = nullptr;
  if (uriParseSingleUriExA(&parsed.uri, escaped.data(), escaped.data() + escaped.size(), &error) !=
      URI_SUCCESS) {
    const std::size_t at = error == nullptr ? 0 : static_cast<std::size_t>(error - escaped.data());
    std::string what = "not a valid URL at character " + std::to_string(at + 1);
    if (at < escaped.size()) {
      what += " ('" + std::string(1, escaped[at]) + "'";
      const bool escape = escaped[at] == '%' || (at >= 1 && escaped[at - 1] == '%') ||
                          (at >= 2 && escaped[at - 2] == '%');
      if (escape) what += ": a '%' must be followed by two hex digits";
      what += ")";
    }
    bad(url, what, form);
  }
  return escaped;
}

struct Query {
  std::string name;
  std::string value;
  bool has_value = false;
};

std::vector<Query> query_of(std::string_view url, const UriUriA& uri, std::string_view form) {
  std::vector<Query> out;
  if (uri.query.first == nullptr || uri.query.first == uri.query.afterLast) return out;
  UriQueryListA* list = nullptr;
  int count = 0;
  if (uriDissectQueryMallocExA(&list, &count, uri.query.first, uri.query.afterLast, URI_FALSE,
                               URI_BR_DONT_TOUCH) != URI_SUCCESS) {
    bad(url, "the query cannot be read", form);
  }
  std::unique_ptr<UriQueryListA, void (*)(UriQueryListA*)> owned(list, uriFreeQueryListA);
  for (const UriQueryListA* q = list; q != nullptr; q = q->next) {
    if (q->key == nullptr || *q->key == '\0') continue;
    out.push_back({q->key, q->value ? q->value : "", q->value != nullptr});
  }
  return out;
}

SqliteUrl parse_sqlite(std::string_view url) {
  Parsed parsed;
  parse_into(url, parsed, kSqliteForm);
  if (parsed.uri.query.first != nullptr) {
    bad(url, "sqlite urls take no query parameters", kSqliteForm);
  }
  // Everything after "sqlite:", less the "//" of an (empty or relative) authority.
  std::string_view rest = url.substr(url.find(':') + 1);
  if (rest.starts_with("//")) rest.remove_prefix(2);
  std::string path = decode(rest);
  if (path.empty() || path == "/") bad(url, "the database path is missing", kSqliteForm);
  return SqliteUrl{std::move(path)};
}

RedisUrl parse_redis(std::string_view url) {
  Parsed parsed;
  parse_into(url, parsed, kRedisForm);
  const UriUriA& uri = parsed.uri;
  RedisUrl out;
  if (const std::string_view info = text(uri.userInfo); uri.userInfo.first != nullptr) {
    if (const auto colon = info.find(':'); colon != std::string_view::npos) {
      out.user = decode(info.substr(0, colon));
      out.password = decode(info.substr(colon + 1));
    } else {
      // redis://secret@host is how several clients spell a password without a user.
      out.password = decode(info);
    }
  }
  out.host = decode(text(uri.hostText));
  if (out.host.empty()) bad(url, "the host is missing", kRedisForm);
  long long number = 0;
  if (uri.portText.first != nullptr) {
    const std::string_view port = text(uri.portText);
    if (port.empty()) bad(url, "the port after ':' is empty", kRedisForm);
    if (!parse_int(port, 1, 65535, number)) {
      bad(url, "port \"" + std::string(port) + "\" is not a number in 1..65535", kRedisForm);
    }
    out.port = static_cast<int>(number);
  }
  if (uri.pathHead != nullptr) {
    if (uri.pathHead->next != nullptr) bad(url, "the path is one database number", kRedisForm);
    const std::string_view db = text(uri.pathHead->text);
    if (!db.empty()) {
      if (!parse_int(db, 0, 1 << 20, number)) {
        bad(url, "database \"" + std::string(db) + "\" is not a non-negative number", kRedisForm);
      }
      out.db = static_cast<int>(number);
    }
  }
  for (const Query& q : query_of(url, uri, kRedisForm)) {
    if (q.name == "prefix") {
      out.prefix = q.value;
    } else if (q.name == "timeout_ms") {
      if (!parse_int(q.value, 1, 3'600'000, number)) {
        bad(url, "timeout_ms \"" + q.value + "\" is not a number of milliseconds in 1..3600000",
            kRedisForm);
      }
      out.timeout = std::chrono::milliseconds(number);
    } else if (q.name == "db") {
      if (!parse_int(q.value, 0, 1 << 20, number)) {
        bad(url, "db \"" + q.value + "\" is not a non-negative number", kRedisForm);
      }
      out.db = static_cast<int>(number);
    } else {
      bad(url, "unknown parameter \"" + q.name + "\" (known: prefix, timeout_ms, db)", kRedisForm);
    }
  }
  return out;
}

// libpq parses the URI itself (when the store connects); here only idem's own parameter is
// taken out, so no SQL or identifier is built.
PostgresUrl parse_postgres(std::string_view url) {
  Parsed parsed;
  const std::string& escaped = parse_into(url, parsed, kPostgresForm);
  const UriUriA& uri = parsed.uri;
  if (uri.hostText.first == nullptr ||
      (text(uri.hostText).empty() && uri.pathHead == nullptr && uri.query.first == nullptr)) {
    bad(url, "the host is missing", kPostgresForm);
  }
  PostgresUrl out;
  const std::size_t query_start =
      uri.query.first == nullptr ? escaped.size()
                                 : static_cast<std::size_t>(uri.query.first - escaped.data()) - 1;
  out.conninfo = escaped.substr(0, query_start);
  std::string kept;
  for (const Query& q : query_of(url, uri, kPostgresForm)) {
    if (!q.has_value) bad(url, "parameter \"" + q.name + "\" has no '='", kPostgresForm);
    if (q.name == "schema") {
      out.schema = q.value;
      if (out.schema.empty()) bad(url, "schema is empty", kPostgresForm);
      continue;
    }
    kept += kept.empty() ? "?" : "&";
    kept += q.name + "=" + q.value;
  }
  out.conninfo += kept;
  return out;
}

}  // namespace

StoreUrl parse_store_url(std::string_view url) {
  const auto colon = url.find(':');
  const std::string_view scheme = colon == std::string_view::npos ? url : url.substr(0, colon);
  if (colon == std::string_view::npos || scheme.empty() ||
      scheme.find_first_of("/.\\") != std::string_view::npos) {
    bad(url, "no scheme (a store url starts with the kind of store)", all_forms());
  }
  if (scheme == "memory") {
    if (url.size() > colon + 1) bad(url, "memory: takes nothing after the colon", kMemoryForm);
    return MemoryUrl{};
  }
  if (scheme == "sqlite") return parse_sqlite(url);
  if (scheme == "redis") return parse_redis(url);
  if (scheme == "postgres" || scheme == "postgresql") return parse_postgres(url);
  if (scheme == "rediss") {
    bad(url, "TLS (rediss://) is not supported by idem's Redis store", kRedisForm);
  }
  bad(url, "unknown scheme \"" + std::string(scheme) + "\"", all_forms());
}

namespace {
// Masks the value of every "password=" parameter (libpq accepts one in the query).
std::string redact_query(std::string query) {
  constexpr std::string_view kKey = "password=";
  for (std::size_t at = query.find(kKey); at != std::string::npos; at = query.find(kKey, at)) {
    if (at != 0 && query[at - 1] != '?' && query[at - 1] != '&') {
      at += kKey.size();
      continue;
    }
    const std::size_t value = at + kKey.size();
    const std::size_t end = query.find('&', value);
    query.replace(value, end == std::string::npos ? std::string::npos : end - value, "***");
    at = value + 3;
  }
  return query;
}
}  // namespace

// Works on text that may not parse (it is used in the messages about such URLs).
std::string redact_store_url(std::string_view url) {
  const auto scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) return redact_query(std::string(url));
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

}  // namespace idem
