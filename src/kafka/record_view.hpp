#pragma once
// A librdkafka message seen as an idem::kafka::Record: views into the message, no copies.
// Inline: both run once per record on the consumer's hot path.

#include <librdkafka/rdkafka.h>

#include <span>
#include <string_view>
#include <vector>

#include "idem/adapters/kafka_consumer.hpp"

namespace idem::kafka::detail {

// The message's headers into out (cleared first; reused per record so nothing is allocated).
inline void read_headers(const rd_kafka_message_t& m, std::vector<Header>& out) {
  out.clear();
  rd_kafka_headers_t* native = nullptr;
  if (rd_kafka_message_headers(&m, &native) != RD_KAFKA_RESP_ERR_NO_ERROR) return;
  const char* name = nullptr;
  const void* value = nullptr;
  std::size_t size = 0;
  for (std::size_t i = 0;
       rd_kafka_header_get_all(native, i, &name, &value, &size) == RD_KAFKA_RESP_ERR_NO_ERROR;
       ++i) {
    out.push_back({name, value ? std::string_view(static_cast<const char*>(value), size)
                               : std::string_view{}});
  }
}

// A null key or payload is seen as empty.
inline Record record_of(std::string_view topic, const rd_kafka_message_t& m,
                        std::span<const Header> headers) {
  return Record{
      .topic = topic,
      .partition = m.partition,
      .offset = m.offset,
      .key =
          m.key ? std::string_view(static_cast<const char*>(m.key), m.key_len) : std::string_view{},
      .payload = m.payload ? std::string_view(static_cast<const char*>(m.payload), m.len)
                           : std::string_view{},
      .headers = headers,
  };
}

}  // namespace idem::kafka::detail
