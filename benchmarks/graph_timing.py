"""Time a piece of GPU work the way the tuner times kernels: captured `rounds` times over rotating
input copies (cold L2) into one CUDA graph, the graph replayed, the median per call (torch)."""
import numpy as np


def graph_us(body, copies: int, stream, rounds: int = 2, reps: int = 15) -> float:
    """Median microseconds of one `body(i)` call, i cycling over `copies` input sets."""
    import torch

    with torch.cuda.stream(stream):
        for i in range(copies):   # first-launch costs outside the capture
            body(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for i in range(copies * rounds):
            body(i % copies)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (copies * rounds))
    return float(np.median(times))
