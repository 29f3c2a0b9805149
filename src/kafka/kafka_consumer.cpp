#include "idem/adapters/kafka_consumer.hpp"

#include <librdkafka/rdkafka.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <map>
#include <thread>
#include <utility>

#include "dead_letter_producer.hpp"
#include "idem/adapters/loop_core.hpp"
#include "idem/adapters/verdict.hpp"
#include "kafka_detail.hpp"
#include "offset_tracker.hpp"
#include "record_view.hpp"

namespace idem::kafka {

std::optional<std::string_view> Record::header(std::string_view name) const noexcept {
  for (auto it = headers.rbegin(); it != headers.rend(); ++it) {
    if (it->name == name) return it->value;
  }
  return std::nullopt;
}

namespace {

using Clock = std::chrono::steady_clock;
using detail::ErrorPtr;
using detail::HandlePtr;
using detail::MessagePtr;
using detail::PartitionKey;
using detail::PartitionListPtr;
using detail::PartitionState;
using detail::QueuePtr;

// The commit timer is read after every record; CLOCK_MONOTONIC_COARSE costs a few ns where
// steady_clock costs ~25 ns, and its resolution (a few ms) is plenty for commit_interval.
std::chrono::nanoseconds coarse_now() noexcept {
#ifdef CLOCK_MONOTONIC_COARSE
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return std::chrono::seconds{ts.tv_sec} + std::chrono::nanoseconds{ts.tv_nsec};
#else
  return Clock::now().time_since_epoch();
#endif
}

PartitionListPtr one_partition(const PartitionKey& key, std::int64_t offset) {
  PartitionListPtr list(rd_kafka_topic_partition_list_new(1));
  rd_kafka_topic_partition_list_add(list.get(), key.first.c_str(), key.second)->offset = offset;
  return list;
}

PartitionListPtr to_list(std::span<const PartitionOffset> offsets) {
  PartitionListPtr list(rd_kafka_topic_partition_list_new(static_cast<int>(offsets.size())));
  for (const PartitionOffset& p : offsets) {
    rd_kafka_topic_partition_list_add(list.get(), p.topic.c_str(), p.partition)->offset =
        p.next_offset;
  }
  return list;
}

std::string where(std::string_view topic, std::int32_t partition, std::int64_t offset) {
  return "record " + std::string(topic) + "/" + std::to_string(partition) + "@" +
         std::to_string(offset);
}

}  // namespace

struct Consumer::Impl {
  Impl(detail::ConfPtr conf, ConsumeFunction consume, BatchSteps batch, ConsumerOptions options)
      : consume_(std::move(consume)),
        batch_(std::move(batch)),
        options_(std::move(options)),
        reporter_{options_.on_error, options_.logger, options_.metrics} {
    check_batch_options();
    detail::set(conf.get(), "enable.auto.commit", "false");
    detail::set(conf.get(), "enable.auto.offset.store", "false");
    if (!options_.dead_letter_topic.empty()) {
      dlq_ = std::make_unique<detail::DeadLetterProducer>(options_.dead_letter_topic,
                                                          options_.dead_letter_config, conf.get());
    }
    rd_kafka_conf_set_opaque(conf.get(), this);
    rd_kafka_conf_set_rebalance_cb(conf.get(), &Impl::rebalance_trampoline);
    rd_kafka_conf_set_error_cb(conf.get(), &Impl::error_trampoline);
    rk_ = detail::make_handle(RD_KAFKA_CONSUMER, conf);
    rd_kafka_poll_set_consumer(rk_.get());
    PartitionListPtr topics(
        rd_kafka_topic_partition_list_new(static_cast<int>(options_.topics.size())));
    for (const std::string& topic : options_.topics) {
      rd_kafka_topic_partition_list_add(topics.get(), topic.c_str(), RD_KAFKA_PARTITION_UA);
    }
    detail::check(rd_kafka_subscribe(rk_.get(), topics.get()), "kafka subscribe failed");
    consumer_queue_.reset(rd_kafka_queue_get_consumer(rk_.get()));
    last_commit_ = coarse_now();
  }

  void check_batch_options() const {
    if (options_.batch_size == 0) {
      throw ConfigError("kafka consumer: batch_size is 0; use 1 to consume one record at a time");
    }
    if (batched() && !batch_.consume_batch) {
      throw ConfigError(
          "kafka consumer: batch_size > 1 and offsets_in_store need a consumer built from an "
          "idem::IdempotentConsumer (or a BatchSteps), not from a consume function alone");
    }
    if (options_.offsets_in_store && !batch_.stored_offsets) {
      throw ConfigError(
          "kafka consumer: offsets_in_store needs a transactional inbox: an IdempotentConsumer "
          "over a SqliteStore or PostgresStore whose handler takes the store's transaction "
          "(SqliteTx& or PostgresTx&)");
    }
  }

  bool batched() const noexcept { return options_.batch_size > 1 || options_.offsets_in_store; }

  static void error_trampoline(rd_kafka_t*, int err, const char* reason, void* opaque) {
    static_cast<Impl*>(opaque)->report(std::string("kafka: ") +
                                       rd_kafka_err2name(static_cast<rd_kafka_resp_err_t>(err)) +
                                       ": " + reason);
  }

  static void rebalance_trampoline(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                                   rd_kafka_topic_partition_list_t* partitions, void* opaque) {
    static_cast<Impl*>(opaque)->rebalance(rk, err, partitions);
  }

  void report(const std::string& what) const noexcept { reporter_.note(LogLevel::warning, what); }

  static std::vector<PartitionOffset> to_vector(const rd_kafka_topic_partition_list_t* list) {
    std::vector<PartitionOffset> out;
    out.reserve(static_cast<std::size_t>(list->cnt));
    for (int i = 0; i < list->cnt; ++i) {
      out.push_back({list->elems[i].topic, list->elems[i].partition, list->elems[i].offset});
    }
    return out;
  }

  // Runs inside rd_kafka_consumer_poll, between records: nothing is in flight, so "finish
  // in-flight work" reduces to committing what is settled before giving partitions up.
  void rebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                 rd_kafka_topic_partition_list_t* partitions) {
    const bool cooperative = std::strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
    reporter_.count(Counter::rebalances);
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
      reporter_.note(LogLevel::info, "kafka rebalance: " + std::to_string(partitions->cnt) +
                                         " partitions assigned");
      for (int i = 0; i < partitions->cnt; ++i) {
        tracker_.assign(partitions->elems[i].topic, partitions->elems[i].partition);
      }
      cached_state_ = nullptr;
      apply_stored_offsets(partitions);
      apply_user_offsets(partitions);
      if (cooperative) {
        ErrorPtr error(rd_kafka_incremental_assign(rk, partitions));
        if (error) report(std::string("kafka assign: ") + rd_kafka_error_string(error.get()));
      } else if (rd_kafka_resp_err_t e = rd_kafka_assign(rk, partitions)) {
        report(std::string("kafka assign: ") + rd_kafka_err2str(e));
      }
      return;
    }
    if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
      reporter_.note(LogLevel::info,
                     "kafka rebalance: " + std::to_string(partitions->cnt) + " partitions revoked");
      commit_pending(partitions, true);
      if (options_.on_revoke) {
        std::vector<PartitionOffset> revoked = to_vector(partitions);
        for (PartitionOffset& p : revoked) {
          const PartitionState* state = tracker_.find({p.topic, p.partition});
          p.next_offset = state != nullptr ? state->next_offset : -1;
        }
        try {
          options_.on_revoke(revoked);
        } catch (const std::exception& e) {
          report(std::string("on_revoke threw: ") + e.what());
        }
      }
      forget(partitions);
      if (cooperative) {
        ErrorPtr error(rd_kafka_incremental_unassign(rk, partitions));
      } else {
        rd_kafka_assign(rk, nullptr);
      }
      return;
    }
    report(std::string("kafka rebalance error: ") + rd_kafka_err2str(err));
    forget(partitions);
    if (!cooperative) tracker_.clear();  // assign(nullptr) below drops them all
    if (cooperative) {
      ErrorPtr error(rd_kafka_incremental_unassign(rk, partitions));
    } else {
      rd_kafka_assign(rk, nullptr);
    }
  }

  // Drops the state of partitions we give up. One we paused for a retry is resumed first:
  // librdkafka keeps the pause across a later re-assignment, and resuming a partition that was
  // never paused is not free (it restarts its fetch), so only ours are touched.
  void forget(const rd_kafka_topic_partition_list_t* partitions) {
    for (int i = 0; i < partitions->cnt; ++i) {
      auto it = tracker_.find_entry({partitions->elems[i].topic, partitions->elems[i].partition});
      if (it == tracker_.end()) continue;
      if (it->second.paused) {
        PartitionListPtr list = one_partition(it->first, it->second.blocked_at);
        rd_kafka_resume_partitions(rk_.get(), list.get());
      }
      tracker_.erase(it);
    }
    cached_state_ = nullptr;
  }

  // Starts each assigned partition where the store's committed effects end.
  void apply_stored_offsets(rd_kafka_topic_partition_list_t* partitions) {
    if (!options_.offsets_in_store) return;
    try {
      for (const PartitionOffset& stored : batch_.stored_offsets()) {
        rd_kafka_topic_partition_t* p =
            rd_kafka_topic_partition_list_find(partitions, stored.topic.c_str(), stored.partition);
        if (p != nullptr && stored.next_offset >= 0) p->offset = stored.next_offset;
      }
    } catch (const std::exception& e) {
      // Still correct, only slower: the records between the group's committed offset and the
      // store's are read again and found done in the store.
      report(std::string("reading the offsets stored with the effects failed; starting from "
                         "the group's committed offsets: ") +
             e.what());
    }
  }

  void apply_user_offsets(rd_kafka_topic_partition_list_t* partitions) {
    if (!options_.on_assign) return;
    try {
      std::vector<PartitionOffset> assigned = to_vector(partitions);
      for (const PartitionOffset& wanted : options_.on_assign(assigned)) {
        rd_kafka_topic_partition_t* p =
            rd_kafka_topic_partition_list_find(partitions, wanted.topic.c_str(), wanted.partition);
        if (p != nullptr) p->offset = wanted.next_offset;
      }
    } catch (const std::exception& e) {
      report(std::string("on_assign threw; starting from committed offsets: ") + e.what());
    }
  }

  // Commits next_offset of every settled partition (all, or those in only). Periodic commits
  // (sync false) are asynchronous: the result is served by rd_kafka_consumer_poll on this
  // thread (commit_done) and a failure leaves the offsets pending for the next one. Revoke,
  // close() and commit() wait for the result. Either way only settled offsets are sent, and
  // Kafka applies one member's commits in the order they were sent.
  void commit_pending(const rd_kafka_topic_partition_list_t* only, bool sync,
                      bool throw_on_error = false) {
    std::vector<PartitionOffset> offsets = tracker_.pending(sync);  // sync: in flight again
    if (only != nullptr) {
      std::erase_if(offsets, [only](const PartitionOffset& p) {
        return rd_kafka_topic_partition_list_find(only, p.topic.c_str(), p.partition) == nullptr;
      });
    }
    last_commit_ = coarse_now();
    if (offsets.empty()) return;
    PartitionListPtr list = to_list(offsets);
    if (!sync) {
      rd_kafka_resp_err_t err = rd_kafka_commit_queue(rk_.get(), list.get(), consumer_queue_.get(),
                                                      &commit_trampoline, this);
      if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        commit_failed(err);
        return;
      }
      tracker_.mark_committing(offsets);
      return;
    }
    rd_kafka_resp_err_t err = rd_kafka_commit(rk_.get(), list.get(), 0);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
      // Offsets stay pending: the next commit retries them; a crash meanwhile only replays
      // records the store already knows as done.
      if (throw_on_error) {
        reporter_.count(Counter::commit_failures);
        detail::check(err, "kafka commit failed");
      }
      commit_failed(err);
      return;
    }
    commit_succeeded();
    tracker_.mark_committed(offsets);
  }

  void commit_failed(rd_kafka_resp_err_t err) {
    reporter_.count(Counter::commit_failures);
    report(std::string("kafka commit failed (the offsets stay pending for the next one): ") +
           rd_kafka_err2str(err));
  }

  void commit_succeeded() {
    ++stats_.commits;
    reporter_.count(Counter::commits);
  }

  static void commit_trampoline(rd_kafka_t*, rd_kafka_resp_err_t err,
                                rd_kafka_topic_partition_list_t* offsets, void* opaque) {
    static_cast<Impl*>(opaque)->commit_done(err, offsets);
  }

  // The result of an asynchronous commit. Partitions that failed are sent again next time.
  void commit_done(rd_kafka_resp_err_t err, const rd_kafka_topic_partition_list_t* offsets) {
    if (offsets == nullptr) {  // nothing to match the result with: send everything again
      tracker_.forget_in_flight();
      if (err != RD_KAFKA_RESP_ERR_NO_ERROR) commit_failed(err);
      return;
    }
    bool any = false;
    for (int i = 0; i < offsets->cnt; ++i) {
      const rd_kafka_topic_partition_t& p = offsets->elems[i];
      const bool ok = err == RD_KAFKA_RESP_ERR_NO_ERROR && p.err == RD_KAFKA_RESP_ERR_NO_ERROR;
      any |= tracker_.commit_result({p.topic, p.partition}, p.offset, ok) && ok;
    }
    if (any) commit_succeeded();
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NO_OFFSET) {
      commit_failed(err);
    }
  }

  bool commit_due() const noexcept {
    return coarse_now() - last_commit_ >= options_.commit_interval;
  }

  // Holds the record back: pause its partition (so nothing after it is handled) and seek back
  // to it (so the prefetched copy and everything after it are read again on resume).
  void block(const PartitionKey& key, PartitionState& state, std::int64_t offset) {
    state.hold(offset, Clock::now(), options_.retry_backoff, options_.max_retry_backoff);
    ++stats_.retries;
    reporter_.count(Counter::retries);
    reporter_.count(Counter::redeliveries);
    PartitionListPtr list = one_partition(key, offset);
    rd_kafka_pause_partitions(rk_.get(), list.get());
    ErrorPtr error(rd_kafka_seek_partitions(rk_.get(), list.get(), 0));
    if (error) report(std::string("kafka seek: ") + rd_kafka_error_string(error.get()));
  }

  void resume_due() {
    for (const PartitionOffset& p : tracker_.due_resumes(Clock::now())) {
      PartitionListPtr list = to_list(std::span<const PartitionOffset>(&p, 1));
      rd_kafka_resume_partitions(rk_.get(), list.get());
    }
  }

  std::chrono::milliseconds until_next_retry(std::chrono::milliseconds timeout) const {
    return tracker_.until_next_retry(Clock::now(), timeout);
  }

  bool dead_letter(const Record& record, std::string_view reason, DeadLetterReason cause) {
    if (auto failure = dlq_->send(record, reason)) {
      dead_letter_failed(record, reason, *failure);
      return false;
    }
    ++stats_.dead_lettered;
    reporter_.count(adapters::counter_of(cause));
    reporter_.note(LogLevel::error, "kafka consumer: dead-lettered " +
                                        where(record.topic, record.partition, record.offset) +
                                        " to topic '" + options_.dead_letter_topic +
                                        "': " + std::string(reason));
    return true;
  }

  void dead_letter_failed(const Record& record, std::string_view reason, const std::string& why) {
    reporter_.count(Counter::dead_letter_failures);
    reporter_.note(LogLevel::error, "kafka consumer: could not dead-letter " +
                                        where(record.topic, record.partition, record.offset) +
                                        " (" + std::string(reason) + ") to topic '" +
                                        options_.dead_letter_topic + "': " + why +
                                        "; its partition retries it after a backoff");
  }

  std::string_view key_of(const Record& record) const {
    if (options_.key_of) return options_.key_of(record);
    if (options_.key_source == KeySource::header) {
      return record.header(options_.key_header).value_or(std::string_view{});
    }
    return record.key;
  }

  // The partition state of a record, or nullptr when the partition is no longer ours (it was
  // revoked in this poll). Records come in runs from one partition: the last one is cached.
  PartitionState* state_of(const rd_kafka_message_t& m) {
    if (cached_state_ == nullptr || m.rkt != cached_rkt_ || m.partition != cached_partition_) {
      auto found = tracker_.find_entry({rd_kafka_topic_name(m.rkt), m.partition});
      if (found == tracker_.end()) return nullptr;
      cached_rkt_ = m.rkt;
      cached_partition_ = m.partition;
      cached_key_ = &found->first;
      cached_state_ = &found->second;
    }
    return cached_state_;
  }

  // False for consume errors (reported) and partition-EOF events.
  bool is_record(const rd_kafka_message_t& m) const {
    if (m.err == RD_KAFKA_RESP_ERR_NO_ERROR) return true;
    if (m.err != RD_KAFKA_RESP_ERR__PARTITION_EOF) {
      report(std::string("kafka consume error: ") + rd_kafka_message_errstr(&m));
    }
    return false;
  }

  Message message_of(const Record& record) const {
    return Message{
        .key = key_of(record),
        .payload = record.payload,
        .inner_id = record.header(options_.inner_id_header).value_or(""),
        .source = {.topic = record.topic, .partition = record.partition, .offset = record.offset}};
  }

  void handle(const rd_kafka_message_t& m) {
    if (!is_record(m)) return;
    PartitionState* found = state_of(m);
    if (found == nullptr) return;
    PartitionState& state = *found;
    const PartitionKey& key = *cached_key_;
    if (!state.takes(m.offset)) return;

    detail::read_headers(m, headers_);
    const Record record = detail::record_of(key.first, m, headers_);
    ++stats_.records;
    const Verdict verdict = decide([&] {
      Result result = consume_(message_of(record));
      if (options_.on_result) options_.on_result(record, result);
      return result;
    });
    (void)apply(verdict, key, state, m, record);
  }

  // Settles the record or holds it back (pausing its partition), as the verdict says.
  // Returns whether it was settled.
  bool apply(Verdict verdict, const PartitionKey& key, PartitionState& state,
             const rd_kafka_message_t& m, const Record& record) {
    std::string& reason = verdict.reason;
    DeadLetterReason cause = verdict.cause;
    Disposition action = verdict.disposition;
    if (action == Disposition::settle) {
      ++stats_.acked;
      state.settle(m.offset);
      return true;
    }
    if (action == Disposition::retry_counted) {
      const unsigned failed = state.count_failure(m.offset);
      if (adapters::attempts_exhausted(failed, options_.max_attempts) && dlq_) {
        action = Disposition::dead_letter;
        cause = DeadLetterReason::attempts_exhausted;
        reason = "attempts exhausted: " + reason;
      } else {
        reporter_.note(LogLevel::warning,
                       "kafka consumer: " + where(key.first, m.partition, m.offset) +
                           " failed (attempt " + std::to_string(failed) + " of " +
                           (options_.max_attempts == 0 ? std::string("unlimited")
                                                       : std::to_string(options_.max_attempts)) +
                           "): " + reason + "; its partition retries it after a backoff");
      }
    } else if (action == Disposition::retry) {
      reporter_.note(LogLevel::debug, "kafka consumer: " + where(key.first, m.partition, m.offset) +
                                          ": " + reason +
                                          "; its partition retries it after a backoff");
    } else if (action == Disposition::hold) {
      // Kafka cannot hold one record aside: a store outage pauses the partition like a retry.
      reporter_.note(LogLevel::warning,
                     "kafka consumer: " + where(key.first, m.partition, m.offset) + ": " + reason +
                         "; its partition waits and retries");
    }
    if (action == Disposition::dead_letter) {
      if (dlq_ && dead_letter(record, reason, cause)) {
        ++stats_.acked;
        state.settle(m.offset);
        return true;
      }
      if (!dlq_) {
        reporter_.count(Counter::dead_letter_failures);
        reporter_.note(LogLevel::error, where(key.first, m.partition, m.offset) +
                                            " blocks its partition (" + reason +
                                            ") and there is no dead_letter_topic");
      }
    }
    block(key, state, m.offset);
    return false;
  }

  // Batch mode: the polled records, grouped by partition in order, each group through one
  // consume_batch. Results are applied in order; the first record held back stops its group
  // (the records after it were handled, and are read again after it as duplicates).
  void handle_batch(const std::vector<MessagePtr>& polled) {
    struct Group {
      const PartitionKey* key;
      PartitionState* state;
      std::vector<const rd_kafka_message_t*> records;
    };
    std::vector<Group> groups;
    for (const MessagePtr& m : polled) {
      if (!is_record(*m)) continue;
      PartitionState* state = state_of(*m);
      if (state == nullptr || state->paused) continue;
      Group* group = nullptr;
      for (Group& g : groups) {
        if (g.state == state) group = &g;
      }
      if (group == nullptr) group = &groups.emplace_back(Group{cached_key_, state, {}});
      // Copies fetched before a seek-back are skipped, as in handle(); after a hold, the
      // group must start at the held record.
      if (m->offset < state->next_offset) continue;
      if (!group->records.empty() && m->offset <= group->records.back()->offset) continue;
      if (group->records.empty() && state->blocked_at >= 0 && m->offset != state->blocked_at) {
        continue;
      }
      group->records.push_back(m.get());
    }
    for (Group& group : groups) {
      if (!group.records.empty()) run_group(*group.key, *group.state, group.records);
    }
  }

  void run_group(const PartitionKey& key, PartitionState& state,
                 const std::vector<const rd_kafka_message_t*>& ms) {
    const std::size_t n = ms.size();
    batch_headers_.resize(std::max(batch_headers_.size(), n));
    std::vector<Record> records;
    std::vector<Message> messages;
    records.reserve(n);
    messages.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      detail::read_headers(*ms[i], batch_headers_[i]);
      records.push_back(detail::record_of(key.first, *ms[i], batch_headers_[i]));
      messages.push_back(message_of(records.back()));
    }
    const PartitionOffset next{key.first, key.second, ms.back()->offset + 1};
    std::vector<Result> results;
    bool offsets_saved = false;
    try {
      results = batch_.consume_batch(messages,
                                     options_.offsets_in_store
                                         ? std::span<const PartitionOffset>(&next, 1)
                                         : std::span<const PartitionOffset>{},
                                     &offsets_saved);
      ++stats_.batches;
    } catch (const StoreUnavailable& e) {
      ++stats_.records;  // the first record was tried; the whole group waits for the store
      report(std::string("store unavailable; partition ") + key.first + "/" +
             std::to_string(key.second) + " waits and retries: " + e.what());
      block(key, state, ms.front()->offset);
      return;
    } catch (...) {
      // An invalid key, or a handler error rethrown on request: one record at a time, so each
      // gets its own verdict (records already done come back as duplicates).
      for (const rd_kafka_message_t* m : ms) {
        if (state.paused) break;
        handle(*m);
      }
      return;
    }
    for (std::size_t i = 0; i < n; ++i) {
      ++stats_.records;
      const Verdict verdict = decide([&]() -> const Result& {
        if (options_.on_result) options_.on_result(records[i], results[i]);
        return results[i];
      });
      if (!apply(verdict, key, state, *ms[i], records[i])) break;
    }
  }

  // Batch mode: up to batch_size records (waiting up to batch_wait after the first).
  std::size_t poll_batch(std::chrono::milliseconds timeout) {
    std::vector<MessagePtr> polled;
    MessagePtr m(
        rd_kafka_consumer_poll(rk_.get(), static_cast<int>(until_next_retry(timeout).count())));
    const Clock::time_point fill_until = Clock::now() + options_.batch_wait;
    while (m) {
      polled.push_back(std::move(m));
      if (polled.size() >= options_.batch_size || stop_.load(std::memory_order_relaxed)) break;
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(fill_until - Clock::now());
      m.reset(rd_kafka_consumer_poll(rk_.get(),
                                     static_cast<int>(std::max<std::int64_t>(0, left.count()))));
    }
    const std::uint64_t before = stats_.records;
    handle_batch(polled);
    if (commit_due()) commit_pending(nullptr, false);
    return static_cast<std::size_t>(stats_.records - before);
  }

  std::size_t poll(std::chrono::milliseconds timeout) {
    if (!rk_) return 0;
    resume_due();
    if (batched()) return poll_batch(timeout);
    std::size_t handled = 0;
    MessagePtr m(
        rd_kafka_consumer_poll(rk_.get(), static_cast<int>(until_next_retry(timeout).count())));
    // Drain what is already buffered without waiting, so one poll() handles a batch.
    while (m) {
      const std::uint64_t before = stats_.records;
      handle(*m);
      handled += static_cast<std::size_t>(stats_.records - before);
      if (commit_due()) commit_pending(nullptr, false);
      if (handled >= 1000 || stop_.load(std::memory_order_relaxed)) break;
      m.reset(rd_kafka_consumer_poll(rk_.get(), 0));
    }
    if (commit_due()) commit_pending(nullptr, false);
    return handled;
  }

  void close() {
    if (!rk_) return;
    commit_pending(nullptr, true);
    if (rd_kafka_resp_err_t err = rd_kafka_consumer_close(rk_.get())) {
      report(std::string("kafka close: ") + rd_kafka_err2str(err));
    }
    consumer_queue_.reset();  // queue references go before the handle
    rk_.reset();
    if (dlq_) dlq_->flush(std::chrono::seconds{5});
    dlq_.reset();
  }

  void abandon() noexcept {
    consumer_queue_.reset();
    if (rd_kafka_t* rk = rk_.release()) {
      rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    }
    dlq_.reset();
  }

  ConsumeFunction consume_;
  BatchSteps batch_;
  ConsumerOptions options_;
  std::unique_ptr<detail::DeadLetterProducer> dlq_;  // before rk_: destroyed after the consumer
  HandlePtr rk_;
  QueuePtr consumer_queue_;  // receives asynchronous commit results; released before rk_
  adapters::Reporter reporter_;
  detail::OffsetTracker tracker_;
  std::vector<Header> headers_;                     // reused per record
  std::vector<std::vector<Header>> batch_headers_;  // reused per batch, one per record
  // The last partition handled; reset whenever partitions_ loses entries.
  const rd_kafka_topic_t* cached_rkt_ = nullptr;
  std::int32_t cached_partition_ = -1;
  const PartitionKey* cached_key_ = nullptr;
  PartitionState* cached_state_ = nullptr;
  std::chrono::nanoseconds last_commit_{};  // coarse_now() of the last commit
  ConsumerStats stats_{};
  std::atomic<bool> stop_{false};
};

Consumer::Consumer(const Config& config, ConsumeFunction consume, ConsumerOptions options)
    : Consumer(config, std::move(consume), BatchSteps{}, std::move(options)) {}

Consumer::Consumer(const Config& config, ConsumeFunction consume, BatchSteps batch,
                   ConsumerOptions options)
    : impl_(std::make_unique<Impl>(detail::make_conf(config), std::move(consume), std::move(batch),
                                   std::move(options))) {}

Consumer::Consumer(rd_kafka_conf_t* conf, ConsumeFunction consume, ConsumerOptions options)
    : impl_(std::make_unique<Impl>(detail::ConfPtr(conf), std::move(consume), BatchSteps{},
                                   std::move(options))) {}

Consumer::~Consumer() {
  if (!impl_) return;
  try {
    impl_->close();
  } catch (...) {  // NOLINT(bugprone-empty-catch): destructors do not throw
  }
}

Consumer::Consumer(Consumer&&) noexcept = default;
Consumer& Consumer::operator=(Consumer&&) noexcept = default;

std::size_t Consumer::poll(std::chrono::milliseconds timeout) {
  return impl_->poll(timeout);
}

void Consumer::run(const std::atomic<bool>& stop) {
  Impl& impl = *impl_;
  adapters::run_loop(
      stop, impl.stop_, [&impl] { impl.poll(impl.options_.poll_timeout); },
      [&impl] { impl.close(); });
}

void Consumer::run() {
  const std::atomic<bool> never{false};
  run(never);
}

void Consumer::request_stop() noexcept {
  impl_->stop_.store(true, std::memory_order_relaxed);
}

void Consumer::commit() {
  if (impl_->rk_) impl_->commit_pending(nullptr, true, true);
}

void Consumer::close() {
  impl_->close();
}

void Consumer::abandon() noexcept {
  impl_->abandon();
}

ConsumerStats Consumer::stats() const noexcept {
  return impl_->stats_;
}

rd_kafka_t* Consumer::native_handle() const noexcept {
  return impl_->rk_.get();
}

}  // namespace idem::kafka
