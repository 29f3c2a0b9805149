// The membership-card purchase. The payment system charges each user once and notifies the
// card-issuing system through a message queue; duplicates can appear in both halves:
//  - first half: the MQ persisted a notification but its ack to the payment system was lost,
//    so the payment system resends it. The publisher stamps one inner id per notification and
//    the MQ keeps one copy per inner id.
//  - second half: the card-issuing consumer's ack is lost, or it crashes before acking, so the
//    MQ delivers the notification again. The consumer keys on the payment id (the biz-id)
//    through idem::IdempotentConsumer and issues one card per payment.
// Exits non-zero unless every payment got exactly one card.
//
// Usage: card_purchase [seed]

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include "idem/idem.hpp"
#include "idem/testing/mock_broker.hpp"

// Built against idem::sqlite (the default when it is built), the card system keeps its dedup
// records in a SQLite file, as it would in production: they survive the crashes below.
#if IDEM_EXAMPLE_WITH_SQLITE
#include <unistd.h>
#include <filesystem>

#include "idem/sqlite.hpp"
#endif

int main(int argc, char** argv) {
  using namespace idem::testing;
  const std::uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 42;
  constexpr int payments = 1000;

  MockBroker mq({.faults = {.lost_publish_ack_rate = 0.2,
                            .lost_commit_rate = 0.2,
                            .crash_rate = 0.05,
                            .seed = seed}});

  // Upstream: charge once, then notify.
  MockPublisher payment_system(mq);
  int charged = 0;
  for (int i = 1; i <= payments; ++i) {
    std::string payment_id = "pay-" + std::to_string(100000 + i);
    ++charged;  // the charge itself: once per payment
    payment_system.publish(payment_id, R"({"event":"payment_succeeded","card":"gold"})");
  }

  // Downstream: issue a card per payment succeeded notification.
#if IDEM_EXAMPLE_WITH_SQLITE
  const std::filesystem::path db = std::filesystem::temp_directory_path() /
                                   ("idem_card_purchase_" + std::to_string(getpid()) + ".db");
  struct RemoveDb {  // removes the file and its WAL companions however main ends
    std::filesystem::path path;
    ~RemoveDb() {
      for (const char* suffix : {"", "-wal", "-shm"}) {
        std::error_code ignored;
        std::filesystem::remove(path.string() + suffix, ignored);
      }
    }
  } remove_db{db};
  idem::SqliteStore store(db.string(), {.synchronous = idem::SqliteSync::normal});
#else
  idem::MemoryStore store;
#endif
  std::map<std::string, int> cards;  // payment id -> cards issued
  idem::IdempotentConsumer issue_card(store,
                                      [&](const idem::Message& m) { ++cards[std::string(m.key)]; });
  MockConsumerSession card_system(mq, {.group = "card-issuing"});
  std::uint64_t suppressed = 0;
  card_system.run([&](const idem::Message& m) {
    idem::Result result = issue_card.consume(m);
    if (result.outcome == idem::Outcome::duplicate) ++suppressed;
    return result;
  });

  int cards_issued = 0, payments_with_one_card = 0;
  for (const auto& [payment_id, count] : cards) {
    cards_issued += count;
    if (count == 1) ++payments_with_one_card;
  }
  const MockBrokerStats& s = mq.stats();
  auto n = [](std::uint64_t v) { return static_cast<unsigned long long>(v); };
  std::printf("membership-card purchase, seed %llu, %s store\n", n(seed),
              std::string(store.name()).c_str());
  std::printf("  payments charged              %6d\n", charged);
  std::printf(
      "  notifications sent            %6llu  (%llu publish acks lost, resent with the "
      "same inner id)\n",
      n(s.publish_attempts), n(s.lost_publish_acks));
  std::printf(
      "  notifications stored by MQ    %6llu  (%llu duplicate copies rejected by inner "
      "id)\n",
      n(s.copies_stored), n(s.copies_rejected));
  std::printf(
      "  notifications delivered       %6llu  (%llu redeliveries: %llu consumer acks "
      "lost, %llu consumer crashes)\n",
      n(s.deliveries), n(s.redeliveries), n(s.lost_commits), n(s.crashes));
  std::printf("  duplicates suppressed by idem %6llu\n", n(suppressed));
  std::printf("  cards issued                  %6d  (a plain handler would have issued %llu)\n",
              cards_issued, n(s.deliveries));

  bool ok = cards_issued == charged && payments_with_one_card == charged;
  std::printf("%s: %s\n", ok ? "OK" : "FAILED",
              ok ? "exactly one card per payment" : "cards and payments do not match");
  return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
