"""The fused all-reduce + residual + RMSNorm on the GPU.

1. One GPU standing in for all (its flags say the peers are ready, their partials lie in its
   buffers): the arithmetic and the slot logic, every valid knob setting.
2. N ranks on one GPU: N copies of the kernel at once, one stream each, every rank with its own
   peer-visible buffer and the others' as its peers', exactly as N GPUs see each other. This runs
   the real protocol (stores, flags or lines, rounds, both slots) without N GPUs; the cross-GPU
   version is tests/gpu/test_sharded_gpu.py, the CPU one (no GPU at all) tests/test_sharded.py."""
import itertools
import time

import numpy as np
import pytest
import tvm

from shardtune.compiler.pdl import pdl_pipeline
from shardtune.kernels import get_template
from shardtune.kernels.allreduce_add_norm import comm_bytes, comm_regions
from shardtune.tuner.targets import get_arch, local_gpu_arch

TPL = get_template("allreduce_add_norm")


def _target():
    return tvm.target.Target(get_arch(local_gpu_arch()).target)


def _valid(wl, target):
    space = TPL.gpu_knobs
    grid = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    return [k for k in grid if TPL.check(wl, k, target) is None]


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_fused_allreduce_norm_matches_reference_on_gpu(shards):
    target = _target()
    wl = {"H": 8192, "shards": shards, "batch": 1}
    inputs = TPL.inputs(wl, np.random.default_rng(0))
    valid = _valid(wl, target)
    # Every one-block setting; of the clusters, every (protocol, blocks) with the widest loads
    # that fit (the index math is the same for the others).
    picked = [k for k in valid if k["blocks"] == 1]
    for protocol, blocks in itertools.product(TPL.gpu_knobs["protocol"], TPL.gpu_knobs["blocks"][1:]):
        some = [k for k in valid if (k["protocol"], k["blocks"]) == (protocol, blocks)]
        picked += sorted(some, key=lambda k: (-k["vec"], -k["threads"]))[:1]
    assert any(k["blocks"] > 1 for k in picked) or not target.attrs["arch"].startswith("sm_9")
    for knobs in picked:
        dev = tvm.cuda(0)
        args = [tvm.runtime.tensor(a, dev) for a in inputs]
        run = tvm.compile(TPL.schedule(wl, knobs, target), target=target)["main"]
        for _ in range(3):   # rounds 1-3: both slots, as timing runs it
            run(*args)
        y_ref, h_ref = TPL.reference(inputs)
        np.testing.assert_array_equal(args[-1].numpy(), h_ref, err_msg=str(knobs))
        np.testing.assert_allclose(args[-2].numpy().astype(np.float32), y_ref.astype(np.float32), atol=2e-3,
                                   rtol=2e-3, err_msg=str(knobs))


@pytest.mark.parametrize("shards,knobs,pdl", [
    (2, {"threads": 1024, "vec": 2, "protocol": "ll", "blocks": 1}, False),
    (2, {"threads": 256, "vec": 8, "protocol": "flag", "blocks": 1}, False),
    (2, {"threads": 256, "vec": 4, "protocol": "ll", "blocks": 8}, False),
    (4, {"threads": 256, "vec": 2, "protocol": "ll", "blocks": 16}, False),
    (4, {"threads": 128, "vec": 8, "protocol": "flag", "blocks": 8}, False),
    (4, {"threads": 512, "vec": 8, "protocol": "flag", "blocks": 1}, False),
    (8, {"threads": 128, "vec": 4, "protocol": "ll", "blocks": 4}, False),
    # as a model build compiles it on sm_90: launched with PDL (compiler/pdl.py) as well as a cluster
    (4, {"threads": 256, "vec": 2, "protocol": "ll", "blocks": 8}, True),
    (2, {"threads": 128, "vec": 8, "protocol": "flag", "blocks": 4}, True),
])
def test_fused_allreduce_ranks_on_one_gpu(shards, knobs, pdl, rank_reference):
    torch = pytest.importorskip("torch")
    import tvm_ffi

    target, H, rounds = _target(), 8192, 5
    wl = {"H": H, "shards": shards, "batch": 1}
    if TPL.check(wl, knobs, target):
        pytest.skip(TPL.check(wl, knobs, target))
    if pdl and not target.attrs["arch"].startswith("sm_9"):
        pytest.skip("PDL needs sm_90")
    pipeline = pdl_pipeline() if pdl else "default"
    run = tvm.compile(TPL.schedule(wl, knobs, target), target=target, tir_pipeline=pipeline)["main"]
    dev, rng = tvm.cuda(0), np.random.default_rng(1)
    own = [tvm.runtime.tensor(np.zeros(comm_bytes(H, shards), np.uint8), dev) for _ in range(shards)]
    regions = [[own[(r + p) % shards]._create_view(shape, dtype, at) for at, shape, dtype in comm_regions(H, shards)
                for p in range(shards)] for r in range(shards)]   # per rank: slots, flags, lines; rank-relative
    residual = rng.standard_normal((1, H)).astype(np.float16)
    weight = (1 + 0.1 * rng.standard_normal(H)).astype(np.float16)
    res_d, w_d = tvm.runtime.tensor(residual, dev), tvm.runtime.tensor(weight, dev)
    outs = [[tvm.runtime.empty((1, H), "float16", dev) for _ in range(2)] for _ in range(shards)]   # y, h
    streams = [torch.cuda.Stream() for _ in range(shards)]
    for rnd in range(1, rounds + 1):   # new partials every round: a stale slot or line would show
        partials = [rng.standard_normal(H).astype(np.float16) for _ in range(shards)]
        part_d = [tvm.runtime.tensor(p[None], dev) for p in partials]
        dev.sync()
        for r in range(shards):
            with tvm_ffi.use_raw_stream(dev, streams[r].cuda_stream):
                run(part_d[r], res_d, w_d, *regions[r], *outs[r])
        done = [torch.cuda.Event() for _ in range(shards)]
        for e, s in zip(done, streams):
            e.record(s)
        deadline = time.time() + 60
        while not all(e.query() for e in done):   # a broken barrier spins forever: fail, do not hang
            assert time.time() < deadline, f"round {rnd}: the ranks did not finish (barrier) with {knobs}"
            time.sleep(0.01)
        for r in range(shards):
            y_ref, h_ref = rank_reference(partials, residual, weight, r)
            np.testing.assert_array_equal(outs[r][1].numpy()[0], h_ref, err_msg=f"rank {r} round {rnd} {knobs}")
            np.testing.assert_allclose(outs[r][0].numpy()[0].astype(np.float32), y_ref.astype(np.float32),
                                       atol=2e-3, rtol=2e-3, err_msg=f"rank {r} round {rnd} {knobs}")
