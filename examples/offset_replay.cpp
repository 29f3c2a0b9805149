// The Kafka restart story. Data 1, 2, 3 sit at offsets 152, 153, 154. The consumer handles
// 152 and 153, then the process is killed before its periodic offset commit. On restart it
// resumes at the last committed offset, 152, so 152 and 153 arrive again.
//
// Run twice on the same log: a plain handler that inserts a row per message (data 1 and 2
// end up inserted twice), and the same handler behind idem::IdempotentConsumer (each once).
// Exits non-zero if the idem run inserted anything twice.

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "idem/idem.hpp"
#include "idem/testing/mock_broker.hpp"

namespace {

using idem::testing::Delivery;
using idem::testing::MockBroker;
using idem::testing::MockConsumerSession;

// A table with no unique constraint: every insert adds a row.
using Table = std::vector<std::string>;

// Deliver 152 and 153, crash before committing, restart and consume to the end.
// handle returns what it did, for the printout.
template <class Handle>
void replay_story(MockBroker& broker, const char* group, Handle handle) {
  MockConsumerSession consumer(broker, {.group = group, .commit_every = 0});  // periodic commit
  auto print = [&](const Delivery& d) {
    std::printf("  offset %lld  %-12s -> %s\n", static_cast<long long>(d.offset),
                std::string(d.payload).c_str(), handle(d.message()).c_str());
  };
  consumer.poll(print);  // 152
  consumer.poll(print);  // 153
  consumer.crash();      // kill -9 before the commit: nothing was committed
  std::printf("  -- consumer killed before committing; restarts at committed offset %lld\n",
              static_cast<long long>(consumer.committed_offset()));
  consumer.run(print);  // 152, 153 again, then 154
}

int duplicate_rows(const Table& table) {
  std::map<std::string, int> count;
  int duplicates = 0;
  for (const std::string& row : table) duplicates += count[row]++ > 0 ? 1 : 0;
  return duplicates;
}

}  // namespace

int main() {
  MockBroker broker({.first_offset = 152});
  idem::testing::MockPublisher producer(broker);
  for (int i = 1; i <= 3; ++i) {
    producer.publish("data-" + std::to_string(i), "Data " + std::to_string(i));
  }

  std::printf("without idem: the handler inserts a row per message\n");
  Table plain_table;
  replay_story(broker, "plain", [&](const idem::Message& m) {
    plain_table.emplace_back(m.payload);
    return "INSERT '" + std::string(m.payload) + "'";
  });
  int plain_duplicates = duplicate_rows(plain_table);
  std::printf("  table: %zu rows for 3 messages, %d inserted twice\n\n", plain_table.size(),
              plain_duplicates);

  std::printf("with idem: the same handler behind idem::IdempotentConsumer\n");
  idem::MemoryStore store;  // in production: a store that survives the restart (SQLite, Redis)
  Table idem_table;
  idem::IdempotentConsumer consumer(
      store, [&](const idem::Message& m) { idem_table.emplace_back(m.payload); });
  replay_story(broker, "idem", [&](const idem::Message& m) {
    idem::Outcome outcome = consumer.consume(m).outcome;
    std::string what(idem::to_string(outcome));
    return outcome == idem::Outcome::processed ? what + ": INSERT '" + std::string(m.payload) + "'"
                                               : what + ": skipped";
  });
  int idem_duplicates = duplicate_rows(idem_table);
  std::printf("  table: %zu rows for 3 messages, %d inserted twice\n\n", idem_table.size(),
              idem_duplicates);

  bool ok = idem_duplicates == 0 && idem_table.size() == 3;
  std::printf("%s: the replay of 152 and 153 %s\n", ok ? "OK" : "FAILED",
              ok ? "was absorbed by idem" : "was NOT absorbed by idem");
  return ok ? 0 : 1;
}
