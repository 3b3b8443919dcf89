"""One tuning result: what was tuned, where, how fast, how right, and by what."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


def canonical(obj) -> str:
    """The one JSON spelling of a dict, so equal workloads/knobs compare equal as text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass
class Record:
    # what
    template: str                 # kernel template name, e.g. "q4f16_1_gemv"
    template_hash: str            # Template.source_hash at tuning time
    workload: dict                # shapes, dtypes, quantization: {"N":..,"K":..,"batch":1,"quant":"q4f16_1"}
    # where
    arch: str                     # "sm_90", "sm_89", "gfx1100", "x86_64", ...
    shards: int                   # tensor-parallel shard count the workload belongs to
    device: str                   # "NVIDIA H100 80GB HBM3", or the CPU model
    compute_units: int            # SMs / CUs / CPU cores
    # result
    knobs: dict
    latency_us: float             # median
    latency_spread_us: float      # interquartile range of the runs
    runs: int
    bandwidth_gbps: float         # bytes_moved / latency
    max_rel_error: float          # ||out - ref|| / ||ref|| against the NumPy reference
    status: str = "complete"      # "complete" | "partial" (search stopped early)
    trials: int = 0
    # provenance
    tvm_version: str = ""
    tvm_ffi_version: str = ""
    shardtune_version: str = ""
    runtime_version: str = ""     # driver / CUDA / ROCm runtime version
    host: str = ""
    created_at: str = ""          # ISO 8601, UTC
    command: str = ""             # the command line that produced it
    source_sha: str = ""          # hash of the generated code (tuner.measure.source_sha); "" if not recorded
    extra: dict = field(default_factory=dict)  # anything else worth keeping (e.g. baseline µs)

    @property
    def workload_key(self) -> str:
        return canonical(self.workload)

    @property
    def key(self) -> tuple:
        """Records with the same key answer the same question; the fastest wins."""
        return (self.template, self.workload_key, self.arch, self.shards)

    def to_dict(self) -> dict:
        """The record as plain JSON. `source_sha` only when known: records made before the
        field existed keep their JSON lines, export bytes and ids."""
        d = dataclasses.asdict(self)
        if not d["source_sha"]:
            del d["source_sha"]
        return d

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
