#include "params.hpp"

#include <charconv>

namespace idem::detail::pg {
namespace {

void put_be(std::string& out, std::uint64_t value, int bytes) {
  for (int shift = (bytes - 1) * 8; shift >= 0; shift -= 8) {
    out.push_back(static_cast<char>((value >> shift) & 0xff));
  }
}

std::uint64_t get_be(const PGresult* result, int row, int column, int bytes) {
  const auto* data = reinterpret_cast<const unsigned char*>(PQgetvalue(result, row, column));
  if (PQgetlength(result, row, column) != bytes) return 0;
  std::uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value = (value << 8) | data[i];
  return value;
}

}  // namespace

Params& Params::add(Oid type, std::string_view bytes, int format) {
  types_.push_back(type);
  // A null pointer would bind SQL NULL: an empty value must point somewhere.
  values_.push_back(bytes.data() != nullptr ? bytes.data() : "");
  lengths_.push_back(static_cast<int>(bytes.size()));
  formats_.push_back(format);
  return *this;
}

Params& Params::own(Oid type, std::string bytes, int format) {
  owned_.push_back(std::move(bytes));
  return add(type, owned_.back(), format);
}

Params& Params::int8(std::int64_t value) {
  std::string bytes;
  put_be(bytes, static_cast<std::uint64_t>(value), 8);
  return own(kInt8, std::move(bytes), 1);
}

Params& Params::int4(std::int32_t value) {
  std::string bytes;
  put_be(bytes, static_cast<std::uint32_t>(value), 4);
  return own(kInt4, std::move(bytes), 1);
}

Params& Params::int2(std::int16_t value) {
  std::string bytes;
  put_be(bytes, static_cast<std::uint16_t>(value), 2);
  return own(kInt2, std::move(bytes), 1);
}

Params& Params::null(Oid type) {
  types_.push_back(type);
  values_.push_back(nullptr);
  lengths_.push_back(0);
  formats_.push_back(0);
  return *this;
}

Params& Params::array(Oid array_type, std::string encoded) {
  return own(array_type, std::move(encoded), 1);
}

Params& Params::user(const PostgresParam& param) {
  if (!param.value) return null();
  return param.binary ? own(kBytea, *param.value, 1) : own(0, *param.value, 0);
}

ArrayWriter& ArrayWriter::bytes(std::string_view value) {
  put_be(body_, value.size(), 4);
  body_.append(value);
  ++count_;
  return *this;
}

ArrayWriter& ArrayWriter::int8(std::int64_t value) {
  put_be(body_, 8, 4);
  put_be(body_, static_cast<std::uint64_t>(value), 8);
  ++count_;
  return *this;
}

ArrayWriter& ArrayWriter::int4(std::int32_t value) {
  put_be(body_, 4, 4);
  put_be(body_, static_cast<std::uint32_t>(value), 4);
  ++count_;
  return *this;
}

ArrayWriter& ArrayWriter::int2(std::int16_t value) {
  put_be(body_, 2, 4);
  put_be(body_, static_cast<std::uint16_t>(value), 2);
  ++count_;
  return *this;
}

ArrayWriter& ArrayWriter::null() {
  put_be(body_, 0xffffffffu, 4);  // length -1
  has_null_ = true;
  ++count_;
  return *this;
}

std::string ArrayWriter::finish() const {
  std::string out;
  out.reserve(20 + body_.size());
  put_be(out, count_ == 0 ? 0 : 1, 4);  // dimensions
  put_be(out, has_null_ ? 1 : 0, 4);
  put_be(out, element_type_, 4);
  if (count_ > 0) {
    put_be(out, static_cast<std::uint32_t>(count_), 4);
    put_be(out, 1, 4);  // lower bound
  }
  out.append(body_);
  return out;
}

std::int64_t get_int8(const PGresult* result, int row, int column) {
  return static_cast<std::int64_t>(get_be(result, row, column, 8));
}
std::int32_t get_int4(const PGresult* result, int row, int column) {
  return static_cast<std::int32_t>(get_be(result, row, column, 4));
}
std::int16_t get_int2(const PGresult* result, int row, int column) {
  return static_cast<std::int16_t>(get_be(result, row, column, 2));
}
bool get_bool(const PGresult* result, int row, int column) {
  return get_be(result, row, column, 1) != 0;
}
std::string_view get_bytes(const PGresult* result, int row, int column) {
  return {PQgetvalue(result, row, column),
          static_cast<std::size_t>(PQgetlength(result, row, column))};
}
bool is_null(const PGresult* result, int row, int column) {
  return PQgetisnull(result, row, column) != 0;
}

std::int64_t affected_rows(const PGresult* result) {
  const char* tuples = PQcmdTuples(const_cast<PGresult*>(result));
  std::int64_t n = 0;
  if (tuples != nullptr)
    std::from_chars(tuples, tuples + std::char_traits<char>::length(tuples), n);
  return n;
}

}  // namespace idem::detail::pg
