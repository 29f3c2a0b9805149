#pragma once
// Calls a user handler in whichever accepted form it has and normalises its return value.

#include <concepts>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "idem/claim.hpp"
#include "idem/message.hpp"

namespace idem::detail {

template <class R>
std::optional<std::string> to_response(R&& value) {
  using T = std::remove_cvref_t<R>;
  if constexpr (std::is_same_v<T, std::optional<std::string>>) {
    return std::forward<R>(value);
  } else {
    static_assert(std::is_convertible_v<R, std::string>,
                  "an idem handler returns void or something convertible to std::string");
    return std::optional<std::string>(std::in_place, std::string(std::forward<R>(value)));
  }
}

template <class H, class... Extra>
std::optional<std::string> call_returning_response(H& handler, Extra&&... extra) {
  using R = std::invoke_result_t<H&, Extra...>;
  if constexpr (std::is_void_v<R>) {
    std::invoke(handler, std::forward<Extra>(extra)...);
    return std::nullopt;
  } else {
    return to_response(std::invoke(handler, std::forward<Extra>(extra)...));
  }
}

// Accepted forms (R is void, std::optional<std::string>, or convertible to std::string):
//   R(const Message&)
//   R(const Message&, FencingToken)
template <class H>
std::optional<std::string> invoke_handler(H& handler, const Message& message, FencingToken token) {
  if constexpr (std::is_invocable_v<H&, const Message&, FencingToken>) {
    return call_returning_response(handler, message, token);
  } else {
    static_assert(std::is_invocable_v<H&, const Message&>,
                  "an idem handler is callable as h(const idem::Message&) or "
                  "h(const idem::Message&, idem::FencingToken), or with a transactional store "
                  "as h(const idem::Message&, Store::Transaction&)");
    return call_returning_response(handler, message);
  }
}

}  // namespace idem::detail
