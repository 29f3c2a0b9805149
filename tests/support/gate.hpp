#pragma once
// A one-shot gate between test threads: wait() blocks until open() was called.

#include <condition_variable>
#include <mutex>

namespace idem::test_support {

// A one-shot latch between a handler and the test.
class Gate {
 public:
  void open() {
    std::lock_guard lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

}  // namespace idem::test_support
