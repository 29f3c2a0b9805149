#pragma once
// A real rabbitmq-server for tests: one node per test binary (start it from a GoogleTest
// Environment), on free loopback ports, with its own node name, data, log, plugins and
// feature-flags files in a temporary directory. As root the directory is handed to the
// rabbitmq user (Debian's wrapper scripts run the node through `su rabbitmq`). Stopped with
// `rabbitmqctl stop`; the directory is removed. Starting takes about 6 s. A watchdog process
// kills the node and removes the directory if the test binary dies without stopping it.
// When rabbitmq-server is not installed, start() throws std::runtime_error saying what to
// install: the tests then fail, they never skip.

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "free_port.hpp"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace idem::test_support::rabbitmq {

using idem::test_support::free_port;

/// True when an AMQP login as guest succeeds on 127.0.0.1:port.
inline bool amqp_ready(int port) {
  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t* socket = amqp_tcp_socket_new(conn);
  timeval timeout{.tv_sec = 1, .tv_usec = 0};
  bool ok = false;
  if (socket != nullptr && amqp_socket_open_noblock(socket, "127.0.0.1", port, &timeout) == 0) {
    amqp_set_rpc_timeout(conn, &timeout);
    amqp_rpc_reply_t r =
        amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
    ok = r.reply_type == AMQP_RESPONSE_NORMAL;
    if (ok) amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
  }
  amqp_destroy_connection(conn);
  return ok;
}

class RabbitMqServer {
 public:
  /// @throws std::runtime_error when rabbitmq-server is missing or does not come up.
  RabbitMqServer() {
    as_root_ = ::geteuid() == 0;
    // As root, Debian's /usr/sbin wrappers switch to the rabbitmq user; otherwise the
    // scripts under /usr/lib/rabbitmq/bin run as we are.
    const std::string bin = as_root_ ? "/usr/sbin/" : "/usr/lib/rabbitmq/bin/";
    server_ = bin + "rabbitmq-server";
    ctl_ = bin + "rabbitmqctl";
    if (::access(server_.c_str(), X_OK) != 0 || ::access(ctl_.c_str(), X_OK) != 0) {
      throw std::runtime_error(
          server_ +
          " not found: the RabbitMQ adapter tests need a real broker; install it "
          "(Debian: apt-get install rabbitmq-server, see scripts/debian-packages.txt)");
    }
    port_ = free_port();
    do dist_port_ = free_port();
    while (dist_port_ == port_);
    node_ = "idem-test-" + std::to_string(port_) + "@localhost";

    std::string pattern =
        (std::filesystem::temp_directory_path() / "idem-rabbitmq-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = pattern;
    std::filesystem::create_directories(dir_ / "mnesia");
    std::filesystem::create_directories(dir_ / "log");
    write(dir_ / "enabled_plugins", "[].\n");
    write(dir_ / "rabbitmq.conf", "listeners.tcp.1 = 127.0.0.1:" + std::to_string(port_) +
                                      "\nlog.console = false\nlog.file.level = warning\n");
    if (as_root_) {
      const passwd* pw = ::getpwnam("rabbitmq");
      if (pw == nullptr)
        throw std::runtime_error("rabbitmq-server is installed but user rabbitmq is missing");
      ::chmod(dir_.c_str(), 0755);
      for (const auto& entry : std::filesystem::recursive_directory_iterator(dir_)) {
        (void)::chown(entry.path().c_str(), pw->pw_uid, pw->pw_gid);
      }
      (void)::chown(dir_.c_str(), pw->pw_uid, pw->pw_gid);
    } else {
      // The CLI and the node must share a cookie; a fixed one in our own HOME.
      write(dir_ / ".erlang.cookie", "IDEMTESTCOOKIE");
      ::chmod((dir_ / ".erlang.cookie").c_str(), 0400);
    }

    pid_ = spawn({server_}, (dir_ / "server.out").string());
    start_watchdog();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{90};
    while (!amqp_ready(port_)) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("rabbitmq-server exited during start-up:\n" + tail());
      }
      if (std::chrono::steady_clock::now() > deadline) {
        stop();
        throw std::runtime_error("rabbitmq-server did not accept AMQP within 90 s:\n" + tail());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{200});
    }
  }

  ~RabbitMqServer() { stop(); }
  RabbitMqServer(const RabbitMqServer&) = delete;
  RabbitMqServer& operator=(const RabbitMqServer&) = delete;

  int port() const noexcept { return port_; }
  const std::string& node() const noexcept { return node_; }

  /// Runs `rabbitmqctl -n <node> args...`; throws when it fails.
  void ctl(const std::vector<std::string>& args) const {
    std::vector<std::string> argv{ctl_, "-n", node_};
    argv.insert(argv.end(), args.begin(), args.end());
    const std::filesystem::path out = dir_ / "ctl.out";
    std::filesystem::remove(out);
    const pid_t pid = spawn(argv, out.string());
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::ifstream in(out);
      std::stringstream text;
      text << in.rdbuf();
      throw std::runtime_error("rabbitmqctl " + args.front() + " failed (status " +
                               std::to_string(status) + "):\n" + text.str());
    }
  }

 private:
  static void write(const std::filesystem::path& path, const std::string& text) {
    std::ofstream(path) << text;
  }

  std::string tail() const {
    std::ifstream in(dir_ / "server.out");
    std::stringstream s;
    s << in.rdbuf();
    std::string text = s.str();
    return text.size() > 4000 ? text.substr(text.size() - 4000) : text;
  }

  std::vector<std::string> environment() const {
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::string_view(*e).starts_with("RABBITMQ_")) continue;
      if (!as_root_ && std::string_view(*e).starts_with("HOME=")) continue;
      env.emplace_back(*e);
    }
    const std::string d = dir_.string();
    env.push_back("RABBITMQ_NODENAME=" + node_);
    env.push_back("RABBITMQ_NODE_IP_ADDRESS=127.0.0.1");
    env.push_back("RABBITMQ_NODE_PORT=" + std::to_string(port_));
    env.push_back("RABBITMQ_DIST_PORT=" + std::to_string(dist_port_));
    env.push_back("RABBITMQ_MNESIA_BASE=" + d + "/mnesia");
    env.push_back("RABBITMQ_LOG_BASE=" + d + "/log");
    env.push_back("RABBITMQ_ENABLED_PLUGINS_FILE=" + d + "/enabled_plugins");
    env.push_back("RABBITMQ_FEATURE_FLAGS_FILE=" + d + "/feature_flags");
    env.push_back("RABBITMQ_CONFIG_FILE=" + d + "/rabbitmq.conf");
    env.push_back("RABBITMQ_PID_FILE=" + d + "/rabbitmq.pid");
    if (!as_root_) env.push_back("HOME=" + d);
    return env;
  }

  // posix_spawn with stdout/stderr to out_file, in its own process group.
  pid_t spawn(const std::vector<std::string>& args, const std::string& out_file) const {
    std::vector<std::string> env = environment();
    std::vector<char*> argv, envp;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    for (std::string& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out_file.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                     0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setpgroup(&attr, 0);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, argv[0], &actions, &attr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) throw std::runtime_error("cannot run " + args.front());
    return pid;
  }

  // As root the node runs under `su -c`, which starts a new session: a signal to our
  // process group never reaches it. The node's own pid (RABBITMQ_PID_FILE) does. Async-signal
  // safe, for the watchdog.
  static void kill_node(const char* pid_file, pid_t group) noexcept {
    const int fd = ::open(pid_file, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      char text[32] = {};
      const ssize_t n = ::read(fd, text, sizeof text - 1);
      ::close(fd);
      pid_t node = 0;
      for (ssize_t i = 0; i < n && text[i] >= '0' && text[i] <= '9'; ++i) {
        node = node * 10 + (text[i] - '0');
      }
      if (node > 1) ::kill(node, SIGKILL);
    }
    if (group > 0) ::kill(-group, SIGKILL);
  }

  // A test binary killed outright (a crash, a CTest timeout) runs no destructor, and the
  // node would outlive it. A forked watchdog waits for the end of a pipe whose only writer is
  // this process; when it dies, the watchdog kills the node and removes its directory.
  void start_watchdog() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return;  // no watchdog: the destructor still stops it
    const std::string pid_file = (dir_ / "rabbitmq.pid").string();
    const std::string dir = dir_.string();
    const pid_t group = pid_;
    const pid_t watchdog = ::fork();
    if (watchdog == 0) {
      ::close(fds[1]);
      ::setsid();  // outlives a signal to the test's process group (CTest's timeout)
      // Off CTest's output pipe, which it would otherwise keep open.
      const int null = ::open("/dev/null", O_RDWR);
      for (int fd = 0; fd <= 2 && null >= 0; ++fd) ::dup2(null, fd);
      char byte = 0;
      while (::read(fds[0], &byte, 1) < 0 && errno == EINTR) {
      }
      kill_node(pid_file.c_str(), group);
      ::execl("/bin/rm", "rm", "-rf", dir.c_str(), static_cast<char*>(nullptr));
      ::_exit(0);
    }
    ::close(fds[0]);
    if (watchdog < 0) {
      ::close(fds[1]);
      return;
    }
    watchdog_pid_ = watchdog;
    watchdog_fd_ = fds[1];
  }

  void stop_watchdog() noexcept {
    if (watchdog_pid_ <= 0) return;
    ::kill(watchdog_pid_, SIGKILL);
    int status = 0;
    ::waitpid(watchdog_pid_, &status, 0);
    ::close(watchdog_fd_);
    watchdog_pid_ = -1;
    watchdog_fd_ = -1;
  }

  void stop() noexcept {
    stop_watchdog();
    if (pid_ > 0) {
      try {
        ctl({"stop"});
      } catch (...) {  // NOLINT(bugprone-empty-catch): fall back to signals below
      }
      int status = 0;
      for (int i = 0; i < 100 && ::waitpid(pid_, &status, WNOHANG) == 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds{100});
      }
      if (::waitpid(pid_, &status, WNOHANG) == 0) {
        kill_node((dir_ / "rabbitmq.pid").c_str(), pid_);
        ::waitpid(pid_, &status, 0);
      }
      pid_ = -1;
    }
    if (!dir_.empty()) {
      std::error_code ignored;
      std::filesystem::remove_all(dir_, ignored);
      dir_.clear();
    }
  }

  bool as_root_ = false;
  std::string server_, ctl_, node_;
  int port_ = 0, dist_port_ = 0;
  std::filesystem::path dir_;
  pid_t pid_ = -1;
  pid_t watchdog_pid_ = -1;
  int watchdog_fd_ = -1;
};

}  // namespace idem::test_support::rabbitmq
