#pragma once
/// @file
/// @brief idem::Verdict: what a broker adapter does with a delivery once consume() has run;
/// the one mapping every adapter shares (Kafka commits, RabbitMQ acks).

#include <exception>
#include <string>
#include <utility>

#include "idem/error.hpp"
#include "idem/result.hpp"

namespace idem {

/// @brief The transport-neutral action for one delivery.
enum class Disposition {
  settle,         ///< processed or duplicate: ack / commit past it
  retry,          ///< another worker holds the key: redeliver later, no attempt counted
  retry_counted,  ///< the handler failed: redeliver, counting one attempt toward the limit
  dead_letter,    ///< a payload conflict or an invalid message: retrying cannot help
  hold,           ///< the store is unavailable: keep the delivery unacked and back off
};

/// @brief Why a delivery is dead-lettered; each has its own idem::Counter.
enum class DeadLetterReason {
  none,                ///< not dead-lettered
  conflict,            ///< Outcome::conflict
  invalid,             ///< idem::InvalidMessage
  missing_key,         ///< no biz-id in the delivery (decided by the adapter)
  attempts_exhausted,  ///< failed max_attempts times (decided by the adapter)
};

/// @brief A Disposition and, for anything but settle, why (for logs and dead-letter headers).
struct Verdict {
  Disposition disposition = Disposition::retry;
  std::string reason{};
  /// For Disposition::dead_letter: conflict or invalid.
  DeadLetterReason cause = DeadLetterReason::none;
};

/// @brief Runs consume (a callable returning idem::Result) and maps its outcome, or the idem
/// exception it throws, to a Verdict. A message is settled only when it was processed or is a
/// known duplicate.
template <class Consume>
Verdict decide(Consume&& consume) {
  try {
    switch (std::forward<Consume>(consume)().outcome) {
      case Outcome::processed:
      case Outcome::duplicate:
        return {Disposition::settle};
      case Outcome::failed:
        return {Disposition::retry_counted, "handler failed"};
      case Outcome::in_progress:
        return {Disposition::retry, "key in progress elsewhere"};
      case Outcome::conflict:
        return {Disposition::dead_letter, "payload conflict: key reused with a different payload",
                DeadLetterReason::conflict};
    }
  } catch (const InvalidMessage& e) {
    return {Disposition::dead_letter, std::string("invalid message: ") + e.what(),
            DeadLetterReason::invalid};
  } catch (const StoreUnavailable& e) {
    return {Disposition::hold, std::string("store unavailable: ") + e.what()};
  } catch (const std::exception& e) {  // a handler error rethrown on request
    return {Disposition::retry_counted, std::string("handler failed: ") + e.what()};
  } catch (...) {  // the same, of a type that is not a std::exception
    return {Disposition::retry_counted, "handler failed with a non-standard exception"};
  }
  return {Disposition::retry, "unknown outcome"};
}

}  // namespace idem
