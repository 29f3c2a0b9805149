#pragma once
// Free loopback ports for the servers the tests start.
//
// Ports are drawn below the kernel's ephemeral range. A server killed and restarted on its
// port (the Redis outage and failover tests, the RabbitMQ crash tests) must find the port
// still free; inside the ephemeral range any outgoing connection may take it as its local
// port meanwhile, and on loopback a client retrying against the dead port can even connect
// to itself (TCP simultaneous open) and hold it.

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <random>
#include <stdexcept>
#include <string>

namespace idem::test_support {

/// True when a listening socket could bind 127.0.0.1:port now.
inline bool port_is_free(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("socket() failed");
  int one = 1;  // the servers set SO_REUSEADDR too: TIME_WAIT leftovers do not block them
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

/// The first port of the kernel's ephemeral range (32768 unless configured otherwise).
inline int ephemeral_port_floor() {
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  int low = 32768;
  if (!(range >> low)) low = 32768;
  return low;
}

/// A port in [10000, ephemeral floor) that is free, and whose port + companion_offset is free
/// too (Redis Cluster's bus listens on port + 10000).
inline int free_port(int companion_offset = 0) {
  constexpr int kLowest = 10000;
  const int highest = ephemeral_port_floor() - 1 - companion_offset;
  if (highest <= kLowest) {
    throw std::runtime_error("no room for test ports below the ephemeral range (" +
                             std::to_string(highest + 1 + companion_offset) +
                             "): lower /proc/sys/net/ipv4/ip_local_port_range's start");
  }
  // Seeded per process: concurrently running test binaries draw different ports.
  static thread_local std::mt19937 rng(std::random_device{}() ^ static_cast<unsigned>(::getpid()));
  std::uniform_int_distribution<int> pick(kLowest, highest);
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const int port = pick(rng);
    if (port_is_free(port) && (companion_offset == 0 || port_is_free(port + companion_offset))) {
      return port;
    }
  }
  throw std::runtime_error("no free loopback port found below " + std::to_string(highest + 1));
}

}  // namespace idem::test_support
