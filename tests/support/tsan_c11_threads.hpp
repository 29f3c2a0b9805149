#pragma once
// ThreadSanitizer cannot see threads and locks made through C11 <threads.h>: glibc's
// thrd_create and mtx_lock call pthread internals directly, bypassing TSan's interceptors, and
// the first malloc on such a thread crashes TSan (Debian's librdkafka uses C11 threads). Under
// TSan this header (include it in exactly one file of a test binary) defines the C11 functions
// in the executable, which interposes them, as plain calls to the intercepted pthread ones.
// It also embeds tests/tsan.supp's suppressions. Without TSan it is empty.

#if defined(__SANITIZE_THREAD__)
#define IDEM_TSAN_C11_THREADS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define IDEM_TSAN_C11_THREADS 1
#endif
#endif

#ifdef IDEM_TSAN_C11_THREADS
#include <errno.h>
#include <pthread.h>
#include <threads.h>
#include <time.h>

namespace idem::test_support::tsan {
inline int to_thrd(int rc) {
  if (rc == 0) return thrd_success;
  if (rc == ETIMEDOUT) return thrd_timedout;
  if (rc == EBUSY) return thrd_busy;
  if (rc == ENOMEM) return thrd_nomem;
  return thrd_error;
}
inline pthread_mutex_t* m(mtx_t* x) {
  return reinterpret_cast<pthread_mutex_t*>(x);
}
inline pthread_cond_t* c(cnd_t* x) {
  return reinterpret_cast<pthread_cond_t*>(x);
}
}  // namespace idem::test_support::tsan

extern "C" {
// Same entries as tests/tsan.supp, so CTest needs no TSAN_OPTIONS.
const char* __tsan_default_suppressions() {
  return "race:librdkafka.so.1\n";
}

// The start routine returns int where pthread expects void*; glibc's own thrd_create makes the
// same cast, and thrd_join truncates the result back to int.
int thrd_create(thrd_t* thr, thrd_start_t func, void* arg) {
  return idem::test_support::tsan::to_thrd(pthread_create(
      thr, nullptr, reinterpret_cast<void* (*)(void*)>(reinterpret_cast<void (*)()>(func)), arg));
}
int thrd_join(thrd_t thr, int* res) {
  void* result = nullptr;
  const int rc = pthread_join(thr, &result);
  if (rc == 0 && res != nullptr) *res = static_cast<int>(reinterpret_cast<intptr_t>(result));
  return idem::test_support::tsan::to_thrd(rc);
}
int thrd_detach(thrd_t thr) {
  return idem::test_support::tsan::to_thrd(pthread_detach(thr));
}
int mtx_init(mtx_t* mutex, int type) {
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  if ((type & mtx_recursive) != 0) pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
  const int rc = pthread_mutex_init(idem::test_support::tsan::m(mutex), &attr);
  pthread_mutexattr_destroy(&attr);
  return idem::test_support::tsan::to_thrd(rc);
}
int mtx_lock(mtx_t* mutex) {
  return idem::test_support::tsan::to_thrd(pthread_mutex_lock(idem::test_support::tsan::m(mutex)));
}
int mtx_trylock(mtx_t* mutex) {
  return idem::test_support::tsan::to_thrd(
      pthread_mutex_trylock(idem::test_support::tsan::m(mutex)));
}
int mtx_timedlock(mtx_t* __restrict mutex, const struct timespec* __restrict ts) {
  return idem::test_support::tsan::to_thrd(
      pthread_mutex_timedlock(idem::test_support::tsan::m(mutex), ts));
}
int mtx_unlock(mtx_t* mutex) {
  return idem::test_support::tsan::to_thrd(
      pthread_mutex_unlock(idem::test_support::tsan::m(mutex)));
}
void mtx_destroy(mtx_t* mutex) {
  pthread_mutex_destroy(idem::test_support::tsan::m(mutex));
}
int cnd_init(cnd_t* cond) {
  return idem::test_support::tsan::to_thrd(
      pthread_cond_init(idem::test_support::tsan::c(cond), nullptr));
}
int cnd_signal(cnd_t* cond) {
  return idem::test_support::tsan::to_thrd(pthread_cond_signal(idem::test_support::tsan::c(cond)));
}
int cnd_broadcast(cnd_t* cond) {
  return idem::test_support::tsan::to_thrd(
      pthread_cond_broadcast(idem::test_support::tsan::c(cond)));
}
int cnd_wait(cnd_t* cond, mtx_t* mutex) {
  return idem::test_support::tsan::to_thrd(
      pthread_cond_wait(idem::test_support::tsan::c(cond), idem::test_support::tsan::m(mutex)));
}
int cnd_timedwait(cnd_t* __restrict cond, mtx_t* __restrict mutex,
                  const struct timespec* __restrict ts) {
  return idem::test_support::tsan::to_thrd(pthread_cond_timedwait(
      idem::test_support::tsan::c(cond), idem::test_support::tsan::m(mutex), ts));
}
void cnd_destroy(cnd_t* cond) {
  pthread_cond_destroy(idem::test_support::tsan::c(cond));
}
}
#endif
