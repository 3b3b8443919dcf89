"""Generated CUDA C run on the CPU, for tests of GPU kernels on machines without a GPU.

`emulate(src, tmp_path)` compiles TVM's CUDA C for the host with one OS thread per GPU thread, a
barrier per block (__syncthreads) and one per warp (shuffles, mma fragments). wmma fragments hold
their whole tile in every lane (the real layout is opaque to the code that uses them). Blocks run one after
another, except the blocks of a thread block cluster, which run together. Each block has its own
shared memory (NaN-filled, so a read before a write shows); the st_cluster_* helpers reach the other
blocks' and wait at the cluster's barrier. Peer memory for the fused all-reduce is plain host
memory: its flags and lines are atomics, so several launches (ranks) may run at once from several
host threads, each waiting on the others as GPUs do."""
import ctypes
import os
import re
import shutil
import subprocess

import pytest

from shardtune.kernels.allreduce_add_norm import ST_CLUSTER_CUDA, ST_LL_CUDA

EMULATOR = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <optional>
#include <thread>
#include <vector>
#define __device__
#define __host__
#define __global__
#define __launch_bounds__(n)
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
struct emu_dim { unsigned x, y, z; };
thread_local emu_dim threadIdx, blockIdx;
thread_local unsigned emu_tid;                       // threadIdx.x + threadIdx.y * blockDim.x
struct emu_block_state {   // what the threads of one block share
  std::barrier<>* block;
  std::vector<std::barrier<>*> warps;
  unsigned long long slot[1024];
  float frag[1024][12];
  std::vector<char> shared = std::vector<char>(1 << 18, static_cast<char>(0xff));
};
thread_local emu_block_state* emu_b;
thread_local size_t emu_shared_used;
thread_local unsigned emu_rank;                      // within the cluster
thread_local std::vector<emu_block_state*>* emu_cluster_blocks;
thread_local std::barrier<>* emu_cluster;
thread_local std::optional<std::barrier<>::arrival_token> emu_cluster_token;
static void* emu_shared(size_t bytes, size_t align) {   // the same offsets in every thread of a block
  emu_shared_used = (emu_shared_used + align - 1) / align * align;
  void* p = emu_b->shared.data() + emu_shared_used;
  emu_shared_used += bytes;
  return p;
}
static inline void __syncthreads() { emu_b->block->arrive_and_wait(); }
template <typename T> static T __shfl_sync(unsigned, T v, int src, int width) {
  unsigned tid = emu_tid, lane = tid % 32, w = tid / 32;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu_b->slot[tid] = bits;
  emu_b->warps[w]->arrive_and_wait();
  bits = emu_b->slot[w * 32 + (lane & ~(width - 1)) + (src & (width - 1))];
  emu_b->warps[w]->arrive_and_wait();
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
template <typename T> static T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  unsigned lane = emu_tid % 32;
  T from = __shfl_sync(mask, v, lane + delta < 32 ? lane + delta : lane, 32);
  return from;
}
// The fused all-reduce's peer protocol: lines of {data, round} stored and loaded whole, flags as
// atomics; a poll yields, so that thousands of host threads on a few cores make progress.
static int st_ll_store(int* line, int data, int round) {
  unsigned long long v = (static_cast<unsigned long long>(static_cast<unsigned>(round)) << 32) | static_cast<unsigned>(data);
  __atomic_store_n(reinterpret_cast<unsigned long long*>(line), v, __ATOMIC_RELEASE);
  return 0;
}
static long long st_ll_load(const int* line) {
  return static_cast<long long>(__atomic_load_n(reinterpret_cast<const unsigned long long*>(line), __ATOMIC_ACQUIRE));
}
static int st_ll_wait(long long first, const int* line, int round) {
  while (static_cast<int>(first >> 32) < round) { std::this_thread::yield(); first = st_ll_load(line); }
  return static_cast<int>(first);
}
static int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static int atomicAdd(int* p, int v) { std::this_thread::yield(); return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static int st_cluster_put(float* slot, int rank, float value) {
  *reinterpret_cast<float*>((*emu_cluster_blocks)[rank]->shared.data() + (reinterpret_cast<char*>(slot) - emu_b->shared.data())) = value;
  return 0;
}
static int st_cluster_arrive() { emu_cluster_token.emplace(emu_cluster->arrive()); return 0; }
static int st_cluster_wait() { emu_cluster->wait(std::move(*emu_cluster_token)); emu_cluster_token.reset(); return 0; }
static int st_cluster_sync() { emu_cluster->arrive_and_wait(); return 0; }
static unsigned tvm_builtin_cluster_ctaid_x() { return emu_rank; }
// mma.m16n8k16 (attention_mma.py) for one warp: every lane leaves its fragments, each takes its d.
#define SHARDTUNE_EMULATED_MMA
static int st_mma_16816(float* d, half a0, half a1, half a2, half a3, half a4, half a5, half a6, half a7,
                        half b0, half b1, half b2, half b3) {
  unsigned tid = emu_tid, lane = tid % 32, w = tid / 32;
  half in[12] = {a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3};
  auto& frag = emu_b->frag;
  for (int i = 0; i < 12; ++i) frag[tid][i] = __half2float(in[i]);
  emu_b->warps[w]->arrive_and_wait();
  auto A = [&](int m, int k) {  // a0,a1: row grp, cols 2t,2t+1; a2,a3: row +8; a4..a7: cols +8
    return frag[w * 32 + 4 * (m % 8) + (k % 8) / 2][(k / 8) * 4 + (m / 8) * 2 + k % 2];
  };
  auto B = [&](int k, int n) { return frag[w * 32 + 4 * n + (k % 8) / 2][8 + (k / 8) * 2 + k % 2]; };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    int m = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;
    out[i] = 0;
    for (int k = 0; k < 16; ++k) out[i] += A(m, k) * B(k, n);
  }
  emu_b->warps[w]->arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] += out[i];
  return 0;
}
static unsigned int __cvta_generic_to_shared(const void*) { return 0; }   // cp.async copies by pointer here
namespace nvcuda::wmma {   // 16x16x16 tiles, as TVM's tensor-core intrinsics use them
struct matrix_a; struct matrix_b; struct accumulator; struct row_major; struct col_major;
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  float v[16][16];   // a: [m][k], b: [k][n], accumulator: [m][n]
};
template <typename F, typename T> void fill_fragment(F& f, T value) {
  for (auto& row : f.v) for (auto& e : row) e = static_cast<float>(value);
}
template <typename Use, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, half, L>& f, const half* p, unsigned ldm) {
  constexpr bool col = std::is_same_v<L, col_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = __half2float(col ? p[c * ldm + r] : p[r * ldm + c]);
}
template <typename A, typename B, typename C, typename D> void mma_sync(D& d, const A& a, const B& b, const C& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      out[m][n] = c.v[m][n];
      for (int k = 0; k < 16; ++k) out[m][n] += a.v[m][k] * b.v[k][n];
    }
  std::memcpy(d.v, out, sizeof(out));
}
template <typename F> void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t layout) {
  auto* warp = emu_b->warps[emu_tid / 32];
  warp->arrive_and_wait();   // one lane writes the tile the warp shares
  if (emu_tid % 32 == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.v[r][c];
  warp->arrive_and_wait();
}
}  // namespace nvcuda::wmma
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename F> static void emu_launch(F kernel, unsigned gx, unsigned gy, unsigned threads, unsigned cluster,
                                              unsigned block_x) {
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx0 = 0; bx0 < gx; bx0 += cluster) {
      std::barrier<> cluster_barrier(cluster * threads);
      std::vector<emu_block_state*> blocks;
      for (unsigned r = 0; r < cluster; ++r) {
        auto* b = new emu_block_state;
        b->block = new std::barrier<>(threads);
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) b->warps.push_back(new std::barrier<>(32));
        blocks.push_back(b);
      }
      std::vector<std::thread> ts;
      for (unsigned r = 0; r < cluster; ++r)
        for (unsigned t = 0; t < threads; ++t)
          ts.emplace_back([&, r, t] {
            threadIdx = {t % block_x, t / block_x, 0};
            emu_tid = t;
            blockIdx = {bx0 + r, by, 0};
            emu_b = blocks[r];
            emu_shared_used = 0;
            emu_rank = r;
            emu_cluster_blocks = &blocks;
            emu_cluster = &cluster_barrier;
            kernel();
          });
      for (auto& t : ts) t.join();
      for (auto* b : blocks) {
        for (auto* w : b->warps) delete w;
        delete b->block;
        delete b;
      }
    }
}
"""
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")


def emulate(src, tmp_path):
    """{kernel name: launch(arrays by parameter name, grid x, grid y, cluster size)} for generated CUDA C."""
    if not shutil.which("g++") or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_fp16.h")):
        pytest.skip("needs g++ and the CUDA headers")
    if int(subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout.split(".")[0]) < 11:
        pytest.skip("needs g++ 11 or newer (std::barrier)")
    # Shared arrays into the block's own memory; the device-side definitions the emulator replaces out.
    src = re.sub(r"__shared__ alignas\((\d+)\) ([\w ]+?) (\w+)\[(\d+)\];",
                 r"\2* \3 = static_cast<\2*>(emu_shared(sizeof(\2) * \4, \1));", src)
    src = re.sub(r"extern __shared__ __align__\((\d+)\) uchar (\w+)\[\];",
                 r"uchar* \2 = static_cast<uchar*>(emu_shared(1 << 17, \1));", src)
    assert "__shared__" not in src, "a shared declaration the emulator does not know"
    src = src.replace("#include <mma.h>", "").replace(ST_CLUSTER_CUDA, "").replace(ST_LL_CUDA, "")
    # cp.async copies at once (a wait then has nothing left to wait for); commit and wait do nothing
    src = re.sub(r'unsigned int dst_addr = __cvta_generic_to_shared\(dst_p\);\s*asm volatile\("cp\.async\.c[ag]\.shared'
                 r'\.global \[%0\], \[%1\], %2;"\s*::\s*"r"\(dst_addr\), "l"\(src_p\), "n"\((\d+)\)\);',
                 r"std::memcpy(dst_p, src_p, \1);", src)
    src = re.sub(r'(void ptx_cp_async_\w*pred\w*\([^)]*\) \{\n.*?= __cvta_generic_to_shared\(dst_p\);\n)\s*__asm__'
                 r' __volatile__\(.*?"n"\((\d+)\).*?\);',   # predicated: zeros where the predicate is off
                 r"\1  if (predicate) std::memcpy(dst_p, src_p, \2); else std::memset(dst_p, 0, \2);", src, flags=re.S)
    src = re.sub(r'asm volatile\("cp\.async\.(commit_group|wait_group \d+);"[^;]*\);', "", src)
    assert "cp.async" not in src, "a cp.async form the emulator does not know"
    src = re.sub(r"__forceinline__ __device__ unsigned int tvm_builtin_cluster_ctaid_x\(\) \{.*?\n\}\n", "", src,
                 flags=re.S)
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\) \{', src)
    params = {name: [p.strip().rsplit(" ", 1) for p in ps.split(",")] for _, name, ps in kernels}
    wrappers = "".join(
        f'extern "C" void emu_{name}(void** a, unsigned gx, unsigned gy, unsigned cluster, unsigned bx) {{\n'
        + "".join(f"  auto {n} = ({t.replace('__restrict__', '').strip()})a[{i}];\n" if "*" in t else
                  f"  auto {n} = ({t})(intptr_t)a[{i}];\n" for i, (t, n) in enumerate(params[name]))
        + f"  emu_launch([=] {{ {name}({', '.join(n for _, n in params[name])}); }}, gx, gy, {threads}, cluster,"
        + f" bx ? bx : {threads});\n}}\n"
        for threads, name, _ in kernels)
    # A new file per build: rewriting a loaded library would change code that is mapped.
    n = len(list(tmp_path.glob("k*.so")))
    cc, so = tmp_path / f"k{n}.cc", tmp_path / f"k{n}.so"
    cc.write_text(EMULATOR + src + wrappers)
    subprocess.run(["g++", "-std=c++20", "-O0", "-w", "-shared", "-fPIC", "-I", CUDA_INCLUDE, str(cc), "-o", str(so),
                    "-lpthread"], check=True)
    lib = ctypes.CDLL(str(so))

    def launcher(name):
        names = [(n.removesuffix("_ptr"), "*" in t) for t, n in params[name]]

        def launch(arrays, gx, gy=1, cluster=1, block_x=0):
            """Clusters of `cluster` blocks along x; threads of `block_x` along threadIdx.x (0: all)."""
            # Scalars (a view's element offset) are 0: every array is passed at its own first element.
            ptrs = (ctypes.c_void_p * len(names))(*[arrays[n].ctypes.data if pointer else 0 for n, pointer in names])
            getattr(lib, "emu_" + name)(ptrs, ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(cluster),
                                        ctypes.c_uint(block_x))
        return launch
    return {name: launcher(name) for name in sorted(params)}


