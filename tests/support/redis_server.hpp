#pragma once
// A real redis-server for tests: started on a free loopback port with its own temporary
// directory, stopped (and the directory removed) on destruction. The binary is looked up on
// PATH, then in /usr/bin and /usr/local/bin; when it is missing, construction throws
// std::runtime_error, which fails the test with a message saying what to install.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "free_port.hpp"

namespace idem::test_support {

/// Finds an executable on PATH or in the usual system directories; empty when absent.
inline std::string find_executable(const std::string& name) {
  std::vector<std::string> dirs;
  if (const char* path = std::getenv("PATH")) {
    std::string p = path;
    std::size_t start = 0;
    while (start <= p.size()) {
      std::size_t end = p.find(':', start);
      if (end == std::string::npos) end = p.size();
      if (end > start) dirs.push_back(p.substr(start, end - start));
      start = end + 1;
    }
  }
  dirs.push_back("/usr/bin");
  dirs.push_back("/usr/local/bin");
  dirs.push_back("/usr/sbin");
  for (const std::string& dir : dirs) {
    std::string candidate = dir + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return {};
}

inline std::string require_executable(const std::string& name) {
  std::string path = find_executable(name);
  if (path.empty()) {
    throw std::runtime_error(name +
                             " not found on PATH nor in /usr/bin: the Redis tests need a real "
                             "server; install it (Debian: apt-get install redis-server "
                             "redis-tools, see scripts/debian-packages.txt)");
  }
  return path;
}

/// Sends one inline command over a fresh connection; returns the raw reply ("" on failure).
inline std::string raw_command(int port, const std::string& command,
                               std::chrono::milliseconds timeout = std::chrono::milliseconds{500}) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return {};
  timeval tv{.tv_sec = static_cast<time_t>(timeout.count() / 1000),
             .tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    std::string line = command + "\r\n";
    if (::send(fd, line.data(), line.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(line.size())) {
      char buf[4096];
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) reply.assign(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  return reply;
}

/// Runs a command line and returns its standard output.
inline std::string run_output(const std::string& command_line) {
  std::string out;
  if (FILE* pipe = ::popen(command_line.c_str(), "r")) {
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
    ::pclose(pipe);
  }
  return out;
}

/// One redis-server process.
class RedisServer {
 public:
  /// Starts at once; extra_args are passed through (e.g. {"--requirepass", "s3cret"}).
  explicit RedisServer(std::vector<std::string> extra_args = {}, int port = 0)
      : binary_(require_executable("redis-server")),
        port_(port ? port : free_port(/*cluster bus*/ 10000)),
        extra_(std::move(extra_args)) {
    // tmpfs when there is one: appendfsync always then costs no disk flushes.
    std::string tmpl =
        ::access("/dev/shm", W_OK) == 0 ? "/dev/shm/idem-redis-XXXXXX" : "/tmp/idem-redis-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    start();
  }
  ~RedisServer() {
    stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  int port() const noexcept { return port_; }
  const std::string& dir() const noexcept { return dir_; }
  bool running() const noexcept { return pid_ > 0; }
  /// The server's process id (for SIGSTOP/SIGCONT in tests); -1 when it is not running.
  pid_t pid() const noexcept { return pid_; }

  /// Starts (again) on the same port and directory; waits until it answers PING.
  void start() {
    if (pid_ > 0) return;
    std::vector<std::string> args{binary_,       "--port",    std::to_string(port_),
                                  "--bind",      "127.0.0.1", "--dir",
                                  dir_,          "--save",    "",
                                  "--daemonize", "no",        "--protected-mode",
                                  "no",          "--logfile", dir_ + "/redis.log"};
    args.insert(args.end(), extra_.begin(), extra_.end());
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      // It logs to its file. Off the test's output pipe: a server orphaned by a crashed test
      // must not keep CTest waiting for the pipe to close until the test's timeout.
      const int null = ::open("/dev/null", O_RDWR);
      if (null >= 0) {
        ::dup2(null, STDOUT_FILENO);
        ::dup2(null, STDERR_FILENO);
      }
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(binary_.c_str(), argv.data());
      ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{10};
    while (std::chrono::steady_clock::now() < deadline) {
      std::string reply = raw_command(port_, "PING");
      // A password-protected server answers -NOAUTH: it is up all the same. -LOADING: not yet.
      if (reply.rfind("+PONG", 0) == 0 || reply.rfind("-NOAUTH", 0) == 0) return;
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("redis-server exited at start; see " + dir_ + "/redis.log");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{10});
    }
    stop();
    throw std::runtime_error("redis-server did not answer PING within 10 s on port " +
                             std::to_string(port_));
  }

  /// SIGTERM (graceful) and wait.
  void stop() { signal_and_wait(SIGTERM); }
  /// SIGKILL: a crash; only what is already in the AOF survives.
  void kill_hard() { signal_and_wait(SIGKILL); }

  /// Runs redis-cli against this server with the given arguments; returns its output.
  std::string cli(const std::string& args) const {
    static const std::string cli_binary = require_executable("redis-cli");
    return run_output(cli_binary + " -h 127.0.0.1 -p " + std::to_string(port_) + " " + args +
                      " 2>&1");
  }

 private:
  void signal_and_wait(int sig) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{10};
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{5});
    }
    pid_ = -1;
  }

  std::string binary_;
  int port_;
  std::vector<std::string> extra_;
  std::string dir_;
  pid_t pid_ = -1;
};

}  // namespace idem::test_support
