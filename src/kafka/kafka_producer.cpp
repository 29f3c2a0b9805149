#include "idem/adapters/kafka_producer.hpp"

#include <librdkafka/rdkafka.h>

#include <array>
#include <atomic>
#include <utility>

#include "kafka_detail.hpp"

namespace idem::kafka {

namespace {

// Travels with each message as its opaque until the delivery report.
struct Pending {
  OutgoingMessage message;
  struct Waiter {
    std::atomic<bool> done{false};
    Delivery delivery;
  }* waiter = nullptr;  // set by send_and_wait
};

}  // namespace

struct Producer::Impl {
  Impl(const Config& config, ProducerOptions options) : options_(std::move(options)) {
    detail::ConfPtr conf = detail::make_conf(config);
    // Broker-side dedup of librdkafka's own retries; our InnerMsgId covers resends above it.
    detail::set(conf.get(), "enable.idempotence", "true");
    rd_kafka_conf_set_opaque(conf.get(), this);
    rd_kafka_conf_set_dr_msg_cb(conf.get(), &Impl::delivered);
    rk_ = detail::make_handle(RD_KAFKA_PRODUCER, conf);
  }

  static void delivered(rd_kafka_t*, const rd_kafka_message_t* m, void* opaque) {
    std::unique_ptr<Pending> pending(static_cast<Pending*>(m->_private));
    Delivery delivery{.message = std::move(pending->message),
                      .partition = m->partition,
                      .offset = m->offset,
                      .error_code = static_cast<int>(m->err),
                      .error = m->err ? rd_kafka_err2str(m->err) : ""};
    if (pending->waiter != nullptr) {
      pending->waiter->delivery = std::move(delivery);
      pending->waiter->done.store(true, std::memory_order_release);
      return;
    }
    const ProducerOptions& options = static_cast<Impl*>(opaque)->options_;
    if (options.on_delivery) options.on_delivery(delivery);
  }

  InnerMsgId send(OutgoingMessage message, Pending::Waiter* waiter) {
    if (!message.inner_id) message.inner_id = ids_.next();
    const InnerMsgId id = *message.inner_id;
    std::array<char, 36> id_text{};
    id.write_to(id_text.data());

    detail::HeadersPtr headers(rd_kafka_headers_new(message.headers.size() + 2));
    auto add = [&](const std::string& name, std::string_view value) {
      rd_kafka_header_add(headers.get(), name.data(), static_cast<ssize_t>(name.size()),
                          value.data(), static_cast<ssize_t>(value.size()));
    };
    add(options_.inner_id_header, std::string_view(id_text.data(), id_text.size()));
    add(options_.biz_id_header, message.biz_id);
    for (const auto& [name, value] : message.headers) add(name, value);

    auto pending =
        std::make_unique<Pending>(Pending{.message = std::move(message), .waiter = waiter});
    const OutgoingMessage& m = pending->message;
    const std::string& key = m.key ? *m.key : m.biz_id;
    rd_kafka_resp_err_t err = rd_kafka_producev(
        rk_.get(), RD_KAFKA_V_TOPIC(m.topic.c_str()), RD_KAFKA_V_PARTITION(m.partition),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_KEY(key.data(), key.size()),
        RD_KAFKA_V_VALUE(const_cast<char*>(m.payload.data()), m.payload.size()),
        RD_KAFKA_V_HEADERS(headers.get()), RD_KAFKA_V_OPAQUE(pending.get()), RD_KAFKA_V_END);
    detail::check(err, "kafka produce to " + m.topic + " refused");
    (void)headers.release();  // owned by the message now
    (void)pending.release();  // freed by the delivery report
    return id;
  }

  ProducerOptions options_;
  InnerMsgIdGenerator ids_;
  detail::HandlePtr rk_;
};

Producer::Producer(const Config& config, ProducerOptions options)
    : impl_(std::make_unique<Impl>(config, std::move(options))) {}

Producer::~Producer() {
  if (impl_ && impl_->rk_) rd_kafka_flush(impl_->rk_.get(), 5000);
}

Producer::Producer(Producer&&) noexcept = default;
Producer& Producer::operator=(Producer&&) noexcept = default;

InnerMsgId Producer::send(OutgoingMessage message) {
  return impl_->send(std::move(message), nullptr);
}

Delivery Producer::send_and_wait(OutgoingMessage message, std::chrono::milliseconds timeout) {
  // The waiter outlives the report: on timeout we keep serving until the report arrives,
  // bounded by message.timeout.ms, since librdkafka still references it.
  Pending::Waiter waiter;
  impl_->send(std::move(message), &waiter);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!waiter.done.load(std::memory_order_acquire)) {
    rd_kafka_poll(impl_->rk_.get(), 10);
    if (std::chrono::steady_clock::now() >= deadline) {
      rd_kafka_purge(impl_->rk_.get(), RD_KAFKA_PURGE_F_QUEUE);  // fail it fast if still queued
    }
  }
  return std::move(waiter.delivery);
}

int Producer::poll(std::chrono::milliseconds timeout) {
  return rd_kafka_poll(impl_->rk_.get(), static_cast<int>(timeout.count()));
}

bool Producer::flush(std::chrono::milliseconds timeout) {
  return rd_kafka_flush(impl_->rk_.get(), static_cast<int>(timeout.count())) ==
         RD_KAFKA_RESP_ERR_NO_ERROR;
}

rd_kafka_t* Producer::native_handle() const noexcept {
  return impl_->rk_.get();
}

}  // namespace idem::kafka
