#include "record.hpp"

#include <charconv>
#include <cstdlib>
#include <limits>
#include <system_error>

namespace idem::redis_detail {

// --- scripts -----------------------------------------------------------------------------------
//
// KEYS per claimed key: record, token counter (same hash slot). ARGV per key: fp, ttl, mark.
// Reply: a flat array, two entries per key: code, data.
//   1 acquired (data token), 5 acquired over an expired lease (data token),
//   2 done (data response or nil), 3 in progress, 4 conflict.
const std::string_view Scripts::claim = R"lua(
local Z = '00000000000000000000000000000000'
local out = {}
for i = 1, #KEYS / 2 do
  local rk, ck = KEYS[2 * i - 1], KEYS[2 * i]
  local fp, ttl, mark = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local v = redis.call('GET', rk)
  local took = 0
  if v then
    local st = string.sub(v, 1, 1)
    local c = string.find(v, ':', 34, true)
    if st == 'p' and redis.call('PTTL', rk) <= tonumber(string.sub(v, c + 1)) then
      took = 1
    else
      local sfp = string.sub(v, 2, 33)
      if fp ~= Z and sfp ~= Z and sfp ~= fp then
        out[2 * i - 1] = 4; out[2 * i] = 0
      elseif st == 'p' then
        out[2 * i - 1] = 3; out[2 * i] = 0
      elseif st == 'r' then
        out[2 * i - 1] = 2; out[2 * i] = string.sub(v, c + 1)
      else
        out[2 * i - 1] = 2; out[2 * i] = false
      end
    end
  end
  if out[2 * i - 1] == nil then
    local t = string.format('%d', redis.call('INCR', ck))
    if mark == '1' then
      redis.call('SET', rk, 'd' .. fp .. t .. ':', 'PX', ttl)
    else
      redis.call('SET', rk, 'p' .. fp .. t .. ':' .. ttl, 'PX', 2 * tonumber(ttl))
    end
    out[2 * i - 1] = 1 + 4 * took; out[2 * i] = tonumber(t)
  end
end
return out
)lua";

// KEYS: records. ARGV per key: token, retention ms, has response ('0'/'1'), response, channel.
// Reply: array of 1 (completed) / 0 (the token no longer owns the key).
// A completed key is announced on its channel (empty: the server has no SPUBLISH) with the
// record's key as message, for waiters (RedisStore::await_change). redis.pcall: a user
// without the right to publish there still completes; its waiters then ask again after pauses.
const std::string_view Scripts::complete = R"lua(
local out = {}
for i = 1, #KEYS do
  local rk = KEYS[i]
  local tok, ret, has, resp = ARGV[5 * i - 4], ARGV[5 * i - 3], ARGV[5 * i - 2], ARGV[5 * i - 1]
  local ch = ARGV[5 * i]
  local v = redis.call('GET', rk)
  out[i] = 0
  if v then
    local c = string.find(v, ':', 34, true)
    if c and string.sub(v, 34, c - 1) == tok then
      if has == '1' then
        redis.call('SET', rk, 'r' .. string.sub(v, 2, c) .. resp, 'PX', ret)
      else
        redis.call('SET', rk, 'd' .. string.sub(v, 2, c), 'PX', ret)
      end
      if ch ~= '' then redis.pcall('SPUBLISH', ch, rk) end
      out[i] = 1
    end
  end
end
return out
)lua";

// KEYS[1]: record. ARGV[1]: token, ARGV[2]: channel (as for complete). Deletes an in-progress
// record still owned by the token.
const std::string_view Scripts::release = R"lua(
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 1) ~= 'p' then return 0 end
local c = string.find(v, ':', 34, true)
if not c or string.sub(v, 34, c - 1) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' then redis.pcall('SPUBLISH', ARGV[2], KEYS[1]) end
return 1
)lua";

// KEYS[1]: record. ARGV[1]: channel (as for complete). Deletes the record whatever its state.
const std::string_view Scripts::forget = R"lua(
local n = redis.call('DEL', KEYS[1])
if n > 0 and ARGV[1] ~= '' then redis.pcall('SPUBLISH', ARGV[1], KEYS[1]) end
return n
)lua";

// KEYS[1]: record. Whether the record is still held: in progress with its lease running.
const std::string_view Scripts::held =
    "local v = redis.call('GET', KEYS[1]) "
    "if not v or string.sub(v, 1, 1) ~= 'p' then return 0 end "
    "local c = string.find(v, ':', 34, true) "
    "if not c or redis.call('PTTL', KEYS[1]) <= tonumber(string.sub(v, c + 1)) then return 0 "
    "end "
    "return 1";

// KEYS[1]: record. The value and the PTTL, read atomically (a pipelined GET + PTTL could see
// a record rewritten or expired between the two). Read-only.
const std::string_view Scripts::inspect =
    "local v = redis.call('GET', KEYS[1]) "
    "if not v then return false end "
    "return {v, redis.call('PTTL', KEYS[1])}";

// --- the handshake ---------------------------------------------------------------------------

void ScriptCache::load(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options,
                       Counters& counters) {
  auto run = [&](Command cmd, std::string_view what) {
    void* raw = redisCommandArgv(ctx, cmd.argc(), cmd.argv(), cmd.lens());
    if (raw == nullptr) throw_context_error(ctx, endpoint, options, what);
    return ReplyPtr(static_cast<redisReply*>(raw));
  };
  // Sharded pub/sub (SPUBLISH, Redis 7) carries the change notifications of await_change.
  // HELLO (Redis 6+) names the version; a server that refuses it (older, or an ACL without
  // @connection) is taken to have none: waiters then only pause.
  bool sharded = false;
  {
    ReplyPtr hello = run(Command{"HELLO", "2"}, "HELLO");
    if (hello->type == REDIS_REPLY_ARRAY) {
      for (std::size_t i = 0; i + 1 < hello->elements; i += 2) {
        const redisReply* name = hello->element[i];
        const redisReply* value = hello->element[i + 1];
        if (name->type == REDIS_REPLY_STRING && reply_text(name) == "version" &&
            value->type == REDIS_REPLY_STRING) {
          sharded = std::atoi(value->str) >= 7;
        }
      }
    }
  }
  std::string shas[3];
  const std::string_view texts[3] = {Scripts::claim, Scripts::complete, Scripts::release};
  for (int i = 0; i < 3; ++i) {
    ReplyPtr reply = run(Command{"SCRIPT", "LOAD", texts[i]}, "SCRIPT LOAD");
    counters.script_loads.fetch_add(1, std::memory_order_relaxed);
    if (reply->type != REDIS_REPLY_STRING) {
      throw_redis(Kind::reply, "Redis at " + endpoint.text() + " refused SCRIPT LOAD (" +
                                   reply_text(reply.get()) +
                                   "): the store needs Lua scripting (EVALSHA, SCRIPT) allowed "
                                   "for its user");
    }
    shas[i] = reply_text(reply.get());
  }
  std::lock_guard lock(mutex_);
  claim_sha_ = shas[0];
  complete_sha_ = shas[1];
  release_sha_ = shas[2];
  sharded_pubsub_ = sharded;
}

bool ScriptCache::loaded() const {
  std::lock_guard lock(mutex_);
  return !claim_sha_.empty();
}
std::string ScriptCache::claim_sha() const {
  std::lock_guard lock(mutex_);
  return claim_sha_;
}
std::string ScriptCache::complete_sha() const {
  std::lock_guard lock(mutex_);
  return complete_sha_;
}
std::string ScriptCache::release_sha() const {
  std::lock_guard lock(mutex_);
  return release_sha_;
}
bool ScriptCache::sharded_pubsub() const {
  std::lock_guard lock(mutex_);
  return sharded_pubsub_;
}

// --- encoding and decoding ----------------------------------------------------------------------

std::string hex_fingerprint(const Fingerprint& fp) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) {
    out[15 - i] = kHex[(fp.high >> (4 * i)) & 0xf];
    out[31 - i] = kHex[(fp.low >> (4 * i)) & 0xf];
  }
  return out;
}

std::string decimal(std::int64_t v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  (void)ec;
  return std::string(buf, end);
}

ParsedRecord parse_record(std::string_view v) {
  ParsedRecord p;
  if (v.size() < 35 || (v[0] != 'p' && v[0] != 'd' && v[0] != 'r')) return p;
  const std::size_t colon = v.find(':', 33);
  if (colon == std::string_view::npos) return p;
  const auto [end, ec] = std::from_chars(v.data() + 33, v.data() + colon, p.token);
  if (ec != std::errc{} || end != v.data() + colon) return p;
  p.state = v[0];
  p.tail = v.substr(colon + 1);
  if (p.state == 'p') {
    const auto [lend, lec] =
        std::from_chars(p.tail.data(), p.tail.data() + p.tail.size(), p.lease_ms);
    if (lec != std::errc{} || lend != p.tail.data() + p.tail.size()) return p;
  }
  p.ok = true;
  return p;
}

std::optional<RecordInfo> record_info(std::string_view value, std::int64_t pttl) {
  const ParsedRecord p = parse_record(value);
  if (!p.ok) return std::nullopt;
  RecordInfo info;
  info.token = p.token;
  // PTTL -1: no expiry (not written by this store); report it as far away.
  const std::int64_t ttl = pttl < 0 ? std::numeric_limits<std::int64_t>::max() / 2 : pttl;
  if (p.state == 'p') {
    info.state = RecordInfo::State::in_progress;
    info.expires_in_ms = ttl - p.lease_ms;  // the record outlives its lease by one lease
  } else {
    info.state = RecordInfo::State::done;
    info.expires_in_ms = ttl;
    if (p.state == 'r') info.response = std::string(p.tail);
  }
  return info;
}

void decode_claims(const redisReply* r, std::span<const std::size_t> idx,
                   std::vector<Claim>& claims) {
  if (r->type != REDIS_REPLY_ARRAY || r->elements != idx.size() * 2) bad_reply("a claim", r);
  for (std::size_t n = 0; n < idx.size(); ++n) {
    const redisReply* code = r->element[2 * n];
    const redisReply* data = r->element[2 * n + 1];
    Claim& c = claims[idx[n]];
    switch (code->integer) {
      case 1:
      case 5:
        c.status = ClaimStatus::acquired;
        c.token = static_cast<std::uint64_t>(data->integer);
        c.took_over = code->integer == 5;
        break;
      case 2:
        c.status = ClaimStatus::done;
        if (data->type == REDIS_REPLY_STRING) c.response.emplace(data->str, data->len);
        break;
      case 3:
        c.status = ClaimStatus::in_progress;
        break;
      case 4:
        c.status = ClaimStatus::conflict;
        break;
      default:
        bad_reply("a claim", r);
    }
  }
}

void bad_reply(std::string_view what, const redisReply* reply) {
  std::string message =
      "Redis answered " + std::string(what) + " unexpectedly (" + reply_text(reply) + ")";
  if (is_error(reply, "OOM")) {
    message +=
        ": Redis is at maxmemory and refuses writes; raise maxmemory or shorten the retention "
        "(keep maxmemory-policy noeviction: evicting dedup records or token counters weakens "
        "the guarantees, see docs/stores/redis.md)";
  }
  throw_redis(reply != nullptr && reply->type == REDIS_REPLY_ERROR ? Kind::reply : Kind::protocol,
              message);
}

}  // namespace idem::redis_detail
