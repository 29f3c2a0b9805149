#pragma once
/// @file
/// @brief idem::kafka::Producer: an idempotent librdkafka producer that stamps each logical
/// message with one InnerMsgId header (kept on every retry) and a biz-id header.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "idem/adapters/kafka_common.hpp"
#include "idem/inner_msg_id.hpp"

typedef struct rd_kafka_s rd_kafka_t;  // NOLINT(modernize-use-using): C type

namespace idem::kafka {

/// @brief One logical message to produce.
struct OutgoingMessage {
  std::string topic{};
  /// The business id, sent in the biz-id header (and as the record key unless key is set).
  std::string biz_id{};
  std::string payload{};
  /// Record key; nullopt: biz_id (so one biz-id stays on one partition).
  std::optional<std::string> key{};
  /// Extra headers.
  std::vector<std::pair<std::string, std::string>> headers{};
  /// -1 (RD_KAFKA_PARTITION_UA): the partitioner picks.
  std::int32_t partition = -1;
  /// Set once by the producer on first send; keep it when you resend the same message.
  std::optional<InnerMsgId> inner_id{};
};

/// @brief The delivery report of one message.
struct Delivery {
  OutgoingMessage message;  ///< what was sent, inner_id filled in
  std::int32_t partition = -1;
  std::int64_t offset = -1;
  int error_code = 0;  ///< rd_kafka_resp_err_t; 0 on success
  std::string error;   ///< empty on success
  bool ok() const noexcept { return error_code == 0; }
};

/// @brief Policy of a kafka::Producer.
struct ProducerOptions {
  std::string biz_id_header = std::string(default_biz_id_header);
  std::string inner_id_header = std::string(default_inner_id_header);
  /// Called from poll()/flush() with each delivery report of send().
  std::function<void(const Delivery&)> on_delivery{};
};

/// @brief Produces with enable.idempotence=true (librdkafka's own retries never duplicate)
/// and an InnerMsgId per logical message, so application-level resends (after a timeout or a
/// failed report) carry the same id and the consumer side runs the effect once.
class Producer {
 public:
  /// @throws idem::ConfigError for a bad property; idem::kafka::KafkaError when librdkafka
  /// refuses to start.
  explicit Producer(const Config& config, ProducerOptions options = {});
  /// @brief Flushes for up to 5 s; never throws.
  ~Producer();
  Producer(Producer&&) noexcept;
  Producer& operator=(Producer&&) noexcept;

  /// @brief Enqueues message, assigning its InnerMsgId unless it has one; the report arrives
  /// through ProducerOptions::on_delivery during poll()/flush().
  /// @throws idem::kafka::KafkaError when the local queue refuses the message.
  InnerMsgId send(OutgoingMessage message);
  /// @brief send() and wait for this message's report (on_delivery is not called for it).
  Delivery send_and_wait(OutgoingMessage message,
                         std::chrono::milliseconds timeout = std::chrono::seconds{30});
  /// @brief Sends a failed delivery's message again with the same InnerMsgId.
  InnerMsgId resend(const Delivery& failed) { return send(failed.message); }
  /// @brief Serves delivery reports; returns how many events were served.
  int poll(std::chrono::milliseconds timeout);
  /// @brief Waits until every message is reported; false on timeout.
  bool flush(std::chrono::milliseconds timeout);

  rd_kafka_t* native_handle() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace idem::kafka
