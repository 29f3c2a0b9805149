#pragma once
// Statement parameters in libpq's form (keys and other bytes bound in binary, never spliced
// into SQL), one-dimensional arrays in PostgreSQL's binary array format for the set-based
// statements, and readers of binary result columns.

#include <libpq-fe.h>

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "idem/stores/postgres_store.hpp"

namespace idem::detail::pg {

// Type OIDs (pg_type.dat); stable across PostgreSQL versions.
inline constexpr Oid kBool = 16, kBytea = 17, kInt8 = 20, kInt2 = 21, kInt4 = 23, kText = 25;
inline constexpr Oid kInt2Array = 1005, kInt4Array = 1007, kTextArray = 1009, kByteaArray = 1001,
                     kInt8Array = 1016;

/// The parameters of one statement. Bytes passed to bytea() must outlive the send (libpq copies
/// them into its output buffer there); everything else is copied.
class Params {
 public:
  Params& bytea(std::string_view bytes) { return add(kBytea, bytes, 1); }
  /// Copied: texts are short and often temporaries.
  Params& text(std::string_view chars) { return own(kText, std::string(chars), 0); }
  Params& int8(std::int64_t value);
  Params& int4(std::int32_t value);
  Params& int2(std::int16_t value);
  Params& null(Oid type = 0);
  /// An array built with ArrayWriter (owned here).
  Params& array(Oid array_type, std::string encoded);
  /// A parameter of a handler's statement (text, bytea or NULL; type left to the server).
  Params& user(const PostgresParam& param);

  int size() const noexcept { return static_cast<int>(values_.size()); }
  const Oid* types() const noexcept { return types_.data(); }
  const char* const* values() const noexcept { return values_.data(); }
  const int* lengths() const noexcept { return lengths_.data(); }
  const int* formats() const noexcept { return formats_.data(); }

 private:
  Params& add(Oid type, std::string_view bytes, int format);
  Params& own(Oid type, std::string bytes, int format);

  std::vector<Oid> types_;
  std::vector<const char*> values_;
  std::vector<int> lengths_;
  std::vector<int> formats_;
  std::deque<std::string> owned_;  // stable addresses
};

/// A one-dimensional array in binary format (array_send's layout).
class ArrayWriter {
 public:
  explicit ArrayWriter(Oid element_type) : element_type_(element_type) {}
  ArrayWriter& bytes(std::string_view value);
  ArrayWriter& int8(std::int64_t value);
  ArrayWriter& int4(std::int32_t value);
  ArrayWriter& int2(std::int16_t value);
  ArrayWriter& null();
  std::string finish() const;

 private:
  Oid element_type_;
  std::string body_;
  std::int32_t count_ = 0;
  bool has_null_ = false;
};

// Binary result columns (statements run with resultFormat 1).
std::int64_t get_int8(const PGresult* result, int row, int column);
std::int32_t get_int4(const PGresult* result, int row, int column);
std::int16_t get_int2(const PGresult* result, int row, int column);
bool get_bool(const PGresult* result, int row, int column);
std::string_view get_bytes(const PGresult* result, int row, int column);
bool is_null(const PGresult* result, int row, int column);

/// The row count of a command tag ("DELETE 3" -> 3); 0 when there is none.
std::int64_t affected_rows(const PGresult* result);

}  // namespace idem::detail::pg
