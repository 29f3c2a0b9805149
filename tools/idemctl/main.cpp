// idemctl: generate inner message ids and inspect, count, purge and forget dedup records.
// Exit codes: see ExitCode in exit_code.hpp (0 ok, 1 no such key, 2 usage or bad url,
// 3 store unreachable or failed, 4 unsupported, 5 not confirmed).

#include <CLI/CLI.hpp>

#include <unistd.h>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <variant>

#include "exit_code.hpp"
#include "idem/dedup_store.hpp"
#include "idem/error.hpp"
#include "idem/inner_msg_id.hpp"
#include "idem/open_store.hpp"

namespace {

using namespace idemctl;

struct Args {
  std::size_t count = 1;
  std::string url;
  std::string key;
  bool hex = false;
  bool yes = false;
  std::size_t max_records = SIZE_MAX;
  long long busy_timeout_ms = 5000;
};

int fail(int code, const std::string& message) {
  std::cerr << "idemctl: " << message << '\n';
  return code;
}

// Keys may be any bytes: show printable ASCII as is, the rest as \xNN.
std::string printable(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// The bytes of hex text, or what is wrong with it.
std::optional<std::string> unhex(std::string_view text, std::string& problem) {
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (digit(text[i]) < 0) {
      problem = "character " + std::to_string(i + 1) + " ('" + printable(text.substr(i, 1)) +
                "') is not a hex digit (0-9, a-f)";
      return std::nullopt;
    }
  }
  if (text.empty() || text.size() % 2 != 0) {
    problem = std::to_string(text.size()) +
              " hex digits is not a whole number of bytes (two digits per byte, e.g. 00ff10)";
    return std::nullopt;
  }
  std::string out;
  for (std::size_t i = 0; i < text.size(); i += 2) {
    out += static_cast<char>(digit(text[i]) * 16 + digit(text[i + 1]));
  }
  return out;
}

std::string duration(std::int64_t ms) {
  const bool past = ms < 0;
  std::uint64_t left = static_cast<std::uint64_t>(past ? -ms : ms) / 1000;
  std::string out;
  const std::uint64_t days = left / 86400, hours = left / 3600 % 24, minutes = left / 60 % 60,
                      seconds = left % 60;
  if (days) out += std::to_string(days) + "d";
  if (days || hours) out += std::to_string(hours) + "h";
  if (days || hours || minutes) out += std::to_string(minutes) + "m";
  out += std::to_string(seconds) + "s";
  return past ? "expired " + out + " ago" : "in " + out;
}

std::string_view state_name(idem::RecordInfo::State state) {
  switch (state) {
    case idem::RecordInfo::State::in_progress:
      return "in_progress";
    case idem::RecordInfo::State::done:
      return "done";
    case idem::RecordInfo::State::released:
      return "released";
  }
  return "unknown";
}

// Opens the store and runs op on it, mapping every failure to its exit code.
// Read-only commands (inspect, stats) open SQLite read-only: they take no write lock and never
// wait behind a consumer's transaction.
enum class Access { read, write };

template <class Op>
int with_store(const Args& args, Access access, Op&& op) {
  idem::StoreUrl url;
  try {
    url = idem::parse_store_url(args.url);
  } catch (const idem::BadStoreUrl& e) {
    return fail(exit_usage, e.what());
  }
  if (std::holds_alternative<idem::MemoryUrl>(url)) {
    return fail(exit_usage,
                "memory: names a store that lives inside one process: idemctl cannot reach it");
  }
  std::unique_ptr<idem::DedupStore> store;
  try {
    // Never create a database (an operator's typo must leave nothing behind); one connection.
    store = idem::open_store(url, {.must_exist = true,
                                   .read_only = access == Access::read,
                                   .busy_timeout = std::chrono::milliseconds(args.busy_timeout_ms),
                                   .pool_size = 1});
  } catch (const idem::StoreBackendNotBuilt& e) {
    return fail(exit_unsupported, e.what());
  } catch (const idem::ConfigError& e) {
    return fail(exit_usage, std::string("bad store url \"") + idem::redact_store_url(args.url) +
                                "\": " + e.what());
  } catch (const idem::StoreUnavailable& e) {
    return fail(exit_unavailable,
                std::string("cannot reach ") + idem::redact_store_url(args.url) + ": " + e.what());
  } catch (const std::exception& e) {
    return fail(exit_unavailable,
                std::string("cannot open ") + idem::redact_store_url(args.url) + ": " + e.what());
  }
  try {
    return op(*store);
  } catch (const idem::ConfigError& e) {
    // DedupStore's default operator hooks throw ConfigError (the backend lacks the operation),
    // and so does a record the store cannot read (another program's key): retrying won't help.
    return fail(exit_unsupported, e.what());
  } catch (const idem::InvalidMessage& e) {
    return fail(exit_usage, e.what());
  } catch (const std::exception& e) {
    return fail(exit_unavailable, e.what());
  }
}

// The key argument, decoded from hex when asked; nullopt (after the message) when invalid.
std::optional<std::string> key_of(const Args& args) {
  if (!args.hex) return args.key;
  std::string problem;
  std::optional<std::string> key = unhex(args.key, problem);
  if (!key) fail(exit_usage, "--hex: \"" + printable(args.key) + "\": " + problem);
  return key;
}

int gen_id(const Args& args) {
  idem::InnerMsgIdGenerator generator;
  std::string out;
  for (std::size_t i = 0; i < args.count; ++i) {
    out += generator.next().to_string();
    out += '\n';
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  return exit_ok;
}

int inspect(const Args& args) {
  const std::optional<std::string> key = key_of(args);
  if (!key) return exit_usage;
  return with_store(args, Access::read, [&](idem::DedupStore& store) {
    const std::optional<idem::RecordInfo> info = store.inspect(*key);
    if (!info) return fail(exit_missing_key, "no record of key \"" + printable(*key) + "\"");
    std::cout << "key:      " << printable(*key) << '\n'
              << "state:    " << state_name(info->state) << '\n'
              << "token:    " << info->token << '\n'
              << "expires:  " << duration(info->expires_in_ms) << '\n'
              << "response: " << (info->response ? '"' + printable(*info->response) + '"' : "-")
              << '\n';
    return static_cast<int>(exit_ok);
  });
}

int stats(const Args& args) {
  return with_store(args, Access::read, [&](idem::DedupStore& store) {
    const idem::StoreStats s = store.stats();
    std::cout << "store:       " << store.name() << '\n'
              << "records:     " << s.records << '\n'
              << "in_progress: " << s.in_progress << '\n'
              << "done:        " << s.done << '\n'
              << "bytes:       " << s.bytes << '\n'
              << "evictions:   " << s.evictions << '\n';
    if (s.foreign > 0) {
      std::cout << "foreign:     " << s.foreign
                << "  (keys under the prefix that are not idem records: another program "
                   "shares the prefix)\n";
    }
    return static_cast<int>(exit_ok);
  });
}

int forget(const Args& args) {
  const std::optional<std::string> key = key_of(args);
  if (!key) return exit_usage;
  return with_store(args, Access::write, [&](idem::DedupStore& store) {
    if (!args.yes) {
      std::cerr << "Forget key \"" << printable(*key) << "\" in "
                << idem::redact_store_url(args.url)
                << "? A redelivery of its message will be processed again. [y/N] " << std::flush;
      std::string answer;
      if (!std::getline(std::cin, answer) || (answer != "y" && answer != "yes")) {
        return fail(exit_aborted, "not confirmed; nothing was changed (use --yes in scripts)");
      }
    }
    if (!store.forget(*key)) {
      return fail(exit_missing_key, "no record of key \"" + printable(*key) + "\"");
    }
    std::cout << "forgot key \"" << printable(*key) << "\"\n";
    return static_cast<int>(exit_ok);
  });
}

int purge_expired(const Args& args) {
  return with_store(args, Access::write, [&](idem::DedupStore& store) {
    const std::size_t purged = store.purge_expired(args.max_records);
    std::cout << "purged " << purged << " expired record" << (purged == 1 ? "" : "s") << '\n';
    return static_cast<int>(exit_ok);
  });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"idemctl: inner message ids and operator access to idem dedup stores.\n"};
  app.footer(
      "Store urls: memory:, sqlite:///path/to/db, redis://[[user]:password@]host[:port][/db]"
      "[?prefix=P&timeout_ms=N],\n  postgres://[user[:password]@]host[:port]/dbname"
      "[?libpq-param=value&schema=S] (or postgresql://)\nBackends in this build: " +
      std::string(idem::open_store_backends()) +
      "\nExit codes: 0 ok, 1 no such key, 2 usage or bad url, 3 store unreachable or failed, "
      "4 unsupported, 5 not confirmed");
  app.require_subcommand(1);
  Args args;
  int (*command)(const Args&) = nullptr;

  auto* gen = app.add_subcommand("gen-id", "Print new inner message ids (UUIDv7), one per line");
  gen->add_option("-n,--count", args.count, "How many ids (increasing)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{10'000'000}));
  gen->callback([&] { command = gen_id; });

  auto add_url = [&](CLI::App* sub) {
    sub->add_option("store-url", args.url,
                    "sqlite:///path/db, redis://host:port/db?prefix=P or postgres://host/db")
        ->required();
    sub->add_option("--busy-timeout", args.busy_timeout_ms,
                    "SQLite: milliseconds to wait for another process's lock (default 5000)")
        ->check(CLI::Range(0LL, 3'600'000LL));
  };
  auto add_key = [&](CLI::App* sub) {
    sub->add_option("key", args.key, "The biz-id (Message::key)")->required();
    sub->add_flag("--hex", args.hex, "The key is given as hex digits (for binary keys)");
  };

  auto* insp = app.add_subcommand("inspect", "Show the record of one key (exit 1 if none)");
  add_url(insp);
  add_key(insp);
  insp->callback([&] { command = inspect; });

  auto* stat = app.add_subcommand("stats", "Count the records of a store");
  add_url(stat);
  stat->callback([&] { command = stats; });

  auto* forg = app.add_subcommand(
      "forget", "Drop the record of one key so its message is processed again (asks first)");
  add_url(forg);
  add_key(forg);
  forg->add_flag("-y,--yes", args.yes, "Do not ask for confirmation");
  forg->callback([&] { command = forget; });

  auto* purge = app.add_subcommand("purge-expired", "Delete expired records now");
  add_url(purge);
  purge->add_option("--max", args.max_records, "Delete at most this many (default: all)")
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            // Not CLI::PositiveNumber: its message prints the range up to DBL_MAX.
            std::size_t value = 0;
            const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
            if (ec != std::errc{} || end != text.data() + text.size() || value == 0) {
              return "\"" + text + "\" is not a positive whole number of records (e.g. 100000)";
            }
            return {};
          },
          "COUNT"));
  purge->callback([&] { command = purge_expired; });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help, or the error and a hint
    return code == 0 ? exit_ok : exit_usage;
  }
  return command ? command(args) : exit_usage;
}
