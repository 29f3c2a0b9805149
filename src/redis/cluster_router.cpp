#include "cluster_router.hpp"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <map>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "record.hpp"

namespace idem::redis_detail {
namespace {

// "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381"
bool parse_redirect(const redisReply* r, std::uint16_t& slot, Endpoint& ep) {
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

}  // namespace

Router::Router(const RedisOptions& options, Counters& counters, OnConnect on_connect)
    : options_(options), counters_(counters), on_connect_(std::move(on_connect)) {
  nodes_.push_back(std::make_unique<Node>(Endpoint{options.host, options.port, options.unix_socket},
                                          options_, counters_, on_connect_));
}

Node& Router::node_for(const Endpoint& ep) {
  {
    std::shared_lock lock(topology_mutex_);
    for (auto& n : nodes_) {
      if (n->endpoint() == ep) return *n;
    }
  }
  std::unique_lock lock(topology_mutex_);
  for (auto& n : nodes_) {
    if (n->endpoint() == ep) return *n;
  }
  nodes_.push_back(std::make_unique<Node>(ep, options_, counters_, on_connect_));
  return *nodes_.back();
}
std::uint16_t Router::node_index(const Endpoint& ep) {
  Node& n = node_for(ep);
  std::shared_lock lock(topology_mutex_);
  for (std::size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i].get() == &n) return static_cast<std::uint16_t>(i);
  }
  return 0;
}

// The vector may grow (cluster nodes_ are added as they are discovered); the Nodes never move.
Node& Router::seed_node() {
  std::shared_lock lock(topology_mutex_);
  return *nodes_.front();
}

Node& Router::owner_of(std::uint16_t slot) {
  if (!options_.cluster) return seed_node();
  {
    std::shared_lock lock(topology_mutex_);
    if (have_map_) return *nodes_[slot_owner_[slot]];
  }
  refresh_map();
  std::shared_lock lock(topology_mutex_);
  return *nodes_[slot_owner_[slot]];
}

// Reads CLUSTER SLOTS from the first node that answers (the seed first, then the others).
void Router::refresh_map() {
  std::lock_guard refresh(refresh_mutex_);
  std::vector<Node*> candidates;
  {
    std::shared_lock lock(topology_mutex_);
    for (auto& n : nodes_) candidates.push_back(n.get());
  }
  std::string errors;
  for (Node* n : candidates) {
    try {
      Command cmd{"CLUSTER", "SLOTS"};
      Command* cmds[] = {&cmd};
      std::vector<ReplyPtr> replies = exchange_resending(*n, cmds, {}, false);
      const redisReply* r = replies[0].get();
      if (r->type != REDIS_REPLY_ARRAY) {
        throw_redis(r->type == REDIS_REPLY_ERROR ? Kind::reply : Kind::protocol,
                    "CLUSTER SLOTS failed (" + reply_text(r) +
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
      std::unique_lock lock(topology_mutex_);
      for (auto& [span, idx] : indexed) {
        for (long long s = span.first; s <= span.second && s < kSlots; ++s) {
          slot_owner_[static_cast<std::size_t>(s)] = idx;
        }
      }
      have_map_ = true;
      return;
    } catch (const StoreUnavailable& e) {
      errors += std::string(errors.empty() ? "" : "; ") + e.what();
    }
  }
  throw_redis(Kind::unavailable, "cannot read the Redis Cluster slot map from any node: " + errors);
}

void Router::set_owner(std::uint16_t slot, const Endpoint& ep) {
  std::uint16_t idx = node_index(ep);
  std::unique_lock lock(topology_mutex_);
  slot_owner_[slot] = idx;
}

// One pipeline to one node, followed by WAIT when asked for.
// Reads (operator inspection) pass replicate = false: there is nothing to wait for.
// With `shortfall`, a WAIT that fell short (or failed: a replica refuses WAIT) is reported
// there instead of thrown, so that the caller can still follow the redirects in the replies:
// a node that became a replica answers every command with MOVED, and those did not run.
std::vector<ReplyPtr> Router::exchange(Node& node, std::vector<Command*>& cmds,
                                       std::span<const char> asking, bool replicate,
                                       std::string* shortfall) {
  if (options_.wait_replicas <= 0 || !replicate) {
    return exchange_resending(node, cmds, asking, /*resend_last=*/false);
  }
  Command wait{"WAIT"};
  wait.add_owned(decimal(options_.wait_replicas));
  wait.add_owned(decimal(positive_ms(options_.wait_timeout)));
  cmds.push_back(&wait);
  std::vector<char> flags(cmds.size(), 0);
  for (std::size_t i = 0; i + 1 < cmds.size(); ++i) flags[i] = !asking.empty() && asking[i];
  std::vector<ReplyPtr> replies = exchange_resending(node, cmds, flags, /*resend_last=*/true);
  cmds.pop_back();
  ReplyPtr ack = std::move(replies.back());
  replies.pop_back();
  if (ack->type != REDIS_REPLY_INTEGER || ack->integer < options_.wait_replicas) {
    std::string what =
        "Redis at " + node.endpoint().text() + " got " +
        (ack->type == REDIS_REPLY_INTEGER ? std::to_string(ack->integer) : reply_text(ack.get())) +
        " of RedisOptions::wait_replicas=" + std::to_string(options_.wait_replicas) +
        " replica acknowledgements within wait_timeout (" +
        std::to_string(options_.wait_timeout.count()) +
        " ms): a failover now could forget this call; check the replicas' links";
    if (shortfall == nullptr) throw_redis(Kind::unavailable, what);
    *shortfall = std::move(what);
  }
  return replies;
}

// Runs every call and fills its reply: one pipeline per node. In a cluster, MOVED updates
// the map and retries, ASK retries once at the importing node behind ASKING, TRYAGAIN
// (a slot mid-migration) and CLUSTERDOWN wait and retry, and a node that fails is dropped
// from the map by a refresh. Gives up after max_redirects rounds or command_timeout.
void Router::run(std::vector<Call>& calls, bool replicate) {
  if (!options_.cluster) {
    std::vector<Command*> cmds;
    cmds.reserve(calls.size() + 1);
    for (Call& c : calls) cmds.push_back(&c.command);
    std::vector<ReplyPtr> replies = exchange(seed_node(), cmds, {}, replicate, nullptr);
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
    if (round > options_.max_redirects ||
        (round > 0 && std::chrono::steady_clock::now() - started > options_.command_timeout)) {
      throw_redis(Kind::unavailable,
                  "Redis Cluster call did not settle after " + std::to_string(round) +
                      " rounds (last: " + last_problem +
                      "); the cluster is resharding or failing over, retry later");
    }
    if (round > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds{std::min<std::size_t>(round * 5, 50)});
    }
    std::map<Node*, std::vector<std::size_t>> by_node;  // node -> indexes into pending
    for (std::size_t p = 0; p < pending.size(); ++p) by_node[pending[p].node].push_back(p);
    std::vector<Pending> next;
    bool refresh = false;
    std::string unreplicated;  // set when a call ran but WAIT did not confirm it
    for (auto& [node, idxs] : by_node) {
      std::vector<Command*> cmds;
      std::vector<char> asking(idxs.size(), 0);
      for (std::size_t n = 0; n < idxs.size(); ++n) {
        cmds.push_back(&calls[pending[idxs[n]].call].command);
        asking[n] = pending[idxs[n]].asking;
      }
      std::vector<ReplyPtr> replies;
      std::string shortfall;
      try {
        replies = exchange(*node, cmds, asking, replicate, &shortfall);
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
        if (is_error(r, "MOVED ") && parse_redirect(r, slot, ep)) {
          counters_.redirects.fetch_add(1, std::memory_order_relaxed);
          set_owner(slot, ep);
          refresh = true;
          last_problem = reply_text(r);
          next.push_back({p.call, &node_for(ep), false});
        } else if (is_error(r, "ASK ") && parse_redirect(r, slot, ep)) {
          counters_.redirects.fetch_add(1, std::memory_order_relaxed);
          last_problem = reply_text(r);
          next.push_back({p.call, &node_for(ep), true});
        } else if (is_error(r, "TRYAGAIN") || is_error(r, "CLUSTERDOWN")) {
          last_problem = reply_text(r);
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
    if (!unreplicated.empty()) throw_redis(Kind::unavailable, unreplicated);
    for (Pending& p : next) {
      if (p.node == nullptr) p.node = &owner_of(calls[p.call].slot);
    }
    pending = std::move(next);
  }
}

// Every master: the seed alone, or each node owning slots in a freshly read cluster map.
std::vector<Node*> Router::masters() {
  if (!options_.cluster) return {&seed_node()};
  refresh_map();
  std::vector<Node*> out;
  std::shared_lock lock(topology_mutex_);
  for (std::uint16_t idx : slot_owner_) {
    Node* n = nodes_[idx].get();
    if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
  }
  return out;
}

// NOSCRIPT: the server lost its script cache (restart, SCRIPT FLUSH, failover), which the
// on-connect hook fills. Those commands did not run; rerun the hook and resend just them.
std::vector<ReplyPtr> Router::exchange_resending(Node& node, std::span<Command* const> commands,
                                                 std::span<const char> asking, bool resend_last) {
  std::vector<ReplyPtr> replies = node.exchange(commands, asking);
  std::vector<std::size_t> again;
  for (std::size_t i = 0; i < replies.size(); ++i) {
    if (is_error(replies[i].get(), "NOSCRIPT")) again.push_back(i);
  }
  if (again.empty()) return replies;
  // A trailing WAIT answered for writes that had not run; it must follow the resent ones.
  if (resend_last && again.back() != replies.size() - 1) again.push_back(replies.size() - 1);
  node.rerun_on_connect();
  std::vector<Command*> resend;
  std::vector<char> resend_asking;
  for (std::size_t i : again) {
    resend.push_back(commands[i]);
    resend_asking.push_back(!asking.empty() && asking[i]);
  }
  std::vector<ReplyPtr> second = node.exchange(resend, resend_asking);
  for (std::size_t n = 0; n < again.size(); ++n) replies[again[n]] = std::move(second[n]);
  return replies;
}

}  // namespace idem::redis_detail
