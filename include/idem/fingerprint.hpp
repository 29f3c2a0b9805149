#pragma once
/// @file
/// @brief idem::Fingerprint, the 128-bit XXH3 digest of a payload used for conflict detection.

#include <compare>
#include <cstdint>
#include <string_view>

namespace idem {

/// @brief XXH3-128 digest of a payload. The all-zero value means "not fingerprinted" and
/// matches anything.
struct Fingerprint {
  std::uint64_t low = 0;
  std::uint64_t high = 0;

  /// @brief XXH3-128 of the bytes.
  static Fingerprint of(std::string_view bytes) noexcept;

  bool empty() const noexcept { return low == 0 && high == 0; }
  /// @brief False only when both are set and differ.
  bool compatible_with(const Fingerprint& other) const noexcept {
    return empty() || other.empty() || *this == other;
  }
  friend bool operator==(const Fingerprint&, const Fingerprint&) = default;
};

}  // namespace idem
