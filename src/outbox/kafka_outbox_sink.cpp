#include "idem/outbox/kafka_outbox_sink.hpp"

#include <librdkafka/rdkafka.h>

#include <unordered_map>
#include <utility>
#include <vector>

#include "idem/error.hpp"

namespace idem::kafka {

struct OutboxSink::Impl {
  // Index of each in-flight row's inner id in the current batch; reports flip confirmed_.
  std::unordered_map<InnerMsgId, std::size_t> index;
  std::vector<char> confirmed;
  std::chrono::milliseconds batch_timeout;
  std::unique_ptr<Producer> producer;
};

OutboxSink::OutboxSink(const Config& config, OutboxSinkOptions options)
    : impl_(std::make_unique<Impl>()) {
  if (options.producer.on_delivery) {
    throw ConfigError(
        "kafka::OutboxSinkOptions::producer.on_delivery must be empty: the sink reads the "
        "delivery reports itself");
  }
  impl_->batch_timeout = options.batch_timeout;
  Impl* impl = impl_.get();
  options.producer.on_delivery = [impl](const Delivery& d) {
    if (!d.ok() || !d.message.inner_id) return;
    auto it = impl->index.find(*d.message.inner_id);
    // A report of an earlier batch's copy of the same row counts: the broker has that row.
    if (it != impl->index.end()) impl->confirmed[it->second] = 1;
  };
  impl_->producer = std::make_unique<Producer>(config, std::move(options.producer));
}

OutboxSink::~OutboxSink() = default;

Producer& OutboxSink::producer() noexcept {
  return *impl_->producer;
}

std::size_t OutboxSink::publish(std::span<OutboxRow> rows) {
  Impl& impl = *impl_;
  impl.index.clear();
  impl.confirmed.assign(rows.size(), 0);
  for (std::size_t i = 0; i < rows.size(); ++i) impl.index.emplace(rows[i].inner_id, i);
  const auto deadline = std::chrono::steady_clock::now() + impl.batch_timeout;
  for (OutboxRow& row : rows) {
    OutgoingMessage m{.topic = std::move(row.message.destination),
                      .biz_id = std::move(row.message.key),
                      .payload = std::move(row.message.payload),
                      .key = std::nullopt,
                      .headers = std::move(row.message.headers),
                      .partition = -1,
                      .inner_id = row.inner_id};
    for (;;) {
      try {
        impl.producer->send(m);
        break;
      } catch (const Error&) {
        // The local queue is full: serve reports to make room, until the batch's deadline.
        if (std::chrono::steady_clock::now() >= deadline) throw;
        impl.producer->poll(std::chrono::milliseconds{10});
      }
    }
  }
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  impl.producer->flush(std::max(left, std::chrono::milliseconds{1}));
  std::size_t prefix = 0;
  while (prefix < rows.size() && impl.confirmed[prefix] != 0) ++prefix;
  impl.index.clear();
  return prefix;
}

}  // namespace idem::kafka
