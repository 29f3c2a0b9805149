#pragma once
/// @file
/// @brief The SQLite backend of idem: idem::SqliteStore, idem::SqliteTx and the offsets table
/// (link idem::sqlite). Pulls in the core too.

#include "idem/idem.hpp"
#include "idem/stores/sqlite_store.hpp"
