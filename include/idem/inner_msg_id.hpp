#pragma once
/// @file
/// @brief idem::InnerMsgId and idem::InnerMsgIdGenerator: the producer-side ("first half")
/// message id, an RFC 9562 UUID version 7.

#include <array>
#include <atomic>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "idem/clock.hpp"

namespace idem {

/// @brief A 128-bit RFC 9562 UUIDv7. Assigned once per logical message and reused on every
/// retry, so the broker (or next hop) can keep one copy per id.
class InnerMsgId {
 public:
  /// @brief The nil id (all zero); never produced by a generator.
  constexpr InnerMsgId() noexcept = default;
  /// @brief From the two big-endian halves of the 16 bytes.
  constexpr InnerMsgId(std::uint64_t high, std::uint64_t low) noexcept : high_(high), low_(low) {}

  /// @brief Canonical 36-character lower-case text, e.g. "0190b2c3-...".
  std::string to_string() const;
  /// @brief Writes the 36 characters to out (no terminator).
  void write_to(char* out) const noexcept;
  /// @brief Parses the canonical lower-case UUIDv7 text to_string() writes; nullopt for anything
  /// else: wrong length, misplaced hyphens, non-hex digits, a version other than 7 or a variant
  /// other than RFC 9562's.
  static std::optional<InnerMsgId> parse(std::string_view text) noexcept;

  /// @brief The 48-bit Unix timestamp in milliseconds.
  constexpr std::uint64_t unix_ms() const noexcept { return high_ >> 16; }
  /// @brief The 16 bytes in network order.
  std::array<std::byte, 16> bytes() const noexcept;
  constexpr std::uint64_t high() const noexcept { return high_; }
  constexpr std::uint64_t low() const noexcept { return low_; }

  friend constexpr auto operator<=>(const InnerMsgId&, const InnerMsgId&) = default;

 private:
  std::uint64_t high_ = 0;
  std::uint64_t low_ = 0;
};

/// @brief Makes strictly increasing UUIDv7s (RFC 9562 section 6.2, method 1: a 22-bit counter
/// after the millisecond timestamp, then 52 random bits from a per-thread PRNG).
///
/// Thread-safe: every next() is strictly greater than every id this generator returned
/// before it, even when the wall clock steps back (the counter then carries on from the last
/// id until the clock catches up). When more than 2^22 ids are asked for within one
/// millisecond the counter carries into the timestamp, which then runs ahead of the clock.
/// Ids are unique across generators, threads and forked processes through the random bits.
/// Timestamps are representable until 2109 (42 bits of milliseconds in the internal state).
class InnerMsgIdGenerator {
 public:
  /// @brief Reads CLOCK_REALTIME directly.
  InnerMsgIdGenerator() noexcept = default;
  /// @brief Reads clock, which must return Unix milliseconds and outlive the generator;
  /// for tests that freeze the clock or step it back (see ManualClock).
  explicit InnerMsgIdGenerator(const Clock& clock) noexcept : clock_(&clock) {}
  InnerMsgIdGenerator(const InnerMsgIdGenerator&) = delete;
  InnerMsgIdGenerator& operator=(const InnerMsgIdGenerator&) = delete;

  /// @brief The next id.
  InnerMsgId next() noexcept;

 private:
  // (unix_ms << 22) | counter of the last id handed out. Own cache line: every next() writes it.
  alignas(64) std::atomic<std::uint64_t> last_{0};
  const Clock* clock_ = nullptr;  // nullptr: CLOCK_REALTIME without a virtual call
};

}  // namespace idem

template <>
struct std::hash<idem::InnerMsgId> {
  std::size_t operator()(const idem::InnerMsgId& id) const noexcept {
    // The low half is mostly random bits; mix in the high half for ids from one millisecond.
    return static_cast<std::size_t>(id.low() ^ (id.high() * 0x9E3779B97F4A7C15ull));
  }
};
