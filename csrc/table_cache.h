// The cache of the CUDA launcher's device tables (cuda_tables.cpp), as plain C++ so that its rules are
// tested on the host (tests/table_cache_check.cpp).
//
// A table is a word array (tensor table, work list, group list, state pointers): the same list of tensors
// gives the same words at every call, so a device copy made once serves every later call with no
// host-to-device copy. Entries are keyed on (device, words), compared word for word (the hash only picks
// the bucket). Rules:
// - A table used while a CUDA graph is being captured is read by that graph at every replay: its entry is
//   kept for the life of the process (never evicted, never freed).
// - A table first copied during a capture is only written when the graph replays (capture runs nothing):
//   before its first use outside a capture it is copied again ("refill").
// - Other entries are evicted least recently used first beyond `max_entries` entries or `max_words` words
//   (their device memory goes back to the allocator, stream-ordered); nothing is evicted during a capture.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace regfast {

struct WordsHash {
  size_t operator()(const std::vector<int64_t>& words) const {
    return std::hash<std::string_view>{}(
        std::string_view(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t)));
  }
};

// Buffer: what a device copy is (moved in and out of the cache, destroyed on eviction).
template <typename Buffer, typename Hash = WordsHash>
class TableCache {
 public:
  TableCache(size_t max_entries, size_t max_words) : max_entries_(max_entries), max_words_(max_words) {}

  // The device copy of `words` on `device`. On a miss `upload(words, capturing)` makes it; an entry made
  // during a capture and used outside one is first passed to `refill(buffer, words)`. `use(buffer)` runs on
  // the entry under the cache's lock (e.g. to mark the stream that will read it); its result is returned.
  template <typename Upload, typename Refill, typename Use>
  auto get(int device, const std::vector<int64_t>& words, bool capturing, Upload&& upload, Refill&& refill,
           Use&& use) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t h = key(device, words);
    auto range = index_.equal_range(h);
    for (auto it = range.first; it != range.second; ++it) {
      Entry& e = *it->second;
      if (e.device != device || e.words != words) continue;
      ++hits_;
      if (capturing) {
        keep(it->second);
      } else if (!e.filled) {
        refill(e.buffer, e.words);
        e.filled = true;
      }
      if (!e.kept) lru_.splice(lru_.begin(), lru_, it->second);
      return use(e.buffer);
    }
    ++misses_;
    Buffer buffer = upload(words, capturing);
    if (!capturing) evict(words.size());
    std::list<Entry>& home = capturing ? kept_ : lru_;
    home.push_front(Entry{device, words, std::move(buffer), !capturing, capturing});
    const auto pos = home.begin();
    index_.emplace(h, pos);
    if (!capturing) words_ += words.size();
    return use(pos->buffer);
  }

  size_t entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return lru_.size() + kept_.size();
  }
  size_t kept() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_.size();
  }
  size_t hits() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return hits_;
  }
  size_t misses() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return misses_;
  }

 private:
  struct Entry {
    int device;
    std::vector<int64_t> words;
    Buffer buffer;
    bool filled;  // holds its words now (false until a captured copy has been refilled)
    bool kept;    // read by a captured graph: never evicted
  };
  using Pos = typename std::list<Entry>::iterator;

  static size_t key(int device, const std::vector<int64_t>& words) {
    return Hash{}(words) ^ (static_cast<size_t>(device) * 0x9e3779b97f4a7c15ull);
  }

  void keep(Pos pos) {
    if (pos->kept) return;
    pos->kept = true;
    words_ -= pos->words.size();
    kept_.splice(kept_.begin(), lru_, pos);  // list iterators stay valid across splice
  }

  // Makes room for `incoming` more words among the evictable entries.
  void evict(size_t incoming) {
    while (!lru_.empty() && (lru_.size() + 1 > max_entries_ || words_ + incoming > max_words_)) {
      const Pos last = std::prev(lru_.end());
      auto range = index_.equal_range(key(last->device, last->words));
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second == last) {
          index_.erase(it);
          break;
        }
      }
      words_ -= last->words.size();
      lru_.erase(last);
    }
  }

  const size_t max_entries_, max_words_;
  mutable std::mutex mutex_;
  std::list<Entry> lru_, kept_;
  std::unordered_multimap<size_t, Pos> index_;
  size_t words_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace regfast
