#pragma once
/// @file
/// @brief idem::Options, the per-consumer policy.

#include <chrono>
#include <cstddef>

#include "idem/fingerprint.hpp"
#include "idem/metrics.hpp"

namespace idem {

struct Message;

/// @brief When the key is recorded as done relative to running the handler.
enum class Mark {
  /// Record done after the handler succeeds: at-least-once effects, deduplicated (default).
  after_success,
  /// Record done before the handler runs: at-most-once; a crash mid-handler loses the message.
  before_processing,
};

/// @brief Policy of one IdempotentConsumer. Designated-initialiser friendly.
struct Options {
  /// Life of an in-progress claim. A claim whose holder died is taken over after this.
  /// Make it longer than the slowest handler, or a second worker may run concurrently.
  std::chrono::milliseconds lease{std::chrono::seconds{30}};
  /// How long a done key is remembered. Redeliveries later than this are processed again.
  std::chrono::milliseconds retention{std::chrono::hours{24}};
  /// Longest accepted key in bytes; longer keys raise idem::InvalidMessage.
  std::size_t max_key_bytes = 512;
  /// Fingerprint payloads (XXH3-128) and report Outcome::conflict when a key is reused
  /// with a different payload.
  bool verify_payload = true;
  /// What is fingerprinted when verify_payload is on; nullptr: the whole payload. Give it
  /// the business fields only when a sender re-sends the same message with a field that
  /// changes (a timestamp, a trace id): e.g. a captureless lambda returning
  /// idem::Fingerprint::of(the fields' bytes). See examples/selective_fingerprint.cpp.
  Fingerprint (*fingerprint_of)(const Message& message) = nullptr;
  /// When the key is recorded as done.
  Mark mark = Mark::after_success;
  /// How long a message whose key another worker is processing waits for that worker to
  /// finish, instead of answering Outcome::in_progress at once: it then gets `duplicate`
  /// with the stored response, or is processed if the holder released the key or its lease
  /// ended, or is `in_progress` when the wait runs out. Nothing (no store connection, no
  /// transaction, no claim of a batch) is held while waiting. 0: do not wait.
  std::chrono::milliseconds in_progress_wait{0};
  /// Let handler exceptions escape consume() (after the claim is released) instead of
  /// returning Outcome::failed.
  bool rethrow_handler_errors = false;
  /// Counters and latencies go here when set (e.g. an idem::PrometheusMetrics). Must outlive
  /// the consumer. nullptr: nothing is measured, no clock is read.
  Metrics* metrics = nullptr;
  /// Store errors, lost leases and handler failures are logged here when set. nullptr: silent.
  Logger* logger = nullptr;
};

}  // namespace idem
