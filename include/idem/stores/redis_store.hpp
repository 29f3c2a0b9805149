#pragma once
/// @file
/// @brief idem::RedisStore: a DedupStore shared by many processes and machines through Redis
/// (a single server or a Redis Cluster). Link idem::redis.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "idem/dedup_store.hpp"
#include "idem/stores/redis_errors.hpp"

struct redisContext;  // hiredis; only the sources include <hiredis/hiredis.h>

namespace idem {

/// @brief Where and how a RedisStore connects. A plain struct: every field has a default.
struct RedisOptions {
  /// Server host name or address (a seed node when cluster is set).
  std::string host = "127.0.0.1";
  /// TCP port.
  int port = 6379;
  /// Path of a Unix socket; when non-empty it is used instead of host and port.
  std::string unix_socket{};
  /// ACL user name; empty: the "default" user (plain `AUTH password`).
  std::string user{};
  /// Password; empty: no AUTH.
  std::string password{};
  /// Logical database (SELECT); must be 0 with a cluster.
  int db = 0;
  /// Prepended to every key the store writes: records are `<prefix>k:<key>`, token counters
  /// `<prefix>t:{<tag>}`. Must not contain '{' or '}' (the key's own hash tag must decide its
  /// slot).
  std::string key_prefix = "idem:";
  /// Longest wait for a TCP/Unix connect (and the AUTH/SELECT/SCRIPT LOAD handshake).
  std::chrono::milliseconds connect_timeout{std::chrono::seconds{1}};
  /// Longest wait for one reply (a pipeline waits at most this long per reply read).
  /// A timed-out connection is closed; the call reports idem::StoreUnavailable.
  std::chrono::milliseconds command_timeout{std::chrono::seconds{1}};
  /// Connections per Redis node, shared by all threads using the store.
  std::size_t pool_size = 8;
  /// Longest wait for a free pooled connection when all pool_size are busy.
  std::chrono::milliseconds pool_wait_timeout{std::chrono::seconds{1}};
  /// After a failed connect, further connects to that node are refused at once (with the same
  /// idem::RedisUnavailable, saying when the next attempt is) for a backoff that starts at
  /// reconnect_backoff, doubles up to max_reconnect_backoff, and resets on the first success.
  std::chrono::milliseconds reconnect_backoff{std::chrono::milliseconds{20}};
  /// The longest reconnect backoff (>= reconnect_backoff).
  std::chrono::milliseconds max_reconnect_backoff{std::chrono::seconds{1}};
  /// Treat host:port as a seed of a Redis Cluster: route by hash slot, follow MOVED/ASK.
  bool cluster = false;
  /// Most MOVED/ASK/TRYAGAIN/reconnect rounds one cluster call makes before it gives up.
  std::size_t max_redirects = 16;
  /// Most keys one claim or completion script call carries (bounds how long Redis is busy).
  std::size_t max_keys_per_call = 128;
  /// When > 0, every round trip ends with `WAIT wait_replicas wait_timeout`: a claim or a
  /// completion counts only once that many replicas have it, so a failover to one of them
  /// cannot forget it. Fewer acknowledgements within wait_timeout: idem::StoreUnavailable.
  /// 0 (default): replication stays asynchronous (see docs/stores/redis.md, crash points).
  int wait_replicas = 0;
  std::chrono::milliseconds wait_timeout{std::chrono::milliseconds{100}};
};

/// @brief Counters of a RedisStore since construction.
struct RedisStoreStats {
  std::uint64_t round_trips = 0;   ///< pipelines written and read (one per node per call)
  std::uint64_t commands = 0;      ///< Redis commands sent (a script call counts once)
  std::uint64_t redirects = 0;     ///< MOVED and ASK replies followed
  std::uint64_t reconnects = 0;    ///< connections opened
  std::uint64_t script_loads = 0;  ///< SCRIPT LOADs, including reloads after NOSCRIPT
  // await_change (Options::in_progress_wait), see docs/stores/redis.md "Waiting for a held key":
  std::uint64_t notifications = 0;    ///< change notifications read (for any key of a channel)
  std::uint64_t waits_woken = 0;      ///< waits ended by a notification for their key
  std::uint64_t waits_settled = 0;    ///< waits that found the key settled once subscribed
  std::uint64_t waits_timed_out = 0;  ///< waits that ran out their max_wait
  std::uint64_t wait_fallbacks = 0;   ///< waits without notifications (no SPUBLISH, refused
                                      ///< SSUBSCRIBE, no connection): paused, or returned early
  std::uint64_t waiting = 0;          ///< threads waiting for a notification right now
};

/// @brief DedupStore on Redis (single server or Redis Cluster; tested with 7.0).
///
/// One claim or completion is one Lua script call (EVALSHA) and one round trip; a batch is
/// one script call per group of keys (per hash slot in a cluster), all pipelined, so a
/// batch costs one round trip per node. Records expire by themselves (PX): in-progress after
/// the lease (plus an equal grace to detect takeovers), done after the retention.
/// Fencing tokens come from INCR on a per-hash-slot counter, so they strictly increase per
/// key across releases, expiries and takeovers. See docs/stores/redis.md.
///
/// Operator hooks (idemctl): inspect() reads one record, stats() SCANs every master,
/// purge_expired() returns 0 (Redis expires records on its own; nothing to purge).
///
/// Waiting (await_change, used by Options::in_progress_wait): completions, releases and
/// forgets announce the key on a sharded pub/sub channel of its slot (SPUBLISH, Redis 7; on
/// older servers waiters only pause); a waiter listens on one dedicated subscriber connection
/// per node, opened on the first wait and shared by the store's waiting threads.
///
/// Thread-safe. Connects lazily: a wrong address or password is reported by the first call
/// (or by ping()) as idem::StoreUnavailable saying what to fix.
class RedisStore final : public DedupStore {
 public:
  /// @throws idem::ConfigError for unusable options (bad prefix, pool_size 0, db with cluster).
  explicit RedisStore(RedisOptions options = {});
  ~RedisStore() override;

  /// @brief Connects (if needed) and sends PING to every master.
  /// @throws idem::RedisUnavailable saying what is wrong: its type tells the kind
  /// (RedisIoError, RedisTimeout, RedisProtocolError, RedisReplyError).
  void ping();

  /// @brief Runs f with a pooled, connected, authenticated hiredis context of the node that
  /// owns the Redis key `routing_key`, e.g. record_key(k) (the seed node when empty). The
  /// escape hatch for anything the store does not wrap; do not keep the pointer after f
  /// returns, and leave the connection as you found it (no pending replies, same db).
  /// @throws idem::StoreUnavailable when no connection can be made.
  void with_connection(std::string_view routing_key, const std::function<void(redisContext*)>& f);

  /// @brief The Redis key of a record (key_prefix + "k:" + key), for an operator's inspection.
  std::string record_key(std::string_view key) const;

  /// @brief The sharded pub/sub channel on which changes of key's record are announced
  /// (key_prefix + "w:{<tag>}", one per hash slot; the message is record_key(key)), e.g. for
  /// `PUBSUB SHARDNUMSUB` or an ACL rule.
  std::string notification_channel(std::string_view key) const;

  /// @brief The store's own counters since construction (no server call; cheap to poll).
  /// stats() gives the store-wide StoreStats every backend has (a SCAN).
  RedisStoreStats counters() const;
  const RedisOptions& options() const noexcept;
  std::string_view name() const noexcept override { return "redis"; }

 private:
  Claim do_claim(const ClaimRequest& request) override;
  bool do_complete(const Completion& completion) override;
  bool do_release(std::string_view key, std::uint64_t token) override;
  bool do_forget(std::string_view key) override;
  std::vector<Claim> do_claim_batch(std::span<const ClaimRequest> requests) override;
  std::vector<bool> do_complete_batch(std::span<const Completion> completions) override;
  /// One atomic read (a read-only EVAL of GET + PTTL), routed like a claim. Released and
  /// forgotten keys are deleted, and expired records are gone: all three read as nullopt. An
  /// in-progress record's expires_in_ms is its lease's remaining time (<= 0: lease expired).
  std::optional<RecordInfo> do_inspect(std::string_view key) override;
  /// SCAN (COUNT 1000, never KEYS) of `<prefix>k:*` on the server or on every cluster master,
  /// then one pipeline of GETRANGE (the value's head) + PTTL + MEMORY USAGE per batch of keys.
  /// O(records) work on the servers: an operator command, not for a hot path or a frequent
  /// scrape. `records` counts every record found; `in_progress` only live leases, so a record
  /// in its takeover grace is in `records` alone. `bytes` sums MEMORY USAGE (0 where that
  /// command is refused); `evictions` stays 0. Approximate while keys expire or slots migrate.
  StoreStats do_stats() override;
  /// Always 0: Redis expires every record itself (PX on each write: in-progress records after
  /// two leases, done ones after the retention), so there is never anything left to purge.
  std::size_t do_purge_expired(std::size_t /*max_records*/) override { return 0; }
  /// Subscribes to the key's channel (SSUBSCRIBE on the dedicated connection), checks that the
  /// record is still held (one read: a change made before the subscription is seen there),
  /// then waits for the key's announcement or max_wait. Store failures do not escape: it pauses
  /// (or returns early) instead, and the caller's next claim reports what is wrong.
  void do_await_change(std::string_view key, std::chrono::milliseconds max_wait) override;

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem
