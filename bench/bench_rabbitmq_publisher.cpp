// Publish throughput with publisher confirms, in one run against one real rabbitmq-server
// started for it (tests/support/rabbitmq_server.hpp):
//   raw        rabbitmq-c alone: confirm.select, basic.publish, and while `window` messages are
//              unconfirmed, read frames and count basic.ack (multiple or not);
//   pipelined  idem::rabbitmq::Publisher::send() with the same window, then flush();
//   one-by-one idem::rabbitmq::Publisher::publish(): each message waits for its own confirm.
// Same message shape for all: message_id (a UUIDv7 text), header idem-biz-id, 100-byte body,
// delivery_mode 2 unless --transient. One durable classic queue, purged after every run (not
// timed). Runs alternate (raw, pipelined per window, then one-by-one) for --rounds rounds;
// medians are printed with min and max, and the publishing thread's CPU time per message
// (CLOCK_THREAD_CPUTIME_ID over the same window): the client's own cost, steadier than rates
// when the broker shares the machine.
//
// Usage: bench_rabbitmq_publisher [--rounds N] [--messages N] [--single N] [--windows 64,256]
//                                 [--transient]

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <sys/time.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "idem/rabbitmq.hpp"
#include "support/rabbitmq_server.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// Wall and CPU seconds of one run.
struct Timed {
  double seconds = 0;
  double cpu_seconds = 0;
};

struct Timer {
  Clock::time_point start = Clock::now();
  double cpu_start = thread_cpu_seconds();
  Timed stop() const {
    return {std::chrono::duration<double>(Clock::now() - start).count(),
            thread_cpu_seconds() - cpu_start};
  }
};
const std::string payload(100, 'x');
constexpr const char* queue = "bench-publish";

struct Config {
  int rounds = 5;
  int messages = 20'000;
  int single = 2'000;
  std::vector<std::size_t> windows{64, 256};
  bool persistent = true;
};

// A plain rabbitmq-c connection (the raw publisher, and queue set-up / purge).
class Raw {
 public:
  explicit Raw(int port) : conn_(amqp_new_connection()) {
    amqp_socket_t* socket = amqp_tcp_socket_new(conn_);
    if (amqp_socket_open(socket, "127.0.0.1", port) != 0) throw std::runtime_error("connect");
    check(amqp_login(conn_, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest"), "login");
    amqp_channel_open(conn_, 1);
    check(amqp_get_rpc_reply(conn_), "channel.open");
  }
  ~Raw() {
    amqp_channel_close(conn_, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn_, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn_);
  }
  Raw(const Raw&) = delete;
  Raw& operator=(const Raw&) = delete;

  void declare() {
    amqp_queue_declare(conn_, 1, amqp_cstring_bytes(queue), 0, 1, 0, 0, amqp_empty_table);
    check(amqp_get_rpc_reply(conn_), "queue.declare");
  }
  std::uint32_t purge() {
    amqp_queue_purge_ok_t* ok = amqp_queue_purge(conn_, 1, amqp_cstring_bytes(queue));
    check(amqp_get_rpc_reply(conn_), "queue.purge");
    return ok->message_count;
  }

  // Publishes n messages with confirms, at most `window` unconfirmed.
  Timed publish_with_confirms(int n, std::size_t window, bool persistent) {
    amqp_confirm_select(conn_, 1);
    check(amqp_get_rpc_reply(conn_), "confirm.select");
    idem::InnerMsgIdGenerator ids;
    std::array<char, 36> id{};
    std::uint64_t published = 0, confirmed = 0;
    const Timer timer;
    for (int i = 0; i < n; ++i) {
      const std::string biz = "order-" + std::to_string(i);
      ids.next().write_to(id.data());
      amqp_table_entry_t header{};
      header.key = amqp_cstring_bytes("idem-biz-id");
      header.value.kind = AMQP_FIELD_KIND_UTF8;
      header.value.value.bytes = {biz.size(), const_cast<char*>(biz.data())};
      amqp_basic_properties_t props{};
      props._flags = AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_HEADERS_FLAG;
      props.message_id = {id.size(), id.data()};
      props.headers = {1, &header};
      if (persistent) {
        props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
        props.delivery_mode = 2;
      }
      if (amqp_basic_publish(conn_, 1, amqp_empty_bytes, amqp_cstring_bytes(queue), 0, 0, &props,
                             {payload.size(), const_cast<char*>(payload.data())}) != 0) {
        throw std::runtime_error("raw basic.publish failed");
      }
      ++published;
      while (published - confirmed >= window) confirmed = read_confirm(confirmed);
    }
    while (confirmed < published) confirmed = read_confirm(confirmed);
    return timer.stop();
  }

 private:
  // One queue: the broker confirms in order, so a tag is the count confirmed so far.
  std::uint64_t read_confirm(std::uint64_t confirmed) {
    amqp_frame_t frame{};
    if (amqp_simple_wait_frame(conn_, &frame) != AMQP_STATUS_OK) {
      throw std::runtime_error("raw: reading a confirm failed");
    }
    if (frame.frame_type != AMQP_FRAME_METHOD) return confirmed;
    if (frame.payload.method.id == AMQP_BASIC_NACK_METHOD) throw std::runtime_error("raw: nack");
    if (frame.payload.method.id != AMQP_BASIC_ACK_METHOD) return confirmed;
    const auto* ack = static_cast<const amqp_basic_ack_t*>(frame.payload.method.decoded);
    confirmed = ack->multiple ? std::max(confirmed, ack->delivery_tag) : confirmed + 1;
    amqp_maybe_release_buffers(conn_);
    return confirmed;
  }

  static void check(amqp_rpc_reply_t reply, const char* what) {
    if (reply.reply_type != AMQP_RESPONSE_NORMAL) throw std::runtime_error(what);
  }
  amqp_connection_state_t conn_;
};

idem::rabbitmq::OutgoingMessage message(int i) {
  return {.routing_key = queue, .biz_id = "order-" + std::to_string(i), .body = payload};
}

Timed pipelined(int port, int n, std::size_t window, bool persistent) {
  idem::rabbitmq::Publisher publisher({.port = port}, {.persistent = persistent, .window = window});
  const Timer timer;
  for (int i = 0; i < n; ++i) publisher.send(message(i));
  publisher.flush();
  const Timed t = timer.stop();
  if (publisher.stats().confirmed != static_cast<std::uint64_t>(n)) {
    throw std::runtime_error("pipelined: not everything was confirmed");
  }
  return t;
}

Timed one_by_one(int port, int n, bool persistent) {
  idem::rabbitmq::Publisher publisher({.port = port}, {.persistent = persistent});
  const Timer timer;
  for (int i = 0; i < n; ++i) publisher.publish(message(i));
  return timer.stop();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--rounds") {
      c.rounds = std::stoi(next());
    } else if (a == "--messages") {
      c.messages = std::stoi(next());
    } else if (a == "--single") {
      c.single = std::stoi(next());
    } else if (a == "--transient") {
      c.persistent = false;
    } else if (a == "--windows") {
      c.windows.clear();
      const std::string list = next();
      for (std::size_t pos = 0; pos < list.size();) {
        const std::size_t comma = std::min(list.find(',', pos), list.size());
        c.windows.push_back(std::stoul(list.substr(pos, comma - pos)));
        pos = comma + 1;
      }
    } else {
      throw std::runtime_error("unknown argument " + a);
    }
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) try {
  const Config config = parse(argc, argv);
  idem::test_support::rabbitmq::RabbitMqServer server;
  const int port = server.port();
  Raw admin(port);
  admin.declare();

  std::map<std::string, std::vector<double>> rates;   // name -> messages/s per round
  std::map<std::string, std::vector<double>> cpu_ns;  // name -> client CPU ns/message
  auto record = [&](const std::string& name, int n, Timed t) {
    rates[name].push_back(n / t.seconds);
    cpu_ns[name].push_back(t.cpu_seconds * 1e9 / n);
    std::printf("  %-22s %9.0f msg/s  (%d in %.3f s)  CPU %6.0f ns/msg\n", name.c_str(),
                n / t.seconds, n, t.seconds, t.cpu_seconds * 1e9 / n);
    std::fflush(stdout);
    if (admin.purge() != static_cast<std::uint32_t>(n)) {
      std::fprintf(stderr, "warning: the queue did not hold %d messages after %s\n", n,
                   name.c_str());
    }
  };
  std::printf("rabbitmq publisher benchmark: %d messages per windowed run, %d one-by-one, %s\n",
              config.messages, config.single, config.persistent ? "persistent" : "transient");
  for (int round = 1; round <= config.rounds; ++round) {
    std::printf("round %d\n", round);
    for (const std::size_t w : config.windows) {
      const std::string suffix = " window " + std::to_string(w);
      {
        Raw raw(port);
        record("raw" + suffix, config.messages,
               raw.publish_with_confirms(config.messages, w, config.persistent));
      }
      record("pipelined" + suffix, config.messages,
             pipelined(port, config.messages, w, config.persistent));
    }
    record("one-by-one publish()", config.single,
           one_by_one(port, config.single, config.persistent));
  }

  std::printf("\nmedians over %d rounds (min .. max), messages/s, client CPU ns/message:\n",
              config.rounds);
  for (const auto& [name, v] : rates) {
    std::printf("  %-22s %9.0f  (%.0f .. %.0f)  CPU %6.0f ns/msg\n", name.c_str(), median(v),
                *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()),
                median(cpu_ns[name]));
  }
  const double single = median(rates["one-by-one publish()"]);
  for (const std::size_t w : config.windows) {
    const std::string suffix = " window " + std::to_string(w);
    const double raw = median(rates["raw" + suffix]);
    const double pipe = median(rates["pipelined" + suffix]);
    std::printf(
        "  window %-5zu pipelined/raw %.2fx   pipelined/one-by-one %.1fx   CPU per message "
        "pipelined/raw %.2fx\n",
        w, pipe / raw, pipe / single,
        median(cpu_ns["pipelined" + suffix]) / median(cpu_ns["raw" + suffix]));
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_rabbitmq_publisher: %s\n", e.what());
  return 1;
}
