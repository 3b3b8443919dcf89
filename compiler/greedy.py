"""Greedy decoding on the device: the next token is argmax(logits), written into the step's own
token buffer, and the position advances by one, so decode steps follow each other with nothing
but a 4-byte read of the token per step on the host (no logits copy, no host argmax).

Ties go to the lowest index, as np.argmax. Not a template: one block, a few microseconds; the
GPU version is written already scheduled (a strided scan per thread, loading in chunks, then on
NVIDIA warp shuffles and one shared-memory round; elsewhere two shared-memory rounds, as TVM's ROCm
backend is LLVM and has no CUDA shuffle to call), the CPU version is a plain loop."""
from __future__ import annotations

from contextlib import ExitStack

from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

THREADS = 1024
LANES = 32   # the last round's width
CHUNK = 16   # logits a thread loads before comparing them


def greedy_next(V: int, dtype: str, vendor: str):
    """PrimFunc (logits [1, V] dtype, token [1] int32, pos [1] int32): token = argmax, pos += 1.
    Compared in fp32: the same order as the fp16 values, which fp32 holds exactly. `vendor`:
    nvidia, amd or cpu (tuner/targets.py)."""
    gpu = vendor != "cpu"
    threads = THREADS if gpu else 1
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("main")
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            logits = T.arg("logits", T.buffer((1, V), dtype))
            token = T.arg("token", T.buffer((1,), "int32"))
            pos = T.arg("pos", T.buffer((1,), "int32"))
            launch = ExitStack()
            if gpu:
                launch.enter_context(T.launch_thread(T.env_thread("blockIdx.x"), 1))
                tx = T.env_thread("threadIdx.x")
                launch.enter_context(T.launch_thread(tx, threads))
            else:
                tx = 0
            best_v = T.alloc_buffer((1,), "float32", scope="local")
            best_i = T.alloc_buffer((1,), "int32", scope="local")
            cand_v = T.alloc_buffer((1,), "float32", scope="local")   # loaded before it is compared:
            cand_i = T.alloc_buffer((1,), "int32", scope="local")     # no load or shuffle in a branch

            def candidate(v, i):
                T.buffer_store(cand_v, v, [0])
                T.buffer_store(cand_i, i, [0])
                take(cand_v[0], cand_i[0])

            def take(v, i):   # (v, i) if it beats the best so far: larger, or as large at a lower index
                with T.If(T.Or(v > best_v[0], T.And(v == best_v[0], i < best_i[0]))):
                    with T.Then():
                        T.buffer_store(best_v, v, [0])
                        T.buffer_store(best_i, i, [0])

            def reset():   # nothing seen yet
                T.buffer_store(best_v, T.float32(float("-inf")), [0])
                T.buffer_store(best_i, T.int32(V), [0])

            reset()
            # Coalesced: thread t reads t, t + 1024, ... CHUNK loads at a time, all issued before the
            # first compare (a load per compare left one load in flight per thread: 14 us for
            # 32000 logits on an H100). Past V, -inf at index >= V never beats the reset best.
            vals = T.alloc_buffer((CHUNK,), "float32", scope="local")
            per_thread = (V + threads - 1) // threads
            with T.serial(0, (per_thread + CHUNK - 1) // CHUNK) as c:
                with T.unroll(0, CHUNK) as e:
                    k = (c * CHUNK + e) * threads + tx
                    T.buffer_store(vals, T.if_then_else(k < V, T.Cast("float32", logits[0, T.min(k, V - 1)]),
                                                        T.float32(float("-inf"))), [e])
                with T.unroll(0, CHUNK) as e:
                    take(vals[e], (c * CHUNK + e) * threads + tx)
            if gpu:
                last_v = T.alloc_buffer((LANES,), "float32", scope="shared")
                last_i = T.alloc_buffer((LANES,), "int32", scope="shared")
                if vendor == "nvidia":
                    full = T.uint32(0xFFFFFFFF)
                    for offset in (16, 8, 4, 2, 1):   # the warp's best, into its lane 0
                        candidate(T.call_extern("float32", "__shfl_down_sync", full, best_v[0], offset),
                                  T.call_extern("int32", "__shfl_down_sync", full, best_i[0], offset))
                    with T.If(tx % 32 == 0):
                        with T.Then():
                            T.buffer_store(last_v, best_v[0], [tx // 32])
                            T.buffer_store(last_i, best_i[0], [tx // 32])
                else:   # every thread's best into shared memory; thread t < LANES folds slice t
                    all_v = T.alloc_buffer((threads,), "float32", scope="shared")
                    all_i = T.alloc_buffer((threads,), "int32", scope="shared")
                    T.buffer_store(all_v, best_v[0], [tx])
                    T.buffer_store(all_i, best_i[0], [tx])
                    T.evaluate(T.tvm_storage_sync("shared"))
                    reset()   # every thread folds slice tx % LANES (the loads stay out of branches)
                    per = threads // LANES
                    with T.serial(0, per) as w:
                        candidate(all_v[tx % LANES * per + w], all_i[tx % LANES * per + w])
                    with T.If(tx < LANES):
                        with T.Then():
                            T.buffer_store(last_v, best_v[0], [tx])
                            T.buffer_store(last_i, best_i[0], [tx])
                T.evaluate(T.tvm_storage_sync("shared"))
                with T.serial(0, LANES) as w:   # every thread folds in the last round; thread 0 writes
                    candidate(last_v[w], last_i[w])
                with T.If(tx == 0):
                    with T.Then():
                        T.buffer_store(token, best_i[0], [0])
                        T.buffer_store(pos, pos[0] + 1, [0])
            else:
                T.buffer_store(token, best_i[0], [0])
                T.buffer_store(pos, pos[0] + 1, [0])
            launch.close()
    return ib.get().with_attr("global_symbol", "greedy_next")
