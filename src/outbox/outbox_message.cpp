#include "idem/outbox/outbox_message.hpp"

#include <cstdint>

#include "idem/error.hpp"

namespace idem::detail {

namespace {
void put_u32(std::string& out, std::size_t n) {
  const auto v = static_cast<std::uint32_t>(n);
  out += static_cast<char>(v >> 24);
  out += static_cast<char>(v >> 16);
  out += static_cast<char>(v >> 8);
  out += static_cast<char>(v);
}

std::string_view take(std::string_view& blob, bool& ok) {
  if (blob.size() < 4) {
    ok = false;
    return {};
  }
  std::uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n = (n << 8) | static_cast<unsigned char>(blob[i]);
  blob.remove_prefix(4);
  if (blob.size() < n) {
    ok = false;
    return {};
  }
  std::string_view out = blob.substr(0, n);
  blob.remove_prefix(n);
  return out;
}
}  // namespace

std::string encode_outbox_headers(const std::vector<std::pair<std::string, std::string>>& headers) {
  std::string out;
  for (const auto& [name, value] : headers) {
    put_u32(out, name.size());
    out += name;
    put_u32(out, value.size());
    out += value;
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> decode_outbox_headers(std::string_view blob) {
  std::vector<std::pair<std::string, std::string>> headers;
  bool ok = true;
  while (ok && !blob.empty()) {
    std::string_view name = take(blob, ok);
    std::string_view value = take(blob, ok);
    if (ok) headers.emplace_back(name, value);
  }
  if (!ok) {
    throw Error(
        "outbox row: the headers column is not in idem's encoding (was the row written by "
        "something other than an idem outbox writer?)");
  }
  return headers;
}

void validate_outbox_message(const OutboxMessage& message) {
  if (message.key.empty()) {
    throw InvalidMessage(
        "outbox message: the key (biz-id) is empty; give every message the business id the "
        "consumer deduplicates on");
  }
}

void validate_outbox_identifier(std::string_view what, std::string_view name) {
  bool ok = !name.empty() && name.size() <= 63 && !(name[0] >= '0' && name[0] <= '9');
  for (char c : name) {
    ok = ok &&
         ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_');
  }
  if (!ok) {
    throw ConfigError(std::string(what) + " \"" + std::string(name) +
                      "\" is not usable: use 1 to 63 characters of [A-Za-z0-9_], not starting "
                      "with a digit");
  }
}

}  // namespace idem::detail
