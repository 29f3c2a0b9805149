#pragma once
// Throwing the RedisUnavailable subclass of a kind. Internal to idem::redis.

#include <chrono>
#include <optional>
#include <string>

#include "idem/stores/redis_errors.hpp"

namespace idem::redis_detail {

using Kind = RedisUnavailable::Kind;

/// Throws the subclass of RedisUnavailable that stands for kind (RedisTimeout for
/// Kind::timeout, ...).
[[noreturn]] void throw_redis(Kind kind, std::string summary,
                              std::optional<std::chrono::milliseconds> retry_in = std::nullopt);

}  // namespace idem::redis_detail
