#include "idem/stores/redis_store.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cluster_slot.hpp"
#include "connection.hpp"
#include "idem/error.hpp"
#include "subscriber.hpp"

namespace idem {

namespace redis_detail {

const std::string& slot_tag(std::uint16_t slot) {
  static const std::vector<std::string> tags = [] {
    std::vector<std::string> t(kSlots);
    std::size_t filled = 0;
    static constexpr char kDigits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    for (std::uint64_t n = 0; filled < kSlots; ++n) {
      std::string s;
      std::uint64_t v = n;
      do {
        s.push_back(kDigits[v % 36]);
        v /= 36;
      } while (v != 0);
      const std::uint16_t hashed = static_cast<std::uint16_t>(crc16(s) & (kSlots - 1));
      if (t[hashed].empty()) {
        t[hashed] = std::move(s);
        ++filled;
      }
    }
    return t;
  }();
  return tags[slot];
}

}  // namespace redis_detail

using redis_detail::Command;
using redis_detail::Endpoint;
using redis_detail::Node;
using redis_detail::ReplyPtr;
using redis_detail::Subscriber;

namespace {

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

std::int64_t positive_ms(std::chrono::milliseconds ms) {
  return std::max<std::int64_t>(1, ms.count());
}

// Store calls that fail say what the caller must do about the message.
template <class F>
auto advised(std::string_view advice, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const StoreUnavailable& e) {
    throw StoreUnavailable("redis store failed: " + std::string(e.what()) + "; " +
                           std::string(advice));
  }
}
constexpr std::string_view kClaimAdvice =
    "the message was not recorded as done: do not ack it, retry later";
constexpr std::string_view kCompleteAdvice =
    "the completion may not have been recorded: do not ack the message; its redelivery finds "
    "the key done, or takes it over once the lease expires";

[[noreturn]] void bad_reply(std::string_view what, const redisReply* reply) {
  std::string message = "Redis answered " + std::string(what) + " unexpectedly (" +
                        redis_detail::reply_text(reply) + ")";
  if (redis_detail::is_error(reply, "OOM")) {
    message +=
        ": Redis is at maxmemory and refuses writes; raise maxmemory or shorten the retention "
        "(keep maxmemory-policy noeviction: evicting dedup records or token counters weakens "
        "the guarantees, see docs/stores/redis.md)";
  }
  throw StoreUnavailable(message);
}

}  // namespace

struct RedisStore::Impl {
  explicit Impl(RedisOptions o) : options(std::move(o)) {
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
    seed = Endpoint{options.host, options.port, options.unix_socket};
    node_for(seed);
    slot_owner.fill(0);
  }

  RedisOptions options;
  redis_detail::Scripts scripts;
  redis_detail::Counters counters;
  Endpoint seed;

  // Nodes are only added, never removed, so a Node& stays valid for the store's life.
  std::shared_mutex topology_mutex;
  std::vector<std::unique_ptr<Node>> nodes;                    // [0] is the seed
  std::array<std::uint16_t, redis_detail::kSlots> slot_owner;  // index into nodes
  bool have_map = false;
  std::mutex refresh_mutex;

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
    return options.key_prefix + "t:{" + redis_detail::slot_tag(slot) + "}";
  }

  // Where changes of the records of a hash slot are announced (SPUBLISH: a shard channel of
  // that slot, so in a cluster only the slot's own shard carries it).
  std::string channel_of(std::uint16_t slot) const {
    return options.key_prefix + "w:{" + redis_detail::slot_tag(slot) + "}";
  }
  // The channel argument of the scripts: empty when the server cannot publish on one.
  std::string publish_channel(bool publish, std::uint16_t slot) const {
    return publish ? channel_of(slot) : std::string{};
  }
  bool sharded_pubsub() {
    std::lock_guard lock(scripts.mutex);
    return scripts.sharded_pubsub;
  }

  std::string claim_sha() {
    std::lock_guard lock(scripts.mutex);
    return scripts.claim_sha;
  }
  std::string complete_sha() {
    std::lock_guard lock(scripts.mutex);
    return scripts.complete_sha;
  }
  std::string release_sha() {
    std::lock_guard lock(scripts.mutex);
    return scripts.release_sha;
  }
  // The SHA1s are learnt on the first handshake; make one before building script calls.
  void ensure_scripts() {
    {
      std::lock_guard lock(scripts.mutex);
      if (!scripts.claim_sha.empty()) return;
    }
    Node& n = seed_node();
    (void)n.acquire();
  }

  // --- topology -----------------------------------------------------------------------------

  Node& node_for(const Endpoint& ep) {
    {
      std::shared_lock lock(topology_mutex);
      for (auto& n : nodes) {
        if (n->endpoint() == ep) return *n;
      }
    }
    std::unique_lock lock(topology_mutex);
    for (auto& n : nodes) {
      if (n->endpoint() == ep) return *n;
    }
    nodes.push_back(std::make_unique<Node>(ep, options, scripts, counters));
    return *nodes.back();
  }
  std::uint16_t node_index(const Endpoint& ep) {
    Node& n = node_for(ep);
    std::shared_lock lock(topology_mutex);
    for (std::size_t i = 0; i < nodes.size(); ++i) {
      if (nodes[i].get() == &n) return static_cast<std::uint16_t>(i);
    }
    return 0;
  }

  // The vector may grow (cluster nodes are added as they are discovered); the Nodes never move.
  Node& seed_node() {
    std::shared_lock lock(topology_mutex);
    return *nodes.front();
  }

  Node& owner_of(std::uint16_t slot) {
    if (!options.cluster) return seed_node();
    {
      std::shared_lock lock(topology_mutex);
      if (have_map) return *nodes[slot_owner[slot]];
    }
    refresh_map();
    std::shared_lock lock(topology_mutex);
    return *nodes[slot_owner[slot]];
  }

  // Reads CLUSTER SLOTS from the first node that answers (the seed first, then the others).
  void refresh_map() {
    std::lock_guard refresh(refresh_mutex);
    std::vector<Node*> candidates;
    {
      std::shared_lock lock(topology_mutex);
      for (auto& n : nodes) candidates.push_back(n.get());
    }
    std::string errors;
    for (Node* n : candidates) {
      try {
        Command cmd{"CLUSTER", "SLOTS"};
        Command* cmds[] = {&cmd};
        std::vector<ReplyPtr> replies = n->exchange(cmds);
        const redisReply* r = replies[0].get();
        if (r->type != REDIS_REPLY_ARRAY) {
          throw StoreUnavailable("CLUSTER SLOTS failed (" + redis_detail::reply_text(r) +
                                 "): is RedisOptions::cluster set for a server that is not "
                                 "in cluster mode?");
        }
        std::vector<std::pair<std::pair<long long, long long>, Endpoint>> ranges;
        for (std::size_t i = 0; i < r->elements; ++i) {
          const redisReply* range = r->element[i];
          if (range->type != REDIS_REPLY_ARRAY || range->elements < 3) continue;
          const redisReply* master = range->element[2];
          if (master->type != REDIS_REPLY_ARRAY || master->elements < 2) continue;
          std::string host(master->element[0]->str, master->element[0]->len);
          if (host.empty()) host = n->endpoint().host;
          ranges.push_back({{range->element[0]->integer, range->element[1]->integer},
                            Endpoint{host, static_cast<int>(master->element[1]->integer), {}}});
        }
        std::vector<std::pair<std::pair<long long, long long>, std::uint16_t>> indexed;
        for (auto& [span, ep] : ranges) indexed.push_back({span, node_index(ep)});
        std::unique_lock lock(topology_mutex);
        for (auto& [span, idx] : indexed) {
          for (long long s = span.first; s <= span.second && s < redis_detail::kSlots; ++s) {
            slot_owner[static_cast<std::size_t>(s)] = idx;
          }
        }
        have_map = true;
        return;
      } catch (const StoreUnavailable& e) {
        errors += std::string(errors.empty() ? "" : "; ") + e.what();
      }
    }
    throw StoreUnavailable("cannot read the Redis Cluster slot map from any node: " + errors);
  }

  void set_owner(std::uint16_t slot, const Endpoint& ep) {
    std::uint16_t idx = node_index(ep);
    std::unique_lock lock(topology_mutex);
    slot_owner[slot] = idx;
  }

  // --- running commands ---------------------------------------------------------------------

  struct Call {
    std::uint16_t slot = 0;
    Command command;
    ReplyPtr reply;
  };

  static bool parse_redirect(const redisReply* r, std::uint16_t& slot, Endpoint& ep) {
    // "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381"
    std::string_view text(r->str, r->len);
    std::size_t a = text.find(' ');
    std::size_t b = text.find(' ', a + 1);
    if (a == std::string_view::npos || b == std::string_view::npos) return false;
    std::string_view slot_text = text.substr(a + 1, b - a - 1);
    std::string_view addr = text.substr(b + 1);
    std::size_t colon = addr.rfind(':');
    if (colon == std::string_view::npos) return false;
    unsigned s = 0;
    int port = 0;
    std::from_chars(slot_text.data(), slot_text.data() + slot_text.size(), s);
    std::from_chars(addr.data() + colon + 1, addr.data() + addr.size(), port);
    slot = static_cast<std::uint16_t>(s);
    ep = Endpoint{std::string(addr.substr(0, colon)), port, {}};
    return true;
  }

  // One pipeline to one node, followed by WAIT when asked for.
  // Reads (operator inspection) pass replicate = false: there is nothing to wait for.
  // With `shortfall`, a WAIT that fell short (or failed: a replica refuses WAIT) is reported
  // there instead of thrown, so that the caller can still follow the redirects in the replies:
  // a node that became a replica answers every command with MOVED, and those did not run.
  std::vector<ReplyPtr> exchange(Node& node, std::vector<Command*>& cmds,
                                 std::span<const bool> asking = {}, bool replicate = true,
                                 std::string* shortfall = nullptr) {
    if (options.wait_replicas <= 0 || !replicate) return node.exchange(cmds, asking);
    Command wait{"WAIT"};
    wait.add_owned(decimal(options.wait_replicas));
    wait.add_owned(decimal(positive_ms(options.wait_timeout)));
    cmds.push_back(&wait);
    std::unique_ptr<bool[]> flags(new bool[cmds.size()]);
    for (std::size_t i = 0; i + 1 < cmds.size(); ++i) flags[i] = !asking.empty() && asking[i];
    flags[cmds.size() - 1] = false;
    std::vector<ReplyPtr> replies =
        node.exchange(cmds, std::span<const bool>(flags.get(), cmds.size()), /*resend_last=*/true);
    cmds.pop_back();
    ReplyPtr ack = std::move(replies.back());
    replies.pop_back();
    if (ack->type != REDIS_REPLY_INTEGER || ack->integer < options.wait_replicas) {
      std::string what =
          "Redis at " + node.endpoint().text() + " got " +
          (ack->type == REDIS_REPLY_INTEGER ? std::to_string(ack->integer)
                                            : redis_detail::reply_text(ack.get())) +
          " of RedisOptions::wait_replicas=" + std::to_string(options.wait_replicas) +
          " replica acknowledgements within wait_timeout (" +
          std::to_string(options.wait_timeout.count()) +
          " ms): a failover now could forget this call; check the replicas' links";
      if (shortfall == nullptr) throw StoreUnavailable(what);
      *shortfall = std::move(what);
    }
    return replies;
  }

  // Runs every call and fills its reply: one pipeline per node. In a cluster, MOVED updates
  // the map and retries, ASK retries once at the importing node behind ASKING, TRYAGAIN
  // (a slot mid-migration) and CLUSTERDOWN wait and retry, and a node that fails is dropped
  // from the map by a refresh. Gives up after max_redirects rounds or command_timeout.
  void run(std::vector<Call>& calls, bool replicate = true) {
    if (!options.cluster) {
      std::vector<Command*> cmds;
      cmds.reserve(calls.size() + 1);
      for (Call& c : calls) cmds.push_back(&c.command);
      std::vector<ReplyPtr> replies = exchange(seed_node(), cmds, {}, replicate);
      for (std::size_t i = 0; i < calls.size(); ++i) calls[i].reply = std::move(replies[i]);
      return;
    }
    struct Pending {
      std::size_t call;
      Node* node;
      bool asking;
    };
    std::vector<Pending> pending;
    for (std::size_t i = 0; i < calls.size(); ++i) {
      pending.push_back({i, &owner_of(calls[i].slot), false});
    }
    const auto started = std::chrono::steady_clock::now();
    std::string last_problem;
    for (std::size_t round = 0; !pending.empty(); ++round) {
      if (round > options.max_redirects ||
          (round > 0 && std::chrono::steady_clock::now() - started > options.command_timeout)) {
        throw StoreUnavailable("Redis Cluster call did not settle after " + std::to_string(round) +
                               " rounds (last: " + last_problem +
                               "); the cluster is resharding or failing over, retry later");
      }
      if (round > 0) {
        std::this_thread::sleep_for(
            std::chrono::milliseconds{std::min<std::size_t>(round * 5, 50)});
      }
      std::map<Node*, std::vector<std::size_t>> by_node;  // node -> indexes into pending
      for (std::size_t p = 0; p < pending.size(); ++p) by_node[pending[p].node].push_back(p);
      std::vector<Pending> next;
      bool refresh = false;
      std::string unreplicated;  // set when a call ran but WAIT did not confirm it
      for (auto& [node, idxs] : by_node) {
        std::vector<Command*> cmds;
        std::unique_ptr<bool[]> asking(new bool[idxs.size()]);
        for (std::size_t n = 0; n < idxs.size(); ++n) {
          cmds.push_back(&calls[pending[idxs[n]].call].command);
          asking[n] = pending[idxs[n]].asking;
        }
        std::vector<ReplyPtr> replies;
        std::string shortfall;
        try {
          replies = exchange(*node, cmds, std::span<const bool>(asking.get(), idxs.size()),
                             replicate, &shortfall);
        } catch (const StoreUnavailable& e) {
          // The node is down or failing over: re-read the map (a replica may be promoted)
          // and retry. A call that did run before the failure is safe to repeat: a repeated
          // claim sees its own in-progress record, a repeated completion finds its token.
          last_problem = e.what();
          refresh = true;
          for (std::size_t p : idxs) next.push_back({pending[p].call, nullptr, false});
          continue;
        }
        for (std::size_t n = 0; n < idxs.size(); ++n) {
          Pending& p = pending[idxs[n]];
          const redisReply* r = replies[n].get();
          std::uint16_t slot = 0;
          Endpoint ep;
          if (redis_detail::is_error(r, "MOVED ") && parse_redirect(r, slot, ep)) {
            counters.redirects.fetch_add(1, std::memory_order_relaxed);
            set_owner(slot, ep);
            refresh = true;
            last_problem = redis_detail::reply_text(r);
            next.push_back({p.call, &node_for(ep), false});
          } else if (redis_detail::is_error(r, "ASK ") && parse_redirect(r, slot, ep)) {
            counters.redirects.fetch_add(1, std::memory_order_relaxed);
            last_problem = redis_detail::reply_text(r);
            next.push_back({p.call, &node_for(ep), true});
          } else if (redis_detail::is_error(r, "TRYAGAIN") ||
                     redis_detail::is_error(r, "CLUSTERDOWN")) {
            last_problem = redis_detail::reply_text(r);
            next.push_back({p.call, nullptr, false});
          } else {
            calls[p.call].reply = std::move(replies[n]);
            if (!shortfall.empty()) unreplicated = shortfall;  // it ran, unconfirmed
          }
        }
      }
      if (refresh) {
        try {
          refresh_map();
        } catch (const StoreUnavailable& e) {
          last_problem = e.what();
        }
      }
      // Calls that ran where their replication could not be confirmed fail the whole run (not
      // retried: the writes happened, only their replication is unsure), now that the
      // redirects met on the way have updated the slot map.
      if (!unreplicated.empty()) throw StoreUnavailable(unreplicated);
      for (Pending& p : next) {
        if (p.node == nullptr) p.node = &owner_of(calls[p.call].slot);
      }
      pending = std::move(next);
    }
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
        slots[i] = redis_detail::key_slot(key_of(i));
        if (groups.empty() || groups.back().size() >= options.max_keys_per_call) {
          groups.emplace_back();
        }
        groups.back().push_back(i);
      }
      return groups;
    }
    std::unordered_map<std::uint16_t, std::size_t> open;  // slot -> group index
    for (std::size_t i = 0; i < n; ++i) {
      slots[i] = redis_detail::key_slot(key_of(i));
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
    run(round.calls);
    return round;
  }

  std::vector<Claim> claim_many(std::span<const ClaimRequest> requests) {
    if (requests.empty()) return {};
    ensure_scripts();
    auto [calls, groups] = run_script(
        requests, claim_sha(), 2,
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
      const redisReply* r = calls[g].reply.get();
      const auto& idx = groups[g];
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
    return claims;
  }

  std::vector<bool> complete_many(std::span<const Completion> completions) {
    if (completions.empty()) return {};
    ensure_scripts();
    const bool publish = sharded_pubsub();
    auto [calls, groups] = run_script(
        completions, complete_sha(), 1,
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
    calls[0].slot = redis_detail::key_slot(rk);
    Command& cmd = calls[0].command;
    cmd.add("EVALSHA");
    cmd.add_owned(release_sha());
    cmd.add("1");
    cmd.add(rk);
    cmd.add_owned(decimal(static_cast<std::int64_t>(token)));
    cmd.add_owned(publish_channel(sharded_pubsub(), calls[0].slot));
    run(calls);
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
    calls[0].slot = redis_detail::key_slot(rk);
    Command& cmd = calls[0].command;
    cmd.add("EVAL");
    cmd.add(redis_detail::Scripts::forget);
    cmd.add("1");
    cmd.add(rk);
    cmd.add_owned(publish_channel(sharded_pubsub(), calls[0].slot));
    run(calls);
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
  static constexpr std::string_view kHeldScript =
      "local v = redis.call('GET', KEYS[1]) "
      "if not v or string.sub(v, 1, 1) ~= 'p' then return 0 end "
      "local c = string.find(v, ':', 34, true) "
      "if not c or redis.call('PTTL', KEYS[1]) <= tonumber(string.sub(v, c + 1)) then return 0 "
      "end "
      "return 1";

  bool held(const std::string& rk, std::uint16_t slot) {
    std::vector<Call> calls(1);
    calls[0].slot = slot;
    Command& cmd = calls[0].command;
    cmd.add("EVAL");
    cmd.add(kHeldScript);
    cmd.add("1");
    cmd.add(rk);
    run(calls, /*replicate=*/false);
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
    const std::uint16_t slot = redis_detail::key_slot(rk);
    Subscriber* subscriber = nullptr;
    try {
      ensure_scripts();  // learns whether the server has sharded pub/sub
      if (!sharded_pubsub()) return fallback(true);
      subscriber = &subscriber_for(owner_of(slot));
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

  // The value and the PTTL of one record, read atomically (a pipelined GET + PTTL could see
  // a record rewritten or expired between the two). Read-only; sent as EVAL: an operator
  // command, so the script is not part of the preloaded set.
  static constexpr std::string_view kInspectScript =
      "local v = redis.call('GET', KEYS[1]) "
      "if not v then return false end "
      "return {v, redis.call('PTTL', KEYS[1])}";

  std::optional<RecordInfo> inspect(std::string_view key) {
    std::vector<Call> calls(1);
    std::string rk = record_key(key);
    calls[0].slot = redis_detail::key_slot(rk);
    Command& cmd = calls[0].command;
    cmd.add("EVAL");
    cmd.add(kInspectScript);
    cmd.add("1");
    cmd.add(rk);
    run(calls, /*replicate=*/false);
    const redisReply* r = calls[0].reply.get();
    if (r->type == REDIS_REPLY_NIL) return std::nullopt;  // absent, expired, released, forgotten
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_INTEGER) {
      bad_reply("an inspection", r);
    }
    const std::string_view v(r->element[0]->str, r->element[0]->len);
    const std::int64_t pttl = r->element[1]->integer;
    const Parsed p = parse(v);
    if (!p.ok) {
      throw StoreUnavailable("the Redis key \"" + rk +
                             "\" does not hold an idem record (another program wrote it?)");
    }
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

  struct Parsed {
    bool ok = false;
    char state = 0;
    std::uint64_t token = 0;
    std::int64_t lease_ms = 0;  // state 'p'
    std::string_view tail;
  };
  // <state:1><fingerprint:32><token>:<tail>; a prefix of it (at least up to the ':' and, for
  // 'p', the whole lease) is enough, which lets stats read only the head of each value.
  static Parsed parse(std::string_view v) {
    Parsed p;
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

  // SCAN's MATCH pattern for every record key: the prefix with glob characters escaped.
  std::string record_pattern() const {
    std::string pattern;
    for (char c : options.key_prefix + "k:") {
      if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\') pattern.push_back('\\');
      pattern.push_back(c);
    }
    pattern.push_back('*');
    return pattern;
  }

  // Every master: the seed alone, or each node owning slots in a freshly read cluster map.
  std::vector<Node*> masters() {
    if (!options.cluster) return {&seed_node()};
    refresh_map();
    std::vector<Node*> out;
    std::shared_lock lock(topology_mutex);
    for (std::uint16_t idx : slot_owner) {
      Node* n = nodes[idx].get();
      if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
    }
    return out;
  }

  // SCAN (COUNT 1000) every master for <prefix>k:*, then per batch one pipeline of
  // GETRANGE (the value's head: state, token, lease), PTTL and MEMORY USAGE per key.
  // An operator command: O(records) work on the servers, never for a hot path.
  StoreStats stats_summary() {
    static constexpr std::string_view kHeadEnd = "95";  // 1 + 32 + 20 + 1 + 20 + slack
    StoreStats stats;
    const std::string pattern = record_pattern();
    for (Node* node : masters()) {
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
          ++stats.records;
          if (mem->type == REDIS_REPLY_INTEGER && mem->integer > 0) {
            stats.bytes += static_cast<std::uint64_t>(mem->integer);
          }
          const Parsed p = parse(std::string_view(head->str, head->len));
          if (!p.ok) continue;
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
};

RedisStore::RedisStore(RedisOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
RedisStore::~RedisStore() = default;

void RedisStore::ping() {
  std::vector<Node*> all;
  if (impl_->options.cluster) impl_->refresh_map();
  {
    std::shared_lock lock(impl_->topology_mutex);
    for (auto& n : impl_->nodes) all.push_back(n.get());
  }
  for (Node* n : all) {
    Command cmd{"PING"};
    Command* cmds[] = {&cmd};
    std::vector<ReplyPtr> replies = n->exchange(cmds);
    if (replies[0]->type == REDIS_REPLY_ERROR) bad_reply("PING", replies[0].get());
  }
}

void RedisStore::with_connection(std::string_view routing_key,
                                 const std::function<void(redisContext*)>& f) {
  Node& node = routing_key.empty() ? impl_->seed_node()
                                   : impl_->owner_of(redis_detail::key_slot(routing_key));
  redis_detail::PooledConnection conn = node.acquire();
  f(conn.get());
}

std::string RedisStore::record_key(std::string_view key) const {
  return impl_->record_key(key);
}

std::string RedisStore::notification_channel(std::string_view key) const {
  return impl_->channel_of(redis_detail::key_slot(impl_->record_key(key)));
}

RedisStoreStats RedisStore::stats() const {
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

StoreStats RedisStore::do_stats_summary() {
  return advised("nothing was changed: retry", [&] { return impl_->stats_summary(); });
}

}  // namespace idem
