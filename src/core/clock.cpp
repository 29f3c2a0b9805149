#include "idem/clock.hpp"

#include <time.h>

namespace idem {
namespace {

template <clockid_t Id>
class PosixClock final : public Clock {
 public:
  std::int64_t now_ms() const noexcept override {
    timespec ts;
    clock_gettime(Id, &ts);
    return std::int64_t{ts.tv_sec} * 1000 + ts.tv_nsec / 1'000'000;
  }
};

}  // namespace

const Clock& monotonic_clock() noexcept {
  static const PosixClock<CLOCK_MONOTONIC_COARSE> clock;
  return clock;
}

const Clock& system_clock() noexcept {
  static const PosixClock<CLOCK_REALTIME> clock;
  return clock;
}

}  // namespace idem
