#pragma once
// Redis Cluster hash slots: CRC16-XMODEM of the key (or of its {hash tag}) modulo 16384.

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace idem::redis_detail {

inline constexpr std::uint16_t kSlots = 16384;

consteval std::array<std::uint16_t, 256> crc16_table() {
  std::array<std::uint16_t, 256> table{};
  for (unsigned i = 0; i < 256; ++i) {
    std::uint16_t crc = static_cast<std::uint16_t>(i << 8);
    for (int bit = 0; bit < 8; ++bit) {
      crc = static_cast<std::uint16_t>((crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    table[i] = crc;
  }
  return table;
}

inline constexpr std::array<std::uint16_t, 256> kCrc16Table = crc16_table();

constexpr std::uint16_t crc16(std::string_view bytes) noexcept {
  std::uint16_t crc = 0;
  for (char c : bytes) {
    crc = static_cast<std::uint16_t>(
        (crc << 8) ^ kCrc16Table[((crc >> 8) ^ static_cast<unsigned char>(c)) & 0xff]);
  }
  return crc;
}

/// The slot Redis Cluster assigns to key: only the part between the first '{' and the next
/// '}' is hashed, when that part is non-empty.
constexpr std::uint16_t key_slot(std::string_view key) noexcept {
  std::size_t open = key.find('{');
  if (open != std::string_view::npos) {
    std::size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close != open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return static_cast<std::uint16_t>(crc16(key) & (kSlots - 1));
}

// The examples of the Redis Cluster specification.
static_assert(crc16("123456789") == 0x31C3);
static_assert(key_slot("{user1000}.following") == key_slot("{user1000}.followers"));
static_assert(key_slot("foo{}{bar}") == (crc16("foo{}{bar}") & (kSlots - 1)));
static_assert(key_slot("foo{{bar}}zap") == (crc16("{bar") & (kSlots - 1)));
static_assert(key_slot("foo{bar}{zap}") == (crc16("bar") & (kSlots - 1)));

/// A short alphanumeric hash tag for every slot: key_slot("{" + slot_tag(s) + "}") == s.
const std::string& slot_tag(std::uint16_t slot);

}  // namespace idem::redis_detail
