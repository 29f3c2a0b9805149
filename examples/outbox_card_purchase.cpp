// The card purchase end to end, as three processes around a transactional outbox:
// the payment service charges and writes "payment charged" to its outbox in one transaction,
// the relay publishes the outbox, the card service issues one card per payment through an idem
// inbox. See examples/card_purchase_services.hpp and docs/outbox.md.
//
// Usage:
//   outbox_card_purchase [payments]                  all three on librdkafka's mock cluster
//                                                    (in this process; no broker needed)
//   outbox_card_purchase --rabbitmq HOST:PORT [payments]   all three on a RabbitMQ broker
//   outbox_card_purchase payment DB COUNT            one service by hand (BROKER is
//   outbox_card_purchase relay DB BROKER EXPECT       kafka=BOOTSTRAP or rabbitmq=HOST:PORT)
//   outbox_card_purchase card DB BROKER EXPECT DELIVERIES_FILE
// It prints payments, charges, notifications published, copies delivered and cards, and
// exits non-zero unless there is exactly one card per payment.

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "card_purchase_services.hpp"

namespace {

pid_t spawn(const std::vector<std::string>& args) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv("/proc/self/exe", argv.data());
    ::_exit(127);
  }
  return pid;
}

int wait_for(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// The three services as child processes, then the report.
int demo(const std::string& broker_arg, int payments) {
  char dir_template[] = "/tmp/idem-card-purchase-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  const std::string pay_db = dir + "/payments.db", card_db = dir + "/cards.db",
                    deliveries = dir + "/deliveries.txt", n = std::to_string(payments);
  std::printf("card purchase: %d payments through %s (files in %s)\n", payments, broker_arg.c_str(),
              dir.c_str());
  // The outbox tables exist before the relay opens the file.
  idem::SqliteOutbox create_tables(pay_db);
  const pid_t card = spawn({"outbox_card_purchase", "card", card_db, broker_arg, n, deliveries});
  const pid_t relay = spawn({"outbox_card_purchase", "relay", pay_db, broker_arg, n});
  const pid_t payment = spawn({"outbox_card_purchase", "payment", pay_db, n});
  const int codes = wait_for(payment) | wait_for(relay) | wait_for(card);
  const card_purchase::Report report = card_purchase::read_report(pay_db, card_db, deliveries);
  card_purchase::print_report(report);
  std::filesystem::remove_all(dir);
  return codes == 0 && report.ok() ? 0 : 1;
}

struct MockCluster {
  MockCluster() {
    char err[256];
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    owner = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (owner == nullptr) throw std::runtime_error(err);
    cluster = rd_kafka_mock_cluster_new(owner, 1);
    if (cluster == nullptr) throw std::runtime_error("rd_kafka_mock_cluster_new failed");
    rd_kafka_mock_topic_create(cluster, card_purchase::kDestination, 3, 1);
  }
  ~MockCluster() {
    rd_kafka_mock_cluster_destroy(cluster);
    rd_kafka_destroy(owner);
  }
  rd_kafka_t* owner = nullptr;
  rd_kafka_mock_cluster_t* cluster = nullptr;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::vector<std::string> args(argv + 1, argv + argc);
    if (!args.empty() && args[0] == "payment" && args.size() == 3) {
      return card_purchase::run_payment_service(args[1], std::stoi(args[2]));
    }
    if (!args.empty() && args[0] == "relay" && args.size() == 4) {
      return card_purchase::run_relay(args[1], card_purchase::parse_broker(args[2]),
                                      std::stoll(args[3]));
    }
    if (!args.empty() && args[0] == "card" && args.size() == 5) {
      return card_purchase::run_card_service(args[1], card_purchase::parse_broker(args[2]),
                                             std::stoll(args[3]), args[4], "card-service");
    }
    if (!args.empty() && args[0] == "--rabbitmq" && args.size() >= 2) {
      return demo("rabbitmq=" + args[1], args.size() > 2 ? std::stoi(args[2]) : 200);
    }
    if (args.size() <= 1 && (args.empty() || args[0][0] != '-')) {
      MockCluster kafka;
      return demo(std::string("kafka=") + rd_kafka_mock_cluster_bootstraps(kafka.cluster),
                  args.empty() ? 200 : std::stoi(args[0]));
    }
    std::fprintf(stderr,
                 "usage: see the comment at the top of examples/outbox_card_purchase.cpp\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "outbox_card_purchase: %s\n", e.what());
    return 1;
  }
}
