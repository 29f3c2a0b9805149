// The card purchase as three processes — payment service (charge + outbox in one SQLite
// transaction), relay, card service (idem inbox) — with random SIGKILLs of any of them, on a
// real RabbitMQ and on librdkafka's mock cluster: payments == charges == cards, none lost,
// none duplicated. The services are examples/card_purchase_services.hpp, run by this binary
// re-executed (tests/outbox_children.hpp).

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <random>
#include <string>
#include <thread>

#include "outbox_brokers.hpp"
#include "outbox_children.hpp"
#include "support/temp_dir.hpp"
#include "support/tsan_c11_threads.hpp"

namespace {

using namespace std::chrono_literals;

constexpr int kPayments = 600;

void card_purchase_under_kills(const std::string& broker, int kills_wanted) {
  idem::testing::TempDir dir("outbox-card-purchase");
  const std::string payments_db = dir.file("payments.db"), cards_db = dir.file("cards.db"),
                    deliveries = dir.file("deliveries.txt");
  idem::SqliteOutbox create_tables(payments_db);
  int generation = 0;
  auto start = [&](int service) {
    static constexpr std::array<const char*, 3> kRoles = {"payment", "relay", "card"};
    ++generation;
    return outbox_test::spawn({{"IDEM_OUTBOX_ROLE", kRoles[static_cast<std::size_t>(service)]},
                               {"IDEM_OUTBOX_DB", service == 2 ? cards_db : payments_db},
                               {"IDEM_OUTBOX_BROKER", broker},
                               {"IDEM_OUTBOX_EXPECT", std::to_string(kPayments)},
                               {"IDEM_OUTBOX_HOLDER", "relay"},
                               {"IDEM_OUTBOX_BATCH", "64"},
                               {"IDEM_OUTBOX_PAUSE_US", "3000"},  // ~2 s of payments
                               {"IDEM_OUTBOX_DELIVERIES", deliveries},
                               {"IDEM_OUTBOX_GROUP", "cards-" + std::to_string(generation)}});
  };
  std::array<outbox_test::Child, 3> services = {start(0), start(1), start(2)};
  std::array<bool, 3> done = {false, false, false};
  std::array<int, 3> kills = {0, 0, 0};
  std::mt19937 random(20261205);
  const auto give_up = std::chrono::steady_clock::now() + 150s;
  while (!(done[0] && done[1] && done[2]) && std::chrono::steady_clock::now() < give_up) {
    if (kills[0] + kills[1] + kills[2] < kills_wanted) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20 + random() % 100));
      const auto victim = static_cast<std::size_t>(random() % 3);
      if (!done[victim]) services[victim].kill();
    } else {
      std::this_thread::sleep_for(20ms);
    }
    for (std::size_t s = 0; s < 3; ++s) {
      int code = 0;
      if (done[s] || !services[s].ended(&code)) continue;
      if (code == 0) {
        done[s] = true;
      } else {
        EXPECT_EQ(code, 128 + SIGKILL) << "service " << s << " failed on its own";
        ++kills[s];
        services[s] = start(static_cast<int>(s));  // restarted, as a supervisor would
      }
    }
  }
  for (std::size_t s = 0; s < 3; ++s) {
    if (!done[s]) {
      ADD_FAILURE() << "service " << s << " did not finish";
      services[s].kill();
      services[s].wait();
    }
  }
  const card_purchase::Report report =
      card_purchase::read_report(payments_db, cards_db, deliveries);
  card_purchase::print_report(report);
  std::printf("kills: payment service %d, relay %d, card service %d\n", kills[0], kills[1],
              kills[2]);
  EXPECT_GE(kills[0] + kills[1] + kills[2], kills_wanted);
  EXPECT_EQ(report.payments, kPayments);
  EXPECT_EQ(report.charges, kPayments);
  EXPECT_EQ(report.published, kPayments);
  EXPECT_EQ(report.cards, kPayments);           // none lost
  EXPECT_EQ(report.distinct_cards, kPayments);  // none duplicated
  EXPECT_GE(report.deliveries, kPayments);
}

TEST(OutboxCardPurchase, RabbitMqWithRandomKills) {
  card_purchase_under_kills(outbox_test::rabbitmq_broker(), 15);
}

TEST(OutboxCardPurchase, KafkaMockClusterWithRandomKills) {
  outbox_test::MockCluster kafka;
  card_purchase_under_kills(kafka.broker(), 8);
}

}  // namespace
