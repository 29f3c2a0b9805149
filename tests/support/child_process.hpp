#pragma once
// Child processes for tests that need real ones: the test binary re-executed with an
// environment that tells its static initializer which child to be, and the small pieces such
// children use (their settings from the environment, a readiness byte on a pipe).

#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

extern char** environ;

namespace idem::test_support {

/// The variable's value, or fallback when it is not set.
inline std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value ? value : fallback;
}

/// Writes one byte to fd and closes it (a child saying "ready"); nothing when fd < 0.
inline void signal_fd(int fd) {
  if (fd >= 0) {
    const char byte = 'r';
    (void)!::write(fd, &byte, 1);
    ::close(fd);
  }
}

/// Re-executes this binary as a child with the given environment added. The environment is
/// built before fork(): only async-signal-safe calls happen in the child before exec.
inline pid_t spawn_child(const std::map<std::string, std::string>& env) {
  std::vector<std::string> entries;
  for (char** e = environ; *e != nullptr; ++e) entries.emplace_back(*e);
  for (const auto& [name, value] : env) entries.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (std::string& entry : entries) envp.push_back(entry.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execve(exe, argv, envp.data());
    ::_exit(127);
  }
  return pid;
}

/// The child's exit code, or 128 + the signal that killed it.
inline int wait_exit_code(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace idem::test_support
