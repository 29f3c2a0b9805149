#include "idem/adapters/rabbitmq_publisher.hpp"

#include <sys/time.h>

#include <algorithm>
#include <array>
#include <thread>
#include <utility>

#include "rabbitmq_detail.hpp"

namespace idem::rabbitmq {

namespace {

using Clock = std::chrono::steady_clock;
using detail::bytes;

enum class Confirm { ack, nack, timeout, broken };

}  // namespace

struct Publisher::Impl {
  Impl(ConnectionOptions connection, PublisherOptions options)
      : connection_options_(std::move(connection)), options_(std::move(options)) {
    connect();
  }

  void report(const std::string& what) const noexcept {
    if (!options_.on_error) return;
    try {
      options_.on_error(what);
    } catch (...) {  // NOLINT(bugprone-empty-catch): a logger must not break publishing
    }
  }

  void connect() {
    auto conn = std::make_unique<detail::Connection>(connection_options_);
    amqp_confirm_select(conn->get(), detail::channel);
    conn->check_rpc("confirm.select");
    conn_ = std::move(conn);
    next_seq_ = 0;  // publish sequence numbers restart per channel
  }

  // Waits for the confirm of seq. Confirms of older sequence numbers are skipped.
  Confirm wait_confirm(std::uint64_t seq) {
    const Clock::time_point deadline = Clock::now() + options_.confirm_timeout;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline - Clock::now());
      if (left.count() <= 0) return Confirm::timeout;
      timeval tv{.tv_sec = static_cast<time_t>(left.count() / 1000000),
                 .tv_usec = static_cast<suseconds_t>(left.count() % 1000000)};
      amqp_frame_t frame{};
      const int rc = amqp_simple_wait_frame_noblock(conn_->get(), &frame, &tv);
      if (rc == AMQP_STATUS_TIMEOUT) return Confirm::timeout;
      if (rc != AMQP_STATUS_OK) return Confirm::broken;
      if (frame.frame_type != AMQP_FRAME_METHOD) continue;
      switch (frame.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
          const auto* ack = static_cast<const amqp_basic_ack_t*>(frame.payload.method.decoded);
          if (ack->delivery_tag == seq || (ack->multiple && ack->delivery_tag >= seq)) {
            return Confirm::ack;
          }
          break;
        }
        case AMQP_BASIC_NACK_METHOD: {
          const auto* nack = static_cast<const amqp_basic_nack_t*>(frame.payload.method.decoded);
          if (nack->delivery_tag == seq || (nack->multiple && nack->delivery_tag >= seq)) {
            return Confirm::nack;
          }
          break;
        }
        case AMQP_CHANNEL_CLOSE_METHOD:
        case AMQP_CONNECTION_CLOSE_METHOD:
          return Confirm::broken;
        default:
          break;
      }
    }
  }

  std::chrono::milliseconds backoff_for(unsigned n) const {
    auto delay = options_.backoff;
    for (unsigned i = 1; i < n && delay < options_.max_backoff; ++i) delay *= 2;
    return std::min(delay, options_.max_backoff);
  }

  InnerMsgId publish(OutgoingMessage& m) {
    if (!m.inner_id) m.inner_id = ids_.next();
    const InnerMsgId id = *m.inner_id;
    std::array<char, 36> id_text{};
    id.write_to(id_text.data());
    const std::string_view id_view(id_text.data(), id_text.size());

    detail::Table headers;
    headers.add(options_.biz_id_header, m.biz_id);
    for (const auto& [name, value] : m.headers) headers.add(name, value);
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_HEADERS_FLAG;
    props.message_id = bytes(id_view);
    props.headers = headers.get();
    if (options_.persistent) {
      props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
      props.delivery_mode = 2;
    }
    if (!m.content_type.empty()) {
      props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
      props.content_type = bytes(m.content_type);
    }
    if (m.correlation_id) {
      props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
      props.correlation_id = bytes(*m.correlation_id);
    }

    for (unsigned attempt = 1;; ++attempt) {
      attempts_ = attempt;
      std::string failure;
      try {
        if (!conn_) connect();
        const std::uint64_t seq = ++next_seq_;
        const int rc = amqp_basic_publish(conn_->get(), detail::channel, bytes(m.exchange),
                                          bytes(m.routing_key), 0, 0, &props, bytes(m.body));
        Confirm confirm = rc == AMQP_STATUS_OK ? wait_confirm(seq) : Confirm::broken;
        if (confirm == Confirm::ack && options_.lose_confirm &&
            options_.lose_confirm(id, attempt)) {
          confirm = Confirm::timeout;
        }
        switch (confirm) {
          case Confirm::ack:
            return id;
          case Confirm::nack:
            failure = "the broker nacked it";
            break;
          case Confirm::timeout:
            failure = "no confirm within confirm_timeout";
            break;
          case Confirm::broken:
            failure = "the connection broke";
            break;
        }
      } catch (const std::exception& e) {
        failure = e.what();
      }
      // Republish on a fresh channel: a late confirm of this attempt cannot be mistaken for
      // the next one, and the next one carries the same message_id.
      if (conn_) conn_->mark_broken();
      conn_.reset();
      report("publish of " + std::string(id_view) + " attempt " + std::to_string(attempt) +
             " unconfirmed: " + failure);
      if (options_.max_attempts != 0 && attempt >= options_.max_attempts) {
        throw RabbitError("message " + std::string(id_view) + " unconfirmed after " +
                              std::to_string(attempt) + " attempts: " + failure,
                          -1);
      }
      std::this_thread::sleep_for(backoff_for(attempt));
    }
  }

  ConnectionOptions connection_options_;
  PublisherOptions options_;
  InnerMsgIdGenerator ids_;
  std::unique_ptr<detail::Connection> conn_;
  std::uint64_t next_seq_ = 0;
  unsigned attempts_ = 0;
};

Publisher::Publisher(ConnectionOptions connection, PublisherOptions options)
    : impl_(std::make_unique<Impl>(std::move(connection), std::move(options))) {}

Publisher::~Publisher() = default;
Publisher::Publisher(Publisher&&) noexcept = default;
Publisher& Publisher::operator=(Publisher&&) noexcept = default;

InnerMsgId Publisher::publish(OutgoingMessage message) {
  return impl_->publish(message);
}

unsigned Publisher::last_attempts() const noexcept {
  return impl_->attempts_;
}

}  // namespace idem::rabbitmq
