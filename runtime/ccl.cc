// The collective-communication backend that TVM's disco runtime looks up by name:
// runtime.disco.<ccl>.init_ccl, .init_ccl_per_worker, .allreduce, .allgather, ... with
// <ccl> = nccl on CUDA and rccl on ROCm, from this one source (SHARDTUNE_RCCL picks).
// The PyPI TVM wheel ships the disco runtime without any backend; runtime/ccl.py builds
// this file at first use with tvm_ffi.cpp.load_inline, and loading it registers the functions.
//
// Every collective is enqueued on the stream TVM launches kernels on (TVMFFIEnvGetStream),
// so it orders with the model's kernels and lands inside a CUDA graph being captured.
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>

#include <cstring>
#include <vector>

#ifdef SHARDTUNE_RCCL
#include <hip/hip_runtime.h>
#include <rccl/rccl.h>
#define CCL_NAME "rccl"
#define DEVICE_TYPE kDLROCM
using stream_t = hipStream_t;
#define GPU(call) GpuCheck((call) == hipSuccess, #call)
#define gpuSetDevice hipSetDevice
#define gpuStreamCreate hipStreamCreate
#define gpuStreamDestroy hipStreamDestroy
#define gpuStreamSynchronize hipStreamSynchronize
#define gpuMalloc hipMalloc
#define gpuFree hipFree
#define gpuMemset hipMemset
#define gpuIpcMemHandle_t hipIpcMemHandle_t
#define gpuIpcGetMemHandle hipIpcGetMemHandle
#define gpuIpcOpenMemHandle hipIpcOpenMemHandle
#define gpuIpcCloseMemHandle hipIpcCloseMemHandle
#define gpuIpcMemLazyEnablePeerAccess hipIpcMemLazyEnablePeerAccess
#define gpuDeviceCanAccessPeer hipDeviceCanAccessPeer
#define gpuGetDevice hipGetDevice
#else
#include <cuda_runtime.h>
#include <nccl.h>
#define CCL_NAME "nccl"
#define DEVICE_TYPE kDLCUDA
using stream_t = cudaStream_t;
#define GPU(call) GpuCheck((call) == cudaSuccess, #call)
#define gpuSetDevice cudaSetDevice
#define gpuStreamCreate cudaStreamCreate
#define gpuStreamDestroy cudaStreamDestroy
#define gpuStreamSynchronize cudaStreamSynchronize
#define gpuMalloc cudaMalloc
#define gpuFree cudaFree
#define gpuMemset cudaMemset
#define gpuIpcMemHandle_t cudaIpcMemHandle_t
#define gpuIpcGetMemHandle cudaIpcGetMemHandle
#define gpuIpcOpenMemHandle cudaIpcOpenMemHandle
#define gpuIpcCloseMemHandle cudaIpcCloseMemHandle
#define gpuIpcMemLazyEnablePeerAccess cudaIpcMemLazyEnablePeerAccess
#define gpuDeviceCanAccessPeer cudaDeviceCanAccessPeer
#define gpuGetDevice cudaGetDevice
#define gpuStreamNonBlocking cudaStreamNonBlocking
#define gpuStreamCreateWithFlags cudaStreamCreateWithFlags
#define gpuStreamBeginCapture cudaStreamBeginCapture
#define gpuStreamCaptureModeThreadLocal cudaStreamCaptureModeThreadLocal
#define gpuStreamEndCapture cudaStreamEndCapture
using graph_t = cudaGraph_t;
using graph_exec_t = cudaGraphExec_t;
using event_t = cudaEvent_t;
#define gpuGraphInstantiate(e, g) cudaGraphInstantiate(e, g, 0)
#define gpuGraphLaunch cudaGraphLaunch
#define gpuGraphExecDestroy cudaGraphExecDestroy
#define gpuGraphDestroy cudaGraphDestroy
#define gpuEventCreate cudaEventCreate
#define gpuEventRecord cudaEventRecord
#define gpuEventSynchronize cudaEventSynchronize
#define gpuEventElapsedTime cudaEventElapsedTime
#define gpuEventDestroy cudaEventDestroy
#endif

namespace shardtune {
using tvm::ffi::Optional;
using tvm::runtime::DiscoWorker;
using tvm::runtime::DRef;
using tvm::runtime::ReduceKind;
using tvm::runtime::Session;
using tvm::runtime::Tensor;

static void GpuCheck(bool ok, const char* what) {
  if (!ok) TVM_FFI_THROW(RuntimeError) << CCL_NAME ": " << what << " failed";
}

#define CCL(call)                                                                       \
  do {                                                                                  \
    ncclResult_t r = (call);                                                            \
    if (r != ncclSuccess) TVM_FFI_THROW(RuntimeError) << CCL_NAME ": " << ncclGetErrorString(r); \
  } while (0)

// One per worker thread: a disco worker is one thread (worker 0 in the controller process).
struct Context {
  DiscoWorker* worker = nullptr;
  int device_id = 0;
  stream_t own_stream = nullptr;
  ncclComm_t global = nullptr, group = nullptr;

  static Context* Get() {
    thread_local Context ctx;
    return &ctx;
  }
  // TVM's current stream for this device; ours when TVM runs on the legacy default stream
  // (a blocking stream still orders with it).
  stream_t Stream() const {
    void* s = TVMFFIEnvGetStream(DEVICE_TYPE, device_id);
    return s ? static_cast<stream_t>(s) : own_stream;
  }
  ncclComm_t Comm(bool in_group) const {
    if (!worker) TVM_FFI_THROW(RuntimeError) << CCL_NAME " is not initialised on this worker";
    return in_group ? group : global;
  }
  int GroupSize() const { return worker->num_workers / worker->num_groups; }
  bool IsRoot(bool in_group) const {
    return in_group ? worker->worker_id % GroupSize() == 0 : worker->worker_id == 0;
  }
};

static ncclDataType_t DType(DLDataType t) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 16) return ncclFloat16;
    if (t.code == kDLFloat && t.bits == 32) return ncclFloat32;
    if (t.code == kDLFloat && t.bits == 64) return ncclFloat64;
    if (t.code == kDLBfloat && t.bits == 16) return ncclBfloat16;
    if (t.code == kDLInt && t.bits == 8) return ncclInt8;
    if (t.code == kDLInt && t.bits == 32) return ncclInt32;
    if (t.code == kDLInt && t.bits == 64) return ncclInt64;
    if (t.code == kDLUInt && t.bits == 8) return ncclUint8;
    if (t.code == kDLUInt && t.bits == 32) return ncclUint32;
    if (t.code == kDLUInt && t.bits == 64) return ncclUint64;
  }
  TVM_FFI_THROW(TypeError) << CCL_NAME ": unsupported dtype code " << int(t.code) << " bits " << int(t.bits);
}

static ncclRedOp_t RedOp(int kind) {
  switch (static_cast<ReduceKind>(kind)) {
    case ReduceKind::kSum: return ncclSum;
    case ReduceKind::kProd: return ncclProd;
    case ReduceKind::kMin: return ncclMin;
    case ReduceKind::kMax: return ncclMax;
    case ReduceKind::kAvg: return ncclAvg;
  }
  TVM_FFI_THROW(ValueError) << CCL_NAME ": unknown reduce kind " << kind;
}

static int64_t Numel(const Tensor& t) { return t.Shape().Product(); }

// Controller side: one unique id, handed to every worker.
void InitCCL(Session sess, tvm::ffi::Shape device_ids) {
  ncclUniqueId id;
  CCL(ncclGetUniqueId(&id));
  DRef f = sess->GetGlobalFunc("runtime.disco." CCL_NAME ".init_ccl_per_worker");
  sess->CallPacked(f, device_ids, tvm::ffi::Bytes(id.internal, NCCL_UNIQUE_ID_BYTES));
}

void InitCCLPerWorker(tvm::ffi::Shape device_ids, tvm::ffi::Bytes unique_id) {
  Context* ctx = Context::Get();
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  if (!worker) TVM_FFI_THROW(RuntimeError) << CCL_NAME ": init_ccl_per_worker runs on disco workers only";
  if (ctx->worker) TVM_FFI_THROW(RuntimeError) << CCL_NAME ": already initialised on this worker";
  if (unique_id.size() != NCCL_UNIQUE_ID_BYTES) TVM_FFI_THROW(ValueError) << CCL_NAME ": bad unique id";
  ctx->device_id = static_cast<int>(device_ids[worker->local_worker_id]);
  GPU(gpuSetDevice(ctx->device_id));
  GPU(gpuStreamCreate(&ctx->own_stream));
  worker->default_device = DLDevice{DEVICE_TYPE, ctx->device_id};
  worker->ccl = CCL_NAME;   // the builtins runtime.disco.allreduce etc. dispatch on this name
  ctx->worker = worker;
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  CCL(ncclCommInitRank(&ctx->global, worker->num_workers, id, worker->worker_id));
  if (worker->num_groups == 1) {
    ctx->group = ctx->global;
  } else {
    int size = ctx->GroupSize();
    CCL(ncclCommSplit(ctx->global, worker->worker_id / size, worker->worker_id % size, &ctx->group, nullptr));
  }
}

void AllReduce(Tensor send, int kind, bool in_group, Tensor recv) {
  Context* ctx = Context::Get();
  CCL(ncclAllReduce(send->data, recv->data, Numel(send), DType(send->dtype), RedOp(kind),
                    ctx->Comm(in_group), ctx->Stream()));
}

void AllGather(Tensor send, bool in_group, Tensor recv) {
  Context* ctx = Context::Get();
  CCL(ncclAllGather(send->data, recv->data, Numel(send), DType(send->dtype), ctx->Comm(in_group),
                    ctx->Stream()));
}

void BroadcastFromWorker0(Optional<Tensor> send, bool in_group, Tensor recv) {
  Context* ctx = Context::Get();
  const void* src = ctx->IsRoot(in_group) ? send.value()->data : nullptr;
  CCL(ncclBroadcast(src, recv->data, Numel(recv), DType(recv->dtype), 0, ctx->Comm(in_group), ctx->Stream()));
}

// Root sends equal slices of `send` to every rank (itself included); everyone receives one.
void ScatterFromWorker0(Optional<Tensor> send, bool in_group, Tensor recv) {
  Context* ctx = Context::Get();
  ncclComm_t comm = ctx->Comm(in_group);
  int ranks = in_group ? ctx->GroupSize() : ctx->worker->num_workers;
  CCL(ncclGroupStart());
  if (ctx->IsRoot(in_group)) {
    const Tensor& all = send.value();
    if (Numel(all) != Numel(recv) * ranks) TVM_FFI_THROW(ValueError) << "scatter: sizes do not divide";
    size_t bytes = Numel(recv) * ((all->dtype.bits * all->dtype.lanes + 7) / 8);
    for (int r = 0; r < ranks; ++r)
      CCL(ncclSend(static_cast<char*>(all->data) + r * bytes, Numel(recv), DType(all->dtype), r, comm, ctx->Stream()));
  }
  CCL(ncclRecv(recv->data, Numel(recv), DType(recv->dtype), 0, comm, ctx->Stream()));
  CCL(ncclGroupEnd());
}

void GatherToWorker0(Tensor send, bool in_group, Optional<Tensor> recv) {
  Context* ctx = Context::Get();
  ncclComm_t comm = ctx->Comm(in_group);
  int ranks = in_group ? ctx->GroupSize() : ctx->worker->num_workers;
  CCL(ncclGroupStart());
  if (ctx->IsRoot(in_group)) {
    const Tensor& all = recv.value();
    if (Numel(all) != Numel(send) * ranks) TVM_FFI_THROW(ValueError) << "gather: sizes do not divide";
    size_t bytes = Numel(send) * ((all->dtype.bits * all->dtype.lanes + 7) / 8);
    for (int r = 0; r < ranks; ++r)
      CCL(ncclRecv(static_cast<char*>(all->data) + r * bytes, Numel(send), DType(all->dtype), r, comm, ctx->Stream()));
  }
  CCL(ncclSend(send->data, Numel(send), DType(send->dtype), 0, comm, ctx->Stream()));
  CCL(ncclGroupEnd());
}

void SendTo(Tensor buffer, int peer) {
  Context* ctx = Context::Get();
  CCL(ncclSend(buffer->data, Numel(buffer), DType(buffer->dtype), peer, ctx->Comm(false), ctx->Stream()));
}

void RecvFrom(Tensor buffer, int peer) {
  Context* ctx = Context::Get();
  CCL(ncclRecv(buffer->data, Numel(buffer), DType(buffer->dtype), peer, ctx->Comm(false), ctx->Stream()));
}

void SyncWorker() {
  Context* ctx = Context::Get();
  GPU(gpuStreamSynchronize(ctx->Stream()));
}

// --- peer memory for the fused all-reduce (kernels/allreduce_add_norm.py) --------------------
// Each worker allocates one buffer, exports its IPC handle, and opens its peers' handles: the
// kernel then reads the peers' partial sums and writes their flag words directly.
struct OwnedAlloc {   // memory this process allocated
  void* ptr;
  void AllocData(DLTensor* t) { t->data = ptr; }
  void FreeData(DLTensor* t) { gpuFree(t->data); }
};
struct OpenedAlloc {  // a peer's memory, mapped here
  void* ptr;
  void AllocData(DLTensor* t) { t->data = ptr; }
  void FreeData(DLTensor* t) { gpuIpcCloseMemHandle(t->data); }
};

static DLDevice CurrentDevice() {
  int id = 0;
  GPU(gpuGetDevice(&id));
  return DLDevice{DEVICE_TYPE, id};
}

Tensor IpcAlloc(int64_t nbytes) {
  void* ptr = nullptr;
  GPU(gpuMalloc(&ptr, nbytes));
  GPU(gpuMemset(ptr, 0, nbytes));   // round counters and flags start at 0
  int64_t shape[1] = {nbytes};
  return Tensor::FromNDAlloc(OwnedAlloc{ptr}, tvm::ffi::ShapeView(shape, 1), DLDataType{kDLUInt, 8, 1},
                             CurrentDevice());
}

tvm::ffi::Bytes IpcHandle(Tensor t) {
  gpuIpcMemHandle_t handle;
  GPU(gpuIpcGetMemHandle(&handle, t->data));
  return tvm::ffi::Bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

Tensor IpcOpen(tvm::ffi::Bytes handle_bytes, int64_t nbytes) {
  gpuIpcMemHandle_t handle;
  if (handle_bytes.size() != sizeof(handle)) TVM_FFI_THROW(ValueError) << "ipc: bad handle";
  std::memcpy(&handle, handle_bytes.data(), sizeof(handle));
  void* ptr = nullptr;
  GPU(gpuIpcOpenMemHandle(&ptr, handle, gpuIpcMemLazyEnablePeerAccess));
  int64_t shape[1] = {nbytes};
  return Tensor::FromNDAlloc(OpenedAlloc{ptr}, tvm::ffi::ShapeView(shape, 1), DLDataType{kDLUInt, 8, 1},
                             CurrentDevice());
}

bool CanAccessPeer(int device, int peer) {
  int ok = 0;
  GPU(gpuDeviceCanAccessPeer(&ok, device, peer));
  return ok != 0;
}

// --- timing short kernels without launch gaps -------------------------------------------------
// Seconds of each of `reps` replays of a GPU graph captured from `body()`: whatever TVM kernels
// and collectives body launches on the current device, recorded once on a capture stream set as
// TVM's current stream, then replayed back to back, an event between replays. Kernels of a few
// microseconds, timed one Python call at a time, would measure the launch path instead.
tvm::ffi::Array<double> GraphReplaySeconds(tvm::ffi::Function body, int64_t reps) {
  DLDevice dev = CurrentDevice();
  stream_t stream;
  GPU(gpuStreamCreateWithFlags(&stream, gpuStreamNonBlocking));
  TVMFFIStreamHandle previous = nullptr;
  TVMFFIEnvSetStream(DEVICE_TYPE, dev.device_id, stream, &previous);
  GPU(gpuStreamBeginCapture(stream, gpuStreamCaptureModeThreadLocal));
  graph_t graph = nullptr;
  try {
    body();
  } catch (...) {
    gpuStreamEndCapture(stream, &graph);
    TVMFFIEnvSetStream(DEVICE_TYPE, dev.device_id, previous, nullptr);
    throw;
  }
  GPU(gpuStreamEndCapture(stream, &graph));
  TVMFFIEnvSetStream(DEVICE_TYPE, dev.device_id, previous, nullptr);
  graph_exec_t exec;
  GPU(gpuGraphInstantiate(&exec, graph));
  std::vector<event_t> events(reps + 1);
  for (auto& e : events) GPU(gpuEventCreate(&e));
  GPU(gpuGraphLaunch(exec, stream));   // warm-up
  GPU(gpuEventRecord(events[0], stream));
  for (int64_t i = 0; i < reps; ++i) {
    GPU(gpuGraphLaunch(exec, stream));
    GPU(gpuEventRecord(events[i + 1], stream));
  }
  GPU(gpuEventSynchronize(events[reps]));
  tvm::ffi::Array<double> seconds;
  for (int64_t i = 0; i < reps; ++i) {
    float ms = 0;
    GPU(gpuEventElapsedTime(&ms, events[i], events[i + 1]));
    seconds.push_back(ms / 1e3);
  }
  for (auto& e : events) gpuEventDestroy(e);
  gpuGraphExecDestroy(exec);
  gpuGraphDestroy(graph);
  gpuStreamDestroy(stream);
  return seconds;
}

double GraphSeconds(tvm::ffi::Function body, int64_t reps) {
  double total = 0;
  for (double s : GraphReplaySeconds(body, reps)) total += s;
  return total / static_cast<double>(reps);
}

#define FN(name) "runtime.disco." CCL_NAME "." name
TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("runtime.disco.compiled_ccl", []() -> tvm::ffi::String { return CCL_NAME; })
      .def(FN("init_ccl"), InitCCL)
      .def(FN("init_ccl_per_worker"), InitCCLPerWorker)
      .def(FN("allreduce"), AllReduce)
      .def(FN("allgather"), AllGather)
      .def(FN("broadcast_from_worker0"), BroadcastFromWorker0)
      .def(FN("scatter_from_worker0"), ScatterFromWorker0)
      .def(FN("gather_to_worker0"), GatherToWorker0)
      .def(FN("recv_from_worker0"), [](Tensor buffer) { RecvFrom(buffer, 0); })
      .def(FN("send_to_next_group"),
           [](Tensor b) { SendTo(b, Context::Get()->worker->worker_id + Context::Get()->GroupSize()); })
      .def(FN("recv_from_prev_group"),
           [](Tensor b) { RecvFrom(b, Context::Get()->worker->worker_id - Context::Get()->GroupSize()); })
      .def(FN("send_to_worker"), SendTo)
      .def(FN("recv_from_worker"), RecvFrom)
      .def(FN("sync_worker"), SyncWorker)
      .def("shardtune.ipc.alloc", IpcAlloc)
      .def("shardtune.ipc.handle", IpcHandle)
      .def("shardtune.ipc.open", IpcOpen)
      .def("shardtune.ipc.can_access_peer", CanAccessPeer)
      .def("shardtune.graph.seconds", GraphSeconds)
      .def("shardtune.graph.replay_seconds", GraphReplaySeconds);
}

}  // namespace shardtune
