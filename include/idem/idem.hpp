#pragma once
/// @file
/// @brief Umbrella header: the core of idem. Backends have their own headers
/// (<idem/sqlite.hpp>, <idem/redis.hpp>); test helpers live in <idem/testing/...>.

#include "idem/claim.hpp"
#include "idem/clock.hpp"
#include "idem/consumer.hpp"
#include "idem/dedup_store.hpp"
#include "idem/error.hpp"
#include "idem/fingerprint.hpp"
#include "idem/inner_msg_id.hpp"
#include "idem/message.hpp"
#include "idem/metrics.hpp"
#include "idem/options.hpp"
#include "idem/outcome.hpp"
#include "idem/result.hpp"
#include "idem/stores/cached_store.hpp"
#include "idem/stores/memory_store.hpp"
