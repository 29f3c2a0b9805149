#include "idem/inner_msg_id.hpp"

#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <random>

namespace idem {
namespace {

constexpr int kCounterBits = 22;
constexpr std::uint64_t kCounterMask = (std::uint64_t{1} << kCounterBits) - 1;
// 2^42 ms: the largest timestamp that still fits above the counter in the 64-bit state.
constexpr std::uint64_t kMaxStateMs = (std::uint64_t{1} << (64 - kCounterBits)) - 1;

constexpr char kHexDigits[] = "0123456789abcdef";

// Value of a hex digit, or 0xFF; a table keeps parse branch-light.
constexpr std::array<std::uint8_t, 256> make_hex_table() {
  std::array<std::uint8_t, 256> table{};
  for (auto& v : table) v = 0xFF;
  for (int i = 0; i < 10; ++i) table['0' + i] = static_cast<std::uint8_t>(i);
  // Lower case only: parse accepts exactly the canonical text to_string() writes.
  for (int i = 0; i < 6; ++i) table['a' + i] = static_cast<std::uint8_t>(10 + i);
  return table;
}
constexpr std::array<std::uint8_t, 256> kHexValue = make_hex_table();

// Where the 32 hex digits sit in the 36 characters (hyphens at 8, 13, 18 and 23).
constexpr std::uint8_t kDigitPos[32] = {0,  1,  2,  3,  4,  5,  6,  7,  9,  10, 11,
                                        12, 14, 15, 16, 17, 19, 20, 21, 22, 24, 25,
                                        26, 27, 28, 29, 30, 31, 32, 33, 34, 35};

// Bumped in every forked child, so a child's threads reseed instead of replaying the
// parent's random stream. Starts at 1 so a zero-initialised thread state seeds on first use.
std::atomic<std::uint64_t> g_fork_generation{1};

void on_fork_child() noexcept {
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
}

// xoshiro256** (Blackman & Vigna): a few ns per 64 bits, no syscall per id.
struct ThreadRandom {
  std::uint64_t s[4];
  std::uint64_t generation;  // 0: never seeded
};

// Constant-initialised, so access needs no TLS guard.
thread_local ThreadRandom t_random{};

constexpr std::uint64_t rotl(std::uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

[[gnu::noinline, gnu::cold]] void seed(ThreadRandom& r, std::uint64_t generation) noexcept {
  static const bool registered = (pthread_atfork(nullptr, nullptr, &on_fork_child), true);
  (void)registered;
  std::uint64_t words[4] = {};
  try {
    std::random_device device;
    for (auto& w : words) w = (std::uint64_t{device()} << 32) | device();
  } catch (...) {
    // No entropy source: fall back to time and address, still distinct per thread/process.
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    words[0] = static_cast<std::uint64_t>(ts.tv_nsec) ^ reinterpret_cast<std::uintptr_t>(&r);
    words[1] = static_cast<std::uint64_t>(ts.tv_sec);
  }
  // splitmix64 over the seed words: spreads them and never leaves the state all zero.
  std::uint64_t x = words[0] ^ rotl(words[1], 16) ^ rotl(words[2], 32) ^ rotl(words[3], 48);
  for (auto& w : r.s) {
    x += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    w = z ^ (z >> 31);
  }
  r.generation = generation;
}

inline std::uint64_t next_random() noexcept {
  ThreadRandom& r = t_random;
  const std::uint64_t generation = g_fork_generation.load(std::memory_order_relaxed);
  if (r.generation != generation) [[unlikely]]
    seed(r, generation);
  const std::uint64_t result = rotl(r.s[1] * 5, 7) * 9;
  const std::uint64_t t = r.s[1] << 17;
  r.s[2] ^= r.s[0];
  r.s[3] ^= r.s[1];
  r.s[1] ^= r.s[2];
  r.s[0] ^= r.s[3];
  r.s[2] ^= t;
  r.s[3] = rotl(r.s[3], 45);
  return result;
}

inline std::uint64_t realtime_ms() noexcept {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000 +
         static_cast<std::uint64_t>(ts.tv_nsec) / 1'000'000;
}

}  // namespace

std::string InnerMsgId::to_string() const {
  std::string out(36, '\0');
  write_to(out.data());
  return out;
}

void InnerMsgId::write_to(char* out) const noexcept {
  out[8] = out[13] = out[18] = out[23] = '-';
  for (int i = 0; i < 16; ++i) {
    out[kDigitPos[i]] = kHexDigits[(high_ >> (60 - 4 * i)) & 0xF];
    out[kDigitPos[16 + i]] = kHexDigits[(low_ >> (60 - 4 * i)) & 0xF];
  }
}

std::optional<InnerMsgId> InnerMsgId::parse(std::string_view text) noexcept {
  if (text.size() != 36) return std::nullopt;
  if (text[8] != '-' || text[13] != '-' || text[18] != '-' || text[23] != '-') return std::nullopt;
  // OR all digit values together and test once: 0xFF (not hex) is the only value above 15.
  std::uint8_t bad = 0;
  std::uint64_t high = 0;
  std::uint64_t low = 0;
  for (int i = 0; i < 16; ++i) {
    const std::uint8_t h = kHexValue[static_cast<unsigned char>(text[kDigitPos[i]])];
    const std::uint8_t l = kHexValue[static_cast<unsigned char>(text[kDigitPos[16 + i]])];
    bad |= h | l;
    high = (high << 4) | (h & 0xF);
    low = (low << 4) | (l & 0xF);
  }
  if (bad > 0xF) return std::nullopt;
  if (((high >> 12) & 0xF) != 7) return std::nullopt;  // version
  if ((low >> 62) != 0b10) return std::nullopt;        // variant
  return InnerMsgId(high, low);
}

std::array<std::byte, 16> InnerMsgId::bytes() const noexcept {
  std::array<std::byte, 16> out;
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<std::byte>(high_ >> (56 - 8 * i));
    out[8 + i] = static_cast<std::byte>(low_ >> (56 - 8 * i));
  }
  return out;
}

InnerMsgId InnerMsgIdGenerator::next() noexcept {
  std::uint64_t now_ms;
  if (clock_ == nullptr) {
    now_ms = realtime_ms();
  } else {
    const std::int64_t ms = clock_->now_ms();
    now_ms = ms < 0 ? 0 : static_cast<std::uint64_t>(ms);
  }
  const std::uint64_t floor = std::min(now_ms, kMaxStateMs) << kCounterBits;

  // Relaxed is enough: all RMWs on last_ form one total order, which is what monotonicity
  // needs; no other memory is published through it.
  std::uint64_t last = last_.load(std::memory_order_relaxed);
  std::uint64_t state;
  do {
    state = std::max(floor, last + 1);
  } while (!last_.compare_exchange_weak(last, state, std::memory_order_relaxed,
                                        std::memory_order_relaxed));

  // 48-bit ms | version 7 | counter[21:10] as rand_a; variant 10 | counter[9:0] | 52 random.
  const std::uint64_t ms = state >> kCounterBits;
  const std::uint64_t counter = state & kCounterMask;
  const std::uint64_t high = (ms << 16) | (std::uint64_t{7} << 12) | (counter >> 10);
  const std::uint64_t low =
      (std::uint64_t{0b10} << 62) | ((counter & 0x3FF) << 52) | (next_random() >> 12);
  return InnerMsgId(high, low);
}

}  // namespace idem
