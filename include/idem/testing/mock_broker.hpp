#pragma once
/// @file
/// @brief idem::testing::MockBroker and friends: an in-process, single-partition message
/// broker for unit tests that reproduces both halves of message duplication, with seeded,
/// reproducible fault injection.
///
/// First half (producer -> broker): MockPublisher stamps one idem::InnerMsgId per logical
/// message; when the broker persisted a message but its publish ack is lost, the publisher
/// retries with the same id, and the broker keeps one copy per id (switchable, to show what
/// happens without it).
///
/// Second half (broker -> consumer): MockConsumerSession delivers the log in offset order to
/// a callback; acks (offset commits) can be lost, which gets the message redelivered after an
/// ack timeout, and the consumer can crash after handling messages but before committing, which
/// replays everything from the last committed offset (the Kafka 152/153/154 story).
///
/// Header-only, no dependency beyond the core. Not thread-safe: drive a broker, its publishers
/// and its sessions from one thread (which is what makes a seeded run reproducible).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "idem/error.hpp"
#include "idem/inner_msg_id.hpp"
#include "idem/message.hpp"
#include "idem/outcome.hpp"
#include "idem/result.hpp"

namespace idem::testing {

/// @brief The faults a MockBroker injects. Every rate is a probability in [0, 1] drawn per
/// opportunity from one std::mt19937_64 seeded with seed, so the same plan and the same
/// sequence of calls inject the same faults.
struct FaultPlan {
  /// Per publish attempt: the broker persisted the message but its ack to the publisher is
  /// dropped, so the publisher retries the same message (first-half duplicate).
  double lost_publish_ack_rate = 0.0;
  /// Per commit: the consumer's ack / offset commit is dropped, so the broker redelivers the
  /// messages it covered after the ack timeout (second-half duplicate).
  double lost_commit_rate = 0.0;
  /// Per delivery: the consumer process dies after the handler ran but before the ack was
  /// committed; on restart it replays from the last committed offset (second-half duplicate).
  double crash_rate = 0.0;
  /// Seed of the fault generator.
  std::uint64_t seed = 1;
};

/// @brief What a MockBroker and everything attached to it did and injected. Compare two runs
/// with ==: same FaultPlan and same calls give equal stats.
struct MockBrokerStats {
  // First half.
  std::uint64_t publish_attempts = 0;   ///< sends by publishers, retries included
  std::uint64_t lost_publish_acks = 0;  ///< injected: persisted, but the ack was dropped
  std::uint64_t copies_stored = 0;      ///< messages appended to the log
  std::uint64_t copies_rejected = 0;    ///< retries dropped because the inner id was stored
  // Second half.
  std::uint64_t deliveries = 0;    ///< messages handed to consumer callbacks
  std::uint64_t redeliveries = 0;  ///< of which the group had delivered that offset before
  std::uint64_t commits = 0;       ///< commit requests sent by sessions
  std::uint64_t lost_commits = 0;  ///< injected: commit requests dropped
  std::uint64_t crashes = 0;       ///< consumer crashes, injected or asked for
  std::uint64_t nacks = 0;         ///< deliveries the callback refused (redelivered later)
  std::uint64_t dead_letters = 0;  ///< deliveries the callback dead-lettered (conflict)

  friend bool operator==(const MockBrokerStats&, const MockBrokerStats&) = default;
};

/// @brief Configuration of a MockBroker.
struct MockBrokerOptions {
  /// Offset of the first message in the log, e.g. 152 to replay the Kafka story.
  std::int64_t first_offset = 0;
  /// Keep one copy per inner id (first-half dedup). Off: every retry is another copy.
  bool dedup_inner_ids = true;
  /// The faults to inject.
  FaultPlan faults{};
};

/// @brief One persisted message of the log.
struct BrokerMessage {
  std::int64_t offset = 0;
  std::string key;       ///< the biz-id (payment id, order id)
  std::string payload;   ///< the body
  std::string inner_id;  ///< InnerMsgId text stamped by the publisher; may be empty

  /// @brief A view for idem::IdempotentConsumer::consume(); valid while the broker lives.
  idem::Message message() const noexcept {
    return {.key = key, .payload = payload, .inner_id = inner_id};
  }
};

/// @brief One delivery of a message to a consumer callback. The views stay valid while the
/// broker lives.
struct Delivery {
  std::int64_t offset = 0;
  std::string_view key{};
  std::string_view payload{};
  std::string_view inner_id{};
  /// 1 on the first delivery of this offset to the group, 2 on the first redelivery, ...
  std::uint32_t delivery_count = 1;

  /// @brief True when the group got this offset before (RabbitMQ's "redelivered" flag).
  bool redelivered() const noexcept { return delivery_count > 1; }
  /// @brief The view idem::IdempotentConsumer::consume() takes.
  idem::Message message() const noexcept {
    return {.key = key, .payload = payload, .inner_id = inner_id};
  }
};

class MockPublisher;
class MockConsumerSession;

/// @brief An in-process broker: one topic with one partition, i.e. one append-only log with
/// offsets, and a committed offset per consumer group. Publish through MockPublisher, consume
/// through MockConsumerSession.
class MockBroker {
 public:
  /// @brief An empty log starting at options.first_offset.
  explicit MockBroker(MockBrokerOptions options = {})
      : options_(std::move(options)), rng_(options_.faults.seed) {}
  MockBroker(const MockBroker&) = delete;
  MockBroker& operator=(const MockBroker&) = delete;

  /// @brief The result of one publish attempt.
  struct SendResult {
    std::int64_t offset = 0;  ///< where the message is (the stored copy's offset on a dedup)
    bool stored = false;      ///< a new copy was appended
    bool acked = false;       ///< the ack reached the publisher (false: a lost ack was injected)
  };

  /// @brief One publish attempt: persists the message (unless its inner id is already stored
  /// and dedup is on), then sends the ack, which the fault plan may drop.
  /// Normally called by MockPublisher; call it directly to publish without an inner id.
  SendResult send(std::string_view key, std::string_view payload, std::string_view inner_id) {
    ++stats_.publish_attempts;
    SendResult result;
    auto known = inner_id.empty() || !options_.dedup_inner_ids
                     ? offset_by_inner_id_.end()
                     : offset_by_inner_id_.find(std::string(inner_id));
    if (known != offset_by_inner_id_.end()) {
      ++stats_.copies_rejected;
      result.offset = known->second;
    } else {
      result.offset = append(key, payload, inner_id);
      result.stored = true;
      if (!inner_id.empty()) offset_by_inner_id_.emplace(std::string(inner_id), result.offset);
    }
    result.acked = !roll(options_.faults.lost_publish_ack_rate);
    if (!result.acked) ++stats_.lost_publish_acks;
    return result;
  }

  /// @brief Offset of the first message (MockBrokerOptions::first_offset).
  std::int64_t begin_offset() const noexcept { return options_.first_offset; }
  /// @brief Offset the next appended message gets.
  std::int64_t end_offset() const noexcept {
    return options_.first_offset + static_cast<std::int64_t>(log_.size());
  }
  /// @brief Messages in the log.
  std::size_t size() const noexcept { return log_.size(); }
  /// @brief The message at offset; offset must be in [begin_offset(), end_offset()).
  const BrokerMessage& at(std::int64_t offset) const {
    return log_.at(static_cast<std::size_t>(offset - options_.first_offset));
  }
  /// @brief The whole log in offset order.
  const std::deque<BrokerMessage>& log() const noexcept { return log_; }
  /// @brief How many copies of messages with this biz-id the log holds.
  std::size_t copies_of(std::string_view key) const {
    return static_cast<std::size_t>(std::count_if(
        log_.begin(), log_.end(), [&](const BrokerMessage& m) { return m.key == key; }));
  }

  /// @brief The group's committed offset: every offset below it is acknowledged, and a
  /// restarting consumer of the group resumes there.
  std::int64_t committed_offset(const std::string& group) const {
    auto it = groups_.find(group);
    return it == groups_.end() ? options_.first_offset : it->second.committed;
  }

  const MockBrokerStats& stats() const noexcept { return stats_; }
  const MockBrokerOptions& options() const noexcept { return options_; }

 private:
  friend class MockPublisher;
  friend class MockConsumerSession;

  // Per consumer group: what the broker knows was acknowledged, and delivery counts.
  struct Group {
    std::int64_t committed = 0;
    std::set<std::int64_t> acked_above;  // acked out of order, all >= committed
    std::vector<std::uint32_t> delivery_counts;
  };

  std::int64_t append(std::string_view key, std::string_view payload, std::string_view inner_id) {
    std::int64_t offset = end_offset();
    log_.push_back(BrokerMessage{.offset = offset,
                                 .key = std::string(key),
                                 .payload = std::string(payload),
                                 .inner_id = std::string(inner_id)});
    ++stats_.copies_stored;
    return offset;
  }

  Group& group(const std::string& name) {
    auto [it, inserted] = groups_.try_emplace(name);
    if (inserted) it->second.committed = options_.first_offset;
    return it->second;
  }

  // Counts the delivery and returns the delivery count of this offset for the group.
  std::uint32_t record_delivery(Group& g, std::int64_t offset) {
    auto index = static_cast<std::size_t>(offset - options_.first_offset);
    if (g.delivery_counts.size() <= index) g.delivery_counts.resize(log_.size(), 0);
    std::uint32_t count = ++g.delivery_counts[index];
    ++stats_.deliveries;
    if (count > 1) ++stats_.redeliveries;
    return count;
  }

  // Applies a commit request that arrived: acknowledges offsets and advances the committed
  // offset over every contiguous acknowledged one.
  static void acknowledge(Group& g, const std::vector<std::int64_t>& offsets) {
    for (std::int64_t offset : offsets) {
      if (offset >= g.committed) g.acked_above.insert(offset);
    }
    while (!g.acked_above.empty() && *g.acked_above.begin() == g.committed) {
      g.acked_above.erase(g.acked_above.begin());
      ++g.committed;
    }
  }

  // One Bernoulli draw. Done by hand from the raw 64-bit output (whose sequence the standard
  // fixes) rather than std::bernoulli_distribution (whose algorithm it does not), so a seed
  // injects the same faults with every standard library.
  bool roll(double rate) {
    if (rate <= 0.0) return false;
    double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
    return u < rate;
  }

  MockBrokerOptions options_;
  std::mt19937_64 rng_;
  std::deque<BrokerMessage> log_;  // a deque: references stay valid while the log grows
  std::unordered_map<std::string, std::int64_t> offset_by_inner_id_;
  std::map<std::string, Group, std::less<>> groups_;
  MockBrokerStats stats_;
};

/// @brief The producer side ("MQ-client" of the first half): stamps one idem::InnerMsgId per
/// logical message and resends it with the same id until the broker's ack arrives.
class MockPublisher {
 public:
  /// @brief What publish() did for one logical message.
  struct Receipt {
    idem::InnerMsgId inner_id{};  ///< the id every attempt carried
    std::int64_t offset = 0;      ///< where the broker holds the message (the acked attempt's)
    std::uint32_t attempts = 0;   ///< sends until an ack arrived; > 1 means lost acks
  };

  /// @brief Publishes to broker with its own id generator. broker must outlive the publisher.
  /// max_attempts bounds the retries of one message (a lost_publish_ack_rate of 1 never acks).
  explicit MockPublisher(MockBroker& broker, std::uint32_t max_attempts = 1000)
      : broker_(broker),
        owned_ids_(std::make_unique<idem::InnerMsgIdGenerator>()),
        ids_(owned_ids_.get()),
        max_attempts_(max_attempts) {}
  /// @brief Publishes to broker, drawing ids from ids (shared with other publishers, or driven
  /// by a ManualClock). Both must outlive the publisher.
  MockPublisher(MockBroker& broker, idem::InnerMsgIdGenerator& ids,
                std::uint32_t max_attempts = 1000)
      : broker_(broker), ids_(&ids), max_attempts_(max_attempts) {}

  /// @brief Sends one logical message until acked, every attempt with the same inner id.
  /// @throws idem::Error when max_attempts sends all lost their ack.
  Receipt publish(std::string_view key, std::string_view payload) {
    Receipt receipt{.inner_id = ids_->next()};
    char text[36];
    receipt.inner_id.write_to(text);
    std::string_view inner_id(text, sizeof text);
    while (receipt.attempts < max_attempts_) {
      ++receipt.attempts;
      MockBroker::SendResult sent = broker_.send(key, payload, inner_id);
      if (sent.acked) {
        receipt.offset = sent.offset;
        return receipt;
      }
      // No ack before the timeout: the publisher cannot tell a lost message from a lost ack,
      // so it resends. Reusing the id is what lets the broker drop the copy.
    }
    throw idem::Error("MockPublisher: no publish ack after " + std::to_string(max_attempts_) +
                      " attempts; lower FaultPlan::lost_publish_ack_rate below 1");
  }

 private:
  MockBroker& broker_;
  std::unique_ptr<idem::InnerMsgIdGenerator> owned_ids_;  // the generator is not movable
  idem::InnerMsgIdGenerator* ids_;
  std::uint32_t max_attempts_;
};

/// @brief What a consumer callback decided about one delivery.
enum class Verdict {
  ack,          ///< handled: commit it
  nack,         ///< not handled: redeliver it after the ack timeout
  dead_letter,  ///< unusable: set it aside and commit it
};

/// @brief The Verdict for an idem::Outcome: processed / duplicate ack, conflict is
/// dead-lettered, in_progress / failed are redelivered.
constexpr Verdict verdict_for(idem::Outcome outcome) noexcept {
  if (idem::should_ack(outcome)) return Verdict::ack;
  return outcome == idem::Outcome::conflict ? Verdict::dead_letter : Verdict::nack;
}

/// @brief Configuration of a MockConsumerSession.
struct SessionOptions {
  /// The consumer group: sessions of one group share its committed offset; other groups
  /// read the log independently.
  std::string group = "default";
  /// Commit after every this many acked deliveries (1: right after each, like a RabbitMQ ack
  /// or a synchronous Kafka commit). 0: only on commit() and when run() runs out of messages,
  /// like a Kafka auto-commit interval that has not elapsed yet.
  std::size_t commit_every = 1;
  /// The ack timeout, counted in deliveries: a message whose commit was lost or that was
  /// nacked comes again after this many further deliveries (at once when nothing else is
  /// left to deliver).
  std::size_t redelivery_delay = 3;
};

/// @brief What MockConsumerSession::run() did.
struct RunReport {
  std::uint64_t deliveries = 0;  ///< callbacks made
  bool drained = false;          ///< everything delivered and committed (false: max reached)
};

/// @brief One consumer process of a group ("MQ-client" of the second half). poll() hands the
/// next message to a callback and acks it according to the callback's answer; the FaultPlan
/// may drop the commit or crash the process before it commits; crash() does the latter on
/// demand.
///
/// The callback takes `const Delivery&` or `const idem::Message&` and returns void (ack),
/// bool (true: ack, false: nack), Verdict, idem::Outcome or idem::Result (see
/// verdict_for), so an idem::IdempotentConsumer composes directly:
/// @code
///   session.run([&](const idem::Message& m) { return consumer.consume(m); });
/// @endcode
/// If the callback throws, the delivery is nacked and the exception propagates.
///
/// A crash restarts the session from the group's committed offset; anything the callback
/// keeps (an idem store, the effects a test counts) plays the durable state that outlives
/// the process.
class MockConsumerSession {
 public:
  /// @brief Joins options.group at its committed offset. broker must outlive the session.
  explicit MockConsumerSession(MockBroker& broker, SessionOptions options = {})
      : broker_(broker),
        options_(std::move(options)),
        position_(broker_.group(options_.group).committed) {}

  /// @brief Delivers one message (a due redelivery first, else the next offset) to callback
  /// and settles it. Returns false when there was nothing to deliver (a drained group may get
  /// new messages later).
  template <class Callback>
  bool poll(Callback&& callback) {
    std::int64_t offset = 0;
    if (!next_offset(offset)) return false;
    MockBroker::Group& g = broker_.group(options_.group);
    const BrokerMessage& stored = broker_.at(offset);
    Delivery delivery{.offset = offset,
                      .key = stored.key,
                      .payload = stored.payload,
                      .inner_id = stored.inner_id,
                      .delivery_count = broker_.record_delivery(g, offset)};
    ++delivered_;
    Verdict verdict = Verdict::nack;
    try {
      verdict = invoke(callback, delivery);
    } catch (...) {
      settle(offset, Verdict::nack);
      throw;
    }
    settle(offset, verdict);
    return true;
  }

  /// @brief Polls until everything is delivered and committed (a final commit as on a clean
  /// shutdown, repeated while commits get lost), or until max_deliveries callbacks.
  template <class Callback>
  RunReport run(Callback&& callback, std::uint64_t max_deliveries = UINT64_MAX) {
    RunReport report;
    for (;;) {
      while (report.deliveries < max_deliveries && poll(callback)) ++report.deliveries;
      if (report.deliveries >= max_deliveries || pending_.empty()) break;
      commit();  // if lost, its offsets come back through the redelivery queue
    }
    report.drained = drained();
    return report;
  }

  /// @brief Sends one commit request for every acked, uncommitted delivery. The FaultPlan may
  /// drop it; the broker then redelivers those messages after the ack timeout.
  void commit() {
    if (pending_.empty()) return;
    ++broker_.stats_.commits;
    if (broker_.roll(broker_.options_.faults.lost_commit_rate)) {
      ++broker_.stats_.lost_commits;
      for (std::int64_t offset : pending_) schedule_redelivery(offset);
    } else {
      MockBroker::acknowledge(broker_.group(options_.group), pending_);
    }
    pending_.clear();
    since_commit_ = 0;
  }

  /// @brief The consumer process dies (kill -9) and restarts: uncommitted acks are gone,
  /// pending redeliveries are forgotten, and reading resumes at the group's committed offset,
  /// so everything from there is delivered again, acked out of order or not, as Kafka does.
  void crash() {
    ++broker_.stats_.crashes;
    pending_.clear();
    redeliveries_.clear();
    since_commit_ = 0;
    position_ = broker_.group(options_.group).committed;
  }

  /// @brief Next offset read from the log (redeliveries aside).
  std::int64_t position() const noexcept { return position_; }
  /// @brief The group's committed offset at the broker.
  std::int64_t committed_offset() const { return broker_.committed_offset(options_.group); }
  /// @brief True when every message in the log is delivered and committed for the group.
  bool drained() const {
    return pending_.empty() && redeliveries_.empty() && position_ == broker_.end_offset() &&
           committed_offset() == broker_.end_offset();
  }
  const SessionOptions& options() const noexcept { return options_; }

 private:
  struct Redelivery {
    std::int64_t offset;
    std::uint64_t due;  // delivered_ count at which it comes again
  };

  template <class Callback>
  static Verdict invoke(Callback& callback, const Delivery& delivery) {
    if constexpr (std::is_invocable_v<Callback&, const Delivery&>) {
      return to_verdict([&] { return callback(delivery); });
    } else {
      static_assert(
          std::is_invocable_v<Callback&, const idem::Message&>,
          "the callback must take const idem::testing::Delivery& or const idem::Message&");
      return to_verdict([&] { return callback(delivery.message()); });
    }
  }

  template <class Call>
  static Verdict to_verdict(Call&& call) {
    using R = std::invoke_result_t<Call&>;
    if constexpr (std::is_void_v<R>) {
      call();
      return Verdict::ack;
    } else if constexpr (std::is_same_v<std::remove_cvref_t<R>, bool>) {
      return call() ? Verdict::ack : Verdict::nack;
    } else if constexpr (std::is_same_v<std::remove_cvref_t<R>, Verdict>) {
      return call();
    } else if constexpr (std::is_same_v<std::remove_cvref_t<R>, idem::Outcome>) {
      return verdict_for(call());
    } else {
      static_assert(std::is_same_v<std::remove_cvref_t<R>, idem::Result>,
                    "the callback must return void, bool, Verdict, idem::Outcome or idem::Result");
      return verdict_for(call().outcome);
    }
  }

  bool next_offset(std::int64_t& offset) {
    // A due redelivery goes first; with nothing new in the log the ack timeout elapses at once.
    bool log_exhausted = position_ >= broker_.end_offset();
    if (!redeliveries_.empty() && (log_exhausted || redeliveries_.front().due <= delivered_)) {
      offset = redeliveries_.front().offset;
      redeliveries_.pop_front();
      return true;
    }
    if (log_exhausted) return false;
    offset = position_++;
    return true;
  }

  void schedule_redelivery(std::int64_t offset) {
    redeliveries_.push_back({.offset = offset, .due = delivered_ + options_.redelivery_delay});
  }

  void settle(std::int64_t offset, Verdict verdict) {
    if (verdict == Verdict::nack) {
      ++broker_.stats_.nacks;
      schedule_redelivery(offset);
      return;
    }
    if (verdict == Verdict::dead_letter) ++broker_.stats_.dead_letters;
    // The process may die between handling a message and committing it: the replay window.
    if (broker_.roll(broker_.options_.faults.crash_rate)) {
      crash();
      return;
    }
    pending_.push_back(offset);
    if (options_.commit_every != 0 && ++since_commit_ >= options_.commit_every) commit();
  }

  MockBroker& broker_;
  SessionOptions options_;
  std::int64_t position_;
  std::uint64_t delivered_ = 0;
  std::size_t since_commit_ = 0;
  std::vector<std::int64_t> pending_;  // acked by the callback, not committed yet
  std::deque<Redelivery> redeliveries_;
};

}  // namespace idem::testing
