#define XXH_INLINE_ALL
#include <xxhash.h>

#include "idem/detail/key_hash.hpp"
#include "idem/fingerprint.hpp"

namespace idem {

Fingerprint Fingerprint::of(std::string_view bytes) noexcept {
  const XXH128_hash_t digest = XXH3_128bits(bytes.data(), bytes.size());
  // Zero means "not fingerprinted"; a real all-zero digest (odds 2^-128) becomes 1.
  if (digest.low64 == 0 && digest.high64 == 0) return Fingerprint{1, 0};
  return Fingerprint{digest.low64, digest.high64};
}

namespace detail {
std::size_t key_hash(std::string_view key) noexcept {
  return static_cast<std::size_t>(XXH3_64bits(key.data(), key.size()));
}
}  // namespace detail

}  // namespace idem
