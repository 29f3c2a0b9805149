#include "dead_letter_producer.hpp"

#include <sys/types.h>

#include <utility>

namespace idem::kafka::detail {

DeadLetterProducer::DeadLetterProducer(std::string topic, const Config& config,
                                       const rd_kafka_conf_t* consumer)
    : topic_(std::move(topic)) {
  Config effective = config;
  if (!effective.contains("bootstrap.servers")) {
    effective["bootstrap.servers"] = get(consumer, "bootstrap.servers");
  }
  effective.try_emplace("enable.idempotence", "true");
  ConfPtr conf = make_conf(effective);
  rd_kafka_conf_set_dr_msg_cb(conf.get(), [](rd_kafka_t*, const rd_kafka_message_t* m, void*) {
    *static_cast<rd_kafka_resp_err_t*>(m->_private) = m->err;
  });
  rk_ = make_handle(RD_KAFKA_PRODUCER, conf);
}

std::optional<std::string> DeadLetterProducer::send(const Record& record, std::string_view reason) {
  HeadersPtr headers(rd_kafka_headers_new(record.headers.size() + 4));
  for (const Header& h : record.headers) {
    rd_kafka_header_add(headers.get(), h.name.data(), static_cast<ssize_t>(h.name.size()),
                        h.value.data(), static_cast<ssize_t>(h.value.size()));
  }
  const std::string partition = std::to_string(record.partition);
  const std::string offset = std::to_string(record.offset);
  auto add = [&](const char* name, std::string_view value) {
    rd_kafka_header_add(headers.get(), name, -1, value.data(), static_cast<ssize_t>(value.size()));
  };
  add("idem-dlq-reason", reason);
  add("idem-dlq-topic", record.topic);
  add("idem-dlq-partition", partition);
  add("idem-dlq-offset", offset);
  rd_kafka_resp_err_t delivered = RD_KAFKA_RESP_ERR__IN_PROGRESS;
  // NOLINTBEGIN(cppcoreguidelines-pro-type-const-cast): librdkafka copies (F_COPY), never writes
  rd_kafka_resp_err_t err = rd_kafka_producev(
      rk_.get(), RD_KAFKA_V_TOPIC(topic_.c_str()), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
      RD_KAFKA_V_KEY(record.key.data(), record.key.size()),
      RD_KAFKA_V_VALUE(const_cast<char*>(record.payload.data()), record.payload.size()),
      RD_KAFKA_V_HEADERS(headers.get()), RD_KAFKA_V_OPAQUE(&delivered), RD_KAFKA_V_END);
  // NOLINTEND(cppcoreguidelines-pro-type-const-cast)
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return std::string("produce failed: ") + rd_kafka_err2str(err);
  }
  (void)headers.release();  // the message owns them now
  while (delivered == RD_KAFKA_RESP_ERR__IN_PROGRESS) rd_kafka_flush(rk_.get(), 1000);
  if (delivered != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return std::string("delivery failed: ") + rd_kafka_err2str(delivered);
  }
  return std::nullopt;
}

void DeadLetterProducer::flush(std::chrono::milliseconds timeout) noexcept {
  rd_kafka_flush(rk_.get(), static_cast<int>(timeout.count()));
}

}  // namespace idem::kafka::detail
