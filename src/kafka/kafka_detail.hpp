#pragma once
// Private helpers of the Kafka adapter: RAII for librdkafka handles and configuration.

#include <librdkafka/rdkafka.h>

#include <memory>
#include <string>
#include <string_view>

#include "idem/adapters/kafka_common.hpp"

namespace idem::kafka::detail {

struct HandleDeleter {
  void operator()(rd_kafka_t* rk) const noexcept { rd_kafka_destroy(rk); }
};
struct ConfDeleter {
  void operator()(rd_kafka_conf_t* conf) const noexcept { rd_kafka_conf_destroy(conf); }
};
struct PartitionListDeleter {
  void operator()(rd_kafka_topic_partition_list_t* list) const noexcept {
    rd_kafka_topic_partition_list_destroy(list);
  }
};
struct MessageDeleter {
  void operator()(rd_kafka_message_t* m) const noexcept { rd_kafka_message_destroy(m); }
};
struct HeadersDeleter {
  void operator()(rd_kafka_headers_t* h) const noexcept { rd_kafka_headers_destroy(h); }
};
struct QueueDeleter {
  void operator()(rd_kafka_queue_t* q) const noexcept { rd_kafka_queue_destroy(q); }
};
struct ErrorDeleter {
  void operator()(rd_kafka_error_t* e) const noexcept { rd_kafka_error_destroy(e); }
};

using HandlePtr = std::unique_ptr<rd_kafka_t, HandleDeleter>;
using ConfPtr = std::unique_ptr<rd_kafka_conf_t, ConfDeleter>;
using PartitionListPtr = std::unique_ptr<rd_kafka_topic_partition_list_t, PartitionListDeleter>;
using MessagePtr = std::unique_ptr<rd_kafka_message_t, MessageDeleter>;
using HeadersPtr = std::unique_ptr<rd_kafka_headers_t, HeadersDeleter>;
using ErrorPtr = std::unique_ptr<rd_kafka_error_t, ErrorDeleter>;
using QueuePtr = std::unique_ptr<rd_kafka_queue_t, QueueDeleter>;

/// Sets one property. @throws idem::ConfigError naming it.
void set(rd_kafka_conf_t* conf, const std::string& name, const std::string& value);
/// A new configuration holding config. @throws idem::ConfigError.
ConfPtr make_conf(const Config& config);
/// The value of a property, empty when unset.
std::string get(const rd_kafka_conf_t* conf, const char* name);
/// rd_kafka_new that throws KafkaError and keeps conf on failure.
HandlePtr make_handle(rd_kafka_type_t type, ConfPtr& conf);
/// Throws KafkaError(what + ": " + rd_kafka_err2str(err)) unless err is 0.
void check(rd_kafka_resp_err_t err, std::string_view what);

}  // namespace idem::kafka::detail
