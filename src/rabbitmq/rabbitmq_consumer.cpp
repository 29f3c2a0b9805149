#include "idem/adapters/rabbitmq_consumer.hpp"

#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "idem/adapters/loop_core.hpp"
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

constexpr std::string_view delivery_count_header = "x-delivery-count";

// An envelope kept past the poll() that read it (a delayed republish, a held delivery).
// rabbitmq-c envelopes own their memory (their own pool and malloc'd buffers), so they stay
// valid whatever happens to the connection.
struct EnvelopeDeleter {
  void operator()(amqp_envelope_t* e) const noexcept {
    amqp_destroy_envelope(e);
    delete e;
  }
};
using EnvelopePtr = std::unique_ptr<amqp_envelope_t, EnvelopeDeleter>;

// Moves e to the heap; e is left empty (destroying it frees nothing). Views into e's buffers
// stay valid: the buffers do not move.
EnvelopePtr take(amqp_envelope_t& e) {
  EnvelopePtr owned(new amqp_envelope_t(e));
  std::memset(&e, 0, sizeof e);
  return owned;
}

enum class Retry { nack, republish };

// A delivery going back to the queue once retry_delay has passed.
struct Deferred {
  std::uint64_t tag = 0;
  Clock::time_point due{};
  Retry how = Retry::nack;
  bool in_progress = false;
  EnvelopePtr envelope{};  // Retry::republish only
  unsigned attempts = 0;   // failed attempts so far, written to idem-attempts
  std::string what{};      // the delivery, for messages
};

// A delivery whose store was unavailable: kept unacked and retried locally after a backoff.
struct Held {
  EnvelopePtr envelope{};
  unsigned retries = 0;
  Clock::time_point due{};
};

// A delivery as views into its envelope (and into Impl::headers_).
struct Parsed {
  Delivery delivery{};
  std::string_view key{};
  std::string key_problem{};  // not empty: no usable biz-id
  std::string_view inner_id{};
  unsigned prior_attempts = 0;
};

timeval to_timeval(std::chrono::milliseconds ms) {
  ms = std::max(ms, std::chrono::milliseconds{0});
  return timeval{.tv_sec = static_cast<time_t>(ms.count() / 1000),
                 .tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

bool is_string(const amqp_field_value_t& v) noexcept {
  return v.kind == AMQP_FIELD_KIND_UTF8 || v.kind == AMQP_FIELD_KIND_BYTES;
}

// A biz-id for a log line: keys are arbitrary bytes.
std::string printable(std::string_view s) {
  constexpr std::size_t limit = 80;
  std::string out;
  for (const char ch : s.substr(0, limit)) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      out += ch;
    } else {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > limit) out += "...";
  return out;
}

std::string ms(std::chrono::milliseconds d) {
  return std::to_string(d.count()) + " ms";
}

}  // namespace

struct Consumer::Impl {
  Impl(ConnectionOptions connection, ConsumeFunction consume, ConsumerOptions options)
      : connection_options_(std::move(connection)),
        consume_(std::move(consume)),
        options_(std::move(options)),
        reporter_{options_.on_error, options_.logger, options_.metrics},
        where_(detail::endpoint(connection_options_)) {
    // The copies' connection idles between failures: no heartbeats to miss; a dead broker is
    // caught by publish_timeout instead.
    side_options_ = connection_options_;
    side_options_.heartbeat = std::chrono::seconds{0};
    connect();  // the first failure is the caller's to see
  }

  // Every line goes to the logger; warnings and errors also to on_error.
  void note(LogLevel level, const std::string& line) const noexcept { reporter_.note(level, line); }

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
      conn->check_rpc("declaring queue '" + q + "'");
    }
    amqp_basic_qos(c, detail::channel, 0, options_.prefetch, 0);
    conn->check_rpc("setting prefetch");
    amqp_basic_consume(c, detail::channel, bytes(q), amqp_empty_bytes, 0, /*no_ack=*/0, 0,
                       amqp_empty_table);
    conn->check_rpc("consuming from queue '" + q + "'");
    if (connected_once_) {
      ++stats_.reconnects;
      reporter_.count(Counter::reconnects);
    }
    connected_once_ = true;
    reconnect_failures_ = 0;
    conn_ = std::move(conn);
  }

  // The connection is gone: its unacked deliveries go back to the queue on the broker's side,
  // so local plans for them (delayed retries, held retries) are dropped with it.
  void lose_connection(const std::string& why) {
    note(LogLevel::warning, "rabbitmq consumer: connection to " + where_ + " lost: " + why +
                                "; reconnecting (its unacked deliveries return to the queue)");
    if (conn_) conn_->mark_broken();
    conn_.reset();
    deferred_.clear();
    held_.reset();
    reconnect_at_ = Clock::now();  // first retry at once, then with backoff
  }

  bool try_reconnect() {
    if (Clock::now() < reconnect_at_) return false;
    try {
      connect();
      return true;
    } catch (const std::exception& e) {
      ++reconnect_failures_;
      const auto delay = adapters::backoff(options_.reconnect_backoff,
                                           options_.max_reconnect_backoff, reconnect_failures_);
      reconnect_at_ = Clock::now() + delay;
      note(LogLevel::error, std::string("rabbitmq consumer: reconnect failed: ") + e.what() +
                                "; next try in " + ms(delay));
      return false;
    }
  }

  bool ack(std::uint64_t tag) {
    if (const int rc = amqp_basic_ack(conn_->get(), detail::channel, tag, 0);
        rc != AMQP_STATUS_OK) {
      lose_connection("basic.ack failed: " + detail::describe_status(rc, errno));
      return false;
    }
    ++stats_.acked;
    return true;
  }

  bool requeue(std::uint64_t tag) {
    if (const int rc = amqp_basic_nack(conn_->get(), detail::channel, tag, 0, 1);
        rc != AMQP_STATUS_OK) {
      lose_connection("basic.nack failed: " + detail::describe_status(rc, errno));
      return false;
    }
    ++stats_.requeued;
    reporter_.count(Counter::redeliveries);
    return true;
  }

  // Publishes a copy and waits for the broker's confirm; mandatory, so a copy routed to no
  // queue is a failure too. Returns why it failed, or nothing.
  std::optional<std::string> publish_confirmed(std::string_view exchange,
                                               std::string_view routing_key,
                                               const amqp_basic_properties_t& props,
                                               std::string_view body) {
    for (int tries = 0;; ++tries) {
      const bool fresh = !side_;
      try {
        if (!side_) side_ = std::make_unique<detail::ConfirmChannel>(side_options_);
      } catch (const std::exception& e) {
        return std::string("cannot open the publishing connection: ") + e.what();
      }
      std::uint64_t seq = 0;
      try {
        seq = side_->publish(exchange, routing_key, true, props, body);
      } catch (const std::exception& e) {
        side_.reset();
        if (fresh || tries > 0) return e.what();
        continue;  // an idle connection the broker dropped: once more on a new one
      }
      const Clock::time_point deadline = Clock::now() + options_.publish_timeout;
      std::string returned;
      for (;;) {
        using Kind = detail::ConfirmChannel::EventKind;
        detail::ConfirmChannel::Event event = side_->next(deadline);
        const bool covers = event.tag == seq || (event.multiple && event.tag >= seq);
        switch (event.kind) {
          case Kind::ack:
            if (!covers) continue;
            if (!returned.empty()) return "the broker routed it to no queue: " + returned;
            return std::nullopt;
          case Kind::nack:
            if (!covers) continue;
            return "the broker nacked it (basic.nack)";
          case Kind::returned:
            returned = std::move(event.detail);
            continue;
          case Kind::timeout:  // a blocked (memory alarm) or dead broker: no polite close
            side_->connection().mark_broken();
            side_.reset();
            return "no confirm within publish_timeout (" + ms(options_.publish_timeout) + ")";
          case Kind::broken:
            side_.reset();
            if (fresh || tries > 0) return event.detail;
            break;
        }
        break;  // broken on a reused connection: publish again on a new one
      }
    }
  }

  // Builds the properties of a copy of env: its own, with headers minus `drop` plus `add`.
  amqp_basic_properties_t copy_properties(const amqp_envelope_t& env,
                                          std::initializer_list<std::string_view> drop,
                                          amqp_flags_t clear) {
    const amqp_basic_properties_t& src = env.message.properties;
    amqp_basic_properties_t props = src;
    // user_id must match the publishing connection's user; the broker checks it.
    props._flags &= static_cast<amqp_flags_t>(~(AMQP_BASIC_USER_ID_FLAG | clear));
    copy_headers_.clear();
    if ((src._flags & AMQP_BASIC_HEADERS_FLAG) != 0) {
      copy_headers_.add_all_except(src.headers, drop);
    }
    props._flags |= AMQP_BASIC_HEADERS_FLAG;
    return props;
  }

  std::string describe(const Parsed& p) const {
    const Delivery& d = p.delivery;
    return "message " +
           (d.message_id.empty() ? std::string("(no message_id)") : std::string(d.message_id)) +
           " (biz-id '" + printable(p.key) + "', delivery tag " + std::to_string(d.delivery_tag) +
           ") from queue '" + options_.queue + "'";
  }

  void defer(amqp_envelope_t& env, Retry how, unsigned attempts, std::string what,
             bool in_progress = false) {
    deferred_.push_back({.tag = env.delivery_tag,
                         .due = Clock::now() + options_.retry_delay,
                         .how = how,
                         .in_progress = in_progress,
                         .envelope = how == Retry::republish ? take(env) : EnvelopePtr{},
                         .attempts = attempts,
                         .what = std::move(what)});
  }

  // Publishes a copy with idem-dlq-* headers to the dead-letter exchange and acks the
  // original once the broker confirmed it; otherwise requeues it and says why.
  void dead_letter(amqp_envelope_t& env, const Parsed& p, const std::string& reason,
                   DeadLetterReason cause, unsigned attempts) {
    std::string what = describe(p);
    const std::string& dlx = options_.dead_letter_exchange;
    if (dlx.empty()) {
      ++stats_.dead_letter_failures;
      reporter_.count(Counter::dead_letter_failures);
      note(LogLevel::error, "rabbitmq consumer: " + what + " must be dead-lettered (" + reason +
                                ") but dead_letter_exchange is not set: requeued in " +
                                ms(options_.retry_delay));
      defer(env, Retry::nack, 0, std::move(what));
      return;
    }
    // Like the broker's own dead-lettering: no expiration, so the copy does not expire again.
    amqp_basic_properties_t props = copy_properties(
        env, {dlq_reason_header, dlq_queue_header, dlq_attempts_header, delivery_count_header},
        AMQP_BASIC_EXPIRATION_FLAG);
    const std::string attempts_text = std::to_string(attempts);
    copy_headers_.add(dlq_reason_header, reason);
    copy_headers_.add(dlq_queue_header, options_.queue);
    if (attempts > 0) copy_headers_.add(dlq_attempts_header, attempts_text);
    props.headers = copy_headers_.get();
    const std::string_view routing_key = options_.dead_letter_routing_key.empty()
                                             ? view(env.routing_key)
                                             : std::string_view(options_.dead_letter_routing_key);
    if (auto failure = publish_confirmed(dlx, routing_key, props, view(env.message.body))) {
      ++stats_.dead_letter_failures;
      reporter_.count(Counter::dead_letter_failures);
      note(LogLevel::error, "rabbitmq consumer: could not dead-letter " + what + " (" + reason +
                                ") to exchange '" + dlx + "': " + *failure + "; requeued in " +
                                ms(options_.retry_delay));
      defer(env, Retry::nack, 0, std::move(what));
      return;
    }
    ++stats_.dead_lettered;
    reporter_.count(adapters::counter_of(cause));
    note(LogLevel::error,
         "rabbitmq consumer: dead-lettered " + what + " to exchange '" + dlx + "': " + reason);
    if (ack(env.delivery_tag)) forget(p.key);
  }

  // RetryMode::republish, once retry_delay has passed: a copy carrying the attempt count goes
  // to the back of the queue, then the original is acked.
  void republish(Deferred& d) {
    const amqp_envelope_t& env = *d.envelope;
    amqp_basic_properties_t props =
        copy_properties(env, {attempts_header, delivery_count_header}, 0);
    const std::string attempts_text = std::to_string(d.attempts);
    copy_headers_.add(attempts_header, attempts_text);
    props.headers = copy_headers_.get();
    if (auto failure = publish_confirmed("", options_.queue, props, view(env.message.body))) {
      note(LogLevel::error, "rabbitmq consumer: could not republish " + d.what +
                                " for another attempt: " + *failure +
                                "; requeued with basic.nack instead (this failure is not counted)");
      requeue(d.tag);
      return;
    }
    if (ack(d.tag)) {
      ++stats_.requeued;
      ++stats_.republished;
      reporter_.count(Counter::redeliveries);
    }
  }

  void flush_deferred() {
    const Clock::time_point now = Clock::now();
    while (conn_ && !deferred_.empty() && deferred_.front().due <= now) {
      Deferred d = std::move(deferred_.front());
      deferred_.pop_front();
      if (d.how == Retry::republish) {
        republish(d);
      } else if (requeue(d.tag) && d.in_progress) {
        ++stats_.in_progress;
      }
    }
  }

  void forget(std::string_view key) {
    if (options_.retry_mode == RetryMode::requeue && !attempts_.empty()) {
      attempts_.erase(std::string(key));
    }
  }

  Parsed parse(const amqp_envelope_t& env) {
    const amqp_basic_properties_t& props = env.message.properties;
    headers_.clear();
    Parsed p;
    std::int64_t delivery_count = 0;
    std::int64_t attempts = 0;
    const amqp_table_entry_t* key_entry = nullptr;
    if ((props._flags & AMQP_BASIC_HEADERS_FLAG) != 0) {
      for (int i = 0; i < props.headers.num_entries; ++i) {
        const amqp_table_entry_t& e = props.headers.entries[i];
        const std::string_view name = view(e.key);
        if (is_string(e.value)) headers_.push_back({name, view(e.value.value.bytes)});
        if (name == delivery_count_header) {
          delivery_count = detail::as_integer(e.value).value_or(0);
        } else if (name == attempts_header) {
          attempts = detail::as_integer(e.value).value_or(0);
        }
        if (key_entry == nullptr && name == options_.key_header) key_entry = &e;
      }
    }
    const std::int64_t prior = std::clamp<std::int64_t>(
        std::max<std::int64_t>(attempts, 0) + std::max<std::int64_t>(delivery_count, 0), 0,
        std::numeric_limits<unsigned>::max() - 1);
    p.prior_attempts = static_cast<unsigned>(prior);
    const bool has_message_id = (props._flags & AMQP_BASIC_MESSAGE_ID_FLAG) != 0;
    const bool has_correlation_id = (props._flags & AMQP_BASIC_CORRELATION_ID_FLAG) != 0;
    p.delivery = Delivery{
        .exchange = view(env.exchange),
        .routing_key = view(env.routing_key),
        .body = view(env.message.body),
        .message_id = has_message_id ? view(props.message_id) : std::string_view{},
        .correlation_id = has_correlation_id ? view(props.correlation_id) : std::string_view{},
        .delivery_tag = env.delivery_tag,
        .redelivered = env.redelivered != 0,
        .headers = headers_,
        .attempt = p.prior_attempts + 1,
    };
    switch (options_.key_source) {
      case KeySource::header:
        if (key_entry == nullptr) {
          p.key_problem = "missing biz-id header " + options_.key_header;
        } else if (!is_string(key_entry->value)) {
          p.key_problem = "biz-id header " + options_.key_header + " is " +
                          std::string(detail::kind_name(key_entry->value.kind)) + ", not a string";
        } else {
          p.key = view(key_entry->value.value.bytes);
        }
        break;
      case KeySource::message_id:
        if (!has_message_id) p.key_problem = "missing message_id property (the biz-id)";
        p.key = p.delivery.message_id;
        break;
      case KeySource::correlation_id:
        if (!has_correlation_id) {
          p.key_problem = "missing correlation_id property (the biz-id)";
        }
        p.key = p.delivery.correlation_id;
        break;
    }
    p.inner_id = options_.inner_id_header.empty()
                     ? p.delivery.message_id
                     : p.delivery.header(options_.inner_id_header).value_or(std::string_view{});
    return p;
  }

  // Runs one delivery through the consume function and settles it by outcome. env may be
  // taken (moved to the heap) when the delivery is held or republished later.
  void process(amqp_envelope_t& env, unsigned held_retries) {
    const Parsed p = parse(env);
    if (!p.key_problem.empty()) {  // nothing to deduplicate on: the consume step never sees it
      ++stats_.missing_key;
      dead_letter(env, p, p.key_problem, DeadLetterReason::missing_key, 0);
      return;
    }
    ++stats_.deliveries;
    const Message message{.key = p.key,
                          .payload = p.delivery.body,
                          .inner_id = p.inner_id,
                          .source = {.delivery_tag = p.delivery.delivery_tag,
                                     .redelivered = p.delivery.redelivered,
                                     .exchange = p.delivery.exchange,
                                     .routing_key = p.delivery.routing_key}};
    std::optional<Outcome> outcome;
    const Verdict verdict = decide([&] {
      Result result = consume_(message);
      outcome = result.outcome;
      if (options_.on_result) options_.on_result(p.delivery, result);
      return result;
    });
    const std::string& reason = verdict.reason;
    switch (verdict.disposition) {
      case Disposition::settle:
        if (ack(env.delivery_tag)) forget(p.key);
        return;
      case Disposition::retry: {
        reporter_.count(Counter::retries);
        std::string what = describe(p);
        note(LogLevel::debug, "rabbitmq consumer: " + what + ": " + reason + "; requeued in " +
                                  ms(options_.retry_delay));
        defer(env, Retry::nack, 0, std::move(what), true);
        return;
      }
      case Disposition::retry_counted:
        retry_counted(env, p, reason);
        return;
      case Disposition::dead_letter:
        ++(outcome == Outcome::conflict ? stats_.conflicts : stats_.invalid);
        dead_letter(env, p, reason, verdict.cause, 0);
        return;
      case Disposition::hold: {
        ++stats_.held;
        reporter_.count(Counter::retries);
        Held held{.envelope = take(env), .retries = held_retries + 1};
        const auto delay =
            adapters::backoff(options_.retry_backoff, options_.max_retry_backoff, held.retries);
        held.due = Clock::now() + delay;
        note(LogLevel::warning, "rabbitmq consumer: holding " + describe(p) +
                                    " unacked: " + reason + "; retrying in " + ms(delay) +
                                    " (nothing new is taken meanwhile)");
        held_ = std::move(held);
        return;
      }
    }
  }

  void retry_counted(amqp_envelope_t& env, const Parsed& p, const std::string& reason) {
    unsigned n = p.prior_attempts + 1;
    if (options_.retry_mode == RetryMode::requeue) {
      // In process: survives requeues to this consumer, not a restart.
      unsigned& counted = attempts_[std::string(p.key)];
      counted = std::max(counted + 1, n);
      n = counted;
      if (attempts_.size() > 100000) attempts_.clear();  // bound memory; counts restart
    }
    if (adapters::attempts_exhausted(n, options_.max_attempts)) {
      ++stats_.attempts_exhausted;
      dead_letter(env, p, "attempts exhausted: " + reason, DeadLetterReason::attempts_exhausted, n);
      return;
    }
    reporter_.count(Counter::retries);
    const bool republish = options_.retry_mode == RetryMode::republish;
    std::string what = describe(p);
    note(LogLevel::warning,
         "rabbitmq consumer: " + what + " failed (attempt " + std::to_string(n) + " of " +
             (options_.max_attempts == 0 ? std::string("unlimited")
                                         : std::to_string(options_.max_attempts)) +
             "): " + reason + "; " +
             (republish
                  ? "republished with " + std::string(attempts_header) + " " + std::to_string(n)
                  : std::string("requeued")) +
             " in " + ms(options_.retry_delay));
    defer(env, republish ? Retry::republish : Retry::nack, n, std::move(what));
  }

  void retry_held() {
    Held held = std::move(*held_);
    held_.reset();
    process(*held.envelope, held.retries);
  }

  // After AMQP_STATUS_UNEXPECTED_STATE a non-delivery frame is waiting: a close or a cancel
  // ends this connection; anything else is dropped.
  void handle_other_frame() {
    amqp_frame_t frame{};
    if (const int rc = amqp_simple_wait_frame(conn_->get(), &frame); rc != AMQP_STATUS_OK) {
      lose_connection("reading a frame failed: " + detail::describe_status(rc, errno));
      return;
    }
    if (frame.frame_type != AMQP_FRAME_METHOD) return;
    switch (frame.payload.method.id) {
      case AMQP_CHANNEL_CLOSE_METHOD: {
        const auto* m = static_cast<const amqp_channel_close_t*>(frame.payload.method.decoded);
        lose_connection("the broker closed the channel: " + std::to_string(m->reply_code) + " " +
                        std::string(view(m->reply_text)));
        break;
      }
      case AMQP_CONNECTION_CLOSE_METHOD: {
        const auto* m = static_cast<const amqp_connection_close_t*>(frame.payload.method.decoded);
        lose_connection("the broker closed the connection: " + std::to_string(m->reply_code) + " " +
                        std::string(view(m->reply_text)));
        break;
      }
      case AMQP_BASIC_CANCEL_METHOD:
        lose_connection("the broker cancelled the consumer (queue '" + options_.queue +
                        "' deleted?)");
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
    const int os_error = errno;
    if (reply.reply_type == AMQP_RESPONSE_NORMAL) {
      struct EnvelopeGuard {
        amqp_envelope_t* e;
        ~EnvelopeGuard() { amqp_destroy_envelope(e); }
      } guard{&envelope};
      process(envelope, 0);
      return 1;
    }
    if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
      if (reply.library_error == AMQP_STATUS_TIMEOUT) return 0;
      if (reply.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
        handle_other_frame();
        return 0;
      }
    }
    lose_connection(detail::describe(reply, os_error));
    return 0;
  }

  void close() noexcept {
    // Delayed retries and a held message need nothing: closing returns them to the queue.
    deferred_.clear();
    held_.reset();
    conn_.reset();
    side_.reset();
    closed_ = true;
  }

  ConnectionOptions connection_options_;
  ConnectionOptions side_options_;
  ConsumeFunction consume_;
  ConsumerOptions options_;
  adapters::Reporter reporter_;
  std::string where_;
  std::unique_ptr<detail::Connection> conn_;
  std::unique_ptr<detail::ConfirmChannel> side_;  // republished and dead-lettered copies
  std::deque<Deferred> deferred_;                 // due times increase: retry_delay is fixed
  std::optional<Held> held_;
  std::unordered_map<std::string, unsigned> attempts_;  // RetryMode::requeue
  std::vector<Header> headers_;                         // reused per delivery
  detail::Table copy_headers_;                          // reused per copy
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
  Impl& impl = *impl_;
  adapters::run_loop(
      stop, impl.stop_, [&impl] { impl.poll(impl.options_.poll_timeout); }, [this] { close(); });
}

void Consumer::run() {
  const std::atomic<bool> never{false};
  run(never);
}

void Consumer::request_stop() noexcept {
  impl_->stop_.store(true, std::memory_order_relaxed);
}

void Consumer::close() noexcept {
  if (impl_) impl_->close();
}

ConsumerStats Consumer::stats() const noexcept {
  return impl_->stats_;
}

int Consumer::native_socket() const noexcept {
  return impl_->conn_ ? impl_->conn_->socket() : -1;
}

}  // namespace idem::rabbitmq
