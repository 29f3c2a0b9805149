#include "idem/stores/redis_store.hpp"

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cluster_router.hpp"
#include "idem/error.hpp"
#include "operator_scan.hpp"
#include "record.hpp"
#include "subscriber.hpp"

namespace idem {

using namespace redis_detail;

namespace {

// Store calls that fail say what the caller must do about the message. The error keeps its
// kind, and the varying reconnect delay stays at the end.
template <class F>
auto advised(std::string_view advice, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const RedisUnavailable& e) {
    throw_redis(e.kind(), "redis store failed: " + e.summary() + "; " + std::string(advice),
                e.retry_in());
  } catch (const StoreUnavailable& e) {
    throw_redis(Kind::unavailable,
                "redis store failed: " + std::string(e.what()) + "; " + std::string(advice));
  }
}
constexpr std::string_view kClaimAdvice =
    "the message was not recorded as done: do not ack it, retry later";
constexpr std::string_view kCompleteAdvice =
    "the completion may not have been recorded: do not ack the message; its redelivery finds "
    "the key done, or takes it over once the lease expires";

}  // namespace

struct RedisStore::Impl {
  // The store's parts refer to options, scripts and counters: Impl never moves (unique_ptr).
  explicit Impl(RedisOptions o)
      : options(checked(std::move(o))),
        router(options, counters, [this](redisContext* ctx, const Endpoint& endpoint) {
          scripts.load(ctx, endpoint, options, counters);
        }) {}

  static RedisOptions checked(RedisOptions options) {
    if (options.key_prefix.find_first_of("{}") != std::string::npos) {
      throw ConfigError("RedisOptions::key_prefix \"" + options.key_prefix +
                        "\" contains '{' or '}': the store places its own hash tags; use a "
                        "prefix without braces");
    }
    if (options.pool_size == 0) throw ConfigError("RedisOptions::pool_size must be at least 1");
    if (options.max_keys_per_call == 0) {
      throw ConfigError("RedisOptions::max_keys_per_call must be at least 1");
    }
    if (options.wait_replicas < 0) throw ConfigError("RedisOptions::wait_replicas must be >= 0");
    if (options.cluster && options.db != 0) {
      throw ConfigError("RedisOptions::db must be 0 with a Redis Cluster (it has only db 0)");
    }
    if (options.unix_socket.empty() && (options.port <= 0 || options.port > 65535)) {
      throw ConfigError("RedisOptions::port " + std::to_string(options.port) +
                        " is not a TCP port (1..65535)");
    }
    if (options.reconnect_backoff.count() < 0 ||
        options.max_reconnect_backoff < options.reconnect_backoff) {
      throw ConfigError("RedisOptions::reconnect_backoff (" +
                        std::to_string(options.reconnect_backoff.count()) +
                        " ms) must be >= 0 and at most max_reconnect_backoff (" +
                        std::to_string(options.max_reconnect_backoff.count()) + " ms)");
    }
    return options;
  }

  RedisOptions options;
  ScriptCache scripts;
  Counters counters;
  Router router;

  // The SHA1s are learnt on the first handshake; make one before building script calls.
  void ensure_scripts() {
    if (!scripts.loaded()) (void)router.seed_node().acquire();
  }

  // --- keys ---------------------------------------------------------------------------------

  std::string record_key(std::string_view key) const {
    std::string k;
    k.reserve(options.key_prefix.size() + 2 + key.size());
    k.append(options.key_prefix).append("k:").append(key);
    return k;
  }
  // The token counter of the record's hash slot: INCR there gives tokens that strictly
  // increase for every key of the slot, and it lives in the same slot as the record, so one
  // script may touch both in a cluster. Bounded: at most 16384 counters per prefix.
  std::string counter_key(std::uint16_t slot) const {
    return options.key_prefix + "t:{" + slot_tag(slot) + "}";
  }

  // Where changes of the records of a hash slot are announced (SPUBLISH: a shard channel of
  // that slot, so in a cluster only the slot's own shard carries it).
  std::string channel_of(std::uint16_t slot) const {
    return options.key_prefix + "w:{" + slot_tag(slot) + "}";
  }
  // The channel argument of the scripts: empty when the server cannot publish on one.
  std::string publish_channel(bool publish, std::uint16_t slot) const {
    return publish ? channel_of(slot) : std::string{};
  }
  // --- script calls ------------------------------------------------------------------------

  // Groups consecutive-in-order requests into script calls of up to max_keys_per_call keys;
  // in a cluster a call holds keys of one slot only. Returns, per call, the indexes it covers.
  template <class KeyOf>
  std::vector<std::vector<std::size_t>> group(std::size_t n, KeyOf key_of,
                                              std::vector<std::uint16_t>& slots) {
    std::vector<std::vector<std::size_t>> groups;
    slots.resize(n);
    if (!options.cluster) {
      for (std::size_t i = 0; i < n; ++i) {
        slots[i] = key_slot(key_of(i));
        if (groups.empty() || groups.back().size() >= options.max_keys_per_call) {
          groups.emplace_back();
        }
        groups.back().push_back(i);
      }
      return groups;
    }
    std::unordered_map<std::uint16_t, std::size_t> open;  // slot -> group index
    for (std::size_t i = 0; i < n; ++i) {
      slots[i] = key_slot(key_of(i));
      auto it = open.find(slots[i]);
      if (it == open.end() || groups[it->second].size() >= options.max_keys_per_call) {
        groups.emplace_back();
        it = open.insert_or_assign(slots[i], groups.size() - 1).first;
      }
      groups[it->second].push_back(i);
    }
    return groups;
  }

  // What one pipelined script round sent and got back: per node, its call and the indexes
  // of the items it carried.
  struct ScriptRound {
    std::vector<Call> calls;
    std::vector<std::vector<std::size_t>> groups;
  };

  // Runs script `sha` once per node for `items`: numkeys, then every item's keys
  // (add_keys(cmd, record_key, slot), keys_per_item of them), then every item's arguments
  // (add_args(cmd, item, slot)). The commands' views into the record keys die with this call;
  // only the replies are read afterwards.
  template <class Item, class AddKeys, class AddArgs>
  ScriptRound run_script(std::span<const Item> items, const std::string& sha,
                         std::size_t keys_per_item, AddKeys add_keys, AddArgs add_args) {
    std::vector<std::uint16_t> slots;
    std::vector<std::string> keys(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) keys[i] = record_key(items[i].key);
    ScriptRound round;
    round.groups = group(
        items.size(), [&](std::size_t i) -> std::string_view { return keys[i]; }, slots);
    round.calls.resize(round.groups.size());
    for (std::size_t g = 0; g < round.groups.size(); ++g) {
      Command& cmd = round.calls[g].command;
      const auto& idx = round.groups[g];
      round.calls[g].slot = slots[idx.front()];
      cmd.reserve(3 + idx.size() * 5);
      cmd.add("EVALSHA");
      cmd.add_owned(sha);
      cmd.add_owned(decimal(static_cast<std::int64_t>(idx.size() * keys_per_item)));
      for (std::size_t i : idx) add_keys(cmd, keys[i], slots[i]);
      for (std::size_t i : idx) add_args(cmd, items[i], slots[i]);
    }
    router.run(round.calls);
    return round;
  }

  std::vector<Claim> claim_many(std::span<const ClaimRequest> requests) {
    if (requests.empty()) return {};
    ensure_scripts();
    auto [calls, groups] = run_script(
        requests, scripts.claim_sha(), 2,
        [&](Command& cmd, const std::string& key, std::uint16_t slot) {
          cmd.add(key);
          cmd.add_owned(counter_key(slot));
        },
        [&](Command& cmd, const ClaimRequest& r, std::uint16_t) {
          cmd.add_owned(hex_fingerprint(r.fingerprint));
          cmd.add_owned(decimal(positive_ms(r.mark_done ? r.retention : r.lease)));
          cmd.add(r.mark_done ? "1" : "0");
        });
    std::vector<Claim> claims(requests.size());
    for (std::size_t g = 0; g < groups.size(); ++g) {
      decode_claims(calls[g].reply.get(), groups[g], claims);
    }
    return claims;
  }

  std::vector<bool> complete_many(std::span<const Completion> completions) {
    if (completions.empty()) return {};
    ensure_scripts();
    const bool publish = scripts.sharded_pubsub();
    auto [calls, groups] = run_script(
        completions, scripts.complete_sha(), 1,
        [&](Command& cmd, const std::string& key, std::uint16_t) { cmd.add(key); },
        [&](Command& cmd, const Completion& c, std::uint16_t slot) {
          cmd.add_owned(decimal(static_cast<std::int64_t>(c.token)));
          cmd.add_owned(decimal(positive_ms(c.retention)));
          cmd.add(c.response ? "1" : "0");
          cmd.add(c.response ? *c.response : std::string_view{});
          cmd.add_owned(publish_channel(publish, slot));
        });
    std::vector<bool> done(completions.size());
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const redisReply* r = calls[g].reply.get();
      const auto& idx = groups[g];
      if (r->type != REDIS_REPLY_ARRAY || r->elements != idx.size()) bad_reply("a completion", r);
      for (std::size_t n = 0; n < idx.size(); ++n) done[idx[n]] = r->element[n]->integer == 1;
    }
    return done;
  }

  bool release(std::string_view key, std::uint64_t token) {
    ensure_scripts();
    std::vector<Call> calls(1);
    std::string rk = record_key(key);
    calls[0].slot = key_slot(rk);
    Command& cmd = calls[0].command;
    cmd.add("EVALSHA");
    cmd.add_owned(scripts.release_sha());
    cmd.add("1");
    cmd.add(rk);
    cmd.add_owned(decimal(static_cast<std::int64_t>(token)));
    cmd.add_owned(publish_channel(scripts.sharded_pubsub(), calls[0].slot));
    router.run(calls);
    const redisReply* r = calls[0].reply.get();
    if (r->type != REDIS_REPLY_INTEGER) bad_reply("a release", r);
    return r->integer == 1;
  }

  // DEL and, when it deleted something, a notification; sent as EVAL (an operator command,
  // so the script is not part of the preloaded set).
  bool forget(std::string_view key) {
    ensure_scripts();
    std::vector<Call> calls(1);
    std::string rk = record_key(key);
    calls[0].slot = key_slot(rk);
    Command& cmd = calls[0].command;
    cmd.add("EVAL");
    cmd.add(Scripts::forget);
    cmd.add("1");
    cmd.add(rk);
    cmd.add_owned(publish_channel(scripts.sharded_pubsub(), calls[0].slot));
    router.run(calls);
    const redisReply* r = calls[0].reply.get();
    if (r->type != REDIS_REPLY_INTEGER) bad_reply("a forget", r);
    return r->integer > 0;
  }

  // --- waiting for a change ----------------------------------------------------------------

  // The subscriber connection of each node a waiter needed, created on the first wait there.
  std::mutex subscribers_mutex;
  std::map<const Node*, std::unique_ptr<Subscriber>> subscribers;

  Subscriber& subscriber_for(const Node& node) {
    std::lock_guard lock(subscribers_mutex);
    std::unique_ptr<Subscriber>& s = subscribers[&node];
    if (!s) s = std::make_unique<Subscriber>(node.endpoint(), options, counters);
    return *s;
  }

  // Whether the record is still held: in progress with its lease running. One atomic read.
  bool held(const std::string& rk, std::uint16_t slot) {
    std::vector<Call> calls(1);
    calls[0].slot = slot;
    Command& cmd = calls[0].command;
    cmd.add("EVAL");
    cmd.add(Scripts::held);
    cmd.add("1");
    cmd.add(rk);
    router.run(calls, /*replicate=*/false);
    const redisReply* r = calls[0].reply.get();
    if (r->type != REDIS_REPLY_INTEGER) bad_reply("a wait's check", r);
    return r->integer == 1;
  }

  // Subscribes to the record's slot channel, then checks the record (a change made before the
  // subscription is seen there, one made after it is announced), then waits for an
  // announcement of this record. Store failures do not escape: the caller asks the store again
  // (and learns of a failure there); until max_wait has passed when the failure would repeat.
  void await_change(std::string_view key, std::chrono::milliseconds max_wait) {
    const auto deadline = Subscriber::Clock::now() + max_wait;
    auto fallback = [&](bool pause) {
      counters.wait_fallbacks.fetch_add(1, std::memory_order_relaxed);
      if (pause) std::this_thread::sleep_until(deadline);
    };
    std::string rk = record_key(key);
    const std::uint16_t slot = key_slot(rk);
    Subscriber* subscriber = nullptr;
    try {
      ensure_scripts();  // learns whether the server has sharded pub/sub
      if (!scripts.sharded_pubsub()) return fallback(true);
      subscriber = &subscriber_for(router.owner_of(slot));
    } catch (const StoreUnavailable&) {
      return fallback(true);
    }
    Subscriber::Status status = Subscriber::Status::unavailable;
    {
      Subscriber::Waiter waiter(*subscriber, channel_of(slot), rk);
      status = waiter.subscribe(deadline);
      if (status == Subscriber::Status::subscribed) {
        try {
          if (!held(rk, slot)) {
            counters.waits_settled.fetch_add(1, std::memory_order_relaxed);
            return;
          }
        } catch (const StoreUnavailable&) {
          return fallback(false);
        }
        counters.waiting.fetch_add(1, std::memory_order_relaxed);
        status = waiter.await_message(deadline);
        counters.waiting.fetch_sub(1, std::memory_order_relaxed);
        if (status == Subscriber::Status::notified) {
          counters.waits_woken.fetch_add(1, std::memory_order_relaxed);
          return;
        }
      }
    }
    if (status == Subscriber::Status::timed_out) {
      counters.waits_timed_out.fetch_add(1, std::memory_order_relaxed);
    } else {
      // Refused or no connection: pause as a store without notifications would. The
      // connection was lost meanwhile: return, the caller asks again at once.
      fallback(status == Subscriber::Status::unavailable);
    }
  }

  // --- operator hooks ----------------------------------------------------------------------

  std::optional<RecordInfo> inspect(std::string_view key) {
    std::vector<Call> calls(1);
    std::string rk = record_key(key);
    calls[0].slot = key_slot(rk);
    Command& cmd = calls[0].command;
    cmd.add("EVAL");
    cmd.add(Scripts::inspect);
    cmd.add("1");
    cmd.add(rk);
    router.run(calls, /*replicate=*/false);
    const redisReply* r = calls[0].reply.get();
    if (r->type == REDIS_REPLY_NIL) return std::nullopt;  // absent, expired, released, forgotten
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_INTEGER) {
      bad_reply("an inspection", r);
    }
    const std::string_view value(r->element[0]->str, r->element[0]->len);
    std::optional<RecordInfo> info = record_info(value, r->element[1]->integer);
    if (!info) {
      throw ConfigError("the Redis key \"" + rk +
                        "\" does not hold an idem record: another program wrote it, or "
                        "RedisOptions::key_prefix is shared with something else; choose a prefix "
                        "of its own (retrying will not help)");
    }
    return info;
  }
};

RedisStore::RedisStore(RedisOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
RedisStore::~RedisStore() = default;

void RedisStore::ping() {
  for (Node* n : impl_->router.masters()) {
    Command cmd{"PING"};
    Command* cmds[] = {&cmd};
    std::vector<ReplyPtr> replies = n->exchange(cmds);
    if (replies[0]->type == REDIS_REPLY_ERROR) bad_reply("PING", replies[0].get());
  }
}

void RedisStore::with_connection(std::string_view routing_key,
                                 const std::function<void(redisContext*)>& f) {
  Node& node = routing_key.empty() ? impl_->router.seed_node()
                                   : impl_->router.owner_of(key_slot(routing_key));
  PooledConnection conn = node.acquire();
  f(conn.get());
}

std::string RedisStore::record_key(std::string_view key) const {
  return impl_->record_key(key);
}

std::string RedisStore::notification_channel(std::string_view key) const {
  return impl_->channel_of(key_slot(impl_->record_key(key)));
}

RedisStoreStats RedisStore::counters() const {
  const auto& c = impl_->counters;
  return RedisStoreStats{.round_trips = c.round_trips.load(std::memory_order_relaxed),
                         .commands = c.commands.load(std::memory_order_relaxed),
                         .redirects = c.redirects.load(std::memory_order_relaxed),
                         .reconnects = c.reconnects.load(std::memory_order_relaxed),
                         .script_loads = c.script_loads.load(std::memory_order_relaxed),
                         .notifications = c.notifications.load(std::memory_order_relaxed),
                         .waits_woken = c.waits_woken.load(std::memory_order_relaxed),
                         .waits_settled = c.waits_settled.load(std::memory_order_relaxed),
                         .waits_timed_out = c.waits_timed_out.load(std::memory_order_relaxed),
                         .wait_fallbacks = c.wait_fallbacks.load(std::memory_order_relaxed),
                         .waiting = c.waiting.load(std::memory_order_relaxed)};
}

const RedisOptions& RedisStore::options() const noexcept {
  return impl_->options;
}

Claim RedisStore::do_claim(const ClaimRequest& request) {
  return advised(kClaimAdvice, [&] {
    return std::move(impl_->claim_many(std::span<const ClaimRequest>(&request, 1)).front());
  });
}

bool RedisStore::do_complete(const Completion& completion) {
  return advised(kCompleteAdvice, [&] {
    return static_cast<bool>(
        impl_->complete_many(std::span<const Completion>(&completion, 1)).front());
  });
}

bool RedisStore::do_release(std::string_view key, std::uint64_t token) {
  return advised("the claim was not released: it expires with its lease",
                 [&] { return impl_->release(key, token); });
}

bool RedisStore::do_forget(std::string_view key) {
  return advised("the record was not deleted: retry", [&] { return impl_->forget(key); });
}

std::vector<Claim> RedisStore::do_claim_batch(std::span<const ClaimRequest> requests) {
  return advised(kClaimAdvice, [&] { return impl_->claim_many(requests); });
}

std::vector<bool> RedisStore::do_complete_batch(std::span<const Completion> completions) {
  return advised(kCompleteAdvice, [&] { return impl_->complete_many(completions); });
}

std::optional<RecordInfo> RedisStore::do_inspect(std::string_view key) {
  return advised("nothing was changed: retry", [&] { return impl_->inspect(key); });
}

void RedisStore::do_await_change(std::string_view key, std::chrono::milliseconds max_wait) {
  impl_->await_change(key, max_wait);
}

StoreStats RedisStore::do_stats() {
  return advised("nothing was changed: retry",
                 [&] { return scan_records(impl_->router, impl_->options.key_prefix); });
}

}  // namespace idem
