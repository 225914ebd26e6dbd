"""Timing, memory and peak-throughput helpers shared by the benchmark scripts.

Timing is the median of repeated runs after warm-up; on CUDA each run is bracketed by CUDA events
(device time, no host overhead), on CPU by `time.perf_counter`. Peak memory is
`torch.cuda.max_memory_allocated` on CUDA and the process's peak resident set size (VmHWM, reset
through /proc/self/clear_refs) on CPU. The "peak" a result is compared with is measured in the same
run: a large GEMM per precision (compute) and a large device copy (bandwidth).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Run as `python benchmarks/x.py` from the repository root: make `medgen` importable without install.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@dataclass
class Timing:
    """Median and spread of repeated runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    cpu_ms: float  # median process CPU time per run (all threads): robust to other processes' load


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_clock_ok(device: torch.device) -> bool:
    """Whether process CPU time can stand in for elapsed time: a CPU run with one torch thread, where it
    is the time the work itself took, whatever the load from other processes."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, iters: int = 5,
            max_seconds: float | None = None, cpu_clock: bool = False) -> Timing:
    """Median wall (CPU) or device-event (CUDA) time of `fn()` after `warmup` untimed calls.

    Args:
        fn: the work to time; called warmup + iters times.
        device: where the work runs (chooses the clock).
        warmup: untimed calls first (allocator, cudnn.benchmark autotuning, compilation).
        iters: timed calls (the median is reported).
        max_seconds: stop timing early once this much time was spent (at least one timed run).
        cpu_clock: report process CPU time instead of elapsed time (CPU only; see cpu_clock_ok).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    cpu_times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.process_time() - c0) * 1e3)
        if max_seconds is not None and time.perf_counter() - start_all > max_seconds:
            break
    cpu_ms = statistics.median(cpu_times) if cpu_times else float("nan")
    if cpu_clock and cpu_times:
        times = cpu_times
    return Timing(statistics.median(times), min(times), max(times), len(times), cpu_ms)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 resets the peak RSS (VmHWM) of this process to its current RSS.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_memory_mb(device: torch.device) -> float | None:
    """Allocated tensor memory (CUDA) or current process RSS (CPU) in MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated tensor memory (CUDA) or peak process RSS (CPU) in MiB since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def backend_flags(device: torch.device, *, tf32: bool = False, cudnn_benchmark: bool = False) -> Iterator[None]:
    """Set TF32 and cudnn.benchmark for the duration of a block (restored afterwards)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = old


@dataclass
class Peak:
    """Throughput ceilings measured in this run."""

    gemm_tflops: dict[str, float] = field(default_factory=dict)  # precision -> TFLOP/s
    copy_gbps: float = 0.0  # device-to-device copy, GB/s counting read + write


def measure_peak(device: torch.device, precisions: list[str], *, quick: bool = False) -> Peak:
    """Measure a large square GEMM per precision and a large copy, as the run's reference peak.

    The fastest of the timed runs is used (a ceiling; the median would drop under load from other processes).

    Args:
        device: where to measure.
        precisions: any of fp32, tf32, bf16 (tf32 only differs from fp32 on CUDA).
        quick: smaller sizes (CPU smoke runs).
    """
    n = 8192 if device.type == "cuda" else (1024 if quick else 2048)
    peak = Peak()
    for name in precisions:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        if name == "bf16" and device.type == "cpu" and not cpu_bf16_supported():
            continue
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        with backend_flags(device, tf32=name == "tf32"):
            t = time_fn(lambda a=a, b=b: torch.mm(a, b), device, warmup=2, iters=5 if quick else 10,
                        cpu_clock=cpu_clock_ok(device))
        peak.gemm_tflops[name] = 2 * n**3 / (t.min_ms * 1e-3) / 1e12  # a ceiling: the best run
        del a, b
    numel = (256 if device.type == "cuda" else 32) * 2**20  # float32 elements: 1 GiB / 128 MiB
    buffers = [torch.empty(numel, device=device, dtype=torch.float32) for _ in range(2)]
    t = time_fn(lambda: buffers[1].copy_(buffers[0]), device, warmup=2, iters=10, cpu_clock=cpu_clock_ok(device))
    peak.copy_gbps = 2 * numel * 4 / (t.min_ms * 1e-3) / 1e9
    buffers.clear()
    return peak


def cpu_bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (avx512_bf16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_info(device: torch.device) -> dict[str, Any]:
    """Describe where the numbers came from."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_bf16": cpu_bf16_supported(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and tensors to plain JSON values."""
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write results atomically (temp file + rename)."""
    from medgen.outputs import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(to_jsonable(payload), indent=2) + "\n")


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: '-' for missing values."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """Print a rich table to stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def resolve_bench_device(name: str) -> torch.device:
    """cpu | cuda, with a one-line exit if CUDA is asked for but absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return torch.device(name)
