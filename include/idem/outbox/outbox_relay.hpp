#pragma once
/// @file
/// @brief idem::OutboxRelay: publishes pending outbox rows in order and marks them sent once
/// the broker confirmed them; one active relay per database (a lease row), standbys take over
/// when it expires. idem::OutboxSource and idem::OutboxSink are the database and broker sides.
/// See docs/outbox.md.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <vector>

#include "idem/metrics.hpp"
#include "idem/outbox/outbox_message.hpp"

namespace idem {

/// @brief The relay's view of an outbox table (SqliteOutboxSource, PostgresOutboxSource).
/// Methods throw idem::StoreUnavailable when the database cannot answer.
class OutboxSource {
 public:
  virtual ~OutboxSource() = default;
  /// @brief Takes or renews the table's relay lease for holder until now + lease (the
  /// database's clock). False while another holder's lease is live.
  virtual bool acquire_lease(std::string_view holder, std::chrono::milliseconds lease) = 0;
  /// @brief Gives the lease up if holder has it (a standby may take over at once). Never throws.
  virtual void release_lease(std::string_view holder) noexcept = 0;
  /// @brief Up to limit rows not yet marked sent, in insert order.
  virtual std::vector<OutboxRow> fetch_pending(std::size_t limit) = 0;
  /// @brief Marks these rows sent (one transaction).
  virtual void mark_sent(std::span<const std::int64_t> seqs) = 0;
  /// @brief Deletes up to limit rows sent more than retention ago; returns how many.
  virtual std::size_t purge_sent(std::chrono::milliseconds retention, std::size_t limit) = 0;
  /// @brief Rows pending, and the Unix ms of the oldest (nullopt when none).
  struct Backlog {
    std::uint64_t pending = 0;
    std::optional<std::int64_t> oldest_ms{};
  };
  virtual Backlog backlog() = 0;
};

/// @brief The relay's broker side (kafka::OutboxSink, rabbitmq::OutboxSink).
class OutboxSink {
 public:
  virtual ~OutboxSink() = default;
  /// @brief Publishes rows in order, each with its inner id and its key as the biz-id, and
  /// waits for the broker's confirms. May move from the rows' messages.
  /// @return How many rows, from the front, the broker confirmed (rows.size() when all were).
  /// A row after an unconfirmed one is not counted even if it was confirmed: the relay
  /// publishes it again, in order, with the same inner id.
  /// @throws idem::Error when the broker cannot be reached (nothing counts as confirmed).
  virtual std::size_t publish(std::span<OutboxRow> rows) = 0;
};

/// @brief Policy of an OutboxRelay. Plain values with defaults.
struct OutboxRelayOptions {
  /// This relay's name in the lease row; empty: "<hostname>:<pid>:<random>".
  std::string holder{};
  /// Life of the lease; renewed every lease / 3. A standby takes over this long after the
  /// active relay stopped renewing. Must exceed the longest publish of one batch.
  std::chrono::milliseconds lease{std::chrono::seconds{10}};
  /// Rows read, published and marked per round.
  std::size_t batch_size = 256;
  /// Pause when nothing is pending, or while another relay holds the lease.
  std::chrono::milliseconds idle_wait{std::chrono::milliseconds{50}};
  /// First pause after a failed round (broker or database down); doubles up to max_backoff.
  std::chrono::milliseconds backoff{std::chrono::milliseconds{100}};
  std::chrono::milliseconds max_backoff{std::chrono::seconds{5}};
  /// Sent rows are deleted this long after they were sent, purge_batch rows per step, one step
  /// per purge_interval. 0 retention: at the next step.
  std::chrono::milliseconds retention{std::chrono::hours{24}};
  std::size_t purge_batch = 1000;
  std::chrono::milliseconds purge_interval{std::chrono::seconds{1}};
  /// How often the backlog gauges (pending rows, oldest age) are read.
  std::chrono::milliseconds backlog_interval{std::chrono::seconds{1}};
  /// Counters (outbox_published, outbox_publish_failed, outbox_purged, store_errors), the
  /// outbox_publish timing and the backlog gauges. Must outlive the relay.
  Metrics* metrics = nullptr;
  /// A line for every failed round, lease taken or lost. Must outlive the relay.
  Logger* logger = nullptr;
};

/// @brief What one round did.
struct OutboxRelayStep {
  bool active = false;          ///< this relay held the lease
  std::size_t published = 0;    ///< rows confirmed and marked sent
  std::size_t unconfirmed = 0;  ///< rows published (or tried) without a confirm; retried
  std::size_t purged = 0;
  bool failed = false;  ///< the round ended in an error (logged); back off
};

/// @brief Totals of an OutboxRelay.
struct OutboxRelayStats {
  std::uint64_t rounds = 0;
  std::uint64_t published = 0;
  std::uint64_t unconfirmed = 0;
  std::uint64_t purged = 0;
  std::uint64_t failed_rounds = 0;
  std::uint64_t leases_taken = 0;  ///< times this relay became the active one
};

/// @brief Moves outbox rows to the broker: takes the lease, reads up to batch_size pending
/// rows in insert order, publishes them through the sink, marks the confirmed prefix sent,
/// and purges sent rows after retention. One relay is active per outbox table at a time, so
/// rows reach each destination in insert order and no row is published twice while the
/// active relay keeps its lease. A row published but not marked (crash, lost confirm, lost
/// lease) is published again with the same inner id. Not thread-safe: one thread runs it.
class OutboxRelay {
 public:
  /// @throws idem::ConfigError for a zero lease or batch_size.
  OutboxRelay(OutboxSource& source, OutboxSink& sink, OutboxRelayOptions options = {});
  /// @brief Gives the lease up. Never throws.
  ~OutboxRelay();
  OutboxRelay(const OutboxRelay&) = delete;
  OutboxRelay& operator=(const OutboxRelay&) = delete;

  /// @brief One round. Errors of the database or the broker are logged and counted, never
  /// thrown.
  OutboxRelayStep run_once();
  /// @brief Rounds until stop is requested, pausing idle_wait when there was nothing to do
  /// and backing off after failures.
  void run(std::stop_token stop);
  /// @brief Rounds until nothing is pending (or timeout); true when the outbox was drained.
  bool drain(std::chrono::milliseconds timeout);

  const std::string& holder() const noexcept { return options_.holder; }
  OutboxRelayStats stats() const noexcept { return stats_; }

 private:
  bool hold_lease();
  void log(LogLevel level, const std::string& line) const noexcept;
  void report_backlog(bool force);

  OutboxSource& source_;
  OutboxSink& sink_;
  OutboxRelayOptions options_;
  OutboxRelayStats stats_{};
  bool active_ = false;
  std::chrono::steady_clock::time_point lease_renewed_{};
  std::chrono::steady_clock::time_point last_purge_{};
  std::chrono::steady_clock::time_point last_backlog_{};
  std::chrono::milliseconds next_backoff_{0};
  std::vector<OutboxRow> rows_;
  std::vector<std::int64_t> seqs_;
};

}  // namespace idem
