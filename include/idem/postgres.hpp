#pragma once
/// @file
/// @brief The PostgreSQL backend of idem: idem::PostgresStore, idem::PostgresTx and the offsets
/// table (link idem::postgres). Pulls in the core too.

#include "idem/idem.hpp"
#include "idem/stores/postgres_store.hpp"
