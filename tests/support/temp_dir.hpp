#pragma once
// A private temporary directory for a test or benchmark, removed with everything in it.

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

namespace idem::testing {

class TempDir {
 public:
  // Under $TMPDIR (or /tmp), named idem-<tag>-XXXXXX.
  explicit TempDir(std::string_view tag) {
    const char* base = std::getenv("TMPDIR");
    std::string pattern =
        std::string(base ? base : "/tmp") + "/idem-" + std::string(tag) + "-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr)
      throw std::runtime_error("mkdtemp failed in " + pattern);
    path_ = pattern;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  std::string file(std::string_view name) const { return path_ + "/" + std::string(name); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace idem::testing
