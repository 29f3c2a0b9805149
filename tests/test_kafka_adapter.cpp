// The Kafka adapter against librdkafka's in-process mock cluster: no broker needed.

#include <gtest/gtest.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "idem/kafka.hpp"
#include "idem/prometheus_metrics.hpp"
#include "idem/sqlite.hpp"
#include "support/temp_dir.hpp"
#include "support/tsan_c11_threads.hpp"

namespace {

using namespace std::chrono_literals;
using idem::kafka::Config;

struct HandleDeleter {
  void operator()(rd_kafka_t* rk) const noexcept { rd_kafka_destroy(rk); }
};
struct MockDeleter {
  void operator()(rd_kafka_mock_cluster_t* m) const noexcept { rd_kafka_mock_cluster_destroy(m); }
};

constexpr std::int16_t produce_api_key = 0;  // RD_KAFKAP_Produce (rdkafka_protocol.h is private)

// One mock cluster per test; the rd_kafka_t it needs for bookkeeping is a bare producer.
class MockCluster {
 public:
  explicit MockCluster(int brokers = 1) {
    std::array<char, 256> err{};
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "0", err.data(), err.size());
    owner_.reset(rd_kafka_new(RD_KAFKA_PRODUCER, conf, err.data(), err.size()));
    if (!owner_) throw std::runtime_error(err.data());
    cluster_.reset(rd_kafka_mock_cluster_new(owner_.get(), brokers));
    if (!cluster_) throw std::runtime_error("rd_kafka_mock_cluster_new failed");
  }
  ~MockCluster() { cluster_.reset(); }

  void create_topic(const std::string& topic, int partitions) {
    ASSERT_EQ(rd_kafka_mock_topic_create(cluster_.get(), topic.c_str(), partitions, 1),
              RD_KAFKA_RESP_ERR_NO_ERROR);
  }
  std::string bootstraps() const { return rd_kafka_mock_cluster_bootstraps(cluster_.get()); }
  rd_kafka_mock_cluster_t* get() const { return cluster_.get(); }

  Config producer_config() const {
    return {{"bootstrap.servers", bootstraps()}, {"linger.ms", "1"}, {"log_level", "0"}};
  }
  // Tight timeouts so joins, rebalances and takeovers finish in about a second.
  Config consumer_config(const std::string& group) const {
    Config config{{"bootstrap.servers", bootstraps()},
                  {"group.id", group},
                  {"auto.offset.reset", "earliest"},
                  {"session.timeout.ms", "4000"},
                  {"heartbeat.interval.ms", "100"},
                  {"fetch.wait.max.ms", "10"},
                  {"topic.metadata.refresh.interval.ms", "500"},
                  {"log_level", debug() ? "7" : "0"}};
    if (debug()) config["debug"] = debug();
    return config;
  }
  // IDEM_KAFKA_DEBUG=cgrp,fetch turns librdkafka's debug log on for a failing test.
  static const char* debug() { return std::getenv("IDEM_KAFKA_DEBUG"); }

 private:
  std::unique_ptr<rd_kafka_t, HandleDeleter> owner_;
  std::unique_ptr<rd_kafka_mock_cluster_t, MockDeleter> cluster_;
};

// What the handlers did, safe to share between consumer threads.
struct Effects {
  void add(std::string_view key) {
    std::lock_guard lock(mutex);
    ++count[std::string(key)];
    order.emplace_back(key);
  }
  std::size_t distinct() const {
    std::lock_guard lock(mutex);
    return count.size();
  }
  std::size_t total() const {
    std::lock_guard lock(mutex);
    return order.size();
  }
  mutable std::mutex mutex;
  std::map<std::string, int> count;
  std::vector<std::string> order;
};

void produce(MockCluster& cluster, const std::string& topic, int n, const std::string& prefix,
             std::int32_t partition = -1) {
  idem::kafka::Producer producer(cluster.producer_config());
  for (int i = 0; i < n; ++i) {
    producer.send({.topic = topic,
                   .biz_id = prefix + std::to_string(i),
                   .payload = "payload-" + std::to_string(i),
                   .partition = partition});
  }
  ASSERT_TRUE(producer.flush(10s));
}

// Polls every consumer until pred holds; false on timeout (generous: sanitizer runs beside
// other tests are slow, and a passing test returns as soon as pred holds).
bool poll_until(const std::function<bool()>& pred,
                std::initializer_list<idem::kafka::Consumer*> consumers,
                std::chrono::milliseconds timeout = 45s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    for (idem::kafka::Consumer* c : consumers) c->poll(20ms);
  }
  return true;
}

// The committed offset of topic/partition for group, read through a fresh client.
std::int64_t committed_offset(MockCluster& cluster, const std::string& group,
                              const std::string& topic, std::int32_t partition) {
  std::array<char, 256> err{};
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "bootstrap.servers", cluster.bootstraps().c_str(), err.data(),
                    err.size());
  rd_kafka_conf_set(conf, "group.id", group.c_str(), err.data(), err.size());
  std::unique_ptr<rd_kafka_t, HandleDeleter> rk(
      rd_kafka_new(RD_KAFKA_CONSUMER, conf, err.data(), err.size()));
  rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(list, topic.c_str(), partition);
  std::int64_t offset = -2;
  if (rd_kafka_committed(rk.get(), list, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
    offset = list->elems[0].offset;
  }
  rd_kafka_topic_partition_list_destroy(list);
  rd_kafka_consumer_close(rk.get());
  return offset;
}

// Headers of the first n records of partition 0 of topic, read without a consumer group.
std::vector<std::map<std::string, std::string>> read_headers(MockCluster& cluster,
                                                             const std::string& topic, int n) {
  std::array<char, 256> err{};
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "bootstrap.servers", cluster.bootstraps().c_str(), err.data(),
                    err.size());
  rd_kafka_conf_set(conf, "fetch.wait.max.ms", "10", err.data(), err.size());
  rd_kafka_conf_set(conf, "group.id", "reader", err.data(), err.size());  // assign() only: no join
  std::unique_ptr<rd_kafka_t, HandleDeleter> rk(
      rd_kafka_new(RD_KAFKA_CONSUMER, conf, err.data(), err.size()));
  rd_kafka_poll_set_consumer(rk.get());
  rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(list, topic.c_str(), 0)->offset = RD_KAFKA_OFFSET_BEGINNING;
  rd_kafka_assign(rk.get(), list);
  rd_kafka_topic_partition_list_destroy(list);
  std::vector<std::map<std::string, std::string>> out;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (static_cast<int>(out.size()) < n && std::chrono::steady_clock::now() < deadline) {
    rd_kafka_message_t* m = rd_kafka_consumer_poll(rk.get(), 100);
    if (m == nullptr) continue;
    rd_kafka_headers_t* headers = nullptr;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR && rd_kafka_message_headers(m, &headers) == 0) {
      auto& row = out.emplace_back();
      const char* name = nullptr;
      const void* value = nullptr;
      std::size_t size = 0;
      for (std::size_t i = 0; rd_kafka_header_get_all(headers, i, &name, &value, &size) == 0; ++i) {
        row[name] = value ? std::string(static_cast<const char*>(value), size) : "";
      }
    }
    rd_kafka_message_destroy(m);
  }
  rd_kafka_consumer_close(rk.get());
  return out;
}

idem::kafka::ConsumerOptions options_for(std::string topic) {
  return {.topics = {std::move(topic)},
          .retry_backoff = 20ms,
          .max_retry_backoff = 200ms,
          .on_error = [](std::string_view e) {
            std::fprintf(stderr, "kafka adapter: %.*s\n", static_cast<int>(e.size()), e.data());
          }};
}

// --- Child processes ----------------------------------------------------------------------------
// The SIGKILL test runs consumers as this binary re-executed with IDEM_KAFKA_CHILD set (the
// mock cluster stays in the parent; children reach it over loopback TCP). The static
// initializer below runs the child's work and _exits before GoogleTest starts.

constexpr int kCrashRecords = 10'000;

// A consumer over an SQLite inbox with offsets in the store. Writes one byte to stdout once
// it has handled records (the parent kills it after that), appends a line to the file in
// IDEM_KAFKA_DUPS for every duplicate it meets, and exits 0 when every record is in.
int crash_child() {
  const std::string db = std::getenv("IDEM_KAFKA_DB");
  const int dups = ::open(std::getenv("IDEM_KAFKA_DUPS"), O_WRONLY | O_APPEND | O_CREAT, 0644);
  idem::SqliteStore store(db, {.synchronous = idem::SqliteSync::normal});
  store.transaction([](idem::SqliteTx& tx) {
    tx.exec("CREATE TABLE IF NOT EXISTS effects(key BLOB NOT NULL, offset_at INTEGER NOT NULL)");
  });
  idem::IdempotentConsumer idem_consumer(store, [](const idem::Message& m, idem::SqliteTx& tx) {
    tx.exec("INSERT INTO effects(key, offset_at) VALUES(?1, ?2)", idem::SqliteBlob{m.key},
            m.source.offset);
    std::this_thread::sleep_for(200us);  // slow enough that every child is killed mid-stream
  });
  idem::kafka::Config config{{"bootstrap.servers", std::getenv("IDEM_KAFKA_CHILD")},
                             {"group.id", std::getenv("IDEM_KAFKA_GROUP")},
                             {"auto.offset.reset", "earliest"},
                             {"fetch.wait.max.ms", "10"},
                             {"log_level", "0"}};
  idem::kafka::ConsumerOptions options{
      .topics = {"crash"}, .batch_size = 25, .offsets_in_store = true};
  options.on_result = [&](const idem::kafka::Record&, const idem::Result& r) {
    if (r.outcome == idem::Outcome::duplicate) (void)!::write(dups, "dup\n", 4);
  };
  idem::kafka::Consumer consumer(config, idem_consumer, options);
  bool told = false;
  const auto give_up = std::chrono::steady_clock::now() + 120s;
  while (std::chrono::steady_clock::now() < give_up) {
    if (consumer.poll(50ms) > 0 && !told) {
      (void)!::write(STDOUT_FILENO, "x", 1);
      told = true;
    }
    std::int64_t done = 0;
    store.transaction([&](idem::SqliteTx& tx) {
      done = tx.query_int64("SELECT count(*) FROM effects").value_or(0);
    });
    if (done >= kCrashRecords) {
      consumer.close();
      return 0;
    }
  }
  std::fprintf(stderr, "kafka child: the stream did not complete within 120 s\n");
  return 3;
}

const bool kIsChild = [] {
  if (std::getenv("IDEM_KAFKA_CHILD") == nullptr) return false;
  int code = 1;
  try {
    code = crash_child();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kafka child: %s\n", e.what());
    code = 2;
  }
  std::fflush(nullptr);
  ::_exit(code);
}();

// Re-executes this binary with env added; its stdout goes to *out_fd (read end). The
// environment is built before fork(): only async-signal-safe calls happen in the child.
pid_t spawn_child(const std::map<std::string, std::string>& env, int* out_fd) {
  std::vector<std::string> entries;
  for (char** e = environ; *e != nullptr; ++e) entries.emplace_back(*e);
  for (const auto& [name, value] : env) entries.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (std::string& entry : entries) envp.push_back(entry.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    ::execve(exe, argv, envp.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  *out_fd = fds[0];
  return pid;
}

int wait_exit_code(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(KafkaAdapter, OffsetReplayAfterCrashDoesNotRepeatEffects) {
  MockCluster cluster;
  cluster.create_topic("replay", 1);
  produce(cluster, "replay", 20, "order-");
  idem::MemoryStore store;  // survives the "crash", as a SQLite or Redis store would
  Effects effects;
  idem::IdempotentConsumer idem_consumer(store,
                                         [&](const idem::Message& m) { effects.add(m.key); });

  auto options = options_for("replay");
  options.commit_interval = std::chrono::hours{1};  // nothing is committed before the crash
  {
    idem::kafka::Consumer first(cluster.consumer_config("replay-group"), idem_consumer, options);
    ASSERT_TRUE(poll_until([&] { return effects.total() == 20; }, {&first}));
    first.abandon();  // crash: no commit, no LeaveGroup
  }
  EXPECT_EQ(committed_offset(cluster, "replay-group", "replay", 0), RD_KAFKA_OFFSET_INVALID);

  std::atomic<int> duplicates{0};
  options.on_result = [&](const idem::kafka::Record&, const idem::Result& r) {
    if (r.outcome == idem::Outcome::duplicate) ++duplicates;
  };
  idem::kafka::Consumer second(cluster.consumer_config("replay-group"), idem_consumer, options);
  ASSERT_TRUE(poll_until([&] { return duplicates == 20; }, {&second}));
  second.close();
  EXPECT_EQ(effects.total(), 20u);
  EXPECT_EQ(effects.distinct(), 20u);
  EXPECT_EQ(committed_offset(cluster, "replay-group", "replay", 0), 20);
}

TEST(KafkaAdapter, GroupOfTwoWithRebalanceLosesAndDuplicatesNothing) {
  MockCluster cluster;
  cluster.create_topic("orders", 4);
  idem::MemoryStore store;
  Effects effects;
  std::atomic<int> handler_runs{0}, duplicates{0};
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    ++handler_runs;
    effects.add(m.key);
  });
  auto options_for_member = [&](std::atomic<int>& assigns) {
    auto options = options_for("orders");
    options.commit_interval = 50ms;
    options.on_assign = [&](std::span<const idem::kafka::PartitionOffset>) {
      ++assigns;
      return std::vector<idem::kafka::PartitionOffset>{};
    };
    options.on_result = [&](const idem::kafka::Record&, const idem::Result& r) {
      if (r.outcome == idem::Outcome::duplicate) ++duplicates;
    };
    return options;
  };
  std::atomic<int> assigns1{0}, assigns2{0};
  idem::kafka::Consumer first(cluster.consumer_config("orders-group"), idem_consumer,
                              options_for_member(assigns1));
  produce(cluster, "orders", 100, "first-");
  ASSERT_TRUE(poll_until([&] { return effects.total() == 100; }, {&first}));

  idem::kafka::Consumer second(cluster.consumer_config("orders-group"), idem_consumer,
                               options_for_member(assigns2));
  ASSERT_TRUE(poll_until([&] { return assigns2 > 0 && assigns1 > 1; }, {&first, &second}));
  const auto second_before = second.stats().records;
  produce(cluster, "orders", 100, "second-");
  ASSERT_TRUE(poll_until([&] { return effects.total() == 200; }, {&first, &second}));
  // Let any stray redelivery show up.
  for (int i = 0; i < 10; ++i) {
    first.poll(10ms);
    second.poll(10ms);
  }
  EXPECT_GT(second.stats().records, second_before) << "the second member got no partitions";
  EXPECT_EQ(effects.distinct(), 200u);
  EXPECT_EQ(handler_runs, 200);
  // The mock coordinator refuses OffsetCommit while the group rebalances (real brokers accept
  // it from the current generation), so records settled since the last interval commit may be
  // redelivered: they must come back as duplicates, never as second effects.
  RecordProperty("duplicates_after_rebalance", duplicates.load());
}

TEST(KafkaAdapter, ProducerRetriesAndResendsYieldOneEffectPerInnerId) {
  MockCluster cluster;
  cluster.create_topic("payments", 1);
  // Transient errors the idempotent producer retries without duplicating.
  rd_kafka_mock_push_request_errors(
      cluster.get(), produce_api_key, 4, RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
      RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT, RD_KAFKA_RESP_ERR__TRANSPORT,
      RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS);
  std::vector<idem::kafka::Delivery> deliveries;
  Config config = cluster.producer_config();
  config["retry.backoff.ms"] = "10";
  idem::kafka::Producer producer(
      config, {.on_delivery = [&](const idem::kafka::Delivery& d) { deliveries.push_back(d); }});
  std::set<std::string> sent_ids;
  for (int i = 0; i < 30; ++i) {
    sent_ids.insert(producer
                        .send({.topic = "payments",
                               .biz_id = "pay-" + std::to_string(i),
                               .payload = "amount=" + std::to_string(i)})
                        .to_string());
  }
  ASSERT_TRUE(producer.flush(20s));
  ASSERT_EQ(deliveries.size(), 30u);
  for (const auto& d : deliveries) ASSERT_TRUE(d.ok()) << d.error;
  // The application did not hear back in time for ten of them and sends them again: same id.
  for (int i = 0; i < 10; ++i) {
    const idem::kafka::Delivery again = producer.send_and_wait(deliveries[i].message, 10s);
    ASSERT_TRUE(again.ok()) << again.error;
    EXPECT_EQ(again.message.inner_id, deliveries[i].message.inner_id);
  }

  idem::MemoryStore store;
  Effects effects;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    EXPECT_TRUE(idem::InnerMsgId::parse(m.inner_id).has_value());
    effects.add(m.inner_id);
  });
  auto options = options_for("payments");
  options.key_source = idem::kafka::KeySource::header;  // dedup on the producer's InnerMsgId
  options.key_header = std::string(idem::kafka::default_inner_id_header);
  idem::kafka::Consumer consumer(cluster.consumer_config("payments-group"), idem_consumer, options);
  ASSERT_TRUE(poll_until([&] { return consumer.stats().records == 40; }, {&consumer}));
  EXPECT_EQ(effects.total(), 30u);
  std::set<std::string> consumed_ids;
  for (const auto& [id, n] : effects.count) {
    consumed_ids.insert(id);
    EXPECT_EQ(n, 1) << id;
  }
  EXPECT_EQ(consumed_ids, sent_ids);
}

TEST(KafkaAdapter, HandlerFailingTwiceIsRetriedInOrderThenCommitted) {
  MockCluster cluster;
  cluster.create_topic("flaky", 1);
  produce(cluster, "flaky", 3, "k-", 0);  // k-0, k-1, k-2 on one partition
  idem::MemoryStore store;
  Effects effects;
  int k0_calls = 0;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    if (m.key == "k-0" && ++k0_calls <= 2) throw std::runtime_error("downstream timeout");
    effects.add(m.key);
  });
  idem::kafka::Consumer consumer(cluster.consumer_config("flaky-group"), idem_consumer,
                                 options_for("flaky"));
  ASSERT_TRUE(poll_until([&] { return effects.total() == 3; }, {&consumer}));
  consumer.commit();
  EXPECT_EQ(k0_calls, 3);
  EXPECT_EQ(effects.order, (std::vector<std::string>{"k-0", "k-1", "k-2"}));
  EXPECT_EQ(consumer.stats().retries, 2u);
  EXPECT_EQ(committed_offset(cluster, "flaky-group", "flaky", 0), 3);
}

// A store outage and a key in progress elsewhere each hold their record back: both counted as
// retries (a seek back each), the outage said at warning, the in-progress key at debug only.
TEST(KafkaAdapter, HoldsAndInProgressKeysAreLoggedAndCounted) {
  MockCluster cluster;
  cluster.create_topic("holds", 1);
  produce(cluster, "holds", 3, "h-", 0);
  struct Logger final : idem::Logger {
    void log(idem::LogLevel level, std::string_view line) noexcept override {
      std::lock_guard lock(mutex);
      lines.emplace_back(level, std::string(line));
    }
    int count(idem::LogLevel level, std::string_view part) {
      std::lock_guard lock(mutex);
      return static_cast<int>(std::count_if(lines.begin(), lines.end(), [&](const auto& l) {
        return l.first == level && l.second.find(part) != std::string::npos;
      }));
    }
    std::mutex mutex;
    std::vector<std::pair<idem::LogLevel, std::string>> lines;
  } logger;
  idem::PrometheusMetrics metrics;
  auto options = options_for("holds");
  options.logger = &logger;
  options.metrics = &metrics;
  std::map<std::string, int> calls;
  Effects effects;
  idem::kafka::Consumer consumer(
      cluster.consumer_config("holds-group"),
      [&](const idem::Message& m) -> idem::Result {
        const int n = ++calls[std::string(m.key)];
        if (m.key == "h-0" && n == 1) throw idem::StoreUnavailable("redis down");
        if (m.key == "h-1" && n == 1) return {.outcome = idem::Outcome::in_progress};
        effects.add(m.key);
        return {.outcome = idem::Outcome::processed};
      },
      options);
  ASSERT_TRUE(poll_until([&] { return effects.total() == 3; }, {&consumer}));
  consumer.commit();
  EXPECT_EQ(effects.order, (std::vector<std::string>{"h-0", "h-1", "h-2"}));
  using idem::Counter;
  EXPECT_EQ(metrics.value(Counter::retries), 2u);
  EXPECT_EQ(metrics.value(Counter::redeliveries), 2u);
  EXPECT_GE(metrics.value(Counter::commits), 1u);
  EXPECT_EQ(metrics.value(Counter::commit_failures), 0u);
  EXPECT_GE(metrics.value(Counter::rebalances), 1u);
  using idem::LogLevel;
  EXPECT_EQ(logger.count(LogLevel::warning, "record holds/0@0: store unavailable: redis down"), 1);
  EXPECT_EQ(logger.count(LogLevel::debug, "record holds/0@1: key in progress elsewhere"), 1);
  EXPECT_GE(logger.count(LogLevel::info, "partitions assigned"), 1);
}

// Periodic commits are asynchronous: they land through later polls, without commit() or
// close(), and never pass a record that is held back.
TEST(KafkaAdapter, PeriodicAsyncCommitsStopBeforeABlockedRecord) {
  MockCluster cluster;
  cluster.create_topic("periodic", 1);
  produce(cluster, "periodic", 10, "p-", 0);  // p-0 .. p-9 on one partition
  idem::MemoryStore store;
  Effects effects;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    if (m.key == "p-6") throw std::runtime_error("always fails");  // no dead-letter topic
    effects.add(m.key);
  });
  idem::kafka::ConsumerOptions options = options_for("periodic");
  options.commit_interval = 0ms;
  idem::kafka::Consumer consumer(cluster.consumer_config("periodic-group"), idem_consumer,
                                 std::move(options));
  ASSERT_TRUE(poll_until([&] { return effects.total() == 6u && consumer.stats().commits > 0; },
                         {&consumer}));
  // The offset after p-5 is committed by the asynchronous commits alone.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (committed_offset(cluster, "periodic-group", "periodic", 0) != 6 &&
         std::chrono::steady_clock::now() < deadline) {
    consumer.poll(50ms);
  }
  for (int i = 0; i < 10; ++i) consumer.poll(20ms);  // retries of p-6 meanwhile
  EXPECT_EQ(committed_offset(cluster, "periodic-group", "periodic", 0), 6);
  EXPECT_EQ(consumer.stats().acked, 6u);
  EXPECT_EQ(effects.total(), 6u);
  consumer.abandon();  // no closing commit: what is committed came from poll()
  EXPECT_EQ(committed_offset(cluster, "periodic-group", "periodic", 0), 6);
}

TEST(KafkaAdapter, PoisonMessagesGoToTheDeadLetterTopic) {
  MockCluster cluster;
  cluster.create_topic("jobs", 1);
  cluster.create_topic("jobs.dlq", 1);
  {
    idem::kafka::Producer producer(cluster.producer_config());
    for (std::string biz : {"good-1", "", "always-fails", "good-2"}) {
      producer.send({.topic = "jobs", .biz_id = biz, .payload = "p", .partition = 0});
    }
    ASSERT_TRUE(producer.flush(10s));
  }
  idem::MemoryStore store;
  Effects effects;
  int failing_calls = 0;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    if (m.key == "always-fails") {
      ++failing_calls;
      throw std::runtime_error("cannot parse");
    }
    effects.add(m.key);
  });
  auto options = options_for("jobs");
  options.key_source = idem::kafka::KeySource::header;  // the empty biz-id is invalid
  options.max_attempts = 3;
  options.dead_letter_topic = "jobs.dlq";
  idem::PrometheusMetrics metrics;
  options.metrics = &metrics;
  std::vector<std::string> lines;  // what on_error saw
  options.on_error = [&](std::string_view e) { lines.emplace_back(e); };
  idem::kafka::Consumer consumer(cluster.consumer_config("jobs-group"), idem_consumer, options);
  // Three attempts with backoff plus two dead-letter deliveries: allow for a loaded machine.
  ASSERT_TRUE(poll_until([&] { return effects.total() == 2 && consumer.stats().acked == 4; },
                         {&consumer}, 45s));
  consumer.commit();
  EXPECT_EQ(failing_calls, 3);
  EXPECT_EQ(consumer.stats().dead_lettered, 2u);
  // Every retry and dead-letter is counted, by reason, and said.
  using idem::Counter;
  EXPECT_EQ(metrics.value(Counter::retries), 2u);       // attempts 1 and 2 of always-fails
  EXPECT_EQ(metrics.value(Counter::redeliveries), 2u);  // each a seek back to it
  EXPECT_EQ(metrics.value(Counter::dead_letters_invalid), 1u);
  EXPECT_EQ(metrics.value(Counter::dead_letters_exhausted), 1u);
  EXPECT_EQ(metrics.value(Counter::dead_letter_failures), 0u);
  EXPECT_GE(metrics.value(Counter::rebalances), 1u);
  EXPECT_GE(metrics.value(Counter::commits), 1u);
  auto said = [&](std::string_view part) {
    return std::count_if(lines.begin(), lines.end(),
                         [&](const std::string& l) { return l.find(part) != std::string::npos; });
  };
  EXPECT_EQ(said("record jobs/0@2 failed (attempt 1 of 3): handler failed;"), 1);
  EXPECT_EQ(said("record jobs/0@2 failed (attempt 2 of 3)"), 1);
  EXPECT_EQ(said("dead-lettered record jobs/0@1 to topic 'jobs.dlq': invalid message"), 1);
  EXPECT_EQ(said("dead-lettered record jobs/0@2 to topic 'jobs.dlq': attempts exhausted"), 1);
  EXPECT_EQ(effects.order, (std::vector<std::string>{"good-1", "good-2"}));
  // The commit is read back through another client; give the mock coordinator time to apply it.
  std::int64_t committed = committed_offset(cluster, "jobs-group", "jobs", 0);
  for (int i = 0; i < 50 && committed != 4; ++i) {
    consumer.poll(100ms);
    committed = committed_offset(cluster, "jobs-group", "jobs", 0);
  }
  EXPECT_EQ(committed, 4);

  // Read the dead letters back with a plain, group-less consumer.
  std::vector<std::string> reasons, biz_ids;
  for (const auto& headers : read_headers(cluster, "jobs.dlq", 2)) {
    reasons.push_back(headers.at("idem-dlq-reason"));
    biz_ids.push_back(headers.at("idem-biz-id"));
  }
  ASSERT_EQ(reasons.size(), 2u);
  EXPECT_EQ(biz_ids, (std::vector<std::string>{"", "always-fails"}));
  EXPECT_NE(reasons[0].find("invalid message"), std::string::npos) << reasons[0];
  EXPECT_NE(reasons[1].find("handler failed"), std::string::npos) << reasons[1];
}

// --- Batches and offsets in the store ---------------------------------------------------------

TEST(KafkaBatch, AFailingRecordInTheMiddleIsRetriedAloneAndOrderIsKept) {
  MockCluster cluster;
  cluster.create_topic("batched", 1);
  produce(cluster, "batched", 10, "b-", 0);  // b-0 .. b-9 on one partition
  idem::MemoryStore store;
  Effects effects;
  std::map<std::string, int> runs;
  idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
    if (++runs[std::string(m.key)] <= 2 && m.key == "b-4") throw std::runtime_error("flaky");
    effects.add(m.key);
  });
  auto options = options_for("batched");
  options.batch_size = 100;
  options.batch_wait = 200ms;  // the ten records arrive as one batch
  idem::kafka::Consumer consumer(cluster.consumer_config("batched-group"), idem_consumer, options);
  ASSERT_TRUE(poll_until([&] { return effects.distinct() == 10; }, {&consumer}));
  consumer.commit();
  EXPECT_EQ(runs["b-4"], 3);
  for (int i = 0; i < 10; ++i) {
    if (i != 4) {
      EXPECT_EQ(runs["b-" + std::to_string(i)], 1) << i;  // re-read as duplicates
    }
  }
  EXPECT_EQ(effects.total(), 10u);
  // First executions in partition order; the held record's success comes after its retries.
  std::vector<std::string> expected{"b-0", "b-1", "b-2", "b-3", "b-5",
                                    "b-6", "b-7", "b-8", "b-9", "b-4"};
  EXPECT_EQ(effects.order, expected);
  EXPECT_GE(consumer.stats().batches, 2u);
  EXPECT_EQ(consumer.stats().retries, 2u);
  EXPECT_EQ(committed_offset(cluster, "batched-group", "batched", 0), 10);
}

TEST(KafkaBatch, HandlersSeeWhereEachRecordCameFrom) {
  MockCluster cluster;
  cluster.create_topic("sourced", 2);
  produce(cluster, "sourced", 6, "s-", 1);
  for (std::size_t batch_size : {std::size_t{1}, std::size_t{50}}) {
    idem::MemoryStore store;
    std::vector<std::int64_t> offsets;
    std::set<std::string> topics;
    std::set<std::int32_t> partitions;
    idem::IdempotentConsumer idem_consumer(store, [&](const idem::Message& m) {
      offsets.push_back(m.source.offset);
      topics.emplace(m.source.topic);
      partitions.insert(m.source.partition);
    });
    auto options = options_for("sourced");
    options.batch_size = batch_size;
    idem::kafka::Consumer consumer(cluster.consumer_config("sourced-" + std::to_string(batch_size)),
                                   idem_consumer, options);
    ASSERT_TRUE(poll_until([&] { return offsets.size() == 6; }, {&consumer})) << batch_size;
    consumer.close();
    EXPECT_EQ(offsets, (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5})) << batch_size;
    EXPECT_EQ(topics, std::set<std::string>{"sourced"});
    EXPECT_EQ(partitions, std::set<std::int32_t>{1});
  }
}

TEST(KafkaBatch, BatchModeNeedsAnIdempotentConsumerAndOffsetsInStoreAnInbox) {
  MockCluster cluster;
  cluster.create_topic("cfg", 1);
  auto options = options_for("cfg");
  options.batch_size = 10;
  idem::kafka::ConsumeFunction plain = [](const idem::Message&) { return idem::Result{}; };
  EXPECT_THROW(idem::kafka::Consumer(cluster.consumer_config("cfg"), plain, options),
               idem::ConfigError);
  options.batch_size = 0;
  idem::MemoryStore store;
  idem::IdempotentConsumer memory(store, [](const idem::Message&) {});
  EXPECT_THROW(idem::kafka::Consumer(cluster.consumer_config("cfg"), memory, options),
               idem::ConfigError);
  options.batch_size = 1;
  options.offsets_in_store = true;  // MemoryStore has no transaction to save them in
  try {
    idem::kafka::Consumer consumer(cluster.consumer_config("cfg"), memory, options);
    ADD_FAILURE() << "offsets_in_store accepted without a transactional inbox";
  } catch (const idem::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("SqliteTx& or PostgresTx&"), std::string::npos)
        << e.what();
  }
}

TEST(KafkaBatch, TwoMembersRebalancingInBatchModeLoseAndDuplicateNothing) {
  MockCluster cluster;
  cluster.create_topic("rebal", 4);
  idem::testing::TempDir dir("kafka-batch");
  idem::SqliteStore store(dir.file("rebal.db"), {.synchronous = idem::SqliteSync::normal});
  store.transaction([](idem::SqliteTx& tx) { tx.exec("CREATE TABLE effects(key BLOB NOT NULL)"); });
  idem::IdempotentConsumer idem_consumer(store, [](const idem::Message& m, idem::SqliteTx& tx) {
    tx.exec("INSERT INTO effects(key) VALUES(?1)", idem::SqliteBlob{m.key});
  });
  auto options = options_for("rebal");
  options.batch_size = 64;
  options.offsets_in_store = true;
  produce(cluster, "rebal", 400, "first-");
  idem::kafka::Consumer a(cluster.consumer_config("rebal-group"), idem_consumer, options);
  auto effects = [&] {
    std::int64_t n = 0;
    store.transaction([&](idem::SqliteTx& tx) {
      n = tx.query_int64("SELECT count(*) FROM effects").value_or(-1);
    });
    return n;
  };
  ASSERT_TRUE(poll_until([&] { return effects() >= 100; }, {&a}));
  idem::kafka::Consumer b(cluster.consumer_config("rebal-group"), idem_consumer, options);
  produce(cluster, "rebal", 400, "second-");
  ASSERT_TRUE(poll_until([&] { return effects() == 800; }, {&a, &b}, 60s));
  for (int i = 0; i < 20; ++i) {  // nothing more arrives
    a.poll(10ms);
    b.poll(10ms);
  }
  a.close();
  b.close();
  EXPECT_EQ(effects(), 800);
  std::int64_t distinct = 0;
  store.transaction([&](idem::SqliteTx& tx) {
    distinct = tx.query_int64("SELECT count(DISTINCT key) FROM effects").value_or(-1);
  });
  EXPECT_EQ(distinct, 800);
  std::int64_t stored_total = 0;
  for (const idem::PartitionOffset& p : store.committed_offsets()) stored_total += p.next_offset;
  EXPECT_EQ(stored_total, 800);  // every record's offset went into the store
}

// Consumers over an SQLite inbox with offsets in the store, SIGKILLed at random while they
// work: every record takes effect exactly once, and no record the store committed is read
// again (no duplicate is ever looked up). Each child joins a fresh group, so nothing depends
// on Kafka's committed offsets at all.
TEST(KafkaOffsetsInStore, SigkilledConsumersLoseDuplicateAndReplayNothing) {
  constexpr int kKills = 20;
  MockCluster cluster;
  cluster.create_topic("crash", 3);
  produce(cluster, "crash", kCrashRecords, "c-");
  idem::testing::TempDir dir("kafka-crash");
  const std::string db = dir.file("inbox.db");
  const std::string dups = dir.file("duplicates.txt");
  std::mt19937 random(20261205);
  auto run_child = [&](int n, bool kill) {
    int out = -1;
    const pid_t pid = spawn_child({{"IDEM_KAFKA_CHILD", cluster.bootstraps()},
                                   {"IDEM_KAFKA_GROUP", "crash-" + std::to_string(n)},
                                   {"IDEM_KAFKA_DB", db},
                                   {"IDEM_KAFKA_DUPS", dups}},
                                  &out);
    EXPECT_GT(pid, 0);
    // The child says when it has handled records; EOF: it exited (done or failed). The mock
    // coordinator delays a new group's first join by 3 s, so allow for that and more.
    pollfd ready{.fd = out, .events = POLLIN, .revents = 0};
    char started = 0;
    const bool working = ::poll(&ready, 1, 60'000) == 1 && ::read(out, &started, 1) == 1;
    if (!working) ::kill(pid, SIGKILL);  // never a hang, whatever the child does
    if (kill && working) {
      std::this_thread::sleep_for(std::chrono::microseconds(random() % 60'000));
      ::kill(pid, SIGKILL);
    }
    ::close(out);
    return wait_exit_code(pid);
  };
  int kills = 0;
  for (int n = 0; n < kKills; ++n) {
    if (run_child(n, true) == 128 + SIGKILL) ++kills;
  }
  EXPECT_EQ(run_child(kKills, false), 0);  // the last one finishes the stream
  EXPECT_GE(kills, kKills - 2);            // a child may finish before its kill only near the end

  idem::SqliteStore store(db);
  std::int64_t total = 0, distinct = 0;
  store.transaction([&](idem::SqliteTx& tx) {
    total = tx.query_int64("SELECT count(*) FROM effects").value_or(-1);
    distinct = tx.query_int64("SELECT count(DISTINCT key) FROM effects").value_or(-1);
  });
  EXPECT_EQ(total, kCrashRecords);
  EXPECT_EQ(distinct, kCrashRecords);
  std::FILE* f = std::fopen(dups.c_str(), "r");
  std::size_t duplicate_lines = 0;
  if (f != nullptr) {
    for (int c = 0; (c = std::fgetc(f)) != EOF;) duplicate_lines += c == '\n';
    std::fclose(f);
  }
  EXPECT_EQ(duplicate_lines, 0u) << "records the store had committed were read again";
}

}  // namespace
