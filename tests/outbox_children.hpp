#pragma once
// Child processes of the outbox end-to-end tests: the test binary re-executed with
// IDEM_OUTBOX_ROLE set runs one service of examples/card_purchase_services.hpp and _exits
// before GoogleTest starts. Its stdout is a pipe: one byte once it has done some work (the
// parent kills it after that). Include in exactly one file of a test binary.

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "card_purchase_services.hpp"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace outbox_test {

inline std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : "";
}

inline int run_child_role() {
  const std::string role = env("IDEM_OUTBOX_ROLE");
  const std::string db = env("IDEM_OUTBOX_DB");
  const std::int64_t expect = std::stoll(env("IDEM_OUTBOX_EXPECT"));
  if (role == "payment") {
    return card_purchase::run_payment_service(
        db, static_cast<int>(expect), STDOUT_FILENO,
        std::chrono::microseconds{std::stoll(env("IDEM_OUTBOX_PAUSE_US"))});
  }
  const card_purchase::Broker broker = card_purchase::parse_broker(env("IDEM_OUTBOX_BROKER"));
  if (role == "relay") {
    return card_purchase::run_relay(db, broker, expect, env("IDEM_OUTBOX_HOLDER"), STDOUT_FILENO,
                                    std::stoul(env("IDEM_OUTBOX_BATCH")));
  }
  if (role == "card") {
    return card_purchase::run_card_service(db, broker, expect, env("IDEM_OUTBOX_DELIVERIES"),
                                           env("IDEM_OUTBOX_GROUP"), STDOUT_FILENO);
  }
  std::fprintf(stderr, "outbox child: unknown role %s\n", role.c_str());
  return 2;
}

inline const bool kIsChild = [] {
  if (std::getenv("IDEM_OUTBOX_ROLE") == nullptr) return false;
  int code = 1;
  try {
    code = run_child_role();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "outbox child (%s): %s\n", std::getenv("IDEM_OUTBOX_ROLE"), e.what());
    code = 2;
  }
  std::fflush(nullptr);
  ::_exit(code);
}();

/// A running child: its pid and the read end of its stdout.
struct Child {
  pid_t pid = -1;
  int out = -1;

  /// Waits up to timeout for the child's "working" byte; false on EOF or timeout.
  bool wait_working(std::chrono::milliseconds timeout) const {
    pollfd ready{.fd = out, .events = POLLIN, .revents = 0};
    char byte = 0;
    return ::poll(&ready, 1, static_cast<int>(timeout.count())) == 1 && ::read(out, &byte, 1) == 1;
  }
  void kill() const { ::kill(pid, SIGKILL); }
  /// True (and *code set) once the child has ended; never blocks.
  bool ended(int* code) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) != pid) return false;
    if (out >= 0) ::close(out);
    out = -1;
    *code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return true;
  }
  /// Exit code, or 128 + the signal that ended it.
  int wait() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (out >= 0) ::close(out);
    out = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
};

/// Re-executes this binary with env added. The environment is built before fork(): only
/// async-signal-safe calls happen in the child.
inline Child spawn(const std::map<std::string, std::string>& vars) {
  std::vector<std::string> entries;
  for (char** e = environ; *e != nullptr; ++e) entries.emplace_back(*e);
  for (const auto& [name, value] : vars) entries.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (std::string& entry : entries) envp.push_back(entry.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};
  int fds[2];
  if (::pipe(fds) != 0) return {};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    ::execve(exe, argv, envp.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  return {pid, fds[0]};
}

}  // namespace outbox_test
