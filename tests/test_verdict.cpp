#include <gtest/gtest.h>

#include <stdexcept>

#include "idem/adapters/verdict.hpp"

namespace {

using idem::Disposition;
using idem::Outcome;

idem::Verdict verdict_of(Outcome outcome) {
  return idem::decide([&] { return idem::Result{.outcome = outcome}; });
}

TEST(Verdict, SettlesOnlyProcessedAndDuplicate) {
  EXPECT_EQ(verdict_of(Outcome::processed).disposition, Disposition::settle);
  EXPECT_EQ(verdict_of(Outcome::duplicate).disposition, Disposition::settle);
  EXPECT_EQ(verdict_of(Outcome::failed).disposition, Disposition::retry_counted);
  EXPECT_EQ(verdict_of(Outcome::in_progress).disposition, Disposition::retry);
  EXPECT_EQ(verdict_of(Outcome::conflict).disposition, Disposition::dead_letter);
}

TEST(Verdict, MapsExceptionsToWhatTheCallerShouldDo) {
  idem::Verdict invalid =
      idem::decide([]() -> idem::Result { throw idem::InvalidMessage("key is empty"); });
  EXPECT_EQ(invalid.disposition, Disposition::dead_letter);
  EXPECT_EQ(invalid.reason, "invalid message: key is empty");
  idem::Verdict down =
      idem::decide([]() -> idem::Result { throw idem::StoreUnavailable("redis down"); });
  EXPECT_EQ(down.disposition, Disposition::hold);
  EXPECT_EQ(down.reason, "store unavailable: redis down");
  idem::Verdict rethrown = idem::decide([]() -> idem::Result { throw std::runtime_error("boom"); });
  EXPECT_EQ(rethrown.disposition, Disposition::retry_counted);
  EXPECT_EQ(rethrown.reason, "handler failed: boom");
  idem::Verdict odd = idem::decide([]() -> idem::Result { throw 42; });
  EXPECT_EQ(odd.disposition, Disposition::retry_counted);
}

}  // namespace
