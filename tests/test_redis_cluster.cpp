// RedisStore on a Redis Cluster (support/redis_cluster.hpp): routing by slot, a slot migrated
// mid-run (MOVED/ASK), a master failing over with WAIT, and waiters on every master.

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "idem/redis.hpp"
#include "support/redis_cluster.hpp"
#include "support/redis_server.hpp"
#include "support/redis_store_helpers.hpp"
#include "support/sanitized.hpp"

namespace {

using namespace std::chrono_literals;
using namespace idem::test_support::redis;
using idem::ClaimStatus;
using idem::Message;
using idem::Outcome;
using idem::RedisOptions;
using idem::RedisStore;
using idem::test_support::RedisServer;
using idem::testing::kSanitized;

TEST(RedisStoreCluster, ThreeMastersWithASlotMigrationMidRunProcessEachKeyOnce) {
  RedisCluster cluster;
  const std::size_t kKeys = kSanitized ? 6'000 : 20'000;
  constexpr std::size_t kThreads = 4;
  ClusterKeys keys(kKeys);
  const std::vector<std::string>& names = keys.names;

  RedisOptions o = options_for(cluster.port(0), "cluster");
  o.cluster = true;
  RedisStore store(o);
  store.ping();
  const std::uint16_t hot = static_cast<std::uint16_t>(
      std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(names[0])})[0]));
  const std::size_t from = cluster.owner(hot), to = (from + 1) % 3;

  idem::IdempotentConsumer consumer(
      store, [&](const Message& m) { keys.ran(m); }, idem::Options{.lease = 10s});
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      drain(consumer, names, worker_stream(kKeys, kThreads, t), t % 2 == 1, keys.acks.get());
    });
  }
  const std::size_t total = keys.deliveries(kThreads);
  while (keys.acked() < total / 3) std::this_thread::sleep_for(5ms);
  const std::size_t acked_before = keys.acked();
  const std::size_t moved = cluster.migrate(hot, from, to);
  const std::size_t acked_during = keys.acked() - acked_before;
  for (std::thread& t : threads) t.join();
  std::printf(
      "cluster: moved %zu keys of slot %u while %zu deliveries were acked; %llu "
      "redirects followed\n",
      moved, static_cast<unsigned>(hot), acked_during,
      static_cast<unsigned long long>(store.counters().redirects));

  std::size_t twice = 0;
  for (std::size_t i = 0; i < kKeys; ++i) twice += keys.runs[i] > 1;
  EXPECT_EQ(keys.never_ran(), 0u);
  EXPECT_EQ(twice, 0u);
  EXPECT_EQ(keys.acked(), total);
  EXPECT_GT(moved, 0u);
  EXPECT_EQ(cluster.owner(hot), to);
  EXPECT_GT(store.counters().redirects, 0u) << "the consumers met the moved slot";
  // The records of the hot slot, its token counter included, now live on the new owner, and
  // a redelivery there is a duplicate.
  EXPECT_GT(
      std::stoul(admin(cluster.port(to), {"CLUSTER", "COUNTKEYSINSLOT", std::to_string(hot)})[0]),
      kKeys / 10);
  EXPECT_EQ(consumer.consume({.key = names[0], .payload = "p"}).outcome, Outcome::duplicate);
  // The operator hooks see every record on every master, the migrated slot included.
  const idem::StoreStats s = store.stats();
  EXPECT_EQ(s.records, kKeys);
  EXPECT_EQ(s.done, kKeys);
  EXPECT_EQ(s.in_progress, 0u);
  const std::optional<idem::RecordInfo> info = store.inspect(names[0]);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, idem::RecordInfo::State::done);
}

// After a failover the store's slot map still names the old master, now a replica. With
// wait_replicas, that node answers the calls with MOVED and the trailing WAIT with an error;
// the store must follow the MOVED (the calls did not run there), not report the WAIT error
// over and over.
TEST(RedisStoreCluster, WaitStillFollowsRedirectsFromAMasterTurnedReplica) {
  RedisCluster cluster(/*replicas=*/true);
  RedisOptions o = options_for(cluster.port(0), "turned");
  o.cluster = true;
  o.wait_replicas = 1;
  o.wait_timeout = 1s;
  RedisStore store(o);
  const std::string key = "{hot}order-1";
  const std::uint16_t hot = static_cast<std::uint16_t>(
      std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(key)})[0]));
  const std::size_t old_master = cluster.owner(hot);
  ASSERT_EQ(store.claim(request("{hot}warm-up")).status, ClaimStatus::acquired);  // map cached
  // A graceful failover: the old master's replica takes over, the old master becomes a replica.
  std::size_t replica = old_master;
  for (std::size_t i = 0; i < 6; ++i) {
    if (i != old_master && cluster.replicates(i, old_master, 0ms)) replica = i;
  }
  ASSERT_NE(replica, old_master);
  admin(cluster.port(replica), {"CLUSTER", "FAILOVER"});
  const auto started = std::chrono::steady_clock::now();
  bool asked_again = false;
  while ((cluster.owner(hot) != replica || !cluster.replicates(old_master, replica, 0ms)) &&
         std::chrono::steady_clock::now() - started < 30s) {
    // A manual failover gives up after 5 s on a slow machine: ask once more.
    if (!asked_again && cluster.owner(hot) != replica &&
        std::chrono::steady_clock::now() - started > 10s) {
      admin(cluster.port(replica), {"CLUSTER", "FAILOVER"});
      asked_again = true;
    }
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(cluster.replicates(old_master, replica, 0ms)) << cluster.describe();
  idem::Claim c = store.claim(request(key));
  EXPECT_EQ(c.status, ClaimStatus::acquired);
  EXPECT_TRUE(store.complete({.key = key, .token = c.token}));
  EXPECT_GT(store.counters().redirects, 0u);
  EXPECT_EQ(store.claim(request(key)).status, ClaimStatus::done);
}

TEST(RedisStoreCluster, MasterFailoverMidRunWithWaitLosesNothing) {
  RedisCluster cluster(/*replicas=*/true);
  const std::size_t kKeys = kSanitized ? 4'000 : 10'000;
  constexpr std::size_t kThreads = 4;
  ClusterKeys keys(kKeys);
  const std::vector<std::string>& names = keys.names;

  RedisOptions o = options_for(cluster.port(0), "failover");
  o.cluster = true;
  o.wait_replicas = 1;  // a record counts once the replica has it
  o.wait_timeout = 500ms;
  o.command_timeout = 500ms;
  o.connect_timeout = 300ms;
  RedisStore store(o);
  store.ping();
  const std::uint16_t hot = static_cast<std::uint16_t>(
      std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(names[0])})[0]));
  const std::size_t victim = cluster.owner(hot);

  idem::IdempotentConsumer consumer(
      store, [&](const Message& m) { keys.ran(m); }, idem::Options{.lease = 2s});
  std::vector<std::thread> threads;
  const std::size_t total = keys.deliveries(kThreads);
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      drain(consumer, names, worker_stream(kKeys, kThreads, t), t % 2 == 1, keys.acks.get(),
            keys.runs.get(), keys.thrown.get());
    });
  }
  while (keys.acked() < total / 3) std::this_thread::sleep_for(5ms);
  cluster.kill(victim);
  const auto killed = std::chrono::steady_clock::now();
  std::size_t new_owner = victim;
  while (new_owner == victim && std::chrono::steady_clock::now() - killed < 20s) {
    std::this_thread::sleep_for(50ms);
    try {
      new_owner = cluster.owner(hot);
    } catch (const std::runtime_error&) {
    }
  }
  const auto promoted = std::chrono::steady_clock::now();
  // The promoted replica has no replica of its own, so WAIT 1 cannot succeed on it until the
  // old master comes back (as its replica); until then its slots report StoreUnavailable.
  cluster.restart(victim);
  const auto restarted = std::chrono::steady_clock::now();
  // Redis rejoins it as a replica of the promoted node on its own (about 5 s: the diskless
  // sync delay). If it has not within 30 s, say what the cluster looks like and do what an
  // operator would: tell it whom to replicate. That is the cluster's healing, not the store's.
  bool rejoined = cluster.replicates(victim, new_owner, 30s);
  const auto linked = std::chrono::steady_clock::now();
  if (!rejoined) {
    std::printf("failover: the old master did not rejoin on its own:\n%s",
                cluster.describe().c_str());
    try {
      admin(cluster.port(victim), {"CLUSTER", "REPLICATE", cluster.id(new_owner)});
    } catch (const std::runtime_error& e) {
      std::printf("failover: CLUSTER REPLICATE failed: %s\n", e.what());
    }
    rejoined = cluster.replicates(victim, new_owner, 30s);
  }
  for (std::thread& t : threads) t.join();
  using ms = std::chrono::milliseconds;
  std::printf("failover: the old master %s as a replica %lld ms after its restart\n",
              rejoined ? "rejoined" : "had NOT rejoined",
              static_cast<long long>(std::chrono::duration_cast<ms>(linked - restarted).count()));
  if (keys.acked() != total) {
    std::printf("failover: not drained; the cluster now:\n%s", cluster.describe().c_str());
  }
  std::printf(
      "failover: replica on node %zu took slot %u after %lld ms; drained %lld ms later\n",
      new_owner, static_cast<unsigned>(hot),
      static_cast<long long>(std::chrono::duration_cast<ms>(promoted - killed).count()),
      static_cast<long long>(
          std::chrono::duration_cast<ms>(std::chrono::steady_clock::now() - promoted).count()));

  std::size_t unexplained_reruns = 0, reruns = 0;
  for (std::size_t i = 0; i < kKeys; ++i) {
    if (keys.runs[i] > 1) {
      ++reruns;
      if (keys.thrown[i] == 0) ++unexplained_reruns;
    }
  }
  std::printf("failover: %zu handlers re-ran after a completion lost in the crash\n", reruns);
  EXPECT_NE(new_owner, victim) << "no replica was promoted";
  EXPECT_EQ(keys.never_ran(), 0u);
  EXPECT_EQ(keys.acked(), total);
  // Only a handler whose completion failed in the crash may run again (after its lease).
  EXPECT_EQ(unexplained_reruns, 0u);
  EXPECT_LE(reruns, kThreads * 50) << "at most the calls in flight at the crash";
}

// The scripts publish on shard channels of the record's own slot (same slot: allowed in a
// cluster script), and each master's waiters listen on that master.
TEST(RedisStoreCluster, WaitersOnEveryMasterAreWokenByNotification) {
  RedisCluster cluster;
  RedisOptions o = options_for(cluster.port(0), "cluster-wait");
  o.cluster = true;
  RedisStore store(o);
  store.ping();
  std::vector<std::string> keys;
  std::vector<std::size_t> owners;
  for (int i = 0; owners.size() < 3 && i < 1000; ++i) {
    const std::string key = "cw-" + std::to_string(i);
    const auto slot = static_cast<std::uint16_t>(
        std::stoi(admin(cluster.port(0), {"CLUSTER", "KEYSLOT", store.record_key(key)})[0]));
    const std::size_t owner = cluster.owner(slot);
    if (std::find(owners.begin(), owners.end(), owner) == owners.end()) {
      owners.push_back(owner);
      keys.push_back(key);
    }
  }
  ASSERT_EQ(keys.size(), 3u);
  std::vector<idem::Claim> claims;
  for (const std::string& key : keys) claims.push_back(store.claim(request(key)));
  std::vector<std::thread> waiters;
  for (const std::string& key : keys) {
    waiters.emplace_back([&store, key] { store.await_change(key, kLongWait); });
  }
  wait_for_waiters(store, 3);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    EXPECT_TRUE(store.complete({.key = keys[i], .token = claims[i].token, .response = keys[i]}));
  }
  for (std::thread& t : waiters) t.join();
  EXPECT_EQ(store.counters().waits_woken, 3u);
  EXPECT_EQ(store.counters().wait_fallbacks, 0u);
  for (const std::string& key : keys) EXPECT_EQ(store.claim(request(key)).response, key);
}

}  // namespace
