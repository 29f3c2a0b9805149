#include "idem/adapters/rabbitmq_consumer.hpp"

#include <sys/time.h>

#include <algorithm>
#include <deque>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "idem/adapters/verdict.hpp"
#include "rabbitmq_detail.hpp"

namespace idem::rabbitmq {

std::optional<std::string_view> Delivery::header(std::string_view name) const noexcept {
  for (const Header& h : headers) {
    if (h.name == name) return h.value;
  }
  return std::nullopt;
}

namespace {

using Clock = std::chrono::steady_clock;
using detail::bytes;
using detail::view;

// A delivery whose store was unavailable: kept unacked and retried locally after a backoff.
struct Held {
  std::uint64_t tag = 0;
  std::string key, body, inner_id, message_id, correlation_id, exchange, routing_key;
  unsigned retries = 0;
  Clock::time_point due{};
};

struct Deferred {
  std::uint64_t tag = 0;
  Clock::time_point due{};
};

timeval to_timeval(std::chrono::milliseconds ms) {
  ms = std::max(ms, std::chrono::milliseconds{0});
  return timeval{.tv_sec = static_cast<time_t>(ms.count() / 1000),
                 .tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

// Reads a numeric table value (x-delivery-count is a long on quorum queues).
std::optional<std::int64_t> as_integer(const amqp_field_value_t& v) {
  switch (v.kind) {
    case AMQP_FIELD_KIND_I8:
      return v.value.i8;
    case AMQP_FIELD_KIND_U8:
      return v.value.u8;
    case AMQP_FIELD_KIND_I16:
      return v.value.i16;
    case AMQP_FIELD_KIND_U16:
      return v.value.u16;
    case AMQP_FIELD_KIND_I32:
      return v.value.i32;
    case AMQP_FIELD_KIND_U32:
      return v.value.u32;
    case AMQP_FIELD_KIND_I64:
      return v.value.i64;
    case AMQP_FIELD_KIND_U64:
      return static_cast<std::int64_t>(v.value.u64);
    default:
      return std::nullopt;
  }
}

}  // namespace

struct Consumer::Impl {
  Impl(ConnectionOptions connection, ConsumeFunction consume, ConsumerOptions options)
      : connection_options_(std::move(connection)),
        consume_(std::move(consume)),
        options_(std::move(options)) {
    connect();  // the first failure is the caller's to see
  }

  void report(const std::string& what) const noexcept {
    if (!options_.on_error) return;
    try {
      options_.on_error(what);
    } catch (...) {  // NOLINT(bugprone-empty-catch): a logger must not break the loop
    }
  }

  void connect() {
    auto conn = std::make_unique<detail::Connection>(connection_options_);
    amqp_connection_state_t c = conn->get();
    const std::string& q = options_.queue;
    if (options_.declare_queue) {
      detail::Table args;
      if (!options_.dead_letter_exchange.empty()) {
        args.add("x-dead-letter-exchange", options_.dead_letter_exchange);
      }
      amqp_queue_declare(c, detail::channel, bytes(q), 0, 1, 0, 0, args.get());
      conn->check_rpc("declaring queue " + q);
    }
    amqp_basic_qos(c, detail::channel, 0, options_.prefetch, 0);
    conn->check_rpc("setting prefetch");
    amqp_basic_consume(c, detail::channel, bytes(q), amqp_empty_bytes, 0, /*no_ack=*/0, 0,
                       amqp_empty_table);
    conn->check_rpc("consuming from " + q);
    if (connected_once_) ++stats_.reconnects;
    connected_once_ = true;
    reconnect_failures_ = 0;
    conn_ = std::move(conn);
  }

  // The connection is gone: its unacked deliveries go back to the queue on the broker's side,
  // so local plans for them (delayed nacks, held retries) are dropped with it.
  void lose_connection(const std::string& why) {
    report("rabbitmq connection lost: " + why);
    if (conn_) conn_->mark_broken();
    conn_.reset();
    deferred_.clear();
    held_.reset();
    reconnect_at_ = Clock::now();  // first retry at once, then with backoff
  }

  std::chrono::milliseconds backoff_for(unsigned n) const {
    auto delay = options_.backoff;
    for (unsigned i = 1; i < n && delay < options_.max_backoff; ++i) delay *= 2;
    return std::min(delay, options_.max_backoff);
  }

  bool try_reconnect() {
    if (Clock::now() < reconnect_at_) return false;
    try {
      connect();
      return true;
    } catch (const std::exception& e) {
      ++reconnect_failures_;
      reconnect_at_ = Clock::now() + backoff_for(reconnect_failures_);
      report(std::string("rabbitmq reconnect failed: ") + e.what());
      return false;
    }
  }

  bool ack(std::uint64_t tag) {
    if (amqp_basic_ack(conn_->get(), detail::channel, tag, 0) != AMQP_STATUS_OK) {
      lose_connection("basic.ack failed");
      return false;
    }
    ++stats_.acked;
    return true;
  }

  bool nack(std::uint64_t tag, bool requeue) {
    const int rc = requeue ? amqp_basic_nack(conn_->get(), detail::channel, tag, 0, 1)
                           : amqp_basic_reject(conn_->get(), detail::channel, tag, 0);
    if (rc != AMQP_STATUS_OK) {
      lose_connection(requeue ? "basic.nack failed" : "basic.reject failed");
      return false;
    }
    ++(requeue ? stats_.requeued : stats_.dead_lettered);
    return true;
  }

  void flush_deferred() {
    const Clock::time_point now = Clock::now();
    while (conn_ && !deferred_.empty() && deferred_.front().due <= now) {
      const std::uint64_t tag = deferred_.front().tag;
      deferred_.pop_front();
      nack(tag, true);
    }
  }

  // Runs one delivery through the consume function and settles it by outcome.
  void process(std::uint64_t tag, const Message& message, const Delivery& delivery,
               std::int64_t delivery_count, unsigned held_retries) {
    ++stats_.deliveries;
    Verdict verdict = decide([&] {
      Result result = consume_(message);
      if (options_.on_result) options_.on_result(delivery, result);
      return result;
    });
    const std::string& reason = verdict.reason;
    // retry_counted becomes dead_letter or retry below, once the attempt is counted.
    Disposition action = verdict.disposition;

    const std::string key(message.key);
    if (action == Disposition::retry_counted) {
      // The in-process count survives requeues to this consumer; x-delivery-count (quorum
      // queues) also counts deliveries to other consumers and before a restart.
      unsigned& n = attempts_[key];
      n = std::max<unsigned>(n + 1, static_cast<unsigned>(delivery_count + 1));
      if (attempts_.size() > 100000) attempts_.clear();  // bound memory; counts restart
      const bool exhausted = options_.max_attempts != 0 && n >= options_.max_attempts;
      action = exhausted ? Disposition::dead_letter : Disposition::retry;
    }
    if (action == Disposition::dead_letter && options_.dead_letter_exchange.empty()) {
      report("message " + std::string(delivery.message_id) + " cannot be processed (" + reason +
             ") and there is no dead_letter_exchange: requeued");
      action = Disposition::retry;
    }
    switch (action) {
      case Disposition::settle:
        if (ack(tag)) attempts_.erase(key);
        break;
      case Disposition::dead_letter:
        if (nack(tag, false)) attempts_.erase(key);
        break;
      case Disposition::retry:
      case Disposition::retry_counted:  // (counted above; kept for the switch's completeness)
        deferred_.push_back({tag, Clock::now() + options_.retry_delay});
        break;
      case Disposition::hold: {
        report("holding the message: " + reason);
        Held held{.tag = tag,
                  .key = key,
                  .body = std::string(message.payload),
                  .inner_id = std::string(message.inner_id),
                  .message_id = std::string(delivery.message_id),
                  .correlation_id = std::string(delivery.correlation_id),
                  .exchange = std::string(delivery.exchange),
                  .routing_key = std::string(delivery.routing_key),
                  .retries = held_retries + 1};
        held.due = Clock::now() + backoff_for(held.retries);
        held_ = std::move(held);
        break;
      }
    }
  }

  void retry_held() {
    Held held = std::move(*held_);
    held_.reset();
    const Delivery delivery{.exchange = held.exchange,
                            .routing_key = held.routing_key,
                            .body = held.body,
                            .message_id = held.message_id,
                            .correlation_id = held.correlation_id,
                            .delivery_tag = held.tag,
                            .redelivered = true};
    process(held.tag, Message{.key = held.key, .payload = held.body, .inner_id = held.inner_id},
            delivery, 0, held.retries);
  }

  void handle(const amqp_envelope_t& envelope) {
    const amqp_basic_properties_t& p = envelope.message.properties;
    headers_.clear();
    std::int64_t delivery_count = 0;
    if ((p._flags & AMQP_BASIC_HEADERS_FLAG) != 0) {
      for (int i = 0; i < p.headers.num_entries; ++i) {
        const amqp_table_entry_t& e = p.headers.entries[i];
        if (e.value.kind == AMQP_FIELD_KIND_UTF8 || e.value.kind == AMQP_FIELD_KIND_BYTES) {
          headers_.push_back({view(e.key), view(e.value.value.bytes)});
        } else if (view(e.key) == "x-delivery-count") {
          delivery_count = as_integer(e.value).value_or(0);
        }
      }
    }
    const Delivery delivery{
        .exchange = view(envelope.exchange),
        .routing_key = view(envelope.routing_key),
        .body = view(envelope.message.body),
        .message_id =
            (p._flags & AMQP_BASIC_MESSAGE_ID_FLAG) ? view(p.message_id) : std::string_view{},
        .correlation_id = (p._flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? view(p.correlation_id)
                                                                      : std::string_view{},
        .delivery_tag = envelope.delivery_tag,
        .redelivered = envelope.redelivered != 0,
        .headers = headers_,
    };
    std::string_view key;
    switch (options_.key_source) {
      case KeySource::header:
        key = delivery.header(options_.key_header).value_or(std::string_view{});
        break;
      case KeySource::message_id:
        key = delivery.message_id;
        break;
      case KeySource::correlation_id:
        key = delivery.correlation_id;
        break;
    }
    const std::string_view inner_id =
        options_.inner_id_header.empty()
            ? delivery.message_id
            : delivery.header(options_.inner_id_header).value_or(std::string_view{});
    process(envelope.delivery_tag,
            Message{.key = key, .payload = delivery.body, .inner_id = inner_id}, delivery,
            delivery_count, 0);
  }

  // After AMQP_STATUS_UNEXPECTED_STATE a non-delivery frame is waiting: a close or a cancel
  // ends this connection; anything else (a stray ack) is dropped.
  void handle_other_frame() {
    amqp_frame_t frame{};
    if (amqp_simple_wait_frame(conn_->get(), &frame) != AMQP_STATUS_OK) {
      lose_connection("reading a frame failed");
      return;
    }
    if (frame.frame_type != AMQP_FRAME_METHOD) return;
    switch (frame.payload.method.id) {
      case AMQP_CHANNEL_CLOSE_METHOD:
        lose_connection("the broker closed the channel");
        break;
      case AMQP_CONNECTION_CLOSE_METHOD:
        lose_connection("the broker closed the connection");
        break;
      case AMQP_BASIC_CANCEL_METHOD:
        lose_connection("the broker cancelled the consumer (queue deleted?)");
        break;
      default:
        break;
    }
  }

  std::size_t poll(std::chrono::milliseconds timeout) {
    if (closed_) return 0;
    if (!conn_ && !try_reconnect()) {
      std::this_thread::sleep_for(
          std::min(timeout, std::chrono::ceil<std::chrono::milliseconds>(
                                std::max(reconnect_at_ - Clock::now(), Clock::duration{0}))));
      return 0;
    }
    flush_deferred();
    if (!conn_) return 0;
    if (held_) {
      // Nothing new is taken while the store is down; the held message is retried first.
      const auto wait = held_->due - Clock::now();
      if (wait > Clock::duration{0}) {
        std::this_thread::sleep_for(
            std::min<Clock::duration>(wait, std::chrono::duration_cast<Clock::duration>(timeout)));
        return 0;
      }
      retry_held();
      return 1;
    }
    if (!deferred_.empty()) {
      timeout = std::min(timeout, std::chrono::ceil<std::chrono::milliseconds>(std::max(
                                      deferred_.front().due - Clock::now(), Clock::duration{0})));
    }
    amqp_maybe_release_buffers(conn_->get());
    amqp_envelope_t envelope{};
    timeval tv = to_timeval(timeout);
    amqp_rpc_reply_t reply = amqp_consume_message(conn_->get(), &envelope, &tv, 0);
    if (reply.reply_type == AMQP_RESPONSE_NORMAL) {
      struct EnvelopeGuard {
        amqp_envelope_t* e;
        ~EnvelopeGuard() { amqp_destroy_envelope(e); }
      } guard{&envelope};
      handle(envelope);
      return 1;
    }
    if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
      if (reply.library_error == AMQP_STATUS_TIMEOUT) return 0;
      if (reply.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
        handle_other_frame();
        return 0;
      }
    }
    lose_connection(detail::describe(reply));
    return 0;
  }

  ConnectionOptions connection_options_;
  ConsumeFunction consume_;
  ConsumerOptions options_;
  std::unique_ptr<detail::Connection> conn_;
  std::deque<Deferred> deferred_;  // due times are increasing: retry_delay is fixed
  std::optional<Held> held_;
  std::unordered_map<std::string, unsigned> attempts_;
  std::vector<Header> headers_;  // reused per delivery
  Clock::time_point reconnect_at_{};
  unsigned reconnect_failures_ = 0;
  bool connected_once_ = false;
  bool closed_ = false;
  ConsumerStats stats_{};
  std::atomic<bool> stop_{false};
};

Consumer::Consumer(ConnectionOptions connection, ConsumeFunction consume, ConsumerOptions options)
    : impl_(std::make_unique<Impl>(std::move(connection), std::move(consume), std::move(options))) {
}

Consumer::~Consumer() {
  close();
}

Consumer::Consumer(Consumer&&) noexcept = default;
Consumer& Consumer::operator=(Consumer&&) noexcept = default;

std::size_t Consumer::poll(std::chrono::milliseconds timeout) {
  return impl_->poll(timeout);
}

void Consumer::run(const std::atomic<bool>& stop) {
  while (!stop.load(std::memory_order_relaxed) && !impl_->stop_.load(std::memory_order_relaxed)) {
    impl_->poll(impl_->options_.poll_timeout);
  }
  close();
}

void Consumer::run() {
  const std::atomic<bool> never{false};
  run(never);
}

void Consumer::request_stop() noexcept {
  impl_->stop_.store(true, std::memory_order_relaxed);
}

void Consumer::close() noexcept {
  if (!impl_) return;
  // Deferred nacks and a held message need nothing: closing returns them to the queue.
  impl_->deferred_.clear();
  impl_->held_.reset();
  impl_->conn_.reset();
  impl_->closed_ = true;
}

ConsumerStats Consumer::stats() const noexcept {
  return impl_->stats_;
}

int Consumer::native_socket() const noexcept {
  return impl_->conn_ ? impl_->conn_->socket() : -1;
}

}  // namespace idem::rabbitmq
