// The SIMT emulator's scheduler (simt.h says what it models): fibers on ucontext, one block at
// a time, a seeded random choice of the next fiber at every synchronisation point.
#include "simt.h"

#include <algorithm>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>

namespace qf::simt {
namespace {

enum State : int { kRunnable = 0, kAtBlockBarrier = 1, kAtWarpBarrier = 2, kDone = 3 };

constexpr size_t kStackBytes = 128 * 1024;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // the most an H100 block can opt in to

struct Extra {  // per fiber, beside the public part
  int src_lane = 0;
  uint64_t result = 0;
};

struct Runtime {
  Launch launch;
  bool running = false;
  std::vector<Fiber> fibers;
  std::vector<Extra> extra;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<int> runnable;
  std::vector<unsigned char> smem;
  int at_block_barrier = 0;
  std::mt19937_64 rng{0x5eed};
  cudaError_t error = cudaSuccess;
  std::string message = "no error";
};

Runtime& rt() {
  thread_local Runtime r;
  return r;
}

std::string where(const Launch& L) {
  std::ostringstream s;
  const Fiber* f = L.current;
  s << "block (" << L.block_idx.x << ", " << L.block_idx.y << ", " << L.block_idx.z << ")";
  if (f != nullptr) s << " thread (" << f->tid.x << ", " << f->tid.y << ", " << f->tid.z << ")";
  return s.str();
}

void yield() {
  Runtime& r = rt();
  Fiber* f = r.launch.current;
  swapcontext(&f->ctx, &r.launch.scheduler);
}

void trampoline() {
  Runtime& r = rt();
  try {
    (*r.launch.body)();
  } catch (const std::exception& e) {
    fail(std::string("exception: ") + e.what());
  }
  r.launch.current->state = kDone;
  // returns to uc_link: the scheduler
}

std::string hex(unsigned v) {
  std::ostringstream s;
  s << std::hex << v;
  return s.str();
}

int threads_of(dim3 d) { return static_cast<int>(d.x * d.y * d.z); }

void run_block(Runtime& r, size_t smem_bytes) {
  Launch& L = r.launch;
  const int n = threads_of(L.block);
  r.fibers.assign(n, Fiber{});
  r.extra.assign(n, Extra{});
  while (static_cast<int>(r.stacks.size()) < n) r.stacks.emplace_back(new char[kStackBytes]);
  r.smem.assign(smem_bytes, 0xff);
  L.dynamic_smem = r.smem.data();
  r.runnable.clear();
  r.at_block_barrier = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = i;
    f.tid = dim3(i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks[i].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &L.scheduler;
    makecontext(&f.ctx, trampoline, 0);
    r.runnable.push_back(i);
  }
  int done = 0;
  while (done < n) {
    if (r.runnable.empty()) {
      int at_warp = 0;
      for (const Fiber& f : r.fibers) at_warp += f.state == kAtWarpBarrier;
      L.current = nullptr;
      std::ostringstream s;
      s << "deadlock in " << where(L) << ": of " << n << " threads, " << r.at_block_barrier
        << " wait at __syncthreads, " << at_warp << " at a warp operation (shuffle/__syncwarp), "
        << done << " have exited (a barrier that not every thread of the block reaches)";
      L.error = s.str();
      return;
    }
    const size_t pick = r.rng() % r.runnable.size();
    const int i = r.runnable[pick];
    r.runnable[pick] = r.runnable.back();
    r.runnable.pop_back();
    L.current = &r.fibers[i];
    swapcontext(&L.scheduler, &r.fibers[i].ctx);
    if (!L.error.empty()) return;
    if (r.fibers[i].state == kDone) ++done;
  }
}

}  // namespace

Launch& launch_state() {
  Runtime& r = rt();
  if (!r.running) throw std::logic_error("a CUDA built-in was used outside a kernel launch");
  return r.launch;
}

void fail(const std::string& message) {
  Runtime& r = rt();
  if (r.launch.error.empty()) r.launch.error = where(r.launch) + ": " + message;
  swapcontext(&r.launch.current->ctx, &r.launch.scheduler);  // never resumed
}

void sync_block() {
  Runtime& r = rt();
  Fiber* f = r.launch.current;
  f->state = kAtBlockBarrier;
  if (++r.at_block_barrier == static_cast<int>(r.fibers.size())) {
    r.at_block_barrier = 0;
    for (Fiber& g : r.fibers) {
      g.state = kRunnable;
      r.runnable.push_back(g.linear);
    }
  }
  yield();
}

uint64_t exchange(unsigned mask, uint64_t value, int src_lane) {
  Runtime& r = rt();
  Fiber* f = r.launch.current;
  const int n = static_cast<int>(r.fibers.size());
  const int base = f->linear / 32 * 32, lane = f->linear % 32;
  const int lanes = std::min(32, n - base);
  const unsigned present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  if (!(mask >> lane & 1u))
    fail("a warp operation's mask 0x" + hex(mask) + " does not include the calling lane " +
         std::to_string(lane));
  if (mask & ~present)
    fail("a warp operation's mask names lanes this warp does not have (it has " +
         std::to_string(lanes) + ")");
  if (src_lane < 0 || src_lane >= 32 || !(mask >> src_lane & 1u))
    fail("a shuffle reads lane " + std::to_string(src_lane) + ", which is not in its mask");
  f->state = kAtWarpBarrier;
  f->warp_mask = mask;
  f->slot = value;
  r.extra[f->linear].src_lane = src_lane;
  bool all = true;
  for (int l = 0; l < lanes && all; ++l)
    if (mask >> l & 1u) all = r.fibers[base + l].state == kAtWarpBarrier;
  if (all) {
    for (int l = 0; l < lanes; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& g = r.fibers[base + l];
      if (g.warp_mask != mask) fail("lanes of one warp operation passed different masks");
      r.extra[g.linear].result = r.fibers[base + r.extra[g.linear].src_lane].slot;
    }
    for (int l = 0; l < lanes; ++l) {
      if (!(mask >> l & 1u)) continue;
      r.fibers[base + l].state = kRunnable;
      r.runnable.push_back(base + l);
    }
  }
  yield();
  return r.extra[f->linear].result;
}

void sync_warp(unsigned mask) { exchange(mask, 0, lane_id()); }

void run(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body) {
  Runtime& r = rt();
  if (r.running) throw std::logic_error("a kernel launch inside a kernel");
  const int n = threads_of(block);
  if (n < 1 || static_cast<unsigned>(n) > kMaxBlockThreads || block.z > 64 || grid.x < 1 ||
      grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 ||
      dynamic_smem_bytes > kMaxDynamicSmem) {
    r.error = cudaErrorInvalidConfiguration;
    r.message = "invalid launch configuration";
    return;
  }
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  std::shuffle(order.begin(), order.end(), r.rng);
  Launch& L = r.launch;
  L.grid = grid;
  L.block = block;
  L.body = &body;
  L.error.clear();
  r.running = true;
  for (const dim3& b : order) {
    L.block_idx = b;
    run_block(r, dynamic_smem_bytes);
    if (!L.error.empty()) break;
  }
  r.running = false;
  L.current = nullptr;
  if (!L.error.empty()) {
    r.error = cudaErrorLaunchFailure;
    r.message = L.error;
  }
}

cudaError_t take_error() {
  Runtime& r = rt();
  const cudaError_t e = r.error;
  r.error = cudaSuccess;
  return e;
}

const char* error_message() { return rt().message.c_str(); }

void set_seed(uint64_t seed) { rt().rng.seed(seed); }

}  // namespace qf::simt
