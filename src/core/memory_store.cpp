#include "idem/stores/memory_store.hpp"

#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "idem/detail/key_hash.hpp"

namespace idem {
namespace {

// Same order as RecordInfo::State.
enum class State : std::uint8_t { in_progress, done, released };

// One record: a block with the key bytes right after it, carved from its shard's slab, so a
// record of a 16-byte key costs 56 bytes plus one slot in the hash set.
struct Entry {
  Entry* next = nullptr;          // insertion (FIFO) order within the shard
  std::uint64_t token = 0;        // fencing token of the current or last owner
  std::int64_t deadline = 0;      // lease end (in_progress) or retention end (done, released)
  std::uint64_t fingerprint = 0;  // low half of the XXH3-128 payload digest; 0: unchecked
  std::uint32_t key_size = 0;
  State state = State::in_progress;
  bool has_response = false;
  // A before_processing record whose handler has not completed: done, but never evicted
  // (eviction would let a second worker run it). Cleared by complete().
  bool running = false;

  std::string_view key() const noexcept {
    return {reinterpret_cast<const char*>(this + 1), key_size};
  }
  bool live(std::int64_t now) const noexcept { return state != State::released && deadline > now; }

  std::size_t block_size() const noexcept { return sizeof(Entry) + key_size; }
};
static_assert(sizeof(Entry) == 40);
static_assert(std::is_trivially_destructible_v<Entry>);

// Per-shard allocator of record blocks: 64 KiB chunks carved by a bump pointer, and a free
// list per 8-byte size class so purged records are reused. It saves malloc's per-block header
// and rounding (8 to 16 bytes a record) and a lock; blocks over kMaxPooled go to operator new.
// Chunks return to the system only when the store is destroyed.
class Slab {
 public:
  Slab() = default;
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;

  Entry* make(std::string_view key) {
    void* block = allocate(sizeof(Entry) + key.size());
    Entry* entry = new (block) Entry;
    entry->key_size = static_cast<std::uint32_t>(key.size());
    std::memcpy(entry + 1, key.data(), key.size());
    return entry;
  }

  void destroy(Entry* entry) noexcept {
    const std::size_t size = entry->block_size();
    if (size > kMaxPooled) return ::operator delete(entry);
    FreeBlock* block = reinterpret_cast<FreeBlock*>(entry);
    block->next = free_[size_class(size)];
    free_[size_class(size)] = block;
  }

 private:
  struct FreeBlock {
    FreeBlock* next;
  };
  static constexpr std::size_t kAlign = alignof(Entry);
  static constexpr std::size_t kMaxPooled = 1024;
  static constexpr std::size_t kChunk = 64 * 1024;
  static std::size_t size_class(std::size_t size) noexcept { return (size + kAlign - 1) / kAlign; }

  void* allocate(std::size_t size) {
    if (size > kMaxPooled) return ::operator new(size);
    const std::size_t cls = size_class(size);
    if (FreeBlock* block = free_[cls]) {
      free_[cls] = block->next;
      return block;
    }
    const std::size_t rounded = cls * kAlign;
    if (left_ < rounded) {
      chunks_.push_back(std::make_unique<std::byte[]>(kChunk));
      cursor_ = chunks_.back().get();
      left_ = kChunk;
    }
    void* block = cursor_;
    cursor_ += rounded;
    left_ -= rounded;
    return block;
  }

  std::vector<std::unique_ptr<std::byte[]>> chunks_;
  std::byte* cursor_ = nullptr;
  std::size_t left_ = 0;
  std::array<FreeBlock*, kMaxPooled / kAlign + 1> free_{};
};

// A key with its hash computed once: picks the shard and probes the set.
struct HashedKey {
  std::string_view key;
  std::size_t hash;
};

struct EntryHash {
  using is_transparent = void;
  std::size_t operator()(const Entry* e) const noexcept { return detail::key_hash(e->key()); }
  std::size_t operator()(const HashedKey& k) const noexcept { return k.hash; }
};

struct EntryEq {
  using is_transparent = void;
  static std::string_view view(const Entry* e) noexcept { return e->key(); }
  static std::string_view view(const HashedKey& k) noexcept { return k.key; }
  template <class A, class B>
  bool operator()(const A& a, const B& b) const noexcept {
    return view(a) == view(b);
  }
};

std::uint64_t compact(const Fingerprint& fp) noexcept {
  return fp.empty() ? 0 : (fp.low != 0 ? fp.low : 1);
}
bool compatible(std::uint64_t stored, std::uint64_t offered) noexcept {
  return stored == 0 || offered == 0 || stored == offered;
}
// Bytes a record costs against max_bytes: its block, its slot and control byte in the set.
std::size_t record_bytes(std::size_t key_size) noexcept {
  return sizeof(Entry) + key_size + sizeof(Entry*) + 1;
}

// Records examined per inserting call; keeps purging O(1) on the hot path.
constexpr int kHousekeepingPerInsert = 2;

struct alignas(64) Shard {
  std::mutex mutex;
  // Wakes the threads waiting for a held key of this shard (Options::in_progress_wait) when
  // a record settles; notified only while someone waits.
  std::condition_variable settled;
  int waiters = 0;
  void notify_waiters() {
    if (waiters > 0) settled.notify_all();
  }
  Slab slab;
  absl::flat_hash_set<Entry*, EntryHash, EntryEq> entries;
  absl::flat_hash_map<const Entry*, std::string> responses;
  Entry* head = nullptr;  // oldest
  Entry* tail = nullptr;  // newest
  // The head's deadline when it became the head. Housekeeping reads this instead of the head
  // itself, a cold record, saving a cache miss per insert; a stale (smaller) value only means
  // the head is looked at a little early.
  std::int64_t head_deadline = std::numeric_limits<std::int64_t>::max();
  std::uint64_t last_token = 0;
  std::size_t bytes = 0;
  std::uint64_t evictions = 0;
  std::uint64_t expired = 0;
  std::uint64_t takeovers = 0;

  ~Shard() {
    for (Entry* e : entries) slab.destroy(e);  // returns large blocks; the slab frees the rest
  }

  Entry* find(const HashedKey& key) const {
    auto it = entries.find(key);
    return it == entries.end() ? nullptr : *it;
  }

  // e's deadline must be set: it may become the head.
  void push_back(Entry* e) noexcept {
    e->next = nullptr;
    if (tail == nullptr) {
      head = e;
      head_deadline = e->deadline;
    } else {
      tail->next = e;
    }
    tail = e;
  }
  Entry* pop_front() noexcept {
    Entry* e = head;
    head = e->next;
    if (head == nullptr) tail = nullptr;
    head_deadline = head ? head->deadline : std::numeric_limits<std::int64_t>::max();
    return e;
  }

  // Strong guarantee: when copying the response throws, nothing has changed.
  void set_response(Entry* e, std::optional<std::string_view> response) {
    if (!response) return drop_response(e);
    std::string value(*response);
    if (e->has_response) {
      std::string& slot = responses.find(e)->second;
      bytes = bytes - slot.size() + value.size();
      slot = std::move(value);
    } else {
      responses.emplace(e, std::move(value));
      bytes += response->size();
      e->has_response = true;
    }
  }
  void drop_response(Entry* e) {
    if (!e->has_response) return;
    auto it = responses.find(e);
    bytes -= it->second.size();
    responses.erase(it);
    e->has_response = false;
  }

  // The record of key, or a new blank one (fresh = true). The block is allocated before the
  // set is touched, so an allocation failure leaves the set as it was.
  Entry* find_or_insert(const HashedKey& key, bool& fresh) {
    Entry* spare = slab.make(key.key);
    fresh = false;
    Entry* e = *entries.lazy_emplace(key, [&](const auto& construct) {
      fresh = true;
      construct(spare);
    });
    if (fresh) {
      bytes += record_bytes(e->key_size);
    } else {
      slab.destroy(spare);
    }
    return e;
  }

  // Keeps head_deadline honest when the head record itself changes.
  void refresh_head(const Entry* e) noexcept {
    if (e != head) return;
    head_deadline =
        e->state == State::released ? std::numeric_limits<std::int64_t>::min() : e->deadline;
  }

  // Unlinked entries only (pop_front first).
  void erase(Entry* e) {
    drop_response(e);
    bytes -= record_bytes(e->key_size);
    entries.erase(e);
    slab.destroy(e);
  }
};

}  // namespace

struct MemoryStore::Impl {
  explicit Impl(const MemoryOptions& options)
      : clock(options.clock ? options.clock : &monotonic_clock()),
        shard_bits(std::bit_width(std::bit_ceil(options.shards ? options.shards : 64)) - 1),
        shards(std::size_t{1} << shard_bits),
        max_keys(options.max_keys ? (options.max_keys + shards.size() - 1) / shards.size() : 0),
        max_bytes(options.max_bytes ? (options.max_bytes + shards.size() - 1) / shards.size() : 0) {
  }

  const Clock* clock;
  int shard_bits;
  std::vector<Shard> shards;
  std::size_t max_keys;   // per shard
  std::size_t max_bytes;  // per shard

  HashedKey hashed(std::string_view key) const noexcept { return {key, detail::key_hash(key)}; }
  Shard& shard_of(const HashedKey& k) noexcept {
    // The top bits pick the shard; the set uses the low ones.
    return shards[shard_bits == 0 ? 0 : k.hash >> (64 - shard_bits)];
  }

  bool over_bounds(const Shard& s) const noexcept {
    return (max_keys && s.entries.size() > max_keys) || (max_bytes && s.bytes > max_bytes);
  }

  // Examines a few of the oldest records: drops what has expired, and evicts done records while
  // the shard is over its bounds. A live claim is never evicted (that would let a second worker
  // in); it moves to the back, as does a record reused in place, whose deadline is newer than
  // its successor's.
  void housekeep(Shard& s, std::int64_t now, std::size_t budget) {
    for (std::size_t seen = 0; seen < budget && s.head != nullptr; ++seen) {
      if (s.head_deadline > now && !over_bounds(s)) break;  // nothing at the front is due
      Entry* e = s.head;
      if (!e->live(now)) {
        s.erase(s.pop_front());
        ++s.expired;
      } else if (over_bounds(s) && e->state == State::done && !e->running) {
        s.erase(s.pop_front());
        ++s.evictions;
      } else if (e->next != nullptr && (over_bounds(s) || e->deadline > e->next->deadline)) {
        s.push_back(s.pop_front());
      } else {
        break;
      }
    }
  }
};

MemoryStore::MemoryStore(MemoryOptions options) : impl_(std::make_unique<Impl>(options)) {}
MemoryStore::~MemoryStore() = default;

Claim MemoryStore::do_claim(const ClaimRequest& request) {
  const HashedKey key = impl_->hashed(request.key);
  Shard& s = impl_->shard_of(key);
  const std::uint64_t fingerprint = compact(request.fingerprint);
  const std::int64_t now = impl_->clock->now_ms();
  const std::int64_t deadline =
      now + (request.mark_done ? request.retention : request.lease).count();
  const State state = request.mark_done ? State::done : State::in_progress;

  std::lock_guard lock(s.mutex);
  bool fresh = false;
  Entry* e = s.find_or_insert(key, fresh);  // one probe finds the record or makes its slot
  if (!fresh && e->live(now)) {
    if (!compatible(e->fingerprint, fingerprint)) return Claim{.status = ClaimStatus::conflict};
    if (e->state == State::in_progress) return Claim{.status = ClaimStatus::in_progress};
    Claim claim{.status = ClaimStatus::done};
    if (e->has_response) claim.response = s.responses.find(e)->second;
    return claim;
  }

  Claim claim{.status = ClaimStatus::acquired, .token = ++s.last_token};
  if (!fresh) {
    // Released, expired, or a dead holder's claim: take the record over in place.
    claim.took_over = e->state == State::in_progress;
    s.takeovers += claim.took_over;
    s.drop_response(e);
  }
  e->token = claim.token;
  e->deadline = deadline;
  e->fingerprint = fingerprint;
  e->state = state;
  e->running = request.mark_done;
  if (fresh) {
    s.push_back(e);
    impl_->housekeep(s, now, kHousekeepingPerInsert + (impl_->over_bounds(s) ? 4 : 0));
  } else {
    s.refresh_head(e);
  }
  return claim;
}

bool MemoryStore::do_complete(const Completion& completion) {
  const HashedKey key = impl_->hashed(completion.key);
  Shard& s = impl_->shard_of(key);
  const std::int64_t now = impl_->clock->now_ms();
  std::lock_guard lock(s.mutex);
  // A record that is gone (its lease ran out and it was purged, or an operator forgot it) is
  // written again: the handler did succeed. One with another token belongs to a newer owner.
  bool fresh = false;
  Entry* e = s.find_or_insert(key, fresh);
  if (!fresh && e->token != completion.token) return false;
  e->token = completion.token;
  e->state = State::done;
  e->running = false;
  e->deadline = now + completion.retention.count();
  if (fresh) {
    s.push_back(e);
  } else {
    s.refresh_head(e);
  }
  s.set_response(e, completion.response);
  s.notify_waiters();
  return true;
}

bool MemoryStore::do_release(std::string_view key_bytes, std::uint64_t token) {
  const HashedKey key = impl_->hashed(key_bytes);
  Shard& s = impl_->shard_of(key);
  std::lock_guard lock(s.mutex);
  Entry* e = s.find(key);
  if (e == nullptr || e->token != token || e->state != State::in_progress) return false;
  // Kept, not erased: it sits in the FIFO list; housekeeping drops it. Tokens come from the
  // shard's counter, so a later owner's token is larger either way.
  e->state = State::released;
  s.refresh_head(e);
  s.notify_waiters();
  return true;
}

bool MemoryStore::do_forget(std::string_view key_bytes) {
  const HashedKey key = impl_->hashed(key_bytes);
  Shard& s = impl_->shard_of(key);
  std::lock_guard lock(s.mutex);
  Entry* e = s.find(key);
  if (e == nullptr || e->state == State::released) return false;
  e->state = State::released;
  e->running = false;
  s.drop_response(e);
  s.refresh_head(e);
  s.notify_waiters();
  return true;
}

void MemoryStore::do_await_change(std::string_view key_bytes, std::chrono::milliseconds max_wait) {
  const HashedKey key = impl_->hashed(key_bytes);
  Shard& s = impl_->shard_of(key);
  std::unique_lock lock(s.mutex);
  // Checked under the shard's lock, so a change made since the caller's claim is not missed.
  const auto held = [&] {
    const Entry* e = s.find(key);
    return e != nullptr && e->state == State::in_progress && e->deadline > impl_->clock->now_ms();
  };
  if (!held()) return;
  ++s.waiters;
  s.settled.wait_for(lock, max_wait);
  --s.waiters;
}

std::optional<RecordInfo> MemoryStore::do_inspect(std::string_view key_bytes) {
  const HashedKey key = impl_->hashed(key_bytes);
  Shard& s = impl_->shard_of(key);
  std::lock_guard lock(s.mutex);
  const Entry* e = s.find(key);
  if (e == nullptr) return std::nullopt;
  RecordInfo info{.state = static_cast<RecordInfo::State>(e->state),
                  .token = e->token,
                  .expires_in_ms = e->deadline - impl_->clock->now_ms()};
  if (e->has_response) info.response = s.responses.find(e)->second;
  return info;
}

StoreStats MemoryStore::do_stats() {
  StoreStats summary;
  for (Shard& s : impl_->shards) {
    std::lock_guard lock(s.mutex);
    const std::int64_t now = impl_->clock->now_ms();
    summary.records += s.entries.size();
    summary.bytes += s.bytes;
    summary.evictions += s.evictions;
    // As every store counts them: only leases still running and retentions not yet over.
    for (const Entry* e : s.entries) {
      if (!e->live(now)) continue;
      summary.in_progress += e->state == State::in_progress;
      summary.done += e->state == State::done;
    }
  }
  return summary;
}

std::size_t MemoryStore::do_purge_expired(std::size_t max_records) {
  std::size_t dropped = 0;
  for (Shard& s : impl_->shards) {
    if (dropped >= max_records) break;
    std::lock_guard lock(s.mutex);
    const std::int64_t now = impl_->clock->now_ms();
    // Walk the whole list once: a purge call is the operator's full sweep, not the hot path.
    Entry* kept_head = nullptr;
    Entry* kept_tail = nullptr;
    while (s.head != nullptr) {
      Entry* e = s.pop_front();
      if (!e->live(now) && dropped < max_records) {
        s.erase(e);
        ++s.expired;
        ++dropped;
        continue;
      }
      e->next = nullptr;
      (kept_tail ? kept_tail->next : kept_head) = e;
      kept_tail = e;
    }
    s.head = kept_head;
    s.tail = kept_tail;
    s.head_deadline = kept_head ? kept_head->deadline : std::numeric_limits<std::int64_t>::max();
  }
  return dropped;
}

MemoryStoreStats MemoryStore::counters() const {
  MemoryStoreStats stats;
  for (Shard& s : impl_->shards) {
    std::lock_guard lock(s.mutex);
    stats.keys += s.entries.size();
    stats.bytes += s.bytes;
    stats.evictions += s.evictions;
    stats.expired += s.expired;
    stats.takeovers += s.takeovers;
  }
  return stats;
}

}  // namespace idem
