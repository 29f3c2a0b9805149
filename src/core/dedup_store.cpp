#include "idem/dedup_store.hpp"

#include <string>
#include <thread>

namespace idem {

void validate_key(std::string_view key, std::size_t max_key_bytes) {
  if (key.empty()) {
    throw InvalidMessage(
        "key is empty: every message needs a biz-id (payment id, order id) in Message::key; "
        "dead-letter this message and fix the producer");
  }
  if (key.size() > max_key_bytes) {
    throw InvalidMessage("key is " + std::to_string(key.size()) + " bytes; max_key_bytes is " +
                         std::to_string(max_key_bytes) +
                         ": use a shorter biz-id (or a digest of it) or raise "
                         "Options::max_key_bytes");
  }
}

namespace {
void validate_duration(std::chrono::milliseconds value, const char* what) {
  if (value.count() <= 0 || value > kMaxDuration) {
    throw ConfigError(std::string(what) + " is " + std::to_string(value.count()) +
                      " ms; it must be 1 ms to 100 years (Options caps larger values)");
  }
}
}  // namespace

void validate_request(const ClaimRequest& request) {
  validate_key(request.key, request.max_key_bytes);
  validate_duration(request.lease, "lease");
  validate_duration(request.retention, "retention");
}

void validate_keys(std::span<const ClaimRequest> requests) {
  for (std::size_t i = 0; i < requests.size(); ++i) {
    try {
      validate_request(requests[i]);
    } catch (const InvalidMessage& e) {
      throw InvalidMessage("message " + std::to_string(i) + " of the batch: " + e.what() +
                           "; nothing in the batch was processed");
    }
  }
}

std::vector<Claim> DedupStore::claim_batch(std::span<const ClaimRequest> requests) {
  validate_keys(requests);
  std::vector<Claim> claims = translate_errors([&] { return do_claim_batch(requests); });
  if (claims.size() != requests.size())
    throw_miscounted("claim_batch", claims.size(), requests.size());
  return claims;
}

std::vector<bool> DedupStore::complete_batch(std::span<const Completion> completions) {
  std::vector<bool> done = translate_errors([&] { return do_complete_batch(completions); });
  if (done.size() != completions.size()) {
    throw_miscounted("complete_batch", done.size(), completions.size());
  }
  return done;
}

void DedupStore::throw_miscounted(const char* operation, std::size_t answers,
                                  std::size_t requests) const {
  throw_unavailable((std::string(operation) + " returned " + std::to_string(answers) +
                     " answers for " + std::to_string(requests) + " requests (a store bug)")
                        .c_str());
}

std::vector<Claim> DedupStore::do_claim_batch(std::span<const ClaimRequest> requests) {
  std::vector<Claim> claims;
  claims.reserve(requests.size());
  for (const ClaimRequest& request : requests) claims.push_back(do_claim(request));
  return claims;
}

std::vector<bool> DedupStore::do_complete_batch(std::span<const Completion> completions) {
  std::vector<bool> done;
  done.reserve(completions.size());
  for (const Completion& completion : completions) done.push_back(do_complete(completion));
  return done;
}

std::optional<RecordInfo> DedupStore::do_inspect(std::string_view) {
  throw_unsupported("inspect");
}
StoreStats DedupStore::do_stats() {
  throw_unsupported("stats");
}
std::size_t DedupStore::do_purge_expired(std::size_t) {
  throw_unsupported("purge-expired");
}

void DedupStore::do_await_change(std::string_view, std::chrono::milliseconds max_wait) {
  std::this_thread::sleep_for(max_wait);
}

void DedupStore::throw_unsupported(std::string_view operation) const {
  throw ConfigError("the " + std::string(name()) + " store does not support " +
                    std::string(operation));
}

void DedupStore::throw_unavailable(const char* what) const {
  throw StoreUnavailable(std::string(name()) + " store failed: " + what +
                         "; the message was not recorded as done: do not ack it, retry later");
}

}  // namespace idem
