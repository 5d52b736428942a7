// The CPU emulator's runtime: fibers for the threads of a block, the block barrier, warp
// collectives, launch checks and the runtime API's state. See cuda_emulator.h.
#include "cuda_emulator.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer into *from, resumes the fiber whose stack
// pointer is `to`. No system call, unlike swapcontext (which also saves the signal mask).
extern "C" void cuda_emu_switch(void** from, void* to);
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
#endif

namespace cuda_emu {

Position* g_position = nullptr;

namespace {

constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxOptinSmem = 227 * 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

enum class State { Runnable, AtBarrier, AtWarp, Done };

// A saved execution context: a stack pointer (x86-64) or a ucontext.
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// An asynchronous copy waiting for its batch to be waited on: the source's bytes as read at the
// copy, and where they go.
struct PendingCopy {
  void* dst;
  size_t size;
  std::array<unsigned char, 16> bytes;
};

struct Lane {
  Context context;
  Position position;
  State state = State::Done;
  Collective op = Collective::SyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int param = 0, width = 32;
  // Asynchronous copies: the open batch, and the committed ones not yet waited on (oldest first).
  std::vector<PendingCopy> open_copies;
  std::deque<std::vector<PendingCopy>> committed_copies;
};

// A static __shared__ variable of the running block: its address and size.
struct StaticVar {
  const void* address;
  size_t bytes;
};

struct Block {
  std::vector<Lane> lanes;
  // Per warp: how many lanes wait at a collective, and which lanes have exited.
  std::vector<int> warp_waiting;
  std::vector<uint32_t> warp_exited;
  int live = 0, at_barrier = 0, current = 0;
  Context scheduler;
  const std::function<void()>* body = nullptr;
  std::string fault;
  void* dynamic = nullptr;
  // The launch's kernel and dynamic shared memory; the static variables this block has reached.
  const void* kernel = nullptr;
  size_t dynamic_bytes = 0, static_bytes = 0;
  std::vector<StaticVar> statics;
  // Per warp: the scratch buffer of the matrix operations.
  std::vector<std::vector<unsigned char>> warp_scratch;
};

Block* g_block = nullptr;
uint64_t g_launches = 0;
uint64_t g_barriers = 0;  // block barriers released

// What each launch did, in launch order.
struct LaunchRecord {
  uint64_t blocks = 0, barriers = 0;
};
std::vector<LaunchRecord> g_launch_log;
// The record of launch number `launch` (1 for the first); an empty one for a launch not run.
LaunchRecord launch_record(uint64_t launch) {
  return launch >= 1 && launch <= g_launch_log.size() ? g_launch_log[launch - 1] : LaunchRecord{};
}

cudaError_t g_last_error = cudaSuccess;
std::unordered_map<const void*, size_t> g_static_shared;
std::unordered_map<const void*, int> g_optin;
std::vector<char*> g_stacks;

std::string schedule_setting() {
  const char* s = std::getenv("CUDA_EMU_SCHEDULE");
  return s == nullptr ? "forward" : s;
}

char* stack(size_t i) {
  while (g_stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot allocate a fiber stack");
    mprotect(p, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    g_stacks.push_back(static_cast<char*>(p));
  }
  return g_stacks[i];
}

Lane& current_lane() {
  if (g_block == nullptr) throw std::runtime_error("cuda_emu: device code called outside a launch");
  return g_block->lanes[g_block->current];
}

std::string describe(const Lane& l) {
  std::ostringstream s;
  s << "thread (" << l.position.thread.x << "," << l.position.thread.y << "," << l.position.thread.z
    << ") of block (" << l.position.block.x << "," << l.position.block.y << ","
    << l.position.block.z << ")";
  return s.str();
}

void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
  cuda_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// Back to the scheduler; returns when this fiber is resumed.
void yield_to_scheduler() {
  Block& b = *g_block;
  switch_context(b.lanes[b.current].context, b.scheduler);
}

[[noreturn]] void fault_here(const std::string& what) {
  Block& b = *g_block;
  if (b.fault.empty()) b.fault = describe(b.lanes[b.current]) + ": " + what;
  // The scheduler throws; this fiber is never resumed.
  for (;;) yield_to_scheduler();
}

void release_barrier_if_complete(Block& b) {
  if (b.at_barrier == 0 || b.at_barrier < b.live) return;
  for (Lane& l : b.lanes)
    if (l.state == State::AtBarrier) l.state = State::Runnable;
  b.at_barrier = 0;
  ++g_barriers;
}

void fiber_main() {
  Block& b = *g_block;
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.fault.empty()) b.fault = describe(b.lanes[b.current]) + ": " + e.what();
  } catch (...) {
    if (b.fault.empty()) b.fault = describe(b.lanes[b.current]) + ": an exception";
  }
  b.lanes[b.current].state = State::Done;
  --b.live;
  // A lane of this warp waiting on this one in a collective would wait forever.
  const int self = b.current, base = self - self % 32;
  b.warp_exited[self / 32] |= 1u << (self - base);
  if (b.warp_waiting[self / 32] > 0) {
    for (int l = base; l < base + 32 && l < static_cast<int>(b.lanes.size()); ++l) {
      const Lane& other = b.lanes[l];
      if (other.state == State::AtWarp && (other.mask >> (self - base) & 1u) && b.fault.empty())
        b.fault = describe(other) + ": a warp collective waiting on lane " +
                  std::to_string(self - base) + ", which has exited";
    }
  }
  release_barrier_if_complete(b);
  // Back to the scheduler for good: a finished fiber is never resumed.
  for (;;) yield_to_scheduler();
}

// A fresh fiber on stack `base` (kStackBytes above the guard page) that starts in fiber_main.
void start_context(Context& c, char* base, Context& scheduler) {
#if defined(__x86_64__)
  (void)scheduler;
  // cuda_emu_switch pops six registers, then returns into fiber_main with the stack as a call
  // leaves it (16-byte aligned plus the return address slot, here a zero never used).
  auto top = reinterpret_cast<uintptr_t>(base + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                         // fiber_main's return address
  *--sp = reinterpret_cast<void*>(&fiber_main);            // cuda_emu_switch's `ret` target
  for (int i = 0; i < 6; ++i) *--sp = nullptr;             // rbp, rbx, r12-r15
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = &scheduler.uc;
  makecontext(&c.uc, fiber_main, 0);
#endif
}

// 0 .. n-1 in the order CUDA_EMU_SCHEDULE sets (for the threads of a block and for the blocks).
template <typename I>
void schedule_order(std::vector<I>& order, I n, const std::string& setting, std::mt19937& rng) {
  order.resize(n);
  for (I i = 0; i < n; ++i) order[i] = i;
  if (setting == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (setting.rfind("random", 0) == 0) {
    std::shuffle(order.begin(), order.end(), rng);
  }
}

std::string deadlock_report(const Block& b) {
  std::ostringstream s;
  s << "deadlock: no thread can run;";
  int shown = 0;
  for (const Lane& l : b.lanes) {
    if (l.state == State::Done) continue;
    if (shown++ == 4) {
      s << " ...";
      break;
    }
    s << " " << describe(l)
      << (l.state == State::AtBarrier ? " waits at __syncthreads"
                                      : " waits at a warp collective with mask ");
    if (l.state == State::AtWarp) s << std::hex << "0x" << l.mask << std::dec;
    s << ";";
  }
  s << " (a barrier not every thread reaches, or a collective naming an exited or diverged lane)";
  return s.str();
}

void run_block(Block& b, const dim3& grid, const dim3& block, const uint3& block_idx,
               const std::string& setting, std::mt19937& rng) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  b.lanes.assign(n, Lane{});
  b.warp_waiting.assign((n + 31) / 32, 0);
  b.warp_exited.assign((n + 31) / 32, 0u);
  b.warp_scratch.assign((n + 31) / 32, {});
  b.live = n;
  b.at_barrier = 0;
  for (int i = 0; i < n; ++i) {
    Lane& l = b.lanes[i];
    l.position.thread = uint3{static_cast<unsigned>(i % block.x),
                              static_cast<unsigned>((i / block.x) % block.y),
                              static_cast<unsigned>(i / (block.x * block.y))};
    l.position.block = block_idx;
    l.position.block_dim = block;
    l.position.grid_dim = grid;
    l.state = State::Runnable;
    start_context(l.context, stack(i) + kGuardBytes, b.scheduler);
  }
  const bool in_order = setting == "forward";
  std::vector<int> order;
  for (;;) {
    if (!in_order) schedule_order(order, n, setting, rng);
    bool ran = false;
    for (int j = 0; j < n; ++j) {
      const int i = in_order ? j : order[j];
      if (b.lanes[i].state != State::Runnable) continue;
      ran = true;
      b.current = i;
      g_position = &b.lanes[i].position;
      switch_context(b.scheduler, b.lanes[i].context);
      g_position = nullptr;
      if (!b.fault.empty()) return;
    }
    if (b.live == 0) return;
    if (!ran) {
      b.fault = deadlock_report(b);
      return;
    }
  }
}

// The integer in environment variable `name`, or `fallback` when it is unset or not positive.
int positive_env(const char* name, int fallback) {
  const char* s = std::getenv(name);
  const int v = s == nullptr ? fallback : std::atoi(s);
  return v > 0 ? v : fallback;
}

}  // namespace

cudaError_t set_last_error(cudaError_t e) {
  g_last_error = e;  // the most recent error, as the runtime keeps it
  return e;
}

cudaError_t get_last_error(bool clear) {
  const cudaError_t e = g_last_error;
  if (clear) g_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "unspecified launch failure";
  }
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) + static_shared(kernel) > kMaxOptinSmem)
    return set_last_error(cudaErrorInvalidValue);
  g_optin[kernel] = bytes;
  return cudaSuccess;
}

int max_dynamic_smem(const void* kernel) {
  const auto it = g_optin.find(kernel);
  return it == g_optin.end() ? static_cast<int>(kDefaultSmem) : it->second;
}

int device_attribute(cudaDeviceAttr attr) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      return positive_env("CUDA_EMU_SMS", 132);
    case cudaDevAttrComputeCapabilityMajor:
    case cudaDevAttrComputeCapabilityMinor: {
      // CUDA_EMU_CC: "major.minor" (default 9.0, an H100 / H200).
      const char* s = std::getenv("CUDA_EMU_CC");
      int major = 9, minor = 0;
      if (s != nullptr && std::sscanf(s, "%d.%d", &major, &minor) < 1) major = 9, minor = 0;
      return attr == cudaDevAttrComputeCapabilityMajor ? major : minor;
    }
    case cudaDevAttrMaxSharedMemoryPerBlock:
      return static_cast<int>(kDefaultSmem);
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      return static_cast<int>(kMaxOptinSmem);
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      return positive_env("CUDA_EMU_SMEM_PER_SM", 233472);
    case cudaDevAttrL2CacheSize:
      return positive_env("CUDA_EMU_L2_BYTES", 52428800);
  }
  return 0;
}

void* dynamic_shared_memory() {
  current_lane();
  return g_block->dynamic;
}

bool declare_static_shared(const void* kernel, size_t bytes) {
  g_static_shared[kernel] = bytes;
  return true;
}

size_t static_shared(const void* kernel) {
  const auto it = g_static_shared.find(kernel);
  return it == g_static_shared.end() ? 0 : it->second;
}

void note_shared(void* variable, size_t bytes) {
  Block& b = *g_block;
  current_lane();
  for (const StaticVar& v : b.statics)
    if (v.address == variable) return;
  b.statics.push_back({variable, bytes});
  std::memset(variable, 0xff, bytes);  // as uninitialized as shared memory is
  b.static_bytes += bytes;
  const bool opted_in = g_optin.count(b.kernel) != 0;
  const size_t limit = opted_in ? kMaxOptinSmem : kDefaultSmem;
  if (b.static_bytes + b.dynamic_bytes > limit) {
    std::ostringstream s;
    s << "static (" << b.static_bytes << " B so far) plus dynamic (" << b.dynamic_bytes
      << " B) shared memory exceed the " << limit << " B a launch gets"
      << (opted_in ? "" : " without the opt-in (cudaFuncSetAttribute)")
      << ": the launch fails on a GPU";
    fault_here(s.str());
  }
}

void check_launch_bounds(int max_threads) {
  const dim3& d = current_lane().position.block_dim;
  const int64_t threads = int64_t(d.x) * d.y * d.z;
  if (threads > max_threads)
    fault_here("a block of " + std::to_string(threads) + " threads for a kernel declared with " +
               "__launch_bounds__(" + std::to_string(max_threads) + "): the launch fails on a GPU");
}

void spin_wait() {
  fault_here(
      "a spin-wait (__nanosleep) on work no earlier block has done: blocks run one after another "
      "here, so it would never end");
}

void misaligned_load(const void* p, size_t alignment) {
  std::ostringstream s;
  s << "misaligned load of " << alignment << " bytes at " << p;
  fault_here(s.str());
}

void fault(const std::string& what) {
  current_lane();
  fault_here(what);
}

void warp_uniform(uint64_t value, const char* what) {
  const uint64_t same = warp_collective(Collective::MatchAny, 0xffffffffu, value, 0, 32);
  if (same != 0xffffffffu)
    fault_here(std::string(what) + " differs between the lanes of the warp (it must be the same)");
}

void* warp_scratch(size_t bytes) {
  Block& b = *g_block;
  std::vector<unsigned char>& buffer = b.warp_scratch[b.current / 32];
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// Whether [p, p + size) lies in the block's shared memory (dynamic, or a static variable).
bool in_shared(const void* p, size_t size) {
  const Block& b = *g_block;
  const auto inside = [&](const void* base, size_t bytes) {
    const auto* lo = static_cast<const unsigned char*>(base);
    const auto* q = static_cast<const unsigned char*>(p);
    return base != nullptr && q >= lo && q + size <= lo + bytes;
  };
  if (inside(b.dynamic, b.dynamic_bytes)) return true;
  for (const StaticVar& v : b.statics)
    if (inside(v.address, v.bytes)) return true;
  return false;
}

void async_copy(void* dst, const void* src, size_t size, size_t zfill) {
  Lane& l = current_lane();
  if (!in_shared(dst, size))
    fault_here("an asynchronous copy to an address outside the block's shared memory");
  if (size != 4 && size != 8 && size != 16)
    fault_here("an asynchronous copy of " + std::to_string(size) + " bytes (4, 8 or 16)");
  if (zfill > size) fault_here("an asynchronous copy whose zero fill exceeds its size");
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0)
    fault_here("an asynchronous copy of " + std::to_string(size) +
               " bytes between addresses not aligned to its size");
  PendingCopy c{dst, size, {}};
  std::memcpy(c.bytes.data(), src, size - zfill);  // the zero-filled tail is not read
  std::memset(c.bytes.data() + (size - zfill), 0, zfill);
  l.open_copies.push_back(c);
}

void async_commit() {
  Lane& l = current_lane();
  l.committed_copies.push_back(std::move(l.open_copies));
  l.open_copies.clear();
}

void async_wait_prior(size_t prior) {
  Lane& l = current_lane();
  while (l.committed_copies.size() > prior) {
    for (const PendingCopy& c : l.committed_copies.front())
      std::memcpy(c.dst, c.bytes.data(), c.size);
    l.committed_copies.pop_front();
  }
}

void sync_threads() {
  Block& b = *g_block;
  Lane& l = current_lane();
  l.state = State::AtBarrier;
  ++b.at_barrier;
  release_barrier_if_complete(b);
  yield_to_scheduler();
}

uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int param, int width) {
  Block& b = *g_block;
  Lane& me = current_lane();
  const int self = b.current, lane = self % 32, base = self - lane;
  if (!(mask >> lane & 1u)) fault_here("a warp collective whose mask leaves out the calling lane");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fault_here("a shuffle width that is not a power of two up to 32");
  const int present = static_cast<int>(b.lanes.size()) - base;
  if (present < 32 && (mask >> present) != 0)
    fault_here("a warp collective whose mask names a lane the block does not have");
  const int warp = self / 32;
  if (const uint32_t gone = b.warp_exited[warp] & mask)
    fault_here("a warp collective waiting on lane " + std::to_string(__builtin_ctz(gone)) +
               ", which has exited");
  me.op = op;
  me.mask = mask;
  me.value = value;
  me.param = param;
  me.width = width;
  me.state = State::AtWarp;
  // The last lane of the mask to arrive completes the collective; the others wait for it.
  bool complete = ++b.warp_waiting[warp] >= __builtin_popcount(mask);
  for (int l = 0; complete && l < 32; ++l)
    complete = !(mask >> l & 1u) || b.lanes[base + l].state == State::AtWarp;
  if (!complete) {
    yield_to_scheduler();
    return me.result;
  }
  b.warp_waiting[warp] -= __builtin_popcount(mask);
  // Every lane of the mask is here: check that they agree, then give each its result.
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Lane& other = b.lanes[base + l];
    if (other.op != op || other.mask != mask)
      fault_here("lanes of one warp collective disagree on the operation or the mask (lane " +
                 std::to_string(l) + ")");
  }
  uint64_t ballot = 0;
  bool all = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const bool pred = b.lanes[base + l].value != 0;
    ballot |= uint64_t(pred) << l;
    all = all && pred;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Lane& dst = b.lanes[base + l];
    const int seg = l & ~(dst.width - 1);
    int src = l;
    switch (op) {
      case Collective::SyncWarp:
        dst.result = 0;
        break;
      case Collective::ShflIdx:
        src = seg + (((dst.param % dst.width) + dst.width) % dst.width);
        break;
      case Collective::ShflUp:  // offsets and lane masks are taken modulo 32, as PTX does
        src = (l - seg) < (dst.param & 31) ? l : l - (dst.param & 31);
        break;
      case Collective::ShflDown:
        src = (l - seg) + (dst.param & 31) >= dst.width ? l : l + (dst.param & 31);
        break;
      case Collective::ShflXor:
        src = l ^ (dst.param & 31);
        if (src >= seg + dst.width || src < 0 || src > 31) src = l;
        break;
      case Collective::Ballot:
        dst.result = ballot;
        break;
      case Collective::Any:
        dst.result = ballot != 0;
        break;
      case Collective::All:
        dst.result = all;
        break;
      case Collective::MatchAny: {
        uint64_t same = 0;
        for (int j = 0; j < 32; ++j)
          if ((mask >> j & 1u) && b.lanes[base + j].value == dst.value) same |= uint64_t(1) << j;
        dst.result = same;
        break;
      }
    }
    if (op == Collective::ShflIdx || op == Collective::ShflUp || op == Collective::ShflDown ||
        op == Collective::ShflXor) {
      if (!(mask >> src & 1u))
        fault_here("lane " + std::to_string(l) + " shuffles from lane " + std::to_string(src) +
                   ", outside the mask");
      dst.result = b.lanes[base + src].value;
    }
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) b.lanes[base + l].state = State::Runnable;
  return me.result;
}

void run_grid(const void* kernel, const LaunchConfig& c, const std::function<void()>& body) {
  const dim3 &g = c.grid, &k = c.block;
  const uint64_t threads = uint64_t(k.x) * k.y * k.z;
  if (threads == 0 || threads > 1024 || k.x > 1024 || k.y > 1024 || k.z > 64 || g.x == 0 ||
      g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    set_last_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (c.smem > static_cast<size_t>(max_dynamic_smem(kernel))) {
    set_last_error(cudaErrorInvalidValue);
    return;
  }
  if (g_block != nullptr)
    throw std::runtime_error(
        "cuda_emu: a launch while another one runs (from device code or another host thread); the "
        "emulator runs one launch at a time");
  ++g_launches;
  const uint64_t barriers_before = g_barriers;
  g_launch_log.resize(g_launches);
  const std::string setting = schedule_setting();
  std::mt19937 rng(setting.rfind("random:", 0) == 0 ? std::stoul(setting.substr(7)) : 0u);
  // Dynamic shared memory starts 128-byte aligned (a GPU aligns it at least that much).
  std::vector<unsigned char> dynamic(c.smem + 128);
  void* aligned = dynamic.data() + (128 - reinterpret_cast<uintptr_t>(dynamic.data()) % 128) % 128;
  Block b;
  b.body = &body;
  b.dynamic = c.smem > 0 ? aligned : nullptr;
  b.kernel = kernel;
  b.dynamic_bytes = c.smem;
  // The order of the blocks follows the schedule setting too (races between blocks).
  const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
  std::vector<uint64_t> order;
  if (setting != "forward") schedule_order(order, blocks, setting, rng);
  g_block = &b;
  try {
    for (uint64_t i = 0; i < blocks; ++i) {
      const uint64_t linear = order.empty() ? i : order[i];
      const uint3 idx{static_cast<unsigned>(linear % g.x),
                      static_cast<unsigned>(linear / g.x % g.y),
                      static_cast<unsigned>(linear / (uint64_t(g.x) * g.y))};
      std::fill(dynamic.begin(), dynamic.end(), static_cast<unsigned char>(0xff));
      b.statics.clear();
      b.static_bytes = 0;
      run_block(b, g, k, idx, setting, rng);
      if (!b.fault.empty()) throw std::runtime_error("cuda_emu: " + b.fault);
    }
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
  g_launch_log[g_launches - 1] = {blocks, g_barriers - barriers_before};
}

}  // namespace cuda_emu

// Launches run so far (for tests that check which code path an op took).
extern "C" uint64_t cuda_emu_launches() { return cuda_emu::g_launches; }

// The block barriers (__syncthreads) that launch number `launch` (1 for the first) released, over
// all its blocks: a measure of the work its blocks did, for tests that check that a kernel's
// blocks skipped theirs. 0 for a launch that has not run.
extern "C" uint64_t cuda_emu_launch_barriers(uint64_t launch) {
  return cuda_emu::launch_record(launch).barriers;
}

// The blocks of launch number `launch` (its grid's size; 0 for a launch that has not run).
extern "C" uint64_t cuda_emu_launch_blocks(uint64_t launch) {
  return cuda_emu::launch_record(launch).blocks;
}
