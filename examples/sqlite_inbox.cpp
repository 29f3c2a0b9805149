// A card-issuing consumer on the SQLite transactional inbox: the INSERT INTO cards and the
// dedup record commit in one transaction, so a redelivered payment never issues a second card,
// and a crash or a failing handler never leaves a card without its record (or the reverse).
//
// Run it: it prints what happened to each delivery and the final counts.
//   ./sqlite_inbox [database-path]      (default: a fresh file under /tmp)

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "idem/sqlite.hpp"

namespace {

std::string card_number_for(std::string_view payment_id) {
  // Stand-in for the card processor: deterministic, so reruns are easy to compare.
  return "4000-0000-" + std::to_string(std::hash<std::string_view>{}(payment_id) % 10'000);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path =
      argc > 1 ? argv[1] : "/tmp/idem-sqlite-inbox-" + std::to_string(::getpid()) + ".db";
  idem::SqliteStore store(path);  // WAL, synchronous=FULL, tables created on first open
  store.transaction([](idem::SqliteTx& tx) {
    tx.exec("CREATE TABLE IF NOT EXISTS cards(payment_id BLOB PRIMARY KEY, number TEXT NOT NULL)");
  });

  bool printer_jammed = true;  // the first attempt at pay-3 fails
  idem::IdempotentConsumer consumer(
      store, [&](const idem::Message& m, idem::SqliteTx& tx) -> std::string {
        const std::string number = card_number_for(m.key);
        tx.exec("INSERT INTO cards(payment_id, number) VALUES(?1, ?2)", idem::SqliteBlob{m.key},
                number);
        if (m.key == "pay-3" && printer_jammed) {
          printer_jammed = false;
          throw std::runtime_error("card printer jammed");  // rolls back the INSERT above
        }
        return number;  // stored with the record, replayed to duplicates
      });

  // The broker delivers at least once: duplicates, a changed payload, a failure and its retry.
  const std::vector<idem::Message> deliveries{
      {.key = "pay-1", .payload = R"({"amount":10})"},
      {.key = "pay-2", .payload = R"({"amount":25})"},
      {.key = "pay-1", .payload = R"({"amount":10})"},  // redelivery
      {.key = "pay-3", .payload = R"({"amount":40})"},  // handler throws
      {.key = "pay-3", .payload = R"({"amount":40})"},  // redelivery after the failure
      {.key = "pay-2", .payload = R"({"amount":99})"},  // same id, different payload
  };
  for (const idem::Message& m : deliveries) {
    const idem::Result r = consumer.consume(m);
    std::printf("%-6s %-12s %-4s %s\n", std::string(m.key).c_str(),
                std::string(idem::to_string(r.outcome)).c_str(), r.should_ack() ? "ack" : "nack",
                r.response.value_or("").c_str());
  }

  // A Kafka-style batch: results and the partition's next offset commit together.
  const std::vector<idem::Message> batch{{.key = "pay-4", .payload = "{}"},
                                         {.key = "pay-1", .payload = R"({"amount":10})"},
                                         {.key = "pay-5", .payload = "{}"}};
  const std::vector<idem::PartitionOffset> offsets{
      {.topic = "payments", .partition = 0, .next_offset = 153}};
  idem::consume_batch_with_offsets(consumer, batch, offsets);
  std::printf("payments/0 resumes at offset %lld\n",
              static_cast<long long>(store.committed_offset("payments", 0).value_or(0)));

  store.transaction([](idem::SqliteTx& tx) {
    std::printf("cards issued: %lld (expected 5: pay-1..pay-5, one each)\n",
                static_cast<long long>(tx.query_int64("SELECT count(*) FROM cards").value_or(0)));
  });
  if (argc <= 1) {
    std::error_code ignored;
    for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path + suffix, ignored);
  }
  return 0;
}
