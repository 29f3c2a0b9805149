#pragma once
// A recording idem::OutboxSink for relay tests: keeps every row it is handed, in order;
// confirms the first confirm_limit rows of a batch (all by default), or throws while down.
// And a Logger that keeps its lines.

#include <algorithm>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "idem/error.hpp"
#include "idem/metrics.hpp"
#include "idem/outbox/outbox_relay.hpp"

namespace idem::test_support {

class RecordingSink final : public idem::OutboxSink {
 public:
  std::size_t publish(std::span<idem::OutboxRow> rows) override {
    if (down) throw idem::Error("broker down (test)");
    for (const idem::OutboxRow& row : rows) published.push_back(row);
    return std::min(rows.size(), confirm_limit);
  }
  std::vector<idem::OutboxRow> published;
  std::size_t confirm_limit = static_cast<std::size_t>(-1);
  bool down = false;
};

class RecordingLogger final : public idem::Logger {
 public:
  void log(idem::LogLevel, std::string_view line) noexcept override { lines.emplace_back(line); }
  std::vector<std::string> lines;
};

}  // namespace idem::test_support
