#pragma once
// Where each command runs: one node (the seed) for a single server; for a Redis Cluster the
// slot map (read with CLUSTER SLOTS), one pool per node, and the MOVED / ASK / TRYAGAIN /
// CLUSTERDOWN handling. Every round trip goes through here, so here too are the WAIT that
// confirms replication and the resend after NOSCRIPT. Internal to idem::redis.

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "cluster_slot.hpp"
#include "pool.hpp"

namespace idem::redis_detail {

/// One command for the key slot `slot`, and its reply once run.
struct Call {
  std::uint16_t slot = 0;
  Command command;
  ReplyPtr reply;
};

class Router {
 public:
  /// options and counters must outlive the router; on_connect runs on every new connection.
  Router(const RedisOptions& options, Counters& counters, OnConnect on_connect);
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  /// The node of RedisOptions::host/port (or unix_socket).
  Node& seed_node();
  /// The node owning slot (the seed without a cluster); reads the slot map when unknown.
  Node& owner_of(std::uint16_t slot);
  /// Every master: the seed alone, or each node owning slots in a freshly read slot map.
  std::vector<Node*> masters();

  /// Runs every call and fills its reply: one pipeline per node, followed by WAIT when
  /// RedisOptions::wait_replicas is set and `replicate` (reads pass false). In a cluster,
  /// MOVED updates the map and retries, ASK retries once at the importing node behind ASKING,
  /// TRYAGAIN (a slot mid-migration) and CLUSTERDOWN wait and retry, and a node that fails is
  /// dropped from the map by a refresh. Gives up after max_redirects rounds or command_timeout.
  /// @throws RedisUnavailable.
  void run(std::vector<Call>& calls, bool replicate = true);

 private:
  Node& node_for(const Endpoint& endpoint);
  std::uint16_t node_index(const Endpoint& endpoint);
  void refresh_map();
  void set_owner(std::uint16_t slot, const Endpoint& endpoint);
  std::vector<ReplyPtr> exchange(Node& node, std::vector<Command*>& cmds,
                                 std::span<const char> asking, bool replicate,
                                 std::string* shortfall);
  std::vector<ReplyPtr> exchange_resending(Node& node, std::span<Command* const> commands,
                                           std::span<const char> asking, bool resend_last);

  const RedisOptions& options_;
  Counters& counters_;
  const OnConnect on_connect_;

  // Nodes are only added, never removed, so a Node& stays valid for the router's life.
  std::shared_mutex topology_mutex_;
  std::vector<std::unique_ptr<Node>> nodes_;        // [0] is the seed
  std::array<std::uint16_t, kSlots> slot_owner_{};  // index into nodes_
  bool have_map_ = false;
  std::mutex refresh_mutex_;
};

}  // namespace idem::redis_detail
