#pragma once
// The store-wide count behind RedisStore's stats hook: SCAN every master for the records of a
// key prefix and read the head of each. Internal to idem::redis.

#include <string>

#include "cluster_router.hpp"
#include "idem/dedup_store.hpp"

namespace idem::redis_detail {

/// SCAN (COUNT 1000, never KEYS) of `<prefix>k:*` on every master, then per batch one
/// pipeline of GETRANGE (the value's head: state, token, lease), PTTL and MEMORY USAGE per
/// key. O(records) work on the servers: an operator command, never for a hot path.
/// @throws RedisUnavailable.
StoreStats scan_records(Router& router, const std::string& key_prefix);

}  // namespace idem::redis_detail
