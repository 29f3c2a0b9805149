#pragma once
/// @file
/// @brief idem::rabbitmq::OutboxSink: the outbox relay's RabbitMQ side, through
/// idem::rabbitmq::Publisher (pipelined confirms; message_id = the row's inner id).

#include <memory>
#include <span>

#include "idem/adapters/rabbitmq_common.hpp"
#include "idem/adapters/rabbitmq_publisher.hpp"
#include "idem/outbox/outbox_relay.hpp"

namespace idem::rabbitmq {

/// @brief Publishes each row to exchange OutboxMessage::destination with routing key
/// OutboxMessage::routing_key, message_id = the row's inner id, the biz-id header = its key
/// and the row's headers; a row counts as confirmed when the broker's confirm arrived. The
/// connection is opened on first use and again after a failure.
class OutboxSink final : public idem::OutboxSink {
 public:
  /// @brief options.on_confirm, when set, is called too. Keep confirm_timeout *
  /// max_attempts below the relay's lease.
  explicit OutboxSink(ConnectionOptions connection, PublisherOptions options = {});
  ~OutboxSink() override;
  OutboxSink(const OutboxSink&) = delete;
  OutboxSink& operator=(const OutboxSink&) = delete;

  /// @throws idem::rabbitmq::ConnectionError when the broker cannot be reached.
  std::size_t publish(std::span<OutboxRow> rows) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem::rabbitmq
