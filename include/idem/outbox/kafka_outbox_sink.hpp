#pragma once
/// @file
/// @brief idem::kafka::OutboxSink: the outbox relay's Kafka side, through idem::kafka::Producer
/// (idempotent producer; the row's inner id and biz-id in the headers consumers read).

#include <chrono>
#include <memory>
#include <span>

#include "idem/adapters/kafka_common.hpp"
#include "idem/adapters/kafka_producer.hpp"
#include "idem/outbox/outbox_relay.hpp"

namespace idem::kafka {

/// @brief Policy of a kafka::OutboxSink.
struct OutboxSinkOptions {
  /// Header names (on_delivery is the sink's own; leave it empty).
  ProducerOptions producer{};
  /// Longest wait for one batch's delivery reports; rows not reported by then count as
  /// unconfirmed (the relay publishes them again, same inner id). Keep it below the relay's
  /// lease.
  std::chrono::milliseconds batch_timeout{std::chrono::seconds{10}};
};

/// @brief Produces each row to the topic OutboxMessage::destination with record key = the
/// row's key (its biz-id), the biz-id and inner-id headers, and the row's headers; a row
/// counts as confirmed when its delivery report says so.
class OutboxSink final : public idem::OutboxSink {
 public:
  /// @throws idem::ConfigError for a bad property; idem::kafka::KafkaError when librdkafka
  /// refuses to start.
  explicit OutboxSink(const Config& config, OutboxSinkOptions options = {});
  ~OutboxSink() override;
  OutboxSink(const OutboxSink&) = delete;
  OutboxSink& operator=(const OutboxSink&) = delete;

  std::size_t publish(std::span<OutboxRow> rows) override;

  Producer& producer() noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem::kafka
