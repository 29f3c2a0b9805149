#include "operator_scan.hpp"

#include <string_view>
#include <vector>

#include "record.hpp"

namespace idem::redis_detail {
namespace {

// SCAN's MATCH pattern for every record key: the prefix with glob characters escaped.
std::string record_pattern(const std::string& key_prefix) {
  std::string pattern;
  for (char c : key_prefix + "k:") {
    if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\') pattern.push_back('\\');
    pattern.push_back(c);
  }
  pattern.push_back('*');
  return pattern;
}

}  // namespace

StoreStats scan_records(Router& router, const std::string& key_prefix) {
  static constexpr std::string_view kHeadEnd = "95";  // 1 + 32 + 20 + 1 + 20 + slack
  StoreStats stats;
  const std::string pattern = record_pattern(key_prefix);
  for (Node* node : router.masters()) {
    std::string cursor = "0";
    do {
      Command scan{"SCAN"};
      scan.add_owned(cursor);
      scan.add("MATCH");
      scan.add(pattern);
      scan.add("COUNT");
      scan.add("1000");
      Command* scan_cmds[] = {&scan};
      std::vector<ReplyPtr> scanned = node->exchange(scan_cmds);
      const redisReply* r = scanned[0].get();
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
          r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_ARRAY) {
        bad_reply("SCAN", r);
      }
      cursor.assign(r->element[0]->str, r->element[0]->len);
      const redisReply* keys = r->element[1];
      if (keys->elements == 0) continue;
      std::vector<Command> per_key(keys->elements * 3);
      std::vector<Command*> cmds;
      cmds.reserve(per_key.size());
      for (std::size_t i = 0; i < keys->elements; ++i) {
        const std::string_view k(keys->element[i]->str, keys->element[i]->len);
        Command& head = per_key[3 * i];
        head.add("GETRANGE");
        head.add(k);
        head.add("0");
        head.add(kHeadEnd);
        Command& ttl = per_key[3 * i + 1];
        ttl.add("PTTL");
        ttl.add(k);
        Command& mem = per_key[3 * i + 2];
        mem.add("MEMORY");
        mem.add("USAGE");
        mem.add(k);
        for (std::size_t c = 0; c < 3; ++c) cmds.push_back(&per_key[3 * i + c]);
      }
      std::vector<ReplyPtr> replies = node->exchange(cmds);
      for (std::size_t i = 0; i < keys->elements; ++i) {
        const redisReply* head = replies[3 * i].get();
        const redisReply* ttl = replies[3 * i + 1].get();
        const redisReply* mem = replies[3 * i + 2].get();
        // Gone since the SCAN (expired, released, moved to another node): not counted.
        if (head->type != REDIS_REPLY_STRING || head->len == 0) continue;
        const ParsedRecord p = parse_record(std::string_view(head->str, head->len));
        if (!p.ok) {  // another program's key under the prefix: not a record
          ++stats.foreign;
          continue;
        }
        ++stats.records;
        if (mem->type == REDIS_REPLY_INTEGER && mem->integer > 0) {
          stats.bytes += static_cast<std::uint64_t>(mem->integer);
        }
        if (p.state != 'p') {
          ++stats.done;
        } else if (ttl->type == REDIS_REPLY_INTEGER && ttl->integer > p.lease_ms) {
          ++stats.in_progress;  // lease still running (not in its takeover grace)
        }
      }
    } while (cursor != "0");
  }
  return stats;
}
}  // namespace idem::redis_detail
