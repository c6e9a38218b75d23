// Work shared by the threads of a parallel region through one counter (decode GEMVs: linear.cpp,
// quant_linear.cpp, which says why and what it measured): each thread takes the next block of
// what is left, a share of it (half of the rest split over the threads, at least min_block),
// so the blocks shrink toward the end and a thread that started late or is served more slowly
// takes less, instead of a fixed half that leaves the other thread waiting at the join.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace qf::cpu {

// Called by every thread of the region with the same `next` (0 before the region): runs
// run(begin, end) on blocks of [0, total) until none is left. limit(begin): the end a block
// starting at begin must not pass (a boundary between two weights), or total.
template <class Limit, class Run>
inline void take_shared_blocks(std::atomic<int64_t>& next, int64_t total, int64_t min_block,
                               int64_t threads, Limit limit, Run run) {
  for (;;) {
    int64_t cur = next.load(std::memory_order_relaxed), take = 0;
    do {
      const int64_t rem = total - cur;
      if (rem <= 0) return;
      take = std::min({rem, std::max(min_block, rem / (2 * threads)), limit(cur) - cur});
    } while (!next.compare_exchange_weak(cur, cur + take, std::memory_order_relaxed));
    run(cur, cur + take);
  }
}

}  // namespace qf::cpu
