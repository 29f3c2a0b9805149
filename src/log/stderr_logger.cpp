#include "idem/stderr_logger.hpp"

#include <fmt/format.h>

#include <chrono>
#include <ctime>
#include <iterator>
#include <utility>

namespace idem {

std::string_view to_string(LogLevel level) noexcept {
  switch (level) {
    case LogLevel::debug:
      return "debug";
    case LogLevel::info:
      return "info";
    case LogLevel::warning:
      return "warning";
    case LogLevel::error:
      return "error";
  }
  return "unknown";
}

StderrLogger::StderrLogger(StderrLoggerOptions options) : options_(std::move(options)) {}

void StderrLogger::log(LogLevel level, std::string_view line) noexcept {
  if (static_cast<int>(level) < static_cast<int>(options_.min_level)) return;
  try {
    fmt::memory_buffer buffer;
    auto out = std::back_inserter(buffer);
    if (options_.timestamps) {
      const auto now = std::chrono::system_clock::now();
      const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
      const auto millis =
          std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() %
          1000;
      std::tm utc{};
      gmtime_r(&seconds, &utc);
      fmt::format_to(out, "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z ", utc.tm_year + 1900,
                     utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, millis);
    }
    fmt::format_to(out, "{} {}: ", options_.tag, to_string(level));
    for (char c : line) {
      if (c == '\n') {
        fmt::format_to(out, "\\n");
      } else {
        buffer.push_back(c);
      }
    }
    buffer.push_back('\n');
    // One fwrite per line: stdio's stream lock keeps lines from different threads whole.
    std::FILE* stream = options_.stream != nullptr ? options_.stream : stderr;
    std::fwrite(buffer.data(), 1, buffer.size(), stream);
  } catch (...) {  // NOLINT(bugprone-empty-catch): logging must never take the consumer down
  }
}

}  // namespace idem
