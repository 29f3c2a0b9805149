#pragma once
// The Kafka consumer's dead-letter topic: an idempotent producer that copies a record with its
// key, value and headers plus idem-dlq-{reason,topic,partition,offset}, and waits for the
// delivery report (the source offset may only be committed once the copy is durable).

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

#include "idem/adapters/kafka_consumer.hpp"
#include "kafka_detail.hpp"

namespace idem::kafka::detail {

class DeadLetterProducer {
 public:
  // bootstrap.servers defaults to the consumer's. @throws ConfigError, KafkaError.
  DeadLetterProducer(std::string topic, const Config& config, const rd_kafka_conf_t* consumer);

  // Produces the copy and waits for its report; returns why it failed, or nothing.
  std::optional<std::string> send(const Record& record, std::string_view reason);
  // Waits up to timeout for copies still in flight (none unless send() was interrupted).
  void flush(std::chrono::milliseconds timeout) noexcept;
  const std::string& topic() const noexcept { return topic_; }

 private:
  std::string topic_;
  HandlePtr rk_;
};

}  // namespace idem::kafka::detail
