#include "errors.hpp"

#include <utility>

namespace idem::redis_detail {

void throw_redis(Kind kind, std::string summary,
                 std::optional<std::chrono::milliseconds> retry_in) {
  switch (kind) {
    case Kind::io:
      throw RedisIoError(std::move(summary), retry_in);
    case Kind::timeout:
      throw RedisTimeout(std::move(summary), retry_in);
    case Kind::protocol:
      throw RedisProtocolError(std::move(summary), retry_in);
    case Kind::reply:
      throw RedisReplyError(std::move(summary), retry_in);
    case Kind::unavailable:
      break;
  }
  throw RedisUnavailable(Kind::unavailable, std::move(summary), retry_in);
}

}  // namespace idem::redis_detail
