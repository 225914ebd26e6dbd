"""Per-layer 3D convolution benchmark for the 64^3 generator, discriminator and encoder.

The layer list comes from the registered models: one real training step of each model runs with
forward hooks on every Conv/ConvTranspose module, recording its hyper-parameters and input shape,
so the benchmark follows the architecture. If the models are not importable it falls back to the
DESIGN.md layout (generator latent -> 4^3 x 8w, four x2 transposed-conv stages to 64^3;
discriminator / encoder k4 s2 convs).

Each distinct layer runs forward, input-grad (dgrad) and weight-grad (wgrad) through
`aten.convolution` / `aten.convolution_backward` at each batch size under each precision
(fp32, TF32, bf16), memory format (NCDHW, channels_last_3d) and cudnn.benchmark setting (CUDA).
FLOPs are counted analytically (2 * MACs, identical for the three passes). Achieved TFLOP/s is
compared with a large GEMM of the same precision measured in the same run, and the minimum bytes
moved with a large device copy. A second table compares the generator's up-sampling stages built as
transposed conv (k4 s2) versus nearest upsample + conv (k3), forward + backward; a third the 1-channel
input layers computed directly versus as space-to-depth + k2 conv (medgen.runtime.SpaceToDepthConv3d).

Usage:
    python benchmarks/conv3d.py --device cuda --json conv3d_cuda.json
    python benchmarks/conv3d.py --device cpu --quick --json conv3d_cpu.json
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Peak,
    backend_flags,
    cpu_bf16_supported,
    cpu_clock_ok,
    fmt,
    machine_info,
    measure_peak,
    peak_memory_mb,
    print_table,
    reset_peak_memory,
    resolve_bench_device,
    time_fn,
    write_json,
)

PASSES = ("fwd", "dgrad", "wgrad")


@dataclass(frozen=True)
class ConvSpec:
    """One convolution layer as the model runs it (batch excluded from in_spatial)."""

    group: str  # top-level sub-network, e.g. generator / discriminator / encoder
    name: str
    transposed: bool
    cin: int
    cout: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    in_spatial: tuple[int, ...]

    @property
    def out_spatial(self) -> tuple[int, ...]:
        out = []
        for i, n in enumerate(self.in_spatial):
            k, s, p, d = self.kernel[i], self.stride[i], self.padding[i], self.dilation[i]
            if self.transposed:
                out.append((n - 1) * s - 2 * p + d * (k - 1) + self.output_padding[i] + 1)
            else:
                out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    def flops(self, batch: int) -> int:
        """2 * multiply-accumulates of one pass (forward, dgrad and wgrad cost the same)."""
        k = math.prod(self.kernel)
        if self.transposed:
            return 2 * batch * self.cin * math.prod(self.in_spatial) * (self.cout // self.groups) * k
        return 2 * batch * self.cout * math.prod(self.out_spatial) * (self.cin // self.groups) * k

    def min_bytes(self, batch: int, elem: int) -> int:
        """Input + weight + output read/written once: the memory-traffic floor of the forward."""
        w = self.cin * self.cout // self.groups * math.prod(self.kernel)
        return elem * (batch * self.cin * math.prod(self.in_spatial) + w
                       + batch * self.cout * math.prod(self.out_spatial))

    @property
    def label(self) -> str:
        kind = "convT" if self.transposed else "conv"
        k, s = self.kernel[0], self.stride[0]
        sp = "x".join(map(str, self.in_spatial))
        return f"{self.group[:5]} {kind} k{k}s{s} {self.cin}->{self.cout} @{sp}"

    def signature(self) -> tuple:
        """Identity for de-duplication (name and group excluded)."""
        return (self.transposed, self.cin, self.cout, self.kernel, self.stride, self.padding,
                self.output_padding, self.dilation, self.groups, self.in_spatial)


def _spec_from_module(group: str, name: str, m: nn.Module, shape: torch.Size) -> ConvSpec:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return ConvSpec(group=group, name=name, transposed=transposed, cin=m.in_channels, cout=m.out_channels,
                    kernel=tuple(m.kernel_size), stride=tuple(m.stride), padding=tuple(m.padding),
                    output_padding=tuple(getattr(m, "output_padding", (0,) * len(m.kernel_size))),
                    dilation=tuple(m.dilation), groups=m.groups, bias=m.bias is not None,
                    in_spatial=tuple(shape[2:]))


def specs_from_training_step(model_name: str, base_width: int, size: int = 64,
                             batch: int = 2) -> list[ConvSpec]:
    """Run one real training step of `model_name` and record every 3D conv call (module + input shape).

    Args:
        model_name: registry name (vae, gan, alpha-gan).
        base_width: model width (64 = published size).
        size: cubic volume side.
        batch: batch of the recording step (shapes are recorded without the batch dimension).
    """
    from medgen.models.registry import create_model
    from medgen.runtime import resolve_precision
    from medgen.training.steps import Batch, StepContext, create_step

    torch.manual_seed(0)
    model = create_model(model_name, spatial_dims=3, in_channels=1, num_classes=3, image_size=size,
                         base_width=base_width)
    step = create_step(model_name)
    opt = step.optimizers(model, 2e-4)
    device = torch.device("cpu")
    ctx = StepContext(precision=resolve_precision("fp32", device), generator=torch.Generator().manual_seed(0))
    seen: dict[tuple, ConvSpec] = {}
    hooks = []
    for qual, m in model.named_modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            group = qual.split(".")[0] if "." in qual else model_name

            def hook(mod, args, _out, qual=qual, group=group):
                spec = _spec_from_module(group, qual, mod, args[0].shape)
                seen.setdefault((qual, spec.in_spatial), spec)

            hooks.append(m.register_forward_hook(hook))
    images = torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(batch) % 3
    try:
        step(model, Batch(images, labels), opt, ctx)
    finally:
        for h in hooks:
            h.remove()
    return list(seen.values())


def specs_from_design(base_width: int, size: int = 64, latent_dim: int = 128) -> list[ConvSpec]:
    """DESIGN.md section 3 layout, used when the models cannot be imported.

    Generator: latent -> 4^3 x 8w (transposed conv k4 s1 on a 1^3 code), then x2 transposed-conv stages
    8w -> 4w -> 2w -> w -> 1 up to `size`. Discriminator and encoder: k4 s2 p1 convs 1 -> w -> 2w -> 4w -> 8w.
    """
    w = base_width
    n3 = (1, 1, 1)

    def conv(group, name, cin, cout, sp, k=4, s=2, p=1, transposed=False):
        return ConvSpec(group, name, transposed, cin, cout, (k,) * 3, (s,) * 3, (p,) * 3, (0,) * 3, n3, 1,
                        not transposed, (sp,) * 3)

    specs = [conv("generator", "g0", latent_dim, 8 * w, 1, k=4, s=1, p=0, transposed=True)]
    chans = [8 * w, 4 * w, 2 * w, w, 1]
    sp = 4
    for i in range(4):
        specs.append(conv("generator", f"g{i + 1}", chans[i], chans[i + 1], sp, transposed=True))
        sp *= 2
    dchans = [1, w, 2 * w, 4 * w, 8 * w]
    sp = size
    for i in range(4):
        specs.append(conv("discriminator", f"d{i}", dchans[i], dchans[i + 1], sp))
        sp //= 2
    specs.append(conv("discriminator", "d_out", 8 * w, 1, sp, k=4, s=1, p=0))
    return specs


def derive_specs(models: list[str], base_width: int, size: int) -> tuple[list[ConvSpec], str]:
    """Distinct conv layers of `models` (first occurrence kept), and where the list came from."""
    specs: list[ConvSpec] = []
    source = "models: " + ", ".join(models)
    try:
        for name in models:
            specs += specs_from_training_step(name, base_width, size)
    except Exception as e:  # models not written yet or broken: fall back to the documented layout
        print(f"note: could not trace the models ({type(e).__name__}: {e}); using the DESIGN.md layout",
              file=sys.stderr)
        specs, source = specs_from_design(base_width, size), "DESIGN.md layout (models not importable)"
    unique: dict[tuple, ConvSpec] = {}
    for s in specs:
        unique.setdefault(s.signature(), s)
    return list(unique.values()), source


@dataclass(frozen=True)
class Setting:
    """One point of the configuration grid."""

    precision: str  # fp32 | tf32 | bf16
    channels_last: bool
    cudnn_benchmark: bool

    @property
    def label(self) -> str:
        fmt_ = "cl3d" if self.channels_last else "ncdhw"
        bench = " bench" if self.cudnn_benchmark else ""
        return f"{self.precision} {fmt_}{bench}"


def settings_grid(device: torch.device, quick: bool, only: list[str] | None = None) -> list[Setting]:
    """fp32 NCDHW first (the baseline); TF32 and cudnn.benchmark only exist on CUDA.

    Args:
        device: where the layers run.
        quick: on CUDA, cudnn.benchmark on only.
        only: restrict to these precisions (fp32 is always kept as the baseline).
    """
    precisions = ["fp32"]
    if device.type == "cuda":
        precisions += ["tf32", "bf16"] if torch.cuda.is_bf16_supported() else ["tf32"]
    elif cpu_bf16_supported():
        precisions.append("bf16")
    if only:
        precisions = [p for p in precisions if p == "fp32" or p in only]
    benches = [False, True] if device.type == "cuda" else [False]
    if quick and device.type == "cuda":
        benches = [True]
    return [Setting(p, cl, b) for p in precisions for cl in (False, True) for b in benches]


def _fmt_tensor(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


def bench_layer(spec: ConvSpec, batch: int, setting: Setting, device: torch.device, peak: Peak,
                warmup: int, iters: int) -> list[dict[str, Any]]:
    """Time forward, dgrad and wgrad of one layer under one setting; one result row per pass."""
    dtype = torch.bfloat16 if setting.precision == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, spec.cin, *spec.in_spatial, device=device, dtype=dtype, generator=g)
    wshape = (spec.cin, spec.cout // spec.groups) if spec.transposed else (spec.cout, spec.cin // spec.groups)
    w = torch.randn(*wshape, *spec.kernel, device=device, dtype=dtype, generator=g) * 0.02
    gy = torch.randn(batch, spec.cout, *spec.out_spatial, device=device, dtype=dtype, generator=g)
    x, w, gy = (_fmt_tensor(t, setting.channels_last) for t in (x, w, gy))
    b = torch.zeros(spec.cout, device=device, dtype=dtype) if spec.bias else None
    args = (list(spec.stride), list(spec.padding), list(spec.dilation), spec.transposed,
            list(spec.output_padding), spec.groups)
    bias_sizes = [spec.cout] if spec.bias else None

    def fwd():
        return torch.ops.aten.convolution(x, w, b, *args)

    def grad(mask):
        return lambda: torch.ops.aten.convolution_backward(gy, x, w, bias_sizes, *args, mask)

    fns = {"fwd": fwd, "dgrad": grad([True, False, False]), "wgrad": grad([False, True, spec.bias])}
    rows = []
    flops = spec.flops(batch)
    peak_key = setting.precision if setting.precision in peak.gemm_tflops else "fp32"
    with torch.no_grad(), backend_flags(device, tf32=setting.precision == "tf32",
                                         cudnn_benchmark=setting.cudnn_benchmark):
        for name, fn in fns.items():
            reset_peak_memory(device)
            t = time_fn(fn, device, warmup=warmup, iters=iters, cpu_clock=cpu_clock_ok(device))
            tflops = flops / (t.median_ms * 1e-3) / 1e12
            gbps = spec.min_bytes(batch, x.element_size()) / (t.median_ms * 1e-3) / 1e9
            rows.append(dict(layer=spec.label, group=spec.group, module=spec.name, batch=batch,
                             precision=setting.precision, channels_last=setting.channels_last,
                             cudnn_benchmark=setting.cudnn_benchmark, setting=setting.label, pass_=name,
                             ms=t.median_ms, gflop=flops / 1e9, tflops=tflops,
                             frac_peak=tflops / peak.gemm_tflops.get(peak_key, float("nan")),
                             frac_copy=gbps / peak.copy_gbps if name == "fwd" else None,
                             peak_mem_mb=peak_memory_mb(device)))
    return rows


def upsample_stages(specs: list[ConvSpec]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(cin, cout, in_spatial) of each x2 up-sampling stage of the generator/decoder layers.

    A stride-2 transposed conv is a stage; so is a stride-1 conv whose input is twice the spatial size
    of the previous generator layer's output (an upsample in between).
    """
    stages = []
    prev_out: tuple[int, ...] | None = None
    for s in specs:
        if not any(k in s.group.lower() for k in ("gen", "dec")):
            continue
        if s.transposed and s.stride[0] == 2:
            stages.append((s.cin, s.cout, s.in_spatial))
        elif prev_out is not None and not s.transposed and s.in_spatial[0] == 2 * prev_out[0]:
            stages.append((s.cin, s.cout, prev_out))
        prev_out = s.out_spatial
    return list(dict.fromkeys(stages))


def bench_upsampling(stages, batch: int, setting: Setting, device: torch.device, warmup: int,
                     iters: int) -> list[dict[str, Any]]:
    """Forward + backward of transposed conv (k4 s2 p1) vs nearest upsample x2 + conv (k3 p1) per stage."""
    rows = []
    dtype = torch.bfloat16 if setting.precision == "bf16" else None
    for cin, cout, sp in stages:
        variants = {
            "convT k4s2": nn.ConvTranspose3d(cin, cout, 4, 2, 1),
            "upsample+conv k3": nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv3d(cin, cout, 3, 1, 1)),
        }
        x = torch.randn(batch, cin, *sp, device=device)
        if setting.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_(True)
        for name, m in variants.items():
            m = m.to(device)
            if setting.channels_last:
                m = m.to(memory_format=torch.channels_last_3d)

            def run(m=m, x=x):
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    y = m(x)
                y.float().square().mean().backward()

            with backend_flags(device, tf32=setting.precision == "tf32", cudnn_benchmark=setting.cudnn_benchmark):
                reset_peak_memory(device)
                t = time_fn(run, device, warmup=warmup, iters=iters, cpu_clock=cpu_clock_ok(device))
            conv = m if isinstance(m, nn.ConvTranspose3d) else m[1]
            in_sp = sp if isinstance(m, nn.ConvTranspose3d) else tuple(2 * n for n in sp)
            spec = _spec_from_module("generator", name, conv, torch.Size((batch, cin, *in_sp)))
            flops = 3 * spec.flops(batch)
            rows.append(dict(stage=f"{cin}->{cout} @{'x'.join(map(str, sp))}", variant=name, batch=batch,
                             setting=setting.label, ms=t.median_ms, gflop=flops / 1e9,
                             tflops=flops / (t.median_ms * 1e-3) / 1e12, peak_mem_mb=peak_memory_mb(device)))
    return rows


def bench_stems(specs: list[ConvSpec], batch: int, setting: Setting, device: torch.device, warmup: int,
                iters: int) -> list[dict[str, Any]]:
    """Input layers with 1-2 channels (k4 s2 p1): direct conv vs space-to-depth + k2 conv (same weights),
    forward + input-grad + weight-grad through autograd (what the critics and encoder run)."""
    from medgen.runtime import use_space_to_depth_stems

    rows = []
    dtype = torch.bfloat16 if setting.precision == "bf16" else None
    stems = [s for s in specs if not s.transposed and s.cin <= 2 and s.kernel == (4, 4, 4)
             and s.stride == (2, 2, 2) and s.padding == (1, 1, 1)]
    for spec in stems:
        x = torch.randn(batch, spec.cin, *spec.in_spatial, device=device)
        if setting.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_(True)
        for variant in ("direct", "space-to-depth"):
            m = nn.Conv3d(spec.cin, spec.cout, 4, 2, 1, bias=spec.bias).to(device)
            if setting.channels_last:
                m = m.to(memory_format=torch.channels_last_3d)
            if variant == "space-to-depth":
                use_space_to_depth_stems(m)

            def run(m=m, x=x):
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    y = m(x)
                y.float().square().mean().backward()

            with backend_flags(device, tf32=setting.precision == "tf32", cudnn_benchmark=setting.cudnn_benchmark):
                t = time_fn(run, device, warmup=warmup, iters=iters, cpu_clock=cpu_clock_ok(device))
            flops = 3 * spec.flops(batch)
            rows.append(dict(layer=spec.label, variant=variant, batch=batch, setting=setting.label, ms=t.median_ms,
                             tflops=flops / (t.median_ms * 1e-3) / 1e12))
    return rows


def summarise(rows: list[dict[str, Any]], settings: list[Setting], batches: list[int]) -> list[dict[str, Any]]:
    """Total time over all layers and passes per (batch, setting) and its ratio to fp32 NCDHW."""
    out = []
    for batch in batches:
        base = None
        for s in settings:
            total = sum(r["ms"] for r in rows if r["batch"] == batch and r["setting"] == s.label)
            flops = sum(r["gflop"] for r in rows if r["batch"] == batch and r["setting"] == s.label)
            if base is None:
                base = total
            out.append(dict(batch=batch, setting=s.label, total_ms=total, tflops=flops / total if total else 0.0,
                            speedup_vs_fp32=base / total if total else None))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small width, batch 2, fewer settings (CPU smoke run)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--base-width", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batches", type=str, default=None, help="comma list; default 4,16,32 (2 with --quick)")
    p.add_argument("--models", type=str, default="gan,alpha-gan")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--precisions", type=str, default=None, help="comma list to restrict to (fp32 always runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    device = resolve_bench_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    width = args.base_width or (8 if args.quick else 64)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([2] if args.quick else [4, 16, 32])
    iters = args.iters or (2 if args.quick else (10 if device.type == "cuda" else 3))
    warmup = 1 if device.type == "cpu" else 3
    specs, source = derive_specs([m for m in args.models.split(",") if m], width, args.size)
    settings = settings_grid(device, args.quick, args.precisions.split(",") if args.precisions else None)
    peak = measure_peak(device, sorted({s.precision for s in settings}), quick=args.quick)
    print(f"layers: {len(specs)} distinct ({source}); width {width}; batches {batches}; "
          f"peak GEMM TFLOP/s {({k: round(v, 3) for k, v in peak.gemm_tflops.items()})}, "
          f"copy {peak.copy_gbps:.1f} GB/s", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    for batch in batches:
        for setting in settings:
            for spec in specs:
                rows += bench_layer(spec, batch, setting, device, peak, warmup, iters)

    stages = upsample_stages(specs) or upsample_stages(specs_from_design(width, args.size))
    up_rows: list[dict[str, Any]] = []
    up_settings = [s for s in settings if s.cudnn_benchmark == (device.type == "cuda")]
    for batch in batches:
        for setting in up_settings:
            up_rows += bench_upsampling(stages, batch, setting, device, warmup, iters)

    stem_rows: list[dict[str, Any]] = []
    for batch in batches:
        for setting in up_settings:
            stem_rows += bench_stems(specs, batch, setting, device, warmup, iters)

    summary = summarise(rows, settings, batches)
    _print(rows, up_rows, summary, settings, batches, device)
    print_table("input layer: direct vs space-to-depth (fwd + bwd)",
                ["layer", "variant", "batch", "setting", "ms", "TFLOP/s"],
                [[r["layer"], r["variant"], str(r["batch"]), r["setting"], fmt(r["ms"], 3), fmt(r["tflops"], 3)]
                 for r in stem_rows])
    clock = "process CPU time (1 thread)" if cpu_clock_ok(device) else ("CUDA events" if device.type == "cuda"
                                                                     else "elapsed time")
    print(f"clock: {clock}", file=sys.stderr)
    payload = dict(benchmark="conv3d", machine=machine_info(device), clock=clock, layer_source=source, base_width=width,
                   size=args.size, batches=batches, peak=peak, settings=[s.label for s in settings],
                   layers=[dict(label=s.label, **{k: v for k, v in s.__dict__.items()}) for s in specs],
                   results=[{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows],
                   upsampling=up_rows, stems=stem_rows, summary=summary)
    if args.json:
        write_json(args.json, payload)
    return payload


def _print(rows, up_rows, summary, settings, batches, device) -> None:
    show_batch = 16 if 16 in batches else batches[-1]
    table_rows = []
    labels = list(dict.fromkeys(r["layer"] for r in rows))
    for layer in labels:
        for s in settings:
            sel = {r["pass_"]: r for r in rows if r["layer"] == layer and r["setting"] == s.label
                   and r["batch"] == show_batch}
            if not sel:
                continue
            tf = [sel[k]["tflops"] for k in PASSES]
            fr = [sel[k]["frac_peak"] for k in PASSES]
            table_rows.append([layer, s.label, *(fmt(sel[k]["ms"], 3) for k in PASSES),
                               fmt(sum(tf) / 3, 3), fmt(100 * sum(fr) / 3, 1),
                               fmt(100 * (sel["fwd"]["frac_copy"] or 0), 1),
                               fmt(max(sel[k]["peak_mem_mb"] or 0 for k in PASSES), 0)])
    print_table(f"conv3d layers, batch {show_batch}, {device}",
                ["layer", "setting", "fwd ms", "dgrad ms", "wgrad ms", "TFLOP/s", "% GEMM peak",
                 "fwd % copy BW", "peak MiB"], table_rows)
    print_table("all layers, all passes: total time per setting",
                ["batch", "setting", "total ms", "TFLOP/s", "x vs fp32 NCDHW"],
                [[str(r["batch"]), r["setting"], fmt(r["total_ms"], 2), fmt(r["tflops"], 3),
                  fmt(r["speedup_vs_fp32"], 2)] for r in summary])
    print_table("generator up-sampling stage: fwd + bwd",
                ["stage", "variant", "batch", "setting", "ms", "TFLOP/s", "peak MiB"],
                [[r["stage"], r["variant"], str(r["batch"]), r["setting"], fmt(r["ms"], 3), fmt(r["tflops"], 3),
                  fmt(r["peak_mem_mb"], 0)] for r in up_rows])


if __name__ == "__main__":
    main()
