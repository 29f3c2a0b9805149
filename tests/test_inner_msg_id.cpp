#include "idem/inner_msg_id.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "idem/clock.hpp"

namespace idem {
namespace {

// The 22-bit counter the generator spreads over rand_a and the top of rand_b.
std::uint64_t counter_of(const InnerMsgId& id) {
  return ((id.high() & 0xFFF) << 10) | ((id.low() >> 52) & 0x3FF);
}

std::int64_t system_now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

TEST(InnerMsgId, NilByDefault) {
  InnerMsgId id;
  EXPECT_EQ(id.high(), 0u);
  EXPECT_EQ(id.low(), 0u);
  EXPECT_EQ(id.to_string(), "00000000-0000-0000-0000-000000000000");
}

TEST(InnerMsgId, ParsesRfc9562Example) {
  // RFC 9562 appendix A.6, in the canonical lower case (the RFC prints it upper case, which
  // the contract's parse rejects).
  EXPECT_FALSE(InnerMsgId::parse("017F22E2-79B0-7CC3-98C4-DC0C0C07398F"));
  const auto id = InnerMsgId::parse("017f22e2-79b0-7cc3-98c4-dc0c0c07398f");
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(id->high(), 0x017F22E279B07CC3u);
  EXPECT_EQ(id->low(), 0x98C4DC0C0C07398Fu);
  EXPECT_EQ(id->unix_ms(), 0x017F22E279B0u);
  EXPECT_EQ(id->to_string(), "017f22e2-79b0-7cc3-98c4-dc0c0c07398f");
}

TEST(InnerMsgId, RoundTripsThroughText) {
  InnerMsgIdGenerator gen;
  for (int i = 0; i < 10'000; ++i) {
    const InnerMsgId id = gen.next();
    const std::string text = id.to_string();
    ASSERT_EQ(text.size(), 36u);
    for (char c : text) ASSERT_TRUE(c == '-' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
    const auto parsed = InnerMsgId::parse(text);
    ASSERT_TRUE(parsed.has_value()) << text;
    ASSERT_EQ(*parsed, id);

    std::string upper = text;
    std::transform(upper.begin(), upper.end(), upper.begin(),
                   [](char c) { return static_cast<char>(std::toupper(c)); });
    // The contract's parse accepts the canonical lower-case text only.
    ASSERT_FALSE(InnerMsgId::parse(upper));

    char buf[36];
    id.write_to(buf);
    ASSERT_EQ(std::string(buf, 36), text);
  }
}

TEST(InnerMsgId, BytesAreBigEndian) {
  const InnerMsgId id(0x0123456789ABCDEFull, 0xFEDCBA9876543210ull);
  const auto b = id.bytes();
  const std::uint8_t expected[16] = {0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF,
                                     0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(std::to_integer<std::uint8_t>(b[i]), expected[i]) << i;
}

TEST(InnerMsgId, ParseRejectsMalformedText) {
  const std::string good = "017f22e2-79b0-7cc3-98c4-dc0c0c07398f";
  ASSERT_TRUE(InnerMsgId::parse(good).has_value());
  const struct {
    const char* why;
    std::string text;
  } cases[] = {
      {"empty", ""},
      {"one short", good.substr(0, 35)},
      {"one long", "017f22e2-79b0-7cc3-98c4-dc0c0c07398f0"},
      {"no hyphens", "017f22e279b07cc398c4dc0c0c07398f"},
      {"braces", "{017f22e2-79b0-7cc3-98c4-dc0c0c07398f}"},
      {"urn prefix", "urn:uuid:017f22e2-79b0-7cc3-98c4-dc0c0c07398f"},
      {"leading space", " 017f22e2-79b0-7cc3-98c4-dc0c0c07398"},
      {"hyphen moved left", "017f22e-279b0-7cc3-98c4-dc0c0c07398f"},
      {"hyphen moved right", "017f22e27-9b0-7cc3-98c4-dc0c0c07398f"},
      {"hyphen replaced", "017f22e2_79b0-7cc3-98c4-dc0c0c07398f"},
      {"last hyphen missing", "017f22e2-79b0-7cc3-98c4xdc0c0c07398f"},
      {"extra hyphen for a digit", "017f22e2-79b0-7cc3-98c4-dc0c0c07398-"},
      {"non-hex letter", "017f22g2-79b0-7cc3-98c4-dc0c0c07398f"},
      {"non-hex letter upper", "017F22E2-79B0-7CC3-98C4-DC0C0C07398G"},
      {"space inside", "017f22e2-79b0-7cc3-98c4-dc0c0c07 98f"},
      {"embedded nul", std::string("017f22e2-79b0-7cc3-98c4-dc0c0c07\0"
                                   "98f",
                                   36)},
      {"non-ascii byte",
       "017f22e2-79b0-7cc3-98c4-dc0c0c07\xff"
       "98f"},
      {"version 4", "017f22e2-79b0-4cc3-98c4-dc0c0c07398f"},
      {"version 8", "017f22e2-79b0-8cc3-98c4-dc0c0c07398f"},
      {"version 0", "017f22e2-79b0-0cc3-98c4-dc0c0c07398f"},
      {"nil", "00000000-0000-0000-0000-000000000000"},
      {"max", "ffffffff-ffff-ffff-ffff-ffffffffffff"},
      {"variant NCS (0xxx)", "017f22e2-79b0-7cc3-78c4-dc0c0c07398f"},
      {"variant NCS (0xxx) low", "017f22e2-79b0-7cc3-08c4-dc0c0c07398f"},
      {"variant Microsoft (110x)", "017f22e2-79b0-7cc3-c8c4-dc0c0c07398f"},
      {"variant reserved (111x)", "017f22e2-79b0-7cc3-e8c4-dc0c0c07398f"},
  };
  for (const auto& c : cases) {
    EXPECT_FALSE(InnerMsgId::parse(c.text).has_value()) << c.why << ": " << c.text;
  }
}

TEST(InnerMsgId, VersionAndVariantBits) {
  InnerMsgIdGenerator gen;
  for (int i = 0; i < 1000; ++i) {
    const InnerMsgId id = gen.next();
    ASSERT_EQ((id.high() >> 12) & 0xF, 7u);
    ASSERT_EQ(id.low() >> 62, 0b10u);
    const std::string text = id.to_string();
    ASSERT_EQ(text[14], '7');
    ASSERT_TRUE(text[19] == '8' || text[19] == '9' || text[19] == 'a' || text[19] == 'b');
  }
}

TEST(InnerMsgId, UnixMsFollowsSystemClock) {
  InnerMsgIdGenerator gen;
  const std::int64_t before = system_now_ms();
  const InnerMsgId id = gen.next();
  const std::int64_t after = system_now_ms();
  EXPECT_GE(static_cast<std::int64_t>(id.unix_ms()), before);
  EXPECT_LE(static_cast<std::int64_t>(id.unix_ms()), after);
}

TEST(InnerMsgId, OrderingMatchesTextOrdering) {
  std::mt19937_64 rng(42);
  std::vector<InnerMsgId> ids;
  InnerMsgIdGenerator gen;
  for (int i = 0; i < 200; ++i) ids.push_back(gen.next());
  for (int i = 0; i < 200; ++i) ids.emplace_back(rng(), rng());
  // Ids that differ in a single nibble, including the top one of each half.
  ids.emplace_back(0x1000000000000000ull, 0);
  ids.emplace_back(0, 0x1000000000000000ull);
  ids.emplace_back(0, 1);
  ids.emplace_back(1, 0);
  for (const auto& a : ids) {
    for (const auto& b : ids) {
      const auto by_value = a <=> b;
      const int by_text = a.to_string().compare(b.to_string());
      ASSERT_EQ(by_value < 0, by_text < 0);
      ASSERT_EQ(by_value == 0, by_text == 0);
      ASSERT_EQ(a == b, by_text == 0);
    }
  }
}

TEST(InnerMsgId, UsableInUnorderedSet) {
  InnerMsgIdGenerator gen;
  std::unordered_set<InnerMsgId> set;
  std::vector<InnerMsgId> ids;
  for (int i = 0; i < 100'000; ++i) {
    ids.push_back(gen.next());
    ASSERT_TRUE(set.insert(ids.back()).second);
  }
  EXPECT_EQ(set.size(), ids.size());
  for (const auto& id : ids) EXPECT_EQ(set.count(id), 1u);
  EXPECT_EQ(set.count(InnerMsgId{}), 0u);
  EXPECT_FALSE(set.insert(ids.front()).second);
}

TEST(InnerMsgIdGenerator, MillionIdsAcrossFourThreadsIncreaseAndAreUnique) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 250'000;
  InnerMsgIdGenerator gen;
  std::vector<std::vector<InnerMsgId>> per_thread(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&gen, &out = per_thread[t]] {
      out.reserve(kPerThread);
      for (int i = 0; i < kPerThread; ++i) out.push_back(gen.next());
    });
  }
  for (auto& th : threads) th.join();

  std::vector<InnerMsgId> all;
  all.reserve(kThreads * kPerThread);
  for (const auto& ids : per_thread) {
    ASSERT_EQ(ids.size(), static_cast<std::size_t>(kPerThread));
    for (std::size_t i = 1; i < ids.size(); ++i) {
      ASSERT_LT(ids[i - 1], ids[i]) << "at " << i;
    }
    all.insert(all.end(), ids.begin(), ids.end());
  }
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::adjacent_find(all.begin(), all.end()), all.end());
  // The generator's (timestamp, counter) prefix alone is unique: one atomic hands it out.
  for (std::size_t i = 1; i < all.size(); ++i) {
    ASSERT_TRUE(all[i - 1].unix_ms() < all[i].unix_ms() ||
                counter_of(all[i - 1]) < counter_of(all[i]));
  }
}

TEST(InnerMsgIdGenerator, StrictlyIncreasingWhenClockStepsBack) {
  ManualClock clock(1'700'000'000'000);
  InnerMsgIdGenerator gen(clock);
  InnerMsgId prev = gen.next();
  EXPECT_EQ(prev.unix_ms(), 1'700'000'000'000u);
  EXPECT_EQ(counter_of(prev), 0u);

  for (int i = 0; i < 100; ++i) {
    const InnerMsgId id = gen.next();
    ASSERT_LT(prev, id);
    prev = id;
  }
  clock.set(1'700'000'000'000 - 5'000);  // NTP step back by 5 s
  for (int i = 0; i < 100; ++i) {
    const InnerMsgId id = gen.next();
    ASSERT_LT(prev, id);
    // The timestamp holds at the last one handed out; only the counter moves.
    ASSERT_EQ(id.unix_ms(), 1'700'000'000'000u);
    prev = id;
  }
  EXPECT_EQ(counter_of(prev), 200u);

  clock.set(1'700'000'000'000 + 1);  // caught up: a new millisecond restarts the counter
  const InnerMsgId caught_up = gen.next();
  EXPECT_LT(prev, caught_up);
  EXPECT_EQ(caught_up.unix_ms(), 1'700'000'000'001u);
  EXPECT_EQ(counter_of(caught_up), 0u);
}

TEST(InnerMsgIdGenerator, CounterOverflowWithinOneMillisecondStaysIncreasing) {
  constexpr std::uint64_t kStart = 1'700'000'000'000;
  ManualClock clock(static_cast<std::int64_t>(kStart));  // frozen
  InnerMsgIdGenerator gen(clock);
  constexpr std::uint64_t kCounterSpace = std::uint64_t{1} << 22;
  InnerMsgId prev = gen.next();
  for (std::uint64_t i = 1; i < kCounterSpace + 1000; ++i) {
    const InnerMsgId id = gen.next();
    if (!(prev < id)) FAIL() << "not increasing at " << i;
    if (i == kCounterSpace - 1) {
      ASSERT_EQ(id.unix_ms(), kStart);
      ASSERT_EQ(counter_of(id), kCounterSpace - 1);
    }
    if (i == kCounterSpace) {
      // The counter carried into the timestamp, which now runs 1 ms ahead of the clock.
      ASSERT_EQ(id.unix_ms(), kStart + 1);
      ASSERT_EQ(counter_of(id), 0u);
    }
    prev = id;
  }
  // The real clock reaching the carried millisecond must not repeat those ids.
  clock.set(static_cast<std::int64_t>(kStart + 1));
  EXPECT_LT(prev, gen.next());
}

TEST(InnerMsgIdGenerator, ForkedChildDoesNotRepeatParentIds) {
  // A frozen clock makes parent and child walk the same (timestamp, counter) sequence, so
  // only the random bits can tell their ids apart.
  ManualClock clock(1'700'000'000'000);
  InnerMsgIdGenerator gen(clock);
  (void)gen.next();  // seed this thread's PRNG before forking: the child inherits it

  constexpr int kIds = 1000;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_NE(pid, -1);
  if (pid == 0) {
    close(fds[0]);
    std::uint64_t buf[2 * kIds];
    for (int i = 0; i < kIds; ++i) {
      const InnerMsgId id = gen.next();
      buf[2 * i] = id.high();
      buf[2 * i + 1] = id.low();
    }
    const char* p = reinterpret_cast<const char*>(buf);
    std::size_t left = sizeof(buf);
    while (left > 0) {
      const ssize_t n = write(fds[1], p, left);
      if (n <= 0) _exit(2);
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    _exit(0);
  }
  close(fds[1]);
  std::vector<InnerMsgId> parent_ids;
  for (int i = 0; i < kIds; ++i) parent_ids.push_back(gen.next());

  std::uint64_t buf[2 * kIds];
  char* p = reinterpret_cast<char*>(buf);
  std::size_t got = 0;
  while (got < sizeof(buf)) {
    const ssize_t n = read(fds[0], p + got, sizeof(buf) - got);
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_EQ(got, sizeof(buf));

  std::unordered_set<InnerMsgId> parent_set(parent_ids.begin(), parent_ids.end());
  int same_prefix = 0;
  for (int i = 0; i < kIds; ++i) {
    const InnerMsgId child_id(buf[2 * i], buf[2 * i + 1]);
    EXPECT_EQ(parent_set.count(child_id), 0u) << child_id.to_string();
    if (child_id.high() == parent_ids[i].high()) ++same_prefix;
  }
  // Sanity: the test really exercised colliding timestamps and counters.
  EXPECT_EQ(same_prefix, kIds);
}

}  // namespace
}  // namespace idem
