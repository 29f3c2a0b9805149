#pragma once
// SQLite result codes: their names, whether they mean "unavailable", and what to do.

#include <string>

namespace idem::detail::sqlite {

/// "SQLITE_BUSY" for 5, and so on (primary codes).
const char* code_name(int primary) noexcept;

/// Codes that say "the database cannot be used right now", as opposed to "this statement is
/// wrong"; a handler's statement failing with one of these is reported as unavailability.
bool unavailable_code(int primary) noexcept;

/// What the caller should do about a primary code, for error messages.
std::string advice(int primary);

}  // namespace idem::detail::sqlite
