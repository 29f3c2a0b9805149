#pragma once
/// @file
/// @brief The Redis backend: idem::RedisStore and idem::RedisOptions (link idem::redis).

#include "idem/idem.hpp"
#include "idem/stores/redis_store.hpp"
