#pragma once
// A Redis Cluster for tests: three masters (and optionally a replica each) started as real
// redis-server processes on loopback, joined with redis-cli --cluster create, with the admin
// moves the tests need (slot migration, kill, restart, who owns a slot). Plus the bookkeeping
// of a cluster run's keys.

#include <hiredis/hiredis.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <iterator>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "support/redis_server.hpp"
#include "support/redis_store_helpers.hpp"

namespace idem::test_support::redis {

// One admin command over hiredis; the reply flattened to strings (arrays: one per element).
inline std::vector<std::string> admin(int port, const std::vector<std::string>& args) {
  redisContext* c = redisConnect("127.0.0.1", port);
  if (c == nullptr || c->err) {
    if (c) redisFree(c);
    throw std::runtime_error("cannot connect to cluster node " + std::to_string(port));
  }
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  for (const std::string& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  auto* r = static_cast<redisReply*>(
      redisCommandArgv(c, static_cast<int>(args.size()), argv.data(), lens.data()));
  std::vector<std::string> out;
  if (r == nullptr) {
    redisFree(c);
    throw std::runtime_error("admin command failed on " + std::to_string(port));
  }
  if (r->type == REDIS_REPLY_ARRAY) {
    for (std::size_t i = 0; i < r->elements; ++i) {
      out.emplace_back(r->element[i]->str ? std::string(r->element[i]->str, r->element[i]->len)
                                          : std::to_string(r->element[i]->integer));
    }
  } else if (r->type == REDIS_REPLY_INTEGER) {
    out.push_back(std::to_string(r->integer));
  } else if (r->str != nullptr) {
    out.emplace_back(r->str, r->len);
  }
  const bool failed = r->type == REDIS_REPLY_ERROR;
  freeReplyObject(r);
  redisFree(c);
  if (failed) throw std::runtime_error("admin command " + args[0] + " failed: " + out[0]);
  return out;
}

class RedisCluster {
 public:
  // Three masters on loopback; with replicas, each gets one replica (six servers).
  explicit RedisCluster(bool replicas = false) {
    for (int i = 0; i < (replicas ? 6 : 3); ++i) {
      nodes_.push_back(std::make_unique<RedisServer>(std::vector<std::string>{
          "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
          "--cluster-node-timeout", replicas ? "1000" : "3000", "--appendonly", "no"}));
    }
    std::string create = "--cluster create";
    for (auto& n : nodes_) create += " 127.0.0.1:" + std::to_string(n->port());
    std::string out =
        nodes_[0]->cli(create + " --cluster-replicas " + (replicas ? "1" : "0") + " --cluster-yes");
    if (out.find("All 16384 slots covered") == std::string::npos) {
      throw std::runtime_error("redis-cli --cluster create failed:\n" + out);
    }
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    auto wait_for = [&](std::size_t i, const std::vector<std::string>& cmd, const char* text) {
      while (admin(port(i), cmd)[0].find(text) == std::string::npos) {
        if (std::chrono::steady_clock::now() > deadline) {
          throw std::runtime_error(std::string("the cluster did not reach ") + text);
        }
        std::this_thread::sleep_for(50ms);
      }
    };
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      wait_for(i, {"CLUSTER", "INFO"}, "cluster_state:ok");
      if (replicas) {
        std::string role = admin(port(i), {"INFO", "replication"})[0];
        wait_for(i, {"INFO", "replication"},
                 role.find("role:master") != std::string::npos ? "connected_slaves:1"
                                                               : "master_link_status:up");
      }
    }
  }
  void kill(std::size_t i) { nodes_[i]->kill_hard(); }
  // Waits until node i is a replica of node m with its link up.
  bool replicates(std::size_t i, std::size_t m, std::chrono::milliseconds within) const {
    const auto deadline = std::chrono::steady_clock::now() + within;
    const std::string master_port = "master_port:" + std::to_string(port(m)) + "\r";
    do {
      try {
        std::string info = admin(port(i), {"INFO", "replication"})[0];
        if (info.find("role:slave") != std::string::npos &&
            info.find(master_port) != std::string::npos &&
            info.find("master_link_status:up") != std::string::npos) {
          return true;
        }
      } catch (const std::runtime_error&) {
      }
      std::this_thread::sleep_for(50ms);
    } while (std::chrono::steady_clock::now() < deadline);
    return false;
  }
  // What each running node believes, and the end of its log: for a failure message.
  std::string describe() const {
    std::string out;
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      out += "--- node " + std::to_string(i) + " port " + std::to_string(port(i)) + "\n";
      if (!nodes_[i]->running()) {
        out += "(down)\n";
        continue;
      }
      try {
        out += admin(port(i), {"CLUSTER", "NODES"})[0];
        std::string info = admin(port(i), {"INFO", "replication"})[0];
        out += info.substr(0, std::min<std::size_t>(info.size(), 400)) + "\n";
      } catch (const std::runtime_error& e) {
        out += std::string(e.what()) + "\n";
      }
      out += nodes_[i]->cli("--no-raw PING");  // proves the port answers
      out += idem::test_support::run_output("tail -n 15 " + nodes_[i]->dir() + "/redis.log");
    }
    return out;
  }
  // Restarts a killed node on its port with its nodes.conf: it rejoins as a replica.
  void restart(std::size_t i) { nodes_[i]->start(); }
  int port(std::size_t i) const { return nodes_[i]->port(); }
  std::string id(std::size_t i) const { return admin(port(i), {"CLUSTER", "MYID"})[0]; }
  std::size_t owner(std::uint16_t slot) const {
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      if (!nodes_[i]->running()) continue;
      std::string nodes = admin(port(i), {"CLUSTER", "NODES"})[0];
      // "<id> <ip:port@cport> myself,master - 0 0 1 connected 0-5460 ..."
      std::istringstream lines(nodes);
      for (std::string line; std::getline(lines, line);) {
        if (line.find("myself") == std::string::npos) continue;
        std::istringstream words(line);
        std::vector<std::string> w{std::istream_iterator<std::string>(words), {}};
        for (std::size_t k = 8; k < w.size(); ++k) {
          if (w[k].empty() || w[k][0] == '[') continue;  // [slot->-node] migration markers
          std::size_t dash = w[k].find('-');
          long lo = std::stol(w[k].substr(0, dash));
          long hi = dash == std::string::npos ? lo : std::stol(w[k].substr(dash + 1));
          if (slot >= lo && slot <= hi) return i;
        }
      }
    }
    throw std::runtime_error("no owner for slot " + std::to_string(slot));
  }

  // Moves a slot the way redis-cli --cluster reshard does, key batch by key batch.
  std::size_t migrate(std::uint16_t slot, std::size_t from, std::size_t to) {
    const std::string s = std::to_string(slot);
    admin(port(to), {"CLUSTER", "SETSLOT", s, "IMPORTING", id(from)});
    admin(port(from), {"CLUSTER", "SETSLOT", s, "MIGRATING", id(to)});
    std::size_t moved = 0;
    for (;;) {
      std::vector<std::string> keys = admin(port(from), {"CLUSTER", "GETKEYSINSLOT", s, "50"});
      if (keys.empty()) break;
      std::vector<std::string> cmd{"MIGRATE", "127.0.0.1", std::to_string(port(to)), "", "0",
                                   "5000",    "KEYS"};
      cmd.insert(cmd.end(), keys.begin(), keys.end());
      admin(port(from), cmd);
      moved += keys.size();
      std::this_thread::sleep_for(2ms);  // let the consumers run into the half-moved slot
    }
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      admin(port(i), {"CLUSTER", "SETSLOT", s, "NODE", id(to)});
    }
    return moved;
  }

 private:
  std::vector<std::unique_ptr<RedisServer>> nodes_;
};

// The keys of a cluster run and what happened to each: every tenth carries the {hot} hash tag,
// so they all live in one slot (the one migrated or failed over).
struct ClusterKeys {
  explicit ClusterKeys(std::size_t n)
      : count(n),
        runs(std::make_unique<std::atomic<int>[]>(n)),
        acks(std::make_unique<std::atomic<int>[]>(n)),
        thrown(std::make_unique<std::atomic<int>[]>(n)) {
    for (std::size_t i = 0; i < count; ++i) {
      names.push_back((i % 10 == 0 ? "{hot}order-" : "order-") + std::to_string(i));
      runs[i] = acks[i] = thrown[i] = 0;
    }
  }
  // The handler's bookkeeping: "order-42" and "{hot}order-40" are keys 42 and 40.
  void ran(const Message& m) {
    std::string_view k = m.key;
    runs[std::stoul(std::string(k.substr(k.find('-') + 1)))]++;
  }
  std::size_t acked() const {
    std::size_t a = 0;
    for (std::size_t i = 0; i < count; ++i) a += static_cast<std::size_t>(acks[i].load());
    return a;
  }
  // Deliveries across all workers (30 % of them redeliveries).
  std::size_t deliveries(std::size_t workers) const {
    std::size_t total = 0;
    for (std::size_t w = 0; w < workers; ++w) total += worker_stream(count, workers, w).size();
    return total;
  }
  std::size_t never_ran() const {
    std::size_t n = 0;
    for (std::size_t i = 0; i < count; ++i) n += runs[i] == 0;
    return n;
  }

  std::size_t count;
  std::vector<std::string> names;
  std::unique_ptr<std::atomic<int>[]> runs, acks, thrown;
};

}  // namespace idem::test_support::redis
