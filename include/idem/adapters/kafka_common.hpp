#pragma once
/// @file
/// @brief Vocabulary shared by the Kafka consumer and producer adapters (<idem/kafka.hpp>).

#include <map>
#include <string>
#include <string_view>

#include "idem/error.hpp"

namespace idem::kafka {

/// @brief librdkafka configuration properties, e.g. {{"bootstrap.servers", "k1:9092"},
/// {"group.id", "payments"}}. Unknown properties raise idem::ConfigError.
using Config = std::map<std::string, std::string, std::less<>>;

/// @brief Header carrying the biz-id (the dedup key) when KeySource::header is chosen.
inline constexpr std::string_view default_biz_id_header = "idem-biz-id";
/// @brief Header carrying the InnerMsgId text stamped by idem::kafka::Producer.
inline constexpr std::string_view default_inner_id_header = "idem-inner-id";

/// @brief librdkafka reported an error; code() is the rd_kafka_resp_err_t value.
class KafkaError : public Error {
 public:
  KafkaError(const std::string& what, int code) : Error(what), code_(code) {}
  /// @brief The native rd_kafka_resp_err_t.
  int code() const noexcept { return code_; }

 private:
  int code_;
};

}  // namespace idem::kafka
