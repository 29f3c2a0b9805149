#pragma once
// The one hash of biz-ids used inside idem (shard choice and hash tables): XXH3-64.

#include <cstddef>
#include <string_view>

namespace idem::detail {

std::size_t key_hash(std::string_view key) noexcept;

}  // namespace idem::detail
