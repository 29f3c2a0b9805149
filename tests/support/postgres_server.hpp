#pragma once
// A real PostgreSQL server for tests: initdb into a private temporary directory, started on a
// free loopback port, with a database and a password-authenticated user (scram-sha-256 over
// TCP, so a wrong password is refused for real). Stopped, and the directory removed, on
// destruction. When the server binaries are missing, construction throws std::runtime_error
// saying what to install; the tests never skip.
//
// Running as root (PostgreSQL refuses that), initdb and postgres run as the `postgres` user:
// the directory is chown'ed to it and the child switches user before exec (what
// `runuser -u postgres --` does). The postmaster is this process's child, started directly
// rather than through `pg_ctl start`, so it gets PR_SET_PDEATHSIG: a test binary killed by a
// timeout takes its server down instead of leaking it. That signal follows the *thread* that
// forked: construct the server and call start() from a thread that outlives it (the main
// thread, e.g. in a GoogleTest Environment), never from a short-lived worker. crash() sends
// SIGQUIT, exactly what `pg_ctl stop -m immediate` sends.

#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
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

namespace idem::test_support {

/// The directory holding initdb and postgres: the newest /usr/lib/postgresql/<n>/bin, else
/// PATH. Throws saying what to install when there is none.
inline std::string postgres_bindir() {
  namespace fs = std::filesystem;
  std::vector<std::pair<int, std::string>> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/usr/lib/postgresql", ec)) {
    const std::string bin = entry.path().string() + "/bin";
    if (::access((bin + "/initdb").c_str(), X_OK) == 0 &&
        ::access((bin + "/postgres").c_str(), X_OK) == 0) {
      found.emplace_back(std::atoi(entry.path().filename().c_str()), bin);
    }
  }
  if (!found.empty()) return std::max_element(found.begin(), found.end())->second;
  if (const char* path = std::getenv("PATH")) {
    std::stringstream dirs(path);
    for (std::string dir; std::getline(dirs, dir, ':');) {
      if (!dir.empty() && ::access((dir + "/initdb").c_str(), X_OK) == 0 &&
          ::access((dir + "/postgres").c_str(), X_OK) == 0) {
        return dir;
      }
    }
  }
  throw std::runtime_error(
      "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin "
      "nor on PATH: the PostgreSQL tests need a real server; install it (Debian: apt-get "
      "install postgresql-15 libpq-dev, see scripts/debian-packages.txt)");
}

/// One private PostgreSQL cluster and its postmaster.
class PostgresServer {
 public:
  static constexpr const char* kDatabase = "idem_test";
  static constexpr const char* kUser = "idem_app";
  static constexpr const char* kPassword = "pw-Tr0ub4dor-s3cret";

  PostgresServer() : bindir_(postgres_bindir()), port_(free_port()) {
    resolve_user();
    std::string tmpl = "/tmp/idem-pg-XXXXXX";  // /tmp: the postgres user must reach it
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    try {
      if (switch_user_ && ::chown(dir_.c_str(), uid_, gid_) != 0) {
        throw std::runtime_error("cannot chown " + dir_ + " to the postgres user");
      }
      {
        std::ofstream pw(dir_ + "/superuser.pw");
        pw << "pw-superuser\n";
      }
      if (switch_user_) (void)::chown((dir_ + "/superuser.pw").c_str(), uid_, gid_);
      run({bindir_ + "/initdb", "-D", data_dir(), "-U", "postgres", "--pwfile",
           dir_ + "/superuser.pw", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
           "--locale=C", "--no-instructions"},
          dir_ + "/initdb.log", "initdb");
      start();
      admin({std::string("CREATE ROLE ") + kUser + " LOGIN PASSWORD '" + kPassword + "'",
             std::string("CREATE DATABASE ") + kDatabase + " OWNER " + kUser});
    } catch (...) {
      stop();
      remove_dir();
      throw;
    }
  }
  ~PostgresServer() {
    stop();
    remove_dir();
  }
  PostgresServer(const PostgresServer&) = delete;
  PostgresServer& operator=(const PostgresServer&) = delete;

  int port() const noexcept { return port_; }
  const std::string& dir() const noexcept { return dir_; }
  bool running() const noexcept { return pid_ > 0; }

  /// key=value conninfo of the test user over TCP (password authentication).
  std::string conninfo() const {
    return "host=127.0.0.1 port=" + std::to_string(port_) + " dbname=" + kDatabase +
           " user=" + kUser + " password=" + kPassword;
  }
  /// The superuser over the Unix socket (trust), for set-up and inspection.
  std::string admin_conninfo(const std::string& dbname = kDatabase) const {
    return "host=" + socket_dir() + " port=" + std::to_string(port_) + " dbname=" + dbname +
           " user=postgres";
  }

  /// Runs statements as the superuser; throws with the server's message on failure.
  void admin(const std::vector<std::string>& statements, const std::string& dbname = "postgres") {
    PGconn* conn = PQconnectdb(admin_conninfo(dbname).c_str());
    if (PQstatus(conn) != CONNECTION_OK) {
      const std::string error = PQerrorMessage(conn);
      PQfinish(conn);
      throw std::runtime_error("cannot connect to the test server as postgres: " + error);
    }
    for (const std::string& sql : statements) {
      PGresult* result = PQexec(conn, sql.c_str());
      const ExecStatusType status = PQresultStatus(result);
      const std::string error = PQresultErrorMessage(result);
      PQclear(result);
      if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
        PQfinish(conn);
        throw std::runtime_error(sql + ": " + error);
      }
    }
    PQfinish(conn);
  }

  /// Starts the postmaster (again, on the same port and directory, after crash() or stop());
  /// returns once it accepts connections.
  void start() {
    if (pid_ > 0) return;
    std::filesystem::create_directories(socket_dir());
    if (switch_user_) (void)::chown(socket_dir().c_str(), uid_, gid_);
    pid_ = spawn({bindir_ + "/postgres", "-D", data_dir(), "-p", std::to_string(port_), "-k",
                  socket_dir(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"},
                 dir_ + "/server.log", /*die_with_parent=*/true);
    const std::string ping = admin_conninfo("postgres");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{60};
    while (std::chrono::steady_clock::now() < deadline) {
      if (PQping(ping.c_str()) == PQPING_OK) return;
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("postgres exited at start: " + tail(dir_ + "/server.log"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{20});
    }
    stop();
    throw std::runtime_error("postgres did not accept connections within 60 s on port " +
                             std::to_string(port_) + ": " + tail(dir_ + "/server.log"));
  }

  /// An immediate shutdown (SIGQUIT, what `pg_ctl stop -m immediate` sends): no checkpoint,
  /// the next start() runs crash recovery from the WAL.
  void crash() { signal_and_wait(SIGQUIT); }
  /// A fast shutdown (SIGINT, `pg_ctl stop -m fast`).
  void stop() { signal_and_wait(SIGINT); }

 private:
  std::string data_dir() const { return dir_ + "/data"; }
  std::string socket_dir() const { return dir_ + "/sock"; }

  void resolve_user() {
    if (::geteuid() != 0) return;  // an ordinary user runs the server as itself
    const passwd* pw = ::getpwnam("postgres");
    if (pw == nullptr) {
      throw std::runtime_error(
          "running as root, but there is no `postgres` user to run the test server as "
          "(PostgreSQL refuses root): install postgresql-15, which creates it");
    }
    switch_user_ = true;
    uid_ = pw->pw_uid;
    gid_ = pw->pw_gid;
  }

  // fork + exec with stdout/stderr to log; everything the child needs is built before fork().
  pid_t spawn(const std::vector<std::string>& args, const std::string& log,
              bool die_with_parent) const {
    std::vector<std::string> owned = args;
    std::vector<char*> argv;
    for (std::string& a : owned) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::string path_env = "PATH=/usr/bin:/bin", lang_env = "LC_ALL=C", home_env = "HOME=" + dir_;
    char* envp[] = {path_env.data(), lang_env.data(), home_env.data(), nullptr};
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      const int null = ::open("/dev/null", O_RDONLY);
      if (fd < 0 || null < 0) ::_exit(126);
      ::dup2(null, 0);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      if (switch_user_) {
        if (::fchown(fd, uid_, gid_) != 0 || ::setgroups(1, &gid_) != 0 || ::setgid(gid_) != 0 ||
            ::setuid(uid_) != 0) {
          ::_exit(125);
        }
      }
      // After setuid, which clears it.
      if (die_with_parent && (::prctl(PR_SET_PDEATHSIG, SIGQUIT) != 0 || ::getppid() != parent)) {
        ::_exit(124);
      }
      ::execve(argv[0], argv.data(), envp);
      ::_exit(127);
    }
    return pid;
  }

  void run(const std::vector<std::string>& args, const std::string& log, const char* what) const {
    const pid_t pid = spawn(args, log, false);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      throw std::runtime_error(std::string(what) + " failed: " + tail(log));
    }
  }

  static std::string tail(const std::string& path) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    std::string all = text.str();
    return all.size() > 2000 ? all.substr(all.size() - 2000) : all;
  }

  void signal_and_wait(int sig) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{30};
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

  void remove_dir() {
    if (dir_.empty()) return;
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  std::string bindir_;
  int port_;
  std::string dir_;
  bool switch_user_ = false;
  uid_t uid_ = 0;
  gid_t gid_ = 0;
  pid_t pid_ = -1;
};

}  // namespace idem::test_support
