"""Full training-step benchmark: vae, gan, alpha-gan (and the cv-evaluate classifier) at 64^3.

Each model runs its real Step (`medgen.training.steps.create_step`) with a `StepContext`, exactly
what `medgen train` runs per iteration, under a ladder of settings that adds one optimisation at a
time over eager fp32 NCDHW:

    CUDA: fp32 -> +TF32 -> +bf16 autocast -> +channels_last_3d -> +cudnn.benchmark -> +space-to-depth stem
          -> +torch.compile (encoder/generator forward only) -> +CUDA graphs (compile mode reduce-overhead)
    CPU:  fp32 -> +channels_last_3d -> +bf16 autocast (if oneDNN has native bf16) -> +space-to-depth stem
          -> +torch.compile

plus the `medgen train` defaults of this device (`medgen.runtime`). The critics are never compiled:
the WGAN-GP gradient penalty needs their double backward. Every setting starts from the same
seeded model, batch and noise; its first-step losses are compared with the baseline's (the check
that the fast path is correct) before ms/step is timed (median after warm-up; CUDA events on GPU).

Usage:
    python benchmarks/train_step.py --device cuda --batch 16 --json train_step_cuda.json
    python benchmarks/train_step.py --device cpu --json train_step_cpu.json
    python benchmarks/train_step.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    backend_flags,
    cpu_bf16_supported,
    current_memory_mb,
    fmt,
    machine_info,
    peak_memory_mb,
    print_table,
    reset_peak_memory,
    resolve_bench_device,
    sync,
    time_fn,
    write_json,
)

MODELS = ("vae", "gan", "alpha-gan", "classifier")
# Loss agreement with the fp32 baseline on the first step: |a - b| <= atol + rtol * |b|.
TOLERANCE = {"fp32": (1e-3, 1e-3), "tf32": (2e-2, 2e-2), "bf16": (5e-2, 5e-2)}


@dataclass(frozen=True)
class Setting:
    """One rung of the ladder."""

    name: str
    precision: str = "fp32"  # fp32 | tf32 | bf16
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile_mode: str | None = None  # None: eager; "default"; "reduce-overhead" (CUDA graphs)
    threads: int | None = None  # CPU: torch threads for this setting (None: the process setting)
    space_to_depth: bool = False  # 1-channel k4 s2 input convs as space-to-depth + k2 conv
    guarded: bool = False  # as medgen train: convs on maps smaller than their kernel in fp32 under CPU bf16;
    # NCDHW for models with instance norm on CPU


def ladder(device: torch.device, *, with_compile: bool) -> list[Setting]:
    """The settings to run, baseline first, each adding one optimisation to the previous one."""
    from medgen.runtime import default_channels_last, default_precision, default_space_to_depth

    out = [Setting("eager fp32")]
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        half = "bf16" if bf16 else "tf32"
        out += [Setting("+ TF32", "tf32")]
        if bf16:
            out += [Setting("+ bf16 autocast", "bf16")]
        out += [Setting("+ channels_last_3d", half, True),
                Setting("+ cudnn.benchmark", half, True, True),
                Setting("+ space-to-depth stem", half, True, True, space_to_depth=True)]
        if with_compile:
            out += [Setting("+ torch.compile G/E", half, True, True, "default", space_to_depth=True),
                    Setting("+ CUDA graphs (reduce-overhead)", half, True, True, "reduce-overhead",
                            space_to_depth=True)]
    else:
        out += [Setting("+ channels_last_3d", "fp32", True)]
        if cpu_bf16_supported():
            out += [Setting("bf16 autocast (NCDHW)", "bf16", False),
                    Setting("+ bf16 autocast", "bf16", True)]
        best = out[-1]
        out += [Setting("+ space-to-depth stem", best.precision, best.channels_last, space_to_depth=True)]
        if with_compile:
            out += [Setting("+ torch.compile G/E", best.precision, best.channels_last, False, "default",
                            space_to_depth=True)]
    default = Setting("medgen default", default_precision(device), default_channels_last(device),
                      device.type == "cuda", space_to_depth=default_space_to_depth(device), guarded=True)
    out.append(default)
    if device.type == "cpu" and (os.cpu_count() or 1) > 1:
        # The same default at another thread count, interleaved with the rest (same load conditions).
        n = 1 if torch.get_num_threads() > 1 else os.cpu_count()
        out.append(Setting(f"medgen default, {n} thread{'s' if n > 1 else ''}", default.precision,
                           default.channels_last, False, None, n, default.space_to_depth, True))
    return out


def build_model(name: str, *, base_width: int, size: int, latent_dim: int | None) -> torch.nn.Module:
    """The registered model with the common keyword arguments it accepts."""
    from medgen.models.registry import create_model, get_model_class

    takes = inspect.signature(get_model_class(name).__init__).parameters
    kwargs: dict[str, Any] = dict(spatial_dims=3, in_channels=1, num_classes=3, image_size=size,
                                  base_width=base_width)
    if latent_dim is not None:
        kwargs["latent_dim"] = latent_dim
    return create_model(name, **{k: v for k, v in kwargs.items() if k in takes})


@dataclass
class Prepared:
    """A model, its Step state and a fixed batch, ready to run one training step per call."""

    setting: Setting
    run: Any  # () -> dict[str, Tensor]
    first_losses: dict[str, float]
    first_step_s: float
    compiled: list[str]
    step_mem_mb: float | None


def prepare(model_name: str, setting: Setting, device: torch.device, *, base_width: int, size: int, batch: int,
            latent_dim: int | None, warmup: int, seed: int) -> Prepared:
    """Build the seeded model/Step/batch under `setting`, run the first step (losses) and the warm-up."""
    from medgen.runtime import (
        compile_model,
        guard_bf16_convs,
        has_instance_norm,
        resolve_precision,
        to_channels_last,
        use_space_to_depth_stems,
    )
    from medgen.training.steps import Batch, StepContext, create_step

    torch.manual_seed(seed)
    model = build_model(model_name, base_width=base_width, size=size, latent_dim=latent_dim).to(device)
    if setting.guarded and device.type == "cpu":
        if setting.precision == "bf16":
            guard_bf16_convs(model)
        if has_instance_norm(model):
            setting = replace(setting, channels_last=False)
    if setting.channels_last:
        to_channels_last(model)
    if setting.space_to_depth:
        use_space_to_depth_stems(model)
    compiled: list[str] = []
    if setting.compile_mode is not None:
        compiled = compile_model(model, mode=None if setting.compile_mode == "default" else setting.compile_mode)
    step = create_step(model_name)
    opt = step.optimizers(model, 2e-4)
    precision = resolve_precision(setting.precision, device)
    gen = torch.Generator().manual_seed(seed + 1)
    images = (torch.rand(batch, 1, size, size, size, generator=gen) * 2 - 1).to(device)
    labels = (torch.arange(batch) % 3).to(device)
    if setting.channels_last:
        images = images.contiguous(memory_format=torch.channels_last_3d)
    ctx = StepContext(precision=precision, generator=torch.Generator(device=device).manual_seed(seed + 2),
                      iteration=0, total_iterations=1000, scalers={k: precision.make_scaler() for k in opt})
    data = Batch(images, labels)

    def one_step() -> dict[str, torch.Tensor]:
        # Flags are per setting; settings are interleaved, so set them on every call.
        threads = torch.get_num_threads()
        if setting.threads:
            torch.set_num_threads(setting.threads)
        try:
            with backend_flags(device, tf32=setting.precision in ("tf32", "bf16"),
                               cudnn_benchmark=setting.cudnn_benchmark):
                losses = step(model, data, opt, ctx)
        finally:
            torch.set_num_threads(threads)
        ctx.iteration += 1
        return losses

    before = current_memory_mb(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    first = {k: float(v) for k, v in one_step().items()}
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        one_step()
    sync(device)
    peak = peak_memory_mb(device)
    mem = peak - before if peak is not None and before is not None else None
    return Prepared(setting, one_step, first, first_s, compiled, mem)


def compare_losses(first: dict[str, float], base: dict[str, float], precision: str) -> tuple[bool, float]:
    """Whether every first-step loss is within the tolerance of `precision`; and the worst |a-b|/(atol+rtol|b|)."""
    rtol, atol = TOLERANCE.get(precision, TOLERANCE["bf16"])
    worst = 0.0
    for key, b in base.items():
        if key.startswith("acc"):  # accuracies are discrete: one flipped argmax is not a precision error
            continue
        a = first.get(key, math.nan)
        worst = max(worst, abs(a - b) / (atol + rtol * abs(b)) if math.isfinite(a) else math.inf)
    return worst <= 1.0, worst


def run_model(model_name: str, settings: list[Setting], device: torch.device, *, base_width: int, size: int,
              batch: int, latent_dim: int | None, warmup: int, iters: int, seed: int) -> list[dict[str, Any]]:
    """Prepare every setting, then time them interleaved (round-robin, one step each per round), so that
    load from other processes spreads evenly over the settings; report the median per setting."""
    prepared: list[Prepared] = []
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        print(f"  {model_name}: {setting.name} ...", file=sys.stderr, flush=True)
        try:
            prepared.append(prepare(model_name, setting, device, base_width=base_width, size=size, batch=batch,
                                    latent_dim=latent_dim, warmup=warmup, seed=seed))
        except Exception as e:  # record and go on: one failing rung must not hide the others
            print(f"    failed: {type(e).__name__}: {e}", file=sys.stderr)
            if os.environ.get("MEDGEN_DEBUG"):
                traceback.print_exc()
            msg = str(e).splitlines()[0] if str(e) else ""
            results[setting.name] = dict(model=model_name, setting=setting.name, config=asdict(setting),
                                         error=f"{type(e).__name__}: {msg}")
    wall: dict[str, list[float]] = {p.setting.name: [] for p in prepared}
    cpu: dict[str, list[float]] = {p.setting.name: [] for p in prepared}
    for _ in range(iters):
        for p in prepared:
            t = time_fn(p.run, device, warmup=0, iters=1)
            wall[p.setting.name].append(t.median_ms)
            cpu[p.setting.name].append(t.cpu_ms)
    base = prepared[0] if prepared and prepared[0].setting == settings[0] else None
    base_ms = statistics.median(wall[base.setting.name]) if base else None
    base_min = min(wall[base.setting.name]) if base else None
    base_cpu = statistics.median(cpu[base.setting.name]) if base else None
    for p in prepared:
        ms = statistics.median(wall[p.setting.name])
        r = dict(model=model_name, setting=p.setting.name, config=asdict(p.setting), compiled=p.compiled,
                 first_losses=p.first_losses, first_step_s=p.first_step_s, ms=ms,
                 ms_min=min(wall[p.setting.name]), cpu_ms=statistics.median(cpu[p.setting.name]),
                 runs=len(wall[p.setting.name]), volumes_per_s=batch / (ms * 1e-3), step_mem_mb=p.step_mem_mb)
        if base is not None:
            r["speedup_vs_baseline"] = base_ms / ms
            # Under load from other processes the fastest run and the CPU time are the steadier estimates.
            r["speedup_vs_baseline_min"] = base_min / r["ms_min"]
            if device.type == "cpu":
                r["speedup_vs_baseline_cpu_time"] = base_cpu / r["cpu_ms"]
            ok, worst = compare_losses(p.first_losses, base.first_losses, p.setting.precision)
            r["losses_match"], r["loss_error_over_tol"] = ok, worst
        results[p.setting.name] = r
    return [results[s.name] for s in settings if s.name in results]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="32^3, width 4, batch 2, no compile (CPU smoke run)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--models", type=str, default=",".join(MODELS))
    p.add_argument("--base-width", type=int, default=None, help="default 64 on CUDA, 8 on CPU, 4 with --quick")
    p.add_argument("--size", type=int, default=None, help="volume side; default 64 (32 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="default 16 on CUDA, 4 on CPU, 2 with --quick")
    p.add_argument("--latent-dim", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", dest="with_compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile rungs (default: on unless --quick)")
    p.add_argument("--max-seconds", type=float, default=None, help="cap on timed seconds per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rungs", type=int, default=None, help="keep only the first N rungs (plus the default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 makes CPU time immune to other processes' load)")
    args = p.parse_args(argv)

    device = resolve_bench_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    width = args.base_width or (4 if args.quick else (64 if cuda else 8))
    size = args.size or (32 if args.quick else 64)
    batch = args.batch or (2 if args.quick else (16 if cuda else 4))
    iters = args.iters or (2 if args.quick else (20 if cuda else 4))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (5 if cuda else 1))
    with_compile = args.with_compile if args.with_compile is not None else not args.quick
    models = [m for m in args.models.split(",") if m]
    settings = ladder(device, with_compile=with_compile)
    if args.rungs is not None:
        settings = settings[:args.rungs] + [s for s in settings if s.name == "medgen default"]
    print(f"{device}: width {width}, {size}^3, batch {batch}, {warmup} warm-up + {iters} timed steps per setting",
          file=sys.stderr)

    results: list[dict[str, Any]] = []
    for model_name in models:
        results += run_model(model_name, settings, device, base_width=width, size=size, batch=batch,
                             latent_dim=args.latent_dim, warmup=warmup, iters=iters, seed=args.seed)
        if cuda:
            torch.cuda.empty_cache()

    _print(results, device, width, size, batch)
    payload = dict(benchmark="train_step", machine=machine_info(device), base_width=width, size=size, batch=batch,
                   warmup=warmup, iters=iters, tolerance=TOLERANCE, settings=[asdict(s) for s in settings],
                   results=results)
    if args.json:
        write_json(args.json, payload)
    return payload


def _print(results: list[dict[str, Any]], device: torch.device, width: int, size: int, batch: int) -> None:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["setting"], "-", "-", "-", "-", "-", "-", "-", "-",
                         "failed: " + r["error"][:60]])
            continue
        rows.append([r["model"], r["setting"], fmt(r["ms"], 1), fmt(r["ms_min"], 1), fmt(r["cpu_ms"], 1),
                     fmt(r["volumes_per_s"], 2), fmt(r.get("speedup_vs_baseline"), 2),
                     fmt(r.get("speedup_vs_baseline_min"), 2), fmt(r["step_mem_mb"], 0),
                     "yes" if r["losses_match"] else "NO", f"{r['loss_error_over_tol']:.2f}"])
    print_table(f"training step, {device}, base_width {width}, {size}^3, batch {batch}",
                ["model", "setting", "ms/step", "min ms", "CPU ms/step", "volumes/s", "x baseline",
                 "x baseline (min)", "step MiB", "losses match", "err/tol"], rows)


if __name__ == "__main__":
    main()
