#include "kafka_detail.hpp"

#include <array>

#include "idem/error.hpp"

namespace idem::kafka::detail {

void set(rd_kafka_conf_t* conf, const std::string& name, const std::string& value) {
  std::array<char, 512> err{};
  if (rd_kafka_conf_set(conf, name.c_str(), value.c_str(), err.data(), err.size()) !=
      RD_KAFKA_CONF_OK) {
    throw ConfigError("kafka property " + name + "=" + value + " rejected: " + err.data());
  }
}

ConfPtr make_conf(const Config& config) {
  ConfPtr conf(rd_kafka_conf_new());
  for (const auto& [name, value] : config) set(conf.get(), name, value);
  return conf;
}

std::string get(const rd_kafka_conf_t* conf, const char* name) {
  std::array<char, 1024> value{};
  std::size_t size = value.size();
  if (rd_kafka_conf_get(conf, name, value.data(), &size) != RD_KAFKA_CONF_OK) return {};
  return std::string(value.data());
}

HandlePtr make_handle(rd_kafka_type_t type, ConfPtr& conf) {
  std::array<char, 512> err{};
  HandlePtr rk(rd_kafka_new(type, conf.get(), err.data(), err.size()));
  if (!rk) throw KafkaError(std::string("cannot create the kafka client: ") + err.data(), -1);
  (void)conf.release();  // rd_kafka_new took it
  return rk;
}

void check(rd_kafka_resp_err_t err, std::string_view what) {
  if (err == RD_KAFKA_RESP_ERR_NO_ERROR) return;
  throw KafkaError(std::string(what) + ": " + rd_kafka_err2str(err), static_cast<int>(err));
}

}  // namespace idem::kafka::detail
