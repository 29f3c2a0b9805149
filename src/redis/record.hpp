#pragma once
// The record of one key in Redis: its value format, the Lua scripts that claim, complete,
// release, forget, check and read it, how their arguments are encoded and how values and
// replies are decoded. Internal to idem::redis.
//
// Record value: <state:1><fingerprint:32 hex><token decimal>:<tail>
//   state 'p' in progress, tail = lease ms (the record lives 2 x lease: the second half is the
//              grace in which a claim can tell a takeover from a fresh claim)
//   state 'd' done, tail empty;  state 'r' done, tail = stored response (binary)
// Fingerprint all zeros = not fingerprinted, matches anything.

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "connection.hpp"
#include "counters.hpp"
#include "idem/claim.hpp"
#include "idem/dedup_store.hpp"
#include "idem/fingerprint.hpp"

namespace idem::redis_detail {

/// The Lua scripts. claim, complete and release are preloaded (SCRIPT LOAD) and called by SHA1;
/// the operator's and the waiter's scripts are sent as EVAL.
struct Scripts {
  static const std::string_view claim;
  static const std::string_view complete;
  static const std::string_view release;
  static const std::string_view forget;
  static const std::string_view held;     // 1 while the record is in progress with a live lease
  static const std::string_view inspect;  // {value, PTTL} in one atomic read, or nil
};

/// What the store learns on each connection's handshake: the SHA1s of the preloaded scripts
/// (SCRIPT LOAD) and whether the server has sharded pub/sub (HELLO). Thread-safe.
class ScriptCache {
 public:
  /// The pool's on-connect hook. @throws RedisUnavailable when scripting is refused.
  void load(redisContext* ctx, const Endpoint& endpoint, const RedisOptions& options,
            Counters& counters);
  bool loaded() const;
  std::string claim_sha() const;
  std::string complete_sha() const;
  std::string release_sha() const;
  /// SPUBLISH/SSUBSCRIBE (Redis 7).
  bool sharded_pubsub() const;

 private:
  mutable std::mutex mutex_;
  std::string claim_sha_, complete_sha_, release_sha_;
  bool sharded_pubsub_ = false;
};

// --- encoding the scripts' arguments --------------------------------------------------------

/// 32 lower-case hex digits (all zeros: not fingerprinted).
std::string hex_fingerprint(const Fingerprint& fp);
std::string decimal(std::int64_t v);
/// PX needs at least 1 ms.
inline std::int64_t positive_ms(std::chrono::milliseconds ms) {
  return ms.count() < 1 ? 1 : ms.count();
}

// --- decoding ---------------------------------------------------------------------------------

/// A record value, or a prefix of one (at least up to the ':' and, for 'p', the whole lease),
/// which lets stats read only the head of each value.
struct ParsedRecord {
  bool ok = false;  // false: not an idem record
  char state = 0;
  std::uint64_t token = 0;
  std::int64_t lease_ms = 0;  // state 'p'
  std::string_view tail;
};
ParsedRecord parse_record(std::string_view value);

/// What an operator sees of a record with this value and PTTL; nullopt when the value is not
/// an idem record.
std::optional<RecordInfo> record_info(std::string_view value, std::int64_t pttl);

/// Fills claims[idx[n]] from the claim script's reply for the keys idx.
void decode_claims(const redisReply* reply, std::span<const std::size_t> idx,
                   std::vector<Claim>& claims);

/// @throws RedisReplyError (an error reply, with advice for OOM) or RedisProtocolError.
[[noreturn]] void bad_reply(std::string_view what, const redisReply* reply);

}  // namespace idem::redis_detail
