#include "idem/outbox/rabbitmq_outbox_sink.hpp"

#include <unordered_map>
#include <utility>
#include <vector>

#include "idem/error.hpp"

namespace idem::rabbitmq {

struct OutboxSink::Impl {
  ConnectionOptions connection;
  PublisherOptions options;
  std::unordered_map<InnerMsgId, std::size_t> index;
  std::vector<char> confirmed;
  std::unique_ptr<Publisher> publisher;
};

OutboxSink::OutboxSink(ConnectionOptions connection, PublisherOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->connection = std::move(connection);
  Impl* impl = impl_.get();
  options.on_confirm = [impl, user = std::move(options.on_confirm)](const InnerMsgId& id) {
    auto it = impl->index.find(id);
    if (it != impl->index.end()) impl->confirmed[it->second] = 1;
    if (user) user(id);
  };
  impl_->options = std::move(options);
}

OutboxSink::~OutboxSink() = default;

std::size_t OutboxSink::publish(std::span<OutboxRow> rows) {
  Impl& impl = *impl_;
  impl.index.clear();
  impl.confirmed.assign(rows.size(), 0);
  for (std::size_t i = 0; i < rows.size(); ++i) impl.index.emplace(rows[i].inner_id, i);
  try {
    if (!impl.publisher)
      impl.publisher = std::make_unique<Publisher>(impl.connection, impl.options);
    for (OutboxRow& row : rows) {
      impl.publisher->send(OutgoingMessage{.exchange = std::move(row.message.destination),
                                           .routing_key = std::move(row.message.routing_key),
                                           .biz_id = std::move(row.message.key),
                                           .body = std::move(row.message.payload),
                                           .content_type = {},
                                           .correlation_id = std::nullopt,
                                           .headers = std::move(row.message.headers),
                                           .inner_id = row.inner_id});
    }
    impl.publisher->flush();
  } catch (const Error&) {
    // Given-up or unreachable: start the next batch on a fresh publisher (and connection).
    impl.publisher.reset();
    std::size_t prefix = 0;
    while (prefix < rows.size() && impl.confirmed[prefix] != 0) ++prefix;
    impl.index.clear();
    if (prefix == 0) throw;
    return prefix;
  }
  std::size_t prefix = 0;
  while (prefix < rows.size() && impl.confirmed[prefix] != 0) ++prefix;
  impl.index.clear();
  return prefix;
}

}  // namespace idem::rabbitmq
