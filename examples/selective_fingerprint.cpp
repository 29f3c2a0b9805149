// A payment provider re-sends the same notification with a new "sent_at" each time. Hashing
// the whole payload would call every resend a conflict (and dead-letter it); fingerprinting
// only the business fields makes a resend a duplicate, while a changed amount under the same
// payment id is still caught as a conflict.
//
// Prints what happened to each delivery and exits non-zero if the outcomes are not the ones
// expected.

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "idem/idem.hpp"

namespace {

// The fields that say what the notification means; transport details (sent_at, attempt,
// trace ids) are left out.
idem::Fingerprint business_fields(const idem::Message& message) {
  const nlohmann::json body = nlohmann::json::parse(message.payload, nullptr,
                                                    /*allow_exceptions=*/false);
  if (body.is_discarded()) return idem::Fingerprint::of(message.payload);  // not JSON: all of it
  nlohmann::json fields = nlohmann::json::object();
  for (const char* name : {"payment_id", "amount", "currency", "user_id"}) {
    if (body.contains(name)) fields[name] = body[name];
  }
  return idem::Fingerprint::of(fields.dump());  // dump() sorts keys: stable bytes
}

}  // namespace

int main() {
  idem::MemoryStore store;
  int cards = 0;
  idem::IdempotentConsumer issue_card(
      store, [&](const idem::Message&) { ++cards; },
      idem::Options{.fingerprint_of = business_fields});

  struct Delivery {
    const char* payload;
    idem::Outcome expected;
  };
  const std::vector<Delivery> deliveries{
      {R"({"payment_id":"pay-1","user_id":7,"amount":1000,"currency":"EUR",)"
       R"("sent_at":"2026-12-05T08:00:00Z"})",
       idem::Outcome::processed},
      {R"({"payment_id":"pay-1","user_id":7,"amount":1000,"currency":"EUR",)"
       R"("sent_at":"2026-12-05T08:00:30Z"})",
       idem::Outcome::duplicate},
      {R"({"sent_at":"2026-12-05T08:01:30Z","currency":"EUR","amount":1000,)"
       R"("user_id":7,"payment_id":"pay-1"})",
       idem::Outcome::duplicate},
      {R"({"payment_id":"pay-1","user_id":7,"amount":9999,"currency":"EUR",)"
       R"("sent_at":"2026-12-05T08:02:00Z"})",
       idem::Outcome::conflict},
  };
  bool as_expected = true;
  for (const Delivery& delivery : deliveries) {
    const idem::Result result = issue_card.consume({.key = "pay-1", .payload = delivery.payload});
    const bool ok = result.outcome == delivery.expected;
    as_expected = as_expected && ok;
    std::printf("%-10s %s%s\n", std::string(idem::to_string(result.outcome)).c_str(),
                delivery.payload, ok ? "" : "   <- unexpected");
  }
  std::printf("cards issued: %d (expected 1)\n", cards);
  return as_expected && cards == 1 ? 0 : 1;
}
