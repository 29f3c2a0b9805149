#pragma once
// The SQL of idem's own statements, built once per store around its (validated, quoted) schema
// name. Keys and every other value are parameters: nothing else is ever spliced into SQL.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace idem::detail::pg {

/// idem's statements, prepared on every connection under the names "idem_<n>".
enum class Sql : std::size_t {
  begin,         // every transaction's BEGIN (prepared: parsed once per connection)
  claim,         // set-based claim; see schema.cpp
  claim_one,     // the same for one key, with scalar parameters (a plan the cache can keep)
  claim_new,     // one key that must be new (a plain INSERT: unique_violation otherwise)
  complete,      // set-based completion (announces completed keys a waiter listens for)
  release,       // $1 key, $2 token, $3 wait hash (announced when a waiter listens)
  forget,        // $1 key, $2 wait hash (announced when a waiter listens)
  undo,          // $1 key, $2 token: drops a failed inbox message's record
  response,      // $1 key, $2 response (the inbox's own record)
  inspect,       // $1 key
  stats,         //
  save_offsets,  // $1 text[], $2 int4[], $3 int8[]
  offsets,       //
  purge_step,    // $1 limit
  purge_gated,   // $1 limit: one step if no other session holds the purge lock
  purge_lock,    // pg_try_advisory_lock
  purge_unlock,  // pg_advisory_unlock
  held,          // $1 key: in progress with a live lease? (FOR SHARE: waits for a writer)
  wait_lock,     // $1 wait lock id: a waiter's interest (a shared session advisory lock)
  wait_unlock,   // $1 wait lock id
  count_
};

inline constexpr std::size_t kSqlCount = static_cast<std::size_t>(Sql::count_);

/// The schema version this build writes into idem_meta and accepts.
inline constexpr std::int64_t kSchemaVersion = 1;

/// The columns idem_keys must have, as format_type() spells them.
inline constexpr std::string_view kKeysLayout =
    "key bytea, state smallint, token bigint, expires_at timestamp with time zone, "
    "fingerprint bigint, response bytea";

class Statements {
 public:
  /// schema must already be validated (letters, digits, _).
  explicit Statements(const std::string& schema);

  static const char* name(Sql which) noexcept;
  std::string_view text(Sql which) const noexcept { return sql_[static_cast<std::size_t>(which)]; }
  /// "\"schema\"" and "\"schema\".idem_keys"-style names.
  const std::string& schema() const noexcept { return quoted_; }
  std::string table(std::string_view name) const { return quoted_ + "." + std::string(name); }
  /// The schema name unquoted (bound as a parameter, e.g. to hashtext()).
  const std::string& schema_name() const noexcept { return schema_; }
  /// The NOTIFY channel of this schema's waiters ("idem_wait_<schema>", at most 63 bytes).
  const std::string& channel() const noexcept { return channel_; }
  /// The hash a waiter for key registers and listens for: XXH3-64 of the key mixed with the
  /// schema's. Its low 31 bits are the wait lock id; the notification's payload is its decimal.
  std::int64_t wait_hash(std::string_view key) const noexcept;
  static std::int32_t wait_lock_id(std::int64_t hash) noexcept {
    return static_cast<std::int32_t>(hash & 0x7fffffff);
  }

  /// Creates what is missing (run inside the creation lock).
  std::string create_script() const;

 private:
  std::string schema_;
  std::string quoted_;
  std::string channel_;
  std::uint64_t schema_hash_ = 0;
  std::array<std::string, kSqlCount> sql_;
};

}  // namespace idem::detail::pg
