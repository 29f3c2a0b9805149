#pragma once
// The card purchase as three services around a transactional outbox, shared by
// examples/outbox_card_purchase.cpp (which runs them as processes and prints what to check)
// and tests/test_outbox_card_purchase.cpp (which SIGKILLs them at random):
//
//   payment service -- charges a payment and writes "payment charged" to the outbox in ONE
//                      SQLite transaction (payments.db)
//   relay           -- publishes the outbox to Kafka or RabbitMQ with the row's inner id and
//                      the payment id as biz-id, marks rows sent after the broker's confirm
//   card service    -- consumes through idem with an SQLite inbox (cards.db): one card per
//                      payment, however many copies arrive
//
// Each service is restartable at any point: it picks up where the committed state says.

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>

#include "idem/idem.hpp"
#include "idem/kafka.hpp"
#include "idem/outbox/kafka_outbox_sink.hpp"
#include "idem/outbox/rabbitmq_outbox_sink.hpp"
#include "idem/outbox/sqlite_outbox.hpp"
#include "idem/rabbitmq.hpp"
#include "idem/sqlite.hpp"

namespace card_purchase {

/// Kafka topic, or RabbitMQ queue (on the default exchange), of "payment charged".
inline constexpr const char* kDestination = "payment-charged";

/// Where the broker is: kafka_bootstrap set for Kafka, else RabbitMQ on host:rabbitmq_port.
struct Broker {
  std::string kafka_bootstrap{};
  std::string host = "127.0.0.1";
  int rabbitmq_port = 5672;
  bool kafka() const { return !kafka_bootstrap.empty(); }
};

/// "kafka=BOOTSTRAP" or "rabbitmq=HOST:PORT".
inline Broker parse_broker(const std::string& text) {
  Broker broker;
  if (text.rfind("kafka=", 0) == 0) {
    broker.kafka_bootstrap = text.substr(6);
  } else if (text.rfind("rabbitmq=", 0) == 0) {
    const std::string hostport = text.substr(9);
    const auto colon = hostport.rfind(':');
    broker.host = hostport.substr(0, colon);
    if (colon != std::string::npos) broker.rabbitmq_port = std::stoi(hostport.substr(colon + 1));
  } else {
    throw std::invalid_argument("broker \"" + text +
                                "\": write kafka=BOOTSTRAP or rabbitmq=HOST:PORT");
  }
  return broker;
}

/// The RabbitMQ side of the notifications: a durable direct exchange kDestination bound (with
/// routing key kDestination) to the queue kDestination and its dead-letter queue. Idempotent;
/// both the relay and the card service call it, so whichever starts first creates them (a
/// message published where nothing is bound would be dropped).
inline idem::rabbitmq::DeadLetterTopology declare_queue(const Broker& broker) {
  auto topology = idem::rabbitmq::declare_queue_with_dead_letters(
      {.host = broker.host, .port = broker.rabbitmq_port}, kDestination);
  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t* socket = amqp_tcp_socket_new(conn);
  bool ok = socket != nullptr &&
            amqp_socket_open(socket, broker.host.c_str(), broker.rabbitmq_port) == AMQP_STATUS_OK;
  ok = ok &&
       amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type ==
           AMQP_RESPONSE_NORMAL;
  ok = ok && amqp_channel_open(conn, 1) != nullptr;
  const amqp_bytes_t name = amqp_cstring_bytes(kDestination);
  ok = ok && amqp_exchange_declare(conn, 1, name, amqp_cstring_bytes("direct"), 0, 1, 0, 0,
                                   amqp_empty_table) != nullptr;
  ok = ok && amqp_queue_bind(conn, 1, name, name, name, amqp_empty_table) != nullptr;
  amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
  amqp_destroy_connection(conn);
  if (!ok) throw std::runtime_error("cannot declare the exchange " + std::string(kDestination));
  return topology;
}

inline std::string payment_id(int i) {
  return "pay-" + std::to_string(i);
}

// A raw SQLite connection (the payment service is a plain application, not an idem consumer).
class Db {
 public:
  explicit Db(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) throw std::runtime_error("open " + path);
    sqlite3_busy_timeout(db_, 10'000);
    exec("PRAGMA journal_mode=WAL");
  }
  ~Db() { sqlite3_close(db_); }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      const std::string what = sql + ": " + (err != nullptr ? err : "?");
      sqlite3_free(err);
      throw std::runtime_error(what);
    }
  }
  // The first column of the first row; -1 when there is none (or no such table).
  std::int64_t scalar(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    std::int64_t v = -1;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) == SQLITE_OK &&
        sqlite3_step(s) == SQLITE_ROW) {
      v = sqlite3_column_int64(s, 0);
    }
    sqlite3_finalize(s);
    return v;
  }
  sqlite3* get() const { return db_; }

 private:
  sqlite3* db_ = nullptr;
};

// Says "I have started working" once, by one byte on fd (the test kills after it).
inline void tell(int fd, bool& told) {
  if (fd >= 0 && !told) {
    told = (::write(fd, "x", 1) == 1);
  }
}

/// The payment service: payments 0..count-1. A payment request is recorded first (its own
/// commit, like an API log); then, if not yet charged, the charge and its notification
/// commit together. Restartable: requests already charged are skipped.
inline int run_payment_service(const std::string& db_path, int count, int notify_fd = -1,
                               std::chrono::microseconds pause = std::chrono::microseconds{0}) {
  Db db(db_path);
  db.exec("CREATE TABLE IF NOT EXISTS payments(id TEXT PRIMARY KEY)");
  db.exec("CREATE TABLE IF NOT EXISTS charges(id TEXT PRIMARY KEY, amount_cents INTEGER)");
  idem::SqliteOutbox outbox(db_path);
  bool told = false;
  for (int i = 0; i < count; ++i) {
    const std::string id = payment_id(i);
    db.exec("INSERT OR IGNORE INTO payments(id) VALUES('" + id + "')");
    db.exec("BEGIN IMMEDIATE");
    if (db.scalar("SELECT count(*) FROM charges WHERE id = '" + id + "'") == 0) {
      db.exec("INSERT INTO charges(id, amount_cents) VALUES('" + id + "', 4900)");
      outbox.add(db.get(), {.destination = card_purchase::kDestination,
                            .routing_key = card_purchase::kDestination,
                            .key = id,
                            .payload = "{\"payment\":\"" + id + "\",\"amount_cents\":4900}",
                            .headers = {{"content-type", "application/json"}}});
    }
    db.exec("COMMIT");
    tell(notify_fd, told);
    if (pause.count() > 0) std::this_thread::sleep_for(pause);
  }
  return 0;
}

/// The relay. Exits 0 once `expect` rows are marked sent (never purged here, so the count is
/// the total). holder names the lease: a restarted relay with the same name takes its lease
/// back at once; another name waits for it to expire.
inline int run_relay(const std::string& db_path, const Broker& broker, std::int64_t expect,
                     const std::string& holder = "relay", int notify_fd = -1,
                     std::size_t batch_size = 64) {
  idem::SqliteOutboxSource source(db_path);
  std::unique_ptr<idem::OutboxSink> sink;
  if (broker.kafka()) {
    sink = std::make_unique<idem::kafka::OutboxSink>(
        idem::kafka::Config{
            {"bootstrap.servers", broker.kafka_bootstrap}, {"linger.ms", "1"}, {"log_level", "0"}},
        idem::kafka::OutboxSinkOptions{.producer = {}, .batch_timeout = std::chrono::seconds{5}});
  } else {
    declare_queue(broker);
    sink = std::make_unique<idem::rabbitmq::OutboxSink>(
        idem::rabbitmq::ConnectionOptions{.host = broker.host, .port = broker.rabbitmq_port},
        idem::rabbitmq::PublisherOptions{.confirm_timeout = std::chrono::seconds{2},
                                         .max_attempts = 2});
  }
  idem::OutboxRelay relay(source, *sink,
                          {.holder = holder,
                           .lease = std::chrono::seconds{10},
                           .batch_size = batch_size,
                           .idle_wait = std::chrono::milliseconds{10},
                           .backoff = std::chrono::milliseconds{50},
                           .max_backoff = std::chrono::milliseconds{500}});
  Db db(db_path);
  bool told = false;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds{120};
  while (std::chrono::steady_clock::now() < give_up) {
    const idem::OutboxRelayStep step = relay.run_once();
    if (step.published > 0) tell(notify_fd, told);
    if (db.scalar("SELECT count(*) FROM idem_outbox WHERE sent_ms IS NOT NULL") >= expect) {
      return 0;
    }
    if (step.failed)
      std::this_thread::sleep_for(std::chrono::milliseconds{50});
    else if (step.published == 0)
      std::this_thread::sleep_for(std::chrono::milliseconds{10});
  }
  std::fprintf(stderr, "relay: fewer than %lld rows sent within 120 s\n",
               static_cast<long long>(expect));
  return 3;
}

/// The card service: one card per payment through an SQLite inbox. Appends one line per
/// delivery to deliveries_path (what came in, duplicates included). Exits 0 once `expect`
/// cards exist. group names the Kafka consumer group (offsets live in the inbox anyway).
inline int run_card_service(const std::string& db_path, const Broker& broker, std::int64_t expect,
                            const std::string& deliveries_path, const std::string& group,
                            int notify_fd = -1) {
  idem::SqliteStore store(db_path);
  store.transaction([](idem::SqliteTx& tx) {
    tx.exec("CREATE TABLE IF NOT EXISTS cards(payment BLOB NOT NULL, inner_id TEXT NOT NULL)");
  });
  idem::IdempotentConsumer issue_card(store, [](const idem::Message& m, idem::SqliteTx& tx) {
    tx.exec("INSERT INTO cards(payment, inner_id) VALUES(?1, ?2)", idem::SqliteBlob{m.key},
            m.inner_id);
  });
  const int deliveries = ::open(deliveries_path.c_str(), O_WRONLY | O_APPEND | O_CREAT, 0644);
  auto record = [deliveries](const idem::Result& r) {
    const char* line = r.outcome == idem::Outcome::processed   ? "processed\n"
                       : r.outcome == idem::Outcome::duplicate ? "duplicate\n"
                                                               : "other\n";
    (void)!::write(deliveries, line, std::char_traits<char>::length(line));
  };
  auto cards = [&] {
    std::int64_t n = 0;
    store.transaction(
        [&](idem::SqliteTx& tx) { n = tx.query_int64("SELECT count(*) FROM cards").value_or(0); });
    return n;
  };
  bool told = false;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds{120};
  auto loop = [&](auto& consumer) {
    while (std::chrono::steady_clock::now() < give_up) {
      if (consumer.poll(std::chrono::milliseconds{50}) > 0) tell(notify_fd, told);
      if (cards() >= expect) return 0;
    }
    std::fprintf(stderr, "card service: fewer than %lld cards within 120 s\n",
                 static_cast<long long>(expect));
    return 3;
  };
  int code = 0;
  if (broker.kafka()) {
    idem::kafka::ConsumerOptions options{
        .topics = {kDestination}, .batch_size = 32, .offsets_in_store = true};
    options.on_result = [&](const idem::kafka::Record&, const idem::Result& r) { record(r); };
    idem::kafka::Consumer consumer({{"bootstrap.servers", broker.kafka_bootstrap},
                                    {"group.id", group},
                                    {"auto.offset.reset", "earliest"},
                                    {"fetch.wait.max.ms", "10"},
                                    {"log_level", "0"}},
                                   issue_card, options);
    code = loop(consumer);
    consumer.close();
  } else {
    const auto topology = declare_queue(broker);
    idem::rabbitmq::ConsumerOptions options{.queue = topology.queue,
                                            .declare_queue = false,
                                            .dead_letter_exchange = topology.dead_letter_exchange};
    options.on_result = [&](const idem::rabbitmq::Delivery&, const idem::Result& r) { record(r); };
    idem::rabbitmq::Consumer consumer({.host = broker.host, .port = broker.rabbitmq_port},
                                      issue_card, options);
    code = loop(consumer);
  }
  ::close(deliveries);
  return code;
}

/// What a person checks after a run.
struct Report {
  std::int64_t payments = 0, charges = 0, outbox_rows = 0, published = 0;
  std::int64_t deliveries = 0, duplicates_dropped = 0, cards = 0, distinct_cards = 0;
  bool ok() const {
    return payments == charges && charges == cards && cards == distinct_cards &&
           published == charges;
  }
};

inline Report read_report(const std::string& payments_db, const std::string& cards_db,
                          const std::string& deliveries_path) {
  Report r;
  Db p(payments_db);
  r.payments = p.scalar("SELECT count(*) FROM payments");
  r.charges = p.scalar("SELECT count(*) FROM charges");
  r.outbox_rows = p.scalar("SELECT count(*) FROM idem_outbox");
  r.published = p.scalar("SELECT count(*) FROM idem_outbox WHERE sent_ms IS NOT NULL");
  Db c(cards_db);
  r.cards = c.scalar("SELECT count(*) FROM cards");
  r.distinct_cards = c.scalar("SELECT count(DISTINCT payment) FROM cards");
  if (std::FILE* f = std::fopen(deliveries_path.c_str(), "r")) {
    char line[32];
    while (std::fgets(line, sizeof line, f) != nullptr) {
      ++r.deliveries;
      if (std::string(line) == "duplicate\n") ++r.duplicates_dropped;
    }
    std::fclose(f);
  }
  return r;
}

inline void print_report(const Report& r, std::FILE* out = stdout) {
  std::fprintf(out,
               "payments %lld, charges %lld, notifications in the outbox %lld (published and "
               "confirmed %lld), copies delivered to the card service %lld (duplicates dropped "
               "%lld), cards %lld (distinct payments %lld): %s\n",
               static_cast<long long>(r.payments), static_cast<long long>(r.charges),
               static_cast<long long>(r.outbox_rows), static_cast<long long>(r.published),
               static_cast<long long>(r.deliveries), static_cast<long long>(r.duplicates_dropped),
               static_cast<long long>(r.cards), static_cast<long long>(r.distinct_cards),
               r.ok() ? "OK, one card per payment" : "MISMATCH");
}

}  // namespace card_purchase
