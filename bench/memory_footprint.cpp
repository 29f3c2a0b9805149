// Fills a MemoryStore (or, with --bare, an absl::flat_hash_set<std::string>) with N done
// records of 16-byte keys and exits; bench/memory_footprint.sh reads the peak RSS.
#include <absl/container/flat_hash_set.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "idem/idem.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: memory_footprint N [--bare]\n");
    return 2;
  }
  const std::size_t n = std::strtoull(argv[1], nullptr, 10);
  const bool bare = argc > 2 && std::strcmp(argv[2], "--bare") == 0;
  char key[32];
  if (bare) {
    absl::flat_hash_set<std::string> set;
    for (std::size_t i = 0; i < n; ++i) {
      std::snprintf(key, sizeof key, "pay-%012zu", i);
      set.emplace(key, 16);
    }
    std::printf("%zu\n", set.size());
    return 0;
  }
  idem::MemoryStore store;
  idem::IdempotentConsumer consumer(store, [](const idem::Message&) {});
  for (std::size_t i = 0; i < n; ++i) {
    std::snprintf(key, sizeof key, "pay-%012zu", i);
    consumer.consume({.key = std::string_view(key, 16), .payload = "{}"});
  }
  std::printf("%zu\n", store.counters().keys);
  return 0;
}
