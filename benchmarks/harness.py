"""One benchmark harness: warm-up, median of repeated runs, bytes declared term by term, and
achieved GB/s against a copy and a read-only pass measured in the same run (the machine's
practical peaks: a kernel that mostly reads, like a decode GEMV, is bounded by the read one).
Implementations compared with each other (and with the read pass) run interleaved (time_fns).

CPU timing uses perf_counter (and, with cold_cache, evicts the caches before each run); CUDA
timing uses events and flushes L2 between runs.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Read before each cold CPU run: far larger than any last-level cache it has to evict.
CPU_FLUSH_BYTES = 256 * 2**20


def time_fns(fns: Sequence[Callable[[], object]], device: torch.device | str = "cpu",
             warmup: int = 3, min_runs: int = 5, min_time_s: float = 0.3, max_runs: int = 1000,
             cold_cache: bool = False) -> List[float]:
    """Median seconds of one call of each fn, the fns run in turn (one run of each per round) so
    that they see the same machine: on a shared host, memory bandwidth and free cores change
    from second to second, and only measurements interleaved like this compare.

    On CUDA, L2 is always flushed between runs; on the CPU only with cold_cache, which reads
    CPU_FLUSH_BYTES (untimed) before each run, so that data the kernel reads comes from memory,
    as a model's weights do when every layer has its own."""
    device = torch.device(device)
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: List[List[float]] = [[] for _ in fns]
    flush = cpu_flush = None
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    elif cold_cache:
        cpu_flush = torch.ones(CPU_FLUSH_BYTES // 4, dtype=torch.float32)
    t_start = time.perf_counter()
    rounds = 0
    while rounds < max_runs and (rounds < min_runs or time.perf_counter() - t_start < min_time_s):
        for fn, ts in zip(fns, times):
            if cpu_flush is not None:
                cpu_flush.sum()     # reads only: no dirty lines left to write back during the run
            if device.type == "cuda":
                flush.zero_()   # evict L2 so every run reads from memory
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        rounds += 1
    return [statistics.median(ts) for ts in times]


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", **kwargs) -> float:
    """Median seconds of one call of fn (time_fns with one fn; same keyword arguments)."""
    return time_fns([fn], device, **kwargs)[0]


def copy_peak_gbs(device: torch.device | str = "cpu", nbytes: int = 256 * 2**20) -> float:
    """Achieved bandwidth of a large tensor copy (read + write bytes), GB/s: the practical peak."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / t / 1e9


def read_pass(device: torch.device | str = "cpu", nbytes: int = 2**30) -> Callable[[], object]:
    """A read-only pass (a sum) over nbytes, far more than the caches hold: it reads at the
    roofline of kernels that read much and write little (decode GEMV). Time it with time_fns
    next to such a kernel to get the bandwidth it could have had at that moment."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=torch.device(device))
    return lambda: buf.sum()


def read_peak_gbs(device: torch.device | str = "cpu", nbytes: int = 2**30) -> float:
    """Achieved bandwidth of read_pass, GB/s."""
    return nbytes / time_fn(read_pass(device, nbytes), device) / 1e9


@dataclass
class Row:
    case: str
    impl: str
    shape: str
    dtype: str
    time_us: float
    bytes: int
    gbs: float
    pct_peak: float
    speedup_vs_reference: Optional[float] = None
    extra: Dict[str, float] = field(default_factory=dict)
    pct_read_peak: Optional[float] = None   # GB/s as a share of read_peak_gbs, where measured
    gflops: Optional[float] = None          # where the case declares its FLOPs


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_outputs(md: str, data: dict, md_path: Optional[Path], json_path: Optional[Path]) -> None:
    """A benchmark's markdown and JSON to the paths it was given (either may be None)."""
    if md_path:
        Path(md_path).write_text(md)
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=1))


def report(name: str, rows: List[Row], meta: dict, out_dir: Path = RESULTS) -> Path:
    """Print a markdown table and write JSON + markdown to benchmarks/results/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    read = any(r.pct_read_peak is not None for r in rows)
    flops = any(r.gflops is not None for r in rows)
    head = ("| case | impl | shape | dtype | time (us) | GB/s | % of copy peak |"
            + (" % of read peak |" if read else "") + (" GFLOP/s |" if flops else "")
            + " speed-up vs baseline |")
    lines = [head, "|" + "---|" * (8 + read + flops)]
    for r in rows:
        sp = f"{r.speedup_vs_reference:.2f}x" if r.speedup_vs_reference else ""
        rd = (f" {r.pct_read_peak:.0f}% |" if r.pct_read_peak is not None else " |") if read else ""
        fl = (f" {r.gflops:.1f} |" if r.gflops is not None else " |") if flops else ""
        lines.append(f"| {r.case} | {r.impl} | {r.shape} | {r.dtype} | {r.time_us:.1f} | "
                     f"{r.gbs:.1f} | {r.pct_peak:.0f}% |{rd}{fl} {sp} |")
    meta_line = ", ".join(f"{k}: {v}" for k, v in meta.items())
    md = f"# {name}\n\n{meta_line}\n\n" + "\n".join(lines) + "\n"
    print(md)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    (out_dir / f"{name}-latest.md").write_text(md)
    return path
