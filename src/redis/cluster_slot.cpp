#include "cluster_slot.hpp"

#include <vector>

namespace idem::redis_detail {

const std::string& slot_tag(std::uint16_t slot) {
  static const std::vector<std::string> tags = [] {
    std::vector<std::string> t(kSlots);
    std::size_t filled = 0;
    static constexpr char kDigits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    for (std::uint64_t n = 0; filled < kSlots; ++n) {
      std::string s;
      std::uint64_t v = n;
      do {
        s.push_back(kDigits[v % 36]);
        v /= 36;
      } while (v != 0);
      const std::uint16_t hashed = static_cast<std::uint16_t>(crc16(s) & (kSlots - 1));
      if (t[hashed].empty()) {
        t[hashed] = std::move(s);
        ++filled;
      }
    }
    return t;
  }();
  return tags[slot];
}

}  // namespace idem::redis_detail
