// The outbox relay end to end, on a real RabbitMQ and on librdkafka's mock cluster: relays
// SIGKILLed at random while publishing (every committed row reaches the broker, every copy of
// a row carries the row's inner id, the consumer side has one effect per inner id), and two
// healthy relays on one database (no row published twice). Relays are this binary
// re-executed (tests/outbox_children.hpp).

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <chrono>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "outbox_brokers.hpp"
#include "outbox_children.hpp"
#include "support/temp_dir.hpp"
#include "support/tsan_c11_threads.hpp"

namespace {

using namespace std::chrono_literals;

// Writes n notifications (pay-0 .. pay-n-1) in transactions of 100; returns key -> inner id.
std::map<std::string, std::string> write_rows(const std::string& db_path, int n) {
  card_purchase::Db db(db_path);
  idem::SqliteOutbox outbox(db_path);
  std::map<std::string, std::string> ids;
  for (int i = 0; i < n; ++i) {
    if (i % 100 == 0) db.exec("BEGIN IMMEDIATE");
    const std::string key = card_purchase::payment_id(i);
    ids[key] = outbox
                   .add(db.get(), {.destination = card_purchase::kDestination,
                                   .routing_key = card_purchase::kDestination,
                                   .key = key,
                                   .payload = "charged " + key,
                                   .headers = {}})
                   .to_string();
    if (i % 100 == 99 || i == n - 1) db.exec("COMMIT");
  }
  return ids;
}

// Kafka's mock cluster answers a batch in ~90 ms whatever its size, RabbitMQ in a few ms:
// batches sized so that 20 kills land while rows are still pending, in seconds.
std::string batch_for(const std::string& broker) {
  return broker.rfind("kafka=", 0) == 0 ? "64" : "16";
}

outbox_test::Child spawn_relay(const std::string& db, const std::string& broker, int expect,
                               const std::string& holder) {
  return outbox_test::spawn({{"IDEM_OUTBOX_ROLE", "relay"},
                             {"IDEM_OUTBOX_DB", db},
                             {"IDEM_OUTBOX_BROKER", broker},
                             {"IDEM_OUTBOX_EXPECT", std::to_string(expect)},
                             {"IDEM_OUTBOX_HOLDER", holder},
                             {"IDEM_OUTBOX_BATCH", batch_for(broker)}});
}

// Every row reached the broker, each copy with the row's inner id, one effect per inner id.
void expect_each_row_once(const std::map<std::string, std::string>& rows,
                          const outbox_test::ReadBack& got) {
  EXPECT_EQ(got.inner_ids_by_key.size(), rows.size()) << "rows lost or unknown keys arrived";
  for (const auto& [key, inner_id] : rows) {
    auto it = got.inner_ids_by_key.find(key);
    if (it == got.inner_ids_by_key.end()) {
      ADD_FAILURE() << key << " never reached the broker";
      continue;
    }
    for (const std::string& copy : it->second) {
      EXPECT_EQ(copy, inner_id) << "a copy of " << key << " carries another inner id";
    }
    auto effects = got.effects_by_inner_id.find(inner_id);
    EXPECT_TRUE(effects != got.effects_by_inner_id.end() && effects->second == 1)
        << key << ": not exactly one effect";
  }
  EXPECT_EQ(got.effects_by_inner_id.size(), rows.size());
}

void sigkilled_relays(const std::string& broker, const std::string& group) {
  constexpr int kRows = 3000;
  constexpr int kKills = 20;
  idem::testing::TempDir dir("outbox-relay-kill");
  const std::string db = dir.file("payments.db");
  const auto rows = write_rows(db, kRows);
  std::mt19937 random(20261205);
  int kills = 0;
  // A relay that finished before its kill does not count; the last rows are left to the end.
  for (int n = 0; n < 2 * kKills && kills < kKills; ++n) {
    outbox_test::Child relay = spawn_relay(db, broker, kRows, "relay");
    ASSERT_GT(relay.pid, 0);
    if (relay.wait_working(30s)) {
      std::this_thread::sleep_for(std::chrono::microseconds(random() % 20'000));
    }
    relay.kill();  // never a hang, whatever the child does
    if (relay.wait() == 128 + SIGKILL) ++kills;
  }
  outbox_test::Child last = spawn_relay(db, broker, kRows, "relay");
  EXPECT_EQ(last.wait(), 0);  // the last one publishes the rest
  EXPECT_GE(kills, kKills);

  const outbox_test::ReadBack got = outbox_test::read_back(broker, kRows, group);
  expect_each_row_once(rows, got);
  EXPECT_GE(got.copies, static_cast<std::size_t>(kRows));
  std::printf("%d relays killed; %zu copies of %d rows reached the broker\n", kills, got.copies,
              kRows);
}

void two_healthy_relays(const std::string& broker, const std::string& group) {
  constexpr int kRows = 2000;
  idem::testing::TempDir dir("outbox-relay-two");
  const std::string db = dir.file("payments.db");
  const auto rows = write_rows(db, kRows);
  outbox_test::Child a = spawn_relay(db, broker, kRows, "relay-a");
  outbox_test::Child b = spawn_relay(db, broker, kRows, "relay-b");
  EXPECT_EQ(a.wait(), 0);
  EXPECT_EQ(b.wait(), 0);
  const outbox_test::ReadBack got = outbox_test::read_back(broker, kRows, group);
  expect_each_row_once(rows, got);
  EXPECT_EQ(got.copies, static_cast<std::size_t>(kRows)) << "a row was published twice";
}

TEST(OutboxRelayKafka, SigkilledRelaysLoseNothingAndKeepEachRowsInnerId) {
  outbox_test::MockCluster kafka;
  sigkilled_relays(kafka.broker(), "read-back");
}

TEST(OutboxRelayRabbitMq, SigkilledRelaysLoseNothingAndKeepEachRowsInnerId) {
  sigkilled_relays(outbox_test::rabbitmq_broker(), "");
}

TEST(OutboxRelayKafka, TwoHealthyRelaysPublishNoRowTwice) {
  outbox_test::MockCluster kafka;
  two_healthy_relays(kafka.broker(), "read-back");
}

TEST(OutboxRelayRabbitMq, TwoHealthyRelaysPublishNoRowTwice) {
  two_healthy_relays(outbox_test::rabbitmq_broker(), "");
}

}  // namespace
