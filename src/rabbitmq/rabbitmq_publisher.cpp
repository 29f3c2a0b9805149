#include "idem/adapters/rabbitmq_publisher.hpp"

#include <algorithm>
#include <array>
#include <deque>
#include <thread>
#include <utility>

#include "idem/adapters/loop_core.hpp"
#include "rabbitmq_detail.hpp"

namespace idem::rabbitmq {

namespace {

using Clock = std::chrono::steady_clock;
using detail::bytes;

// A message sent and not yet confirmed. The deque of them is in publish order, which is
// sequence-number order on the current channel.
struct Pending {
  std::uint64_t seq = 0;
  OutgoingMessage message;
  std::array<char, 36> id_text{};
  unsigned attempts = 0;
  Clock::time_point sent{};
};

struct Failed {
  OutgoingMessage message;
  unsigned attempts = 0;
  std::string why;
};

// What publish() is waiting for.
enum class Await { none, pending, confirmed, failed };

}  // namespace

struct Publisher::Impl {
  Impl(ConnectionOptions connection, PublisherOptions options)
      : connection_options_(std::move(connection)), options_(std::move(options)) {
    options_.window = std::max<std::size_t>(options_.window, 1);
    connect();
  }

  void report(LogLevel level, const std::string& what) const noexcept {
    if (options_.logger != nullptr) options_.logger->log(level, what);
    if (!options_.on_error) return;
    try {
      options_.on_error(what);
    } catch (...) {  // NOLINT(bugprone-empty-catch): a logger must not break publishing
    }
  }

  void connect() {
    chan_ = std::make_unique<detail::ConfirmChannel>(connection_options_);
    if (connected_once_) ++stats_.reconnects;
    connected_once_ = true;
  }

  void drop() noexcept {
    if (chan_) chan_->connection().mark_broken();
    chan_.reset();
  }

  std::chrono::milliseconds backoff_for(unsigned n) const {
    return adapters::backoff(options_.reconnect_backoff, options_.max_reconnect_backoff, n);
  }

  static std::string_view id_of(const Pending& p) { return {p.id_text.data(), p.id_text.size()}; }

  // basic.publish of one pending message on the current channel. Throws ConnectionError.
  void publish_one(Pending& p) {
    headers_.clear();
    headers_.add(options_.biz_id_header, p.message.biz_id);
    for (const auto& [name, value] : p.message.headers) headers_.add(name, value);
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_HEADERS_FLAG;
    props.message_id = bytes(id_of(p));
    props.headers = headers_.get();
    if (options_.persistent) {
      props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
      props.delivery_mode = 2;
    }
    if (!p.message.content_type.empty()) {
      props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
      props.content_type = bytes(p.message.content_type);
    }
    if (p.message.correlation_id) {
      props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
      props.correlation_id = bytes(*p.message.correlation_id);
    }
    p.seq = chan_->publish(p.message.exchange, p.message.routing_key, false, props, p.message.body);
    p.sent = Clock::now();
    ++stats_.published;
    if (p.attempts > 1) ++stats_.republished;
  }

  void give_up(Pending&& p, const std::string& why) {
    report(LogLevel::error, "rabbitmq publisher: message " + std::string(id_of(p)) +
                                " unconfirmed after " + std::to_string(p.attempts) +
                                " attempts (max_attempts): " + why);
    ++stats_.failed;
    if (awaited_ && *awaited_ == *p.message.inner_id) {
      await_ = Await::failed;
      last_attempts_ = p.attempts;
      awaited_failure_ = why;
      return;  // publish() throws it; not kept for take_failed()
    }
    failed_.push_back({std::move(p.message), p.attempts, why});
  }

  // Gives up the pending messages whose last allowed attempt just failed.
  void give_up_exhausted(const std::string& why) {
    if (options_.max_attempts == 0) return;
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->attempts >= options_.max_attempts) {
        Pending p = std::move(*it);
        it = pending_.erase(it);
        give_up(std::move(p), why);
      } else {
        ++it;
      }
    }
  }

  // The connection is gone or a confirm is missing: every pending message's attempt failed.
  // Reconnects with backoff and publishes them all again, in order, with the same message_id;
  // each round is one more attempt of each.
  void recover(std::string why) {
    drop();
    for (unsigned round = 1;; ++round) {
      give_up_exhausted(why);
      if (pending_.empty()) return;
      report(LogLevel::warning,
             "rabbitmq publisher: " + std::to_string(pending_.size()) +
                 " message(s) unconfirmed: " + why +
                 "; reconnecting to publish them again with the same message_id");
      std::this_thread::sleep_for(backoff_for(round));
      for (Pending& p : pending_) ++p.attempts;
      try {
        connect();
        for (Pending& p : pending_) publish_one(p);
        return;
      } catch (const std::exception& e) {
        why = e.what();
        drop();
      }
    }
  }

  void confirmed(Pending&& p) {
    ++stats_.confirmed;
    if (awaited_ && *awaited_ == *p.message.inner_id) {
      await_ = Await::confirmed;
      last_attempts_ = p.attempts;
    }
    if (options_.on_confirm) options_.on_confirm(*p.message.inner_id);
  }

  // The pending message published with sequence number seq on this channel, or end().
  std::deque<Pending>::iterator find(std::uint64_t seq) {
    auto it = std::lower_bound(pending_.begin(), pending_.end(), seq,
                               [](const Pending& p, std::uint64_t s) { return p.seq < s; });
    return it != pending_.end() && it->seq == seq ? it : pending_.end();
  }

  // Applies a basic.ack or basic.nack of tag (and below when multiple).
  void settle(std::uint64_t tag, bool multiple, bool ack) {
    if (ack && !options_.lose_confirm) {  // the common case, without copies
      if (multiple) {
        while (!pending_.empty() && pending_.front().seq <= tag) {
          confirmed(std::move(pending_.front()));
          pending_.pop_front();
        }
      } else if (auto it = find(tag); it != pending_.end()) {
        confirmed(std::move(*it));
        pending_.erase(it);
      }
      return;
    }
    std::vector<Pending> settled;
    if (multiple) {
      while (!pending_.empty() && pending_.front().seq <= tag) {
        settled.push_back(std::move(pending_.front()));
        pending_.pop_front();
      }
    } else {
      auto it = find(tag);
      if (it == pending_.end()) return;
      settled.push_back(std::move(*it));
      pending_.erase(it);
    }
    if (ack) {
      std::vector<Pending> lost;
      for (Pending& p : settled) {
        if (options_.lose_confirm && options_.lose_confirm(*p.message.inner_id, p.attempts)) {
          lost.push_back(std::move(p));
        } else {
          confirmed(std::move(p));
        }
      }
      if (lost.empty()) return;
      // Lost confirms have the lowest sequence numbers: back at the front, in order.
      for (auto it = lost.rbegin(); it != lost.rend(); ++it) pending_.push_front(std::move(*it));
      recover("no confirm (lose_confirm)");
      return;
    }
    // Nacked: the broker could not take them; publish them again on this channel.
    const std::string why = "the broker nacked it (basic.nack)";
    const std::size_t first_again = pending_.size();
    for (Pending& p : settled) {
      if (options_.max_attempts != 0 && p.attempts >= options_.max_attempts) {
        give_up(std::move(p), why);
        continue;
      }
      report(LogLevel::warning, "rabbitmq publisher: message " + std::string(id_of(p)) +
                                    " attempt " + std::to_string(p.attempts) +
                                    " unconfirmed: " + why + "; publishing it again");
      pending_.push_back(std::move(p));
    }
    if (!chan_) {
      recover("not connected");
      return;
    }
    try {
      for (std::size_t i = first_again; i < pending_.size(); ++i) {
        ++pending_[i].attempts;
        publish_one(pending_[i]);
      }
    } catch (const std::exception& e) {
      recover(e.what());
    }
  }

  // Reads one confirm (or recovers from a missing one). Returns after at most confirm_timeout.
  void wait_some() {
    if (pending_.empty()) return;
    if (!chan_) {
      recover("not connected");
      return;
    }
    const Clock::time_point deadline = pending_.front().sent + options_.confirm_timeout;
    const detail::ConfirmChannel::Event event = chan_->next(deadline);
    using Kind = detail::ConfirmChannel::EventKind;
    switch (event.kind) {
      case Kind::ack:
        settle(event.tag, event.multiple, true);
        break;
      case Kind::nack:
        settle(event.tag, event.multiple, false);
        break;
      case Kind::returned:  // not mandatory: cannot happen; its ack follows anyway
        break;
      case Kind::timeout:
        recover("no confirm within confirm_timeout (" +
                std::to_string(options_.confirm_timeout.count()) + " ms) on " +
                chan_->connection().where());
        break;
      case Kind::broken:
        recover(event.detail);
        break;
    }
  }

  InnerMsgId send(OutgoingMessage& m) {
    if (!m.inner_id) m.inner_id = ids_.next();
    const InnerMsgId id = *m.inner_id;
    while (pending_.size() >= options_.window) wait_some();
    Pending& p = pending_.emplace_back();
    p.message = std::move(m);
    id.write_to(p.id_text.data());
    p.attempts = 1;
    try {
      // No channel only after every pending message was given up: p is alone.
      if (!chan_) connect();
      publish_one(p);
    } catch (const std::exception& e) {
      recover(e.what());
    }
    return id;
  }

  InnerMsgId publish(OutgoingMessage& m) {
    if (!m.inner_id) m.inner_id = ids_.next();
    const InnerMsgId id = *m.inner_id;
    awaited_ = id;
    await_ = Await::pending;
    last_attempts_ = 0;
    send(m);
    while (await_ == Await::pending && !pending_.empty()) wait_some();
    const Await result = await_;
    awaited_.reset();
    await_ = Await::none;
    if (result != Await::confirmed) {
      std::array<char, 36> text{};
      id.write_to(text.data());
      throw RabbitError("message " + std::string(text.data(), text.size()) + " unconfirmed after " +
                            std::to_string(last_attempts_) + " attempts: " + awaited_failure_,
                        -1);
    }
    return id;
  }

  void flush() {
    while (!pending_.empty()) wait_some();
    if (failed_.empty()) return;
    const Failed& first = failed_.front();
    std::array<char, 36> text{};
    first.message.inner_id->write_to(text.data());
    throw RabbitError(std::to_string(failed_.size()) +
                          " message(s) given up after max_attempts unconfirmed attempts, "
                          "first " +
                          std::string(text.data(), text.size()) + " after " +
                          std::to_string(first.attempts) + ": " + first.why +
                          " (take_failed() returns them)",
                      -1);
  }

  ConnectionOptions connection_options_;
  PublisherOptions options_;
  InnerMsgIdGenerator ids_;
  std::unique_ptr<detail::ConfirmChannel> chan_;
  std::deque<Pending> pending_;
  std::vector<Failed> failed_;
  detail::Table headers_;  // reused per publish
  PublisherStats stats_{};
  std::optional<InnerMsgId> awaited_;
  Await await_ = Await::none;
  std::string awaited_failure_;
  unsigned last_attempts_ = 0;
  bool connected_once_ = false;
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
  return impl_->last_attempts_;
}

InnerMsgId Publisher::send(OutgoingMessage message) {
  return impl_->send(message);
}

void Publisher::flush() {
  impl_->flush();
}

std::size_t Publisher::unconfirmed() const noexcept {
  return impl_->pending_.size();
}

std::vector<OutgoingMessage> Publisher::take_failed() {
  std::vector<OutgoingMessage> out;
  out.reserve(impl_->failed_.size());
  for (Failed& f : impl_->failed_) out.push_back(std::move(f.message));
  impl_->failed_.clear();
  return out;
}

PublisherStats Publisher::stats() const noexcept {
  return impl_->stats_;
}

}  // namespace idem::rabbitmq
