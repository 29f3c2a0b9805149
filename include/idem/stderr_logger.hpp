#pragma once
/// @file
/// @brief idem::StderrLogger: an idem::Logger that writes one timestamped line per event to
/// stderr (or any FILE*). Link idem::log; it is formatted with {fmt}, which stays a private
/// dependency of that library (this header does not include it).

#include <cstdio>
#include <string>
#include <string_view>

#include "idem/metrics.hpp"

namespace idem {

/// @brief Settings of a StderrLogger.
struct StderrLoggerOptions {
  /// Lines below this level are dropped.
  LogLevel min_level = LogLevel::info;
  /// Written after the timestamp, e.g. the service or consumer name.
  std::string tag = "idem";
  /// Prefix each line with the UTC time (ISO 8601, milliseconds). Turn off when the process
  /// manager (journald, Kubernetes) stamps lines itself.
  bool timestamps = true;
  /// Where lines go; nullptr: stderr. Must stay open as long as the logger is used.
  std::FILE* stream = nullptr;
};

/// @brief Writes `2026-01-31T12:00:00.123Z idem warning: <text>` lines. Each line is one
/// fwrite (stdio locks the stream), so lines from many threads never interleave. Newlines
/// inside an event are written as "\n" so one event stays one line. Never throws.
class StderrLogger final : public Logger {
 public:
  explicit StderrLogger(StderrLoggerOptions options = {});

  /// @brief Writes one line unless level is below min_level.
  void log(LogLevel level, std::string_view line) noexcept override;

 private:
  StderrLoggerOptions options_;
};

/// @brief "debug", "info", "warning" or "error".
std::string_view to_string(LogLevel level) noexcept;

}  // namespace idem
