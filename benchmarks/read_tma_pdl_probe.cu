// Can any kernel read the 70B TP2 KV cache (8.39 MB) at issue 4's 70% of copy, timed as the tuner
// times ours (back to back in a CUDA graph, rotating copies, cold L2)? `read_speed_of_light.py` said
// no for 16-byte loads (68.0%, 4.31 us). This probe tries the two things that one did not:
//   tma  the Hopper bulk copy (cp.async.bulk global -> shared, completed on an mbarrier): one thread
//        puts a block's whole share in flight, with no registers held for it;
//   pdl  programmatic dependent launch, as the model launches every kernel: the kernel starts with
//        griddepcontrol.wait and is launched with programmatic stream serialization, so its blocks
//        are placed while the kernel before still runs.
// Each read kernel against 16-byte loads, with and without PDL, in the same run. Also timed, for the
// 8.39 MB KV cache only: the bulk-copy read in decode attention's shape with the flash-decoding merge
// done inside the kernel (`cluster`): one thread block cluster of P blocks per KV head (4 heads,
// 4096 rows of K and of V, 256 bytes a row); each block reads its 4096/P rows of K and V (bulk copies
// through a ring of shared buffers) and puts a
// 4 KB partial (8 query heads x 128 floats) into the first block's shared memory, which sums the P
// partials and writes them out. That is the merge without a second kernel or a global round trip.
// Build and run (needs an sm_90 GPU): nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/rp
//   benchmarks/read_tma_pdl_probe.cu && /tmp/rp [MB,...] > out.json
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

__device__ __forceinline__ void pdl_wait(bool pdl) { if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory"); }

// 16-byte loads, U in flight per thread, grid-stride (one pass when the grid covers n).
template <int U>
__global__ void ldg_read(const uint4* __restrict__ p, long long n, unsigned* sink, bool pdl) {
  pdl_wait(pdl);
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + (U - 1) * stride < n; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; u++) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < U; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) { uint4 v = __ldcs(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
  if (acc == 0x9e3779b9u) sink[0] = acc;   // a write the compiler cannot drop, (almost) never taken
}

// Bulk copies: block b reads chunks b, b + grid, ... of `chunk` bytes into a ring of `stages` shared
// buffers; thread 0 issues, everyone waits on the stage's mbarrier and XORs one word of it (so the
// data is used). With stages >= chunks per block every copy is in flight at once.
__global__ void tma_read(const char* __restrict__ p, long long bytes, int chunk, int stages, unsigned* sink, bool pdl) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) unsigned long long bar[16];
  pdl_wait(pdl);
  const long long nchunks = bytes / chunk;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; s++) {
      unsigned a = (unsigned)__cvta_generic_to_shared(&bar[s]);
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(a));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](long long c, int s) {
    unsigned a = (unsigned)__cvta_generic_to_shared(&bar[s]);
    unsigned dst = (unsigned)__cvta_generic_to_shared(smem + (size_t)s * chunk);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(a), "r"(chunk) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(p + c * chunk), "r"(chunk), "r"(a) : "memory");
  };
  long long c0 = blockIdx.x;
  if (threadIdx.x == 0)
    for (int s = 0; s < stages && c0 + (long long)s * gridDim.x < nchunks; s++) issue(c0 + (long long)s * gridDim.x, s);
  unsigned acc = 0;
  int k = 0;
  for (long long c = c0; c < nchunks; c += gridDim.x, k++) {
    int s = k % stages;
    unsigned phase = (k / stages) & 1;
    unsigned a = (unsigned)__cvta_generic_to_shared(&bar[s]);
    asm volatile("{ .reg .pred done; WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1; @!done bra WAIT_%=; }"
                 :: "r"(a), "r"(phase) : "memory");
    acc ^= reinterpret_cast<const unsigned*>(smem + (size_t)s * chunk)[threadIdx.x];
    __syncthreads();   // every thread has read the stage before it is refilled
    long long next = c + (long long)stages * gridDim.x;
    if (threadIdx.x == 0 && next < nchunks) issue(next, s);
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// Block (h, p) of cluster h reads K rows and V rows [p*R, (p+1)*R) of head h through a ring of
// `stages` shared buffers of `chunk` bytes, then its partial goes to block 0 of the cluster over DSMEM.
__global__ void cluster_read(const char* __restrict__ kv, int rows, int heads, int chunk, int stages, float* out,
                             unsigned* sink, bool pdl) {
  extern __shared__ __align__(128) char smem[];   // [partials of the cluster: P x 1024 floats][ring]
  __shared__ __align__(8) unsigned long long bar[16];
  unsigned P, p;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(P));
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(p));
  const int h = blockIdx.x / P;
  const long long bytes = (long long)(rows / P) * 256;   // of K, and of V
  const int per_tensor = (int)(bytes / chunk), pieces = 2 * per_tensor;
  float* parts = reinterpret_cast<float*>(smem);
  char* ring = smem + P * 4096;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; s++)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"((unsigned)__cvta_generic_to_shared(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");   // this block has started
  pdl_wait(pdl);
  auto issue = [&](int j) {
    int s = j % stages, t = j / per_tensor;
    const char* src = kv + ((size_t)t * heads + h) * rows * 256 + p * bytes + (long long)(j % per_tensor) * chunk;
    unsigned a = (unsigned)__cvta_generic_to_shared(&bar[s]);
    unsigned dst = (unsigned)__cvta_generic_to_shared(ring + (size_t)s * chunk);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(a), "r"(chunk) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(chunk), "r"(a) : "memory");
  };
  if (threadIdx.x == 0)
    for (int j = 0; j < stages && j < pieces; j++) issue(j);
  // Stand-in for the math: every thread folds its words of each piece.
  unsigned acc = 0;
  for (int j = 0; j < pieces; j++) {
    int s = j % stages;
    unsigned a = (unsigned)__cvta_generic_to_shared(&bar[s]), phase = (j / stages) & 1;
    asm volatile("{ .reg .pred done; WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1; @!done bra WAIT_%=; }"
                 :: "r"(a), "r"(phase) : "memory");
    const uint4* w = reinterpret_cast<const uint4*>(ring + (size_t)s * chunk);
    for (int i = threadIdx.x; i < chunk / 16; i += blockDim.x) { uint4 v = w[i]; acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    __syncthreads();
    if (threadIdx.x == 0 && j + stages < pieces) issue(j + stages);
  }
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");   // every block started: block 0's smem exists
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) {
    unsigned local = (unsigned)__cvta_generic_to_shared(&parts[p * 1024 + i]), remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(0));
    asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"((float)(acc & 0xff)) : "memory");
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (p == 0)
    for (int i = threadIdx.x; i < 1024; i += blockDim.x) {
      float s = 0;
      for (unsigned q = 0; q < P; q++) s += parts[q * 1024 + i];
      out[h * 1024 + i] = s;
    }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// 4 KV heads x P blocks in clusters of P; `attr` has room for a second (PDL) attribute.
static cudaLaunchConfig_t cluster_config(int P, int threads, size_t smem, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(4 * P);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = P;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

static void launch_cluster(const int P, int threads, int chunk, int stages, const char* kv, float* out, unsigned* sink,
                           bool pdl, cudaStream_t st) {
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg = cluster_config(P, threads, P * 4096 + (size_t)stages * chunk, attr);
  cfg.stream = st;
  if (pdl) {
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.numAttrs = 2;
  }
  CHECK(cudaLaunchKernelEx(&cfg, cluster_read, kv, 4096, 4, chunk, stages, out, sink, pdl));   // rows, heads
}

// Whether the GPU can place one cluster of P such blocks at all (16 is beyond the portable 8).
static bool cluster_fits(int P, int threads, size_t smem) {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = cluster_config(P, threads, smem, attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, cluster_read, &cfg) != cudaSuccess) { cudaGetLastError(); return false; }
  if (n == 0) fprintf(stderr, "cluster of %d blocks (%d threads, %zu B shared) does not fit\n", P, threads, smem);
  return n > 0;
}

// For "cluster", `grid` holds the cluster size P (the grid is 4 x P blocks).
struct Launch { std::string kind; int threads, loads, grid, chunk, stages; size_t smem; float* out = nullptr; };

static void launch(const Launch& l, const char* buf, long long bytes, unsigned* sink, bool pdl, cudaStream_t st) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(l.grid);
  cfg.blockDim = dim3(l.threads);
  cfg.dynamicSmemBytes = l.smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const uint4* p = reinterpret_cast<const uint4*>(buf);
  long long n16 = bytes / 16;
  if (l.kind == "cluster") launch_cluster(l.grid, l.threads, l.chunk, l.stages, buf, l.out, sink, pdl, st);
  else if (l.kind == "tma") CHECK(cudaLaunchKernelEx(&cfg, tma_read, buf, bytes, l.chunk, l.stages, sink, pdl));
  else if (l.loads == 1) CHECK(cudaLaunchKernelEx(&cfg, ldg_read<1>, p, n16, sink, pdl));
  else if (l.loads == 2) CHECK(cudaLaunchKernelEx(&cfg, ldg_read<2>, p, n16, sink, pdl));
  else CHECK(cudaLaunchKernelEx(&cfg, ldg_read<4>, p, n16, sink, pdl));
}

// Median microseconds per launch: `rounds` passes over the copies captured into one graph, replayed.
static double graph_us(const Launch& l, const std::vector<char*>& bufs, long long bytes, unsigned* sink, bool pdl,
                       cudaStream_t st) {
  const int rounds = 2, reps = 15;
  for (char* b : bufs) launch(l, b, bytes, sink, pdl, st);
  CHECK(cudaStreamSynchronize(st));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < rounds; r++)
    for (char* b : bufs) launch(l, b, bytes, sink, pdl, st);
  CHECK(cudaStreamEndCapture(st, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < reps + 1; i++) {
    CHECK(cudaEventRecord(a, st));
    CHECK(cudaGraphLaunch(ge, st));
    CHECK(cudaEventRecord(b, st));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (i) t.push_back(ms * 1e3 / (rounds * bufs.size()));
  }
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  std::vector<double> sizes_mb = {8.39, 4.19, 9.4, 18.9, 33.0};
  if (argc > 1) {
    sizes_mb.clear();
    for (char* s = strtok(argv[1], ","); s; s = strtok(nullptr, ",")) sizes_mb.push_back(atof(s));
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  CHECK(cudaFuncSetAttribute(tma_read, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  CHECK(cudaFuncSetAttribute(cluster_read, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  CHECK(cudaFuncSetAttribute(cluster_read, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  float* cluster_out;
  CHECK(cudaMalloc(&cluster_out, 4 * 1024 * sizeof(float)));
  cudaStream_t st;
  CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  unsigned* sink;
  CHECK(cudaMalloc(&sink, 4));

  // The bars' reference: a 512 MB device-to-device copy, bytes read + written, median of 10.
  size_t cb = 512u << 20;
  char *src, *dst;
  CHECK(cudaMalloc(&src, cb));
  CHECK(cudaMalloc(&dst, cb));
  std::vector<double> ct;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 11; i++) {
    CHECK(cudaEventRecord(a, st));
    CHECK(cudaMemcpyAsync(dst, src, cb, cudaMemcpyDeviceToDevice, st));
    CHECK(cudaEventRecord(b, st));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (i) ct.push_back(ms / 1e3);
  }
  std::sort(ct.begin(), ct.end());
  const double copy_gbps = 2.0 * cb / ct[ct.size() / 2] / 1e9;
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));

  time_t now = time(nullptr);
  char date[32];
  strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
  printf("{\"device\": \"%s\", \"date\": \"%s\", \"command\": \"%s%s%s\", \"sms\": %d, \"copy_512MB_gbps\": %.1f,\n \"rows\": [\n",
         prop.name, date, "benchmarks/read_tma_pdl_probe.cu", argc > 1 ? " " : "", argc > 1 ? argv[1] : "", sms, copy_gbps);
  fprintf(stderr, "%s, copy 512 MB: %.0f GB/s\n", prop.name, copy_gbps);

  bool first_row = true;
  for (double mb : sizes_mb) {
    long long bytes = (long long)(mb * 1e6) / 65536 * 65536;   // whole chunks of every size tried
    int copies = std::max(2, (int)std::ceil(400e6 / bytes));
    std::vector<char*> bufs(copies);
    for (auto& p : bufs) { CHECK(cudaMalloc(&p, bytes)); CHECK(cudaMemset(p, 0x5a, bytes)); }
    std::vector<Launch> launches;
    for (int threads : {256, 512, 1024})
      for (int loads : {1, 2, 4}) {
        long long one_pass = (bytes / 16 + (long long)threads * loads - 1) / ((long long)threads * loads);
        launches.push_back({"ldg", threads, loads, (int)one_pass, 0, 0, 0});
        for (int waves : {1, 2})
          if (waves * sms * (2048 / threads) < one_pass)
            launches.push_back({"ldg", threads, loads, waves * sms * (2048 / threads), 0, 0, 0});
      }
    for (int chunk : {4096, 8192, 16384, 32768})
      for (int stages : {1, 2, 4, 8}) {
        if ((size_t)chunk * stages > 200 * 1024) continue;
        long long nchunks = bytes / chunk;
        // one pass (each block's chunks all in flight at once), or a ring over fewer blocks
        int one_pass = (int)((nchunks + stages - 1) / stages);
        launches.push_back({"tma", 128, 0, one_pass, chunk, stages, (size_t)chunk * stages});
        int per_sm = std::max(1, (int)(200 * 1024 / ((size_t)chunk * stages)));
        if (sms * per_sm < one_pass)
          launches.push_back({"tma", 128, 0, sms * per_sm, chunk, stages, (size_t)chunk * stages});
      }
    // Decode attention's shape (4 KV heads x 4096 rows x 256 bytes, K and V) is these 8.39 MB.
    if (bytes == 4LL * 4096 * 256 * 2)
      for (int P : {4, 8, 16})
        for (int threads : {128, 512})
          for (int chunk : {16384, 32768})
            for (int stages : {2, 4, 8})
              if (P * 4096 + chunk * stages <= 200 * 1024 && (4096 / P) * 256 % chunk == 0 &&
                  cluster_fits(P, threads, P * 4096 + chunk * stages))
                launches.push_back({"cluster", threads, 0, P, chunk, stages, 0, cluster_out});
    if (!first_row) printf(",\n");
    first_row = false;
    printf("  {\"mb\": %.3f, \"copies\": %d, \"settings\": [", bytes / 1e6, copies);
    double best[3][2] = {{1e30, 1e30}, {1e30, 1e30}, {1e30, 1e30}};   // [ldg, tma, cluster][no pdl, pdl]
    bool first = true;
    for (const Launch& l : launches)
      for (bool pdl : {false, true}) {
        double us = graph_us(l, bufs, bytes, sink, pdl, st);
        int k = l.kind == "tma" ? 1 : l.kind == "cluster" ? 2 : 0;
        best[k][pdl] = std::min(best[k][pdl], us);
        printf("%s\n    {\"kind\": \"%s\", \"pdl\": %s, \"threads\": %d, \"loads\": %d, \"grid\": %d, \"chunk\": %d, "
               "\"stages\": %d, \"us\": %.3f, \"pct_of_copy\": %.1f}", first ? "" : ",", l.kind.c_str(),
               pdl ? "true" : "false", l.threads, l.loads, l.grid, l.chunk, l.stages, us, 100.0 * bytes / us / 1e3 / copy_gbps);
        first = false;
      }
    printf("],\n   \"best_us\": {\"ldg\": %.3f, \"ldg_pdl\": %.3f, \"tma\": %.3f, \"tma_pdl\": %.3f", best[0][0], best[0][1],
           best[1][0], best[1][1]);
    if (best[2][0] < 1e30) printf(", \"cluster\": %.3f, \"cluster_pdl\": %.3f", best[2][0], best[2][1]);
    printf("}}");
    fprintf(stderr, "%7.2f MB: best us (%% of copy)  ldg %.2f (%.1f)  ldg+pdl %.2f (%.1f)  tma %.2f (%.1f)  tma+pdl %.2f (%.1f)\n",
            bytes / 1e6, best[0][0], 100.0 * bytes / best[0][0] / 1e3 / copy_gbps, best[0][1],
            100.0 * bytes / best[0][1] / 1e3 / copy_gbps, best[1][0], 100.0 * bytes / best[1][0] / 1e3 / copy_gbps,
            best[1][1], 100.0 * bytes / best[1][1] / 1e3 / copy_gbps);
    if (best[2][0] < 1e30)
      fprintf(stderr, "          attention-shaped read + in-cluster merge: %.2f (%.1f)  with pdl %.2f (%.1f)\n", best[2][0],
              100.0 * bytes / best[2][0] / 1e3 / copy_gbps, best[2][1], 100.0 * bytes / best[2][1] / 1e3 / copy_gbps);
    for (char* p : bufs) CHECK(cudaFree(p));
  }
  printf("\n ]}\n");
  return 0;
}
