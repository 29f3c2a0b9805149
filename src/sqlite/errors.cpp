#include "errors.hpp"

#include <sqlite3.h>

namespace idem::detail::sqlite {

const char* code_name(int primary) noexcept {
  switch (primary) {
    case SQLITE_ERROR:
      return "SQLITE_ERROR";
    case SQLITE_INTERNAL:
      return "SQLITE_INTERNAL";
    case SQLITE_PERM:
      return "SQLITE_PERM";
    case SQLITE_ABORT:
      return "SQLITE_ABORT";
    case SQLITE_BUSY:
      return "SQLITE_BUSY";
    case SQLITE_LOCKED:
      return "SQLITE_LOCKED";
    case SQLITE_NOMEM:
      return "SQLITE_NOMEM";
    case SQLITE_READONLY:
      return "SQLITE_READONLY";
    case SQLITE_INTERRUPT:
      return "SQLITE_INTERRUPT";
    case SQLITE_IOERR:
      return "SQLITE_IOERR";
    case SQLITE_CORRUPT:
      return "SQLITE_CORRUPT";
    case SQLITE_FULL:
      return "SQLITE_FULL";
    case SQLITE_CANTOPEN:
      return "SQLITE_CANTOPEN";
    case SQLITE_PROTOCOL:
      return "SQLITE_PROTOCOL";
    case SQLITE_SCHEMA:
      return "SQLITE_SCHEMA";
    case SQLITE_TOOBIG:
      return "SQLITE_TOOBIG";
    case SQLITE_CONSTRAINT:
      return "SQLITE_CONSTRAINT";
    case SQLITE_MISMATCH:
      return "SQLITE_MISMATCH";
    case SQLITE_MISUSE:
      return "SQLITE_MISUSE";
    case SQLITE_NOLFS:
      return "SQLITE_NOLFS";
    case SQLITE_AUTH:
      return "SQLITE_AUTH";
    case SQLITE_RANGE:
      return "SQLITE_RANGE";
    case SQLITE_NOTADB:
      return "SQLITE_NOTADB";
    default:
      return "SQLITE_?";
  }
}

bool unavailable_code(int primary) noexcept {
  switch (primary) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_NOMEM:
    case SQLITE_READONLY:
    case SQLITE_INTERRUPT:
    case SQLITE_IOERR:
    case SQLITE_CORRUPT:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_PROTOCOL:
    case SQLITE_NOTADB:
    case SQLITE_NOLFS:
    case SQLITE_PERM:
    case SQLITE_AUTH:
      return true;
    default:
      return false;
  }
}

std::string advice(int primary) {
  switch (primary) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return "another connection kept the database locked longer than busy_timeout; retry "
             "later, or raise the busy timeout (SqliteOptions::busy_timeout; idemctl: "
             "--busy-timeout) if that writer is expected to be slow";
    case SQLITE_CANTOPEN:
      return "check that the directory exists and that this process may create files in it "
             "(SQLite also creates the -wal and -shm files next to the database)";
    case SQLITE_NOTADB:
      return "the file is not an SQLite database (or is encrypted): point SqliteStore at a "
             "new path or at the right file";
    case SQLITE_READONLY:
      return "the database, its directory or its -wal/-shm files are read-only for this "
             "process: fix their permissions or use a writable path";
    case SQLITE_PERM:
    case SQLITE_AUTH:
      return "access was denied: check the file's permissions";
    case SQLITE_FULL:
      return "the disk is full: free some space";
    case SQLITE_IOERR:
      return "the operating system reported an I/O error: check the disk and file system";
    case SQLITE_CORRUPT:
      return "the database file is corrupt: restore it from a backup, or move it aside and "
             "start a new one (its done keys are then forgotten)";
    case SQLITE_NOMEM:
      return "SQLite ran out of memory";
    default:
      return "see SQLite's message";
  }
}

}  // namespace idem::detail::sqlite
