// The rules of the CUDA launcher's table cache (csrc/table_cache.h), on the host: a buffer is a record of
// how it was made, uploads and refills are counted. Prints one line per rule checked, then "OK"; exits 1
// at the first broken rule.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "table_cache.h"

namespace {

struct Buffer {
  std::vector<int64_t> words;  // what the device copy holds
  bool made_in_capture = false;
  int refills = 0;
  int* alive = nullptr;  // counts live buffers: eviction must destroy them
  Buffer() = default;
  Buffer(std::vector<int64_t> w, bool cap, int* live) : words(std::move(w)), made_in_capture(cap), alive(live) {
    ++*alive;
  }
  Buffer(Buffer&& o) noexcept : words(std::move(o.words)), made_in_capture(o.made_in_capture), refills(o.refills),
                                alive(o.alive) {
    o.alive = nullptr;
  }
  Buffer& operator=(Buffer&&) = delete;
  ~Buffer() {
    if (alive != nullptr) --*alive;
  }
};

// A hash that puts every table in one bucket: lookups must still compare the words.
struct OneBucket {
  size_t operator()(const std::vector<int64_t>&) const { return 7; }
};

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) ++failures;
}

template <typename Cache>
struct Harness {
  Cache cache;
  int uploads = 0, refills = 0, live = 0;
  Harness(size_t entries, size_t words) : cache(entries, words) {}

  // Returns what the caller would read: the words held by the buffer it gets.
  std::vector<int64_t> get(int device, const std::vector<int64_t>& words, bool capturing) {
    return cache.get(
        device, words, capturing,
        [&](const std::vector<int64_t>& w, bool cap) {
          ++uploads;
          // A copy made in a capture holds nothing until a replay or a refill: model it as garbage.
          return Buffer(cap ? std::vector<int64_t>(w.size(), -1) : w, cap, &live);
        },
        [&](Buffer& b, const std::vector<int64_t>& w) {
          ++refills;
          ++b.refills;
          b.words = w;
        },
        [&](Buffer& b) { return b.words; });
  }
};

std::vector<int64_t> table(int64_t seed, size_t n) {
  std::vector<int64_t> w(n);
  for (size_t i = 0; i < n; ++i) w[i] = seed * 1000003 + static_cast<int64_t>(i);
  return w;
}

}  // namespace

int main() {
  using regfast::TableCache;
  {
    Harness<TableCache<Buffer>> h(4, 1000);
    const auto a = table(1, 10), b = table(2, 10);
    check(h.get(0, a, false) == a && h.uploads == 1, "a miss uploads the words");
    check(h.get(0, a, false) == a && h.uploads == 1 && h.cache.hits() == 1, "the same words again: no upload");
    check(h.get(1, a, false) == a && h.uploads == 2, "the same words on another device: their own copy");
    check(h.get(0, b, false) == b && h.uploads == 3, "other words: their own copy");
    auto a2 = a;
    a2.back() += 1;
    check(h.get(0, a2, false) == a2 && h.uploads == 4, "one word differs: a miss");
    auto a3 = a;
    a3.push_back(0);
    check(h.get(0, a3, false) == a3 && h.uploads == 5, "a longer table with the same prefix: a miss");
    check(h.cache.entries() == 4 && h.live == 4, "at most 4 entries: the least recently used one evicted and freed");
    check(h.get(1, a, false) == a && h.uploads == 5, "device 1's copy of a, used after device 0's, survived");
    check(h.get(0, a, false) == a && h.uploads == 6, "device 0's copy, the least recently used, was evicted");
  }
  {
    Harness<TableCache<Buffer, OneBucket>> h(8, 1000);
    std::vector<std::vector<int64_t>> ts;
    for (int i = 0; i < 6; ++i) ts.push_back(table(i, 5));
    for (const auto& t : ts) h.get(0, t, false);
    bool ok = true;
    for (const auto& t : ts) ok = ok && h.get(0, t, false) == t;
    check(ok && h.uploads == 6, "tables sharing one hash bucket: each gets its own words back");
  }
  {
    Harness<TableCache<Buffer>> h(100, 25);
    h.get(0, table(1, 10), false);
    h.get(0, table(2, 10), false);
    h.get(0, table(3, 10), false);
    check(h.cache.entries() == 2 && h.live == 2, "beyond the word limit: evicted down to it");
    h.get(0, table(4, 40), false);
    check(h.cache.entries() == 1 && h.live == 1, "a table larger than the limit: cached alone");
  }
  {
    Harness<TableCache<Buffer>> h(2, 1000);
    const auto c = table(9, 10);
    check(h.get(0, c, true) == std::vector<int64_t>(10, -1) && h.uploads == 1,
          "a miss in a capture uploads (the copy runs at replay)");
    check(h.get(0, c, true).front() == -1 && h.uploads == 1 && h.refills == 0,
          "the same table in a capture again: no upload, no refill (the graph's own copy fills it)");
    check(h.get(0, c, false) == c && h.refills == 1, "first use outside a capture: refilled, then read");
    check(h.get(0, c, false) == c && h.refills == 1, "later uses: no refill");
    const auto d = table(10, 10);
    h.get(0, d, false);
    h.get(0, d, true);  // used eagerly, then read by a captured graph: kept from now on
    for (int i = 0; i < 10; ++i) h.get(0, table(100 + i, 10), false);
    check(h.cache.kept() == 2, "tables read by captured graphs are kept");
    const int before = h.uploads;
    check(h.get(0, c, false) == c && h.get(0, d, false) == d && h.uploads == before,
          "kept tables survive any number of evictions");
    check(h.cache.entries() == 4 && h.live == 4, "the other entries stay within the limit");
    for (int i = 0; i < 5; ++i) h.get(0, table(200 + i, 10), true);
    check(h.cache.entries() == 9 && h.cache.kept() == 7, "nothing is evicted during a capture");
  }
  std::printf(failures == 0 ? "OK\n" : "FAILED\n");
  return failures == 0 ? 0 : 1;
}
