"""The export pipeline: a trained generator -> a MONAI bundle that samples volumes without medgen.

    OUT/configs/metadata.json    MONAI bundle metadata (versions, network_data_format, classes, provenance)
    OUT/configs/inference.json   the workflow `python -m monai.bundle run` executes
    OUT/models/model.ts          TorchScript sampler: (z [N, latent_dim] float32, labels [N] int64)
                                 -> images [N, C, *spatial] in [-1, 1]
    OUT/models/model.pt          the sampler's weights (a plain state dict; torch.load(weights_only=True))
    OUT/scripts/volumes.py       writes the volumes as NIfTI with the training header (nibabel only)
    OUT/docs/README.md           how to run it

The workflow draws latents exactly as `medgen synth` does (torch.randn from a CPU generator seeded with
`seed`), so `--class_name AD --num_samples 4 --seed 1` gives the volumes of
`medgen synth --class AD --n 4 --seed 1`: the training affine, sform/qform codes and units, and the training
data's intensity scale. Only the conditional generators (vae, gan, alpha-gan) export; the sampler is traced
(torch.jit.trace) on the CPU from their decoding network alone.
"""

from __future__ import annotations

import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch
from torch import nn

import medgen
from medgen.checkpoint import model_from_checkpoint
from medgen.console import log
from medgen.errors import MedgenError
from medgen.models.sampling import draw_latents
from medgen.outputs import atomic_write, atomic_write_json, atomic_write_text, check_output_dir, staged_dir
from medgen.pipelines.synthesize import intensity_map, nifti_codes

# The models that export, and the submodule that decodes (z, labels) -> images in each.
EXPORTABLE = {"vae": "decoder", "gan": "generator", "alpha-gan": "generator"}
BUNDLE_VERSION = "0.1.0"
# configs/logging.conf: MONAI bundles read it (log lines to stderr).
LOGGING_CONF = """\
[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stderr,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


class Sampler(nn.Module):
    """The decoding network of a generator as a standalone module: (z, labels) -> images clamped to [-1, 1].

    Args:
        network: the generator's decoder (called as network(z, labels)).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z [N, latent_dim], labels [N] -> images [N, C, *spatial] in [-1, 1]."""
        return self.network(z, labels).float().clamp(-1.0, 1.0)


def trace_sampler(model: nn.Module, model_name: str, latent_dim: int, num_classes: int) -> torch.jit.ScriptModule:
    """TorchScript (traced on the CPU, eval mode) of `model`'s decoding network, checked against eager."""
    network = getattr(model, EXPORTABLE[model_name])
    sampler = Sampler(network).eval().cpu()
    for p in sampler.parameters():
        p.requires_grad_(False)
    z = draw_latents(2, latent_dim, 0)  # [2, latent_dim]
    labels = torch.arange(2) % num_classes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
        traced = torch.jit.trace(sampler, (z, labels))
    probe_z, probe_labels = draw_latents(3, latent_dim, 1), torch.arange(3) % num_classes  # another batch size
    with torch.no_grad():
        diff = float((traced(probe_z, probe_labels) - sampler(probe_z, probe_labels)).abs().max())
    if not diff <= 1e-5:
        raise MedgenError(f"the traced {model_name} sampler differs from the model by {diff:.3g}; cannot export it")
    return traced


def inference_config(meta: dict[str, Any], latent_dim: int, mapping: tuple[float, float] | None,
                     codes: dict[str, int]) -> dict[str, Any]:
    """configs/inference.json: parameters (class_name, num_samples, seed, output_dir, device, scale) and the
    workflow: latents as `medgen synth` draws them -> the TorchScript sampler -> NIfTI files."""
    class_names = list(meta["class_names"])
    return {
        "imports": ["$import torch", "$import importlib"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "class_names": class_names,
        "class_name": class_names[-1],
        "num_samples": 4,
        "seed": 0,
        "batch_size": 4,
        "scale": "data",
        "latent_dim": int(latent_dim),
        "data_intensity_range": None if mapping is None else [float(mapping[0]), float(mapping[1])],
        "intensity_range": "$@data_intensity_range if @scale == 'data' else None",
        "affine": np.asarray(meta["affine"], dtype=np.float64).tolist(),
        "nifti": {k: int(v) for k, v in codes.items()},
        "class_index": "$@writer.class_index(@class_names, @class_name)",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device).eval()",
        "latents": "$torch.randn(@num_samples, @latent_dim, generator=torch.Generator().manual_seed(@seed))",
        "labels": "$torch.full((@num_samples,), @class_index, dtype=torch.int64)",
        "images": "$torch.cat([@network(z.to(@device), y.to(@device)).cpu() for z, y in "
                  "zip(@latents.split(@batch_size), @labels.split(@batch_size))])",
        "writer": "$importlib.import_module('scripts.volumes')",
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": ["$@writer.write_volumes(@images, @labels, @class_names, @affine, @nifti, @output_dir, "
                "intensity_range=@intensity_range, prefix='synthetic', seed=@seed)"],
        "finalize": [],
    }


def metadata(meta: dict[str, Any], latent_dim: int, shape: tuple[int, ...], mapping: tuple[float, float] | None,
             weights: str) -> dict[str, Any]:
    """configs/metadata.json: the bundle's versions, network_data_format, classes and provenance."""
    source = (meta["normalisation"].get("source_dataset") or {}).get("uri")
    return {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medgen {medgen.__version__} from {Path(meta['path']).name} "
                                      f"(sha256 {meta['sha256']}, iteration {meta['step']})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nib.__version__},
        "name": f"medgen {meta['model']} generator",
        "task": "class-conditional synthesis of 3D T1-weighted brain MRI volumes",
        "description": f"The {meta['model']} generator of a medgen training run: latents and a class give volumes in the "
                       "training space (affine, NIfTI codes) and, by default, the training data's intensity scale.",
        "authors": "medgen",
        "copyright": "the owner of the training data and run",
        "data_source": source or "not recorded",
        "data_type": "nibabel",
        "intended_use": "research on synthetic data augmentation; not for clinical use",
        "network_data_format": {
            "inputs": {
                "latent": {"type": "tensor", "format": "latent", "num_channels": int(latent_dim),
                           "spatial_shape": [int(latent_dim)], "dtype": "float32", "value_range": [],
                           "is_patch_data": False, "channel_def": {}},
                "labels": {"type": "tensor", "format": "class index", "num_channels": 1, "spatial_shape": [1],
                           "dtype": "int64", "value_range": [0, len(meta["class_names"]) - 1],
                           "is_patch_data": False,
                           "channel_def": {str(i): c for i, c in enumerate(meta["class_names"])}},
            },
            "outputs": {
                "pred": {"type": "image", "format": "magnitude", "num_channels": int(shape[0]),
                         "spatial_shape": [int(s) for s in shape[1:]], "dtype": "float32", "value_range": [-1, 1],
                         "is_patch_data": False, "channel_def": {"0": "image"}},
            },
        },
        "medgen": {
            "model": meta["model"], "kwargs": meta["kwargs"], "class_names": list(meta["class_names"]),
            "checkpoint": Path(meta["path"]).name, "checkpoint_sha256": meta["sha256"], "iteration": meta["step"],
            "weights": weights, "data_intensity_range": None if mapping is None else list(mapping),
            "medgen_version": medgen.__version__,
        },
    }


def readme(meta: dict[str, Any], out_name: str) -> str:
    classes = ", ".join(meta["class_names"])
    return f"""\
# medgen {meta['model']} generator (MONAI bundle)

Samples class-conditional volumes without medgen (needs torch, monai, nibabel). Classes: {classes}.

```bash
python -m monai.bundle run --config_file {out_name}/configs/inference.json --meta_file {out_name}/configs/metadata.json \\
    --bundle_root {out_name} --class_name {meta['class_names'][-1]} --num_samples 4 --seed 0 --output_dir synthetic
```

Writes `OUTPUT_DIR/synthetic_CLASS_SEED_NNNN.nii.gz` (the training affine, sform/qform codes and units) and a
MONAI datalist `OUTPUT_DIR/synthetic_CLASS_SEED_datalist.json`; existing files are never replaced.
`--scale model` keeps the generator's [-1, 1] instead of the training data's intensity scale. The same
class, number and seed give the volumes of `medgen synth --class CLASS --n N --seed SEED`.

`models/model.ts` is the TorchScript sampler, `(z [N, latent_dim] float32, labels [N] int64) -> images
[N, C, *spatial]` in [-1, 1]; `models/model.pt` holds its weights as a plain state dict.
"""


def export_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                  ema: bool = True) -> Path:
    """Write a MONAI bundle of a trained generator (see the module docstring) atomically.

    Args:
        checkpoint: a checkpoint file or a `medgen train` run folder.
        out: the bundle folder (refused when non-empty unless overwrite; only a folder medgen wrote is replaced).
        overwrite: replace an existing bundle once the new one is complete.
        ema: export the EMA weights when the checkpoint has them.
    Returns:
        The bundle folder.
    """
    check_output_dir(out, overwrite=overwrite, inputs=[checkpoint])
    model, meta = model_from_checkpoint(checkpoint, ema=ema)
    if meta["model"] not in EXPORTABLE:
        raise MedgenError(f"checkpoint {meta['path']} holds model {meta['model']!r}; medgen export writes "
                          f"bundles of the conditional generators only ({', '.join(EXPORTABLE)})")
    if meta["affine"] is None or int(meta["kwargs"].get("spatial_dims", 3)) != 3:
        raise MedgenError(f"checkpoint {meta['path']} is a 2D model; the bundle writes 3D NIfTI volumes")
    latent_dim = int(model.latent_dim)
    traced = trace_sampler(model, meta["model"], latent_dim, len(meta["class_names"]))
    with torch.no_grad():
        shape = tuple(traced(draw_latents(1, latent_dim, 0), torch.zeros(1, dtype=torch.int64)).shape[1:])
    mapping = intensity_map(meta["normalisation"], "data")
    codes = nifti_codes(meta["normalisation"])
    if mapping is None:
        log(f"checkpoint {meta['path']} records no intensity scale of its training data (older medgen); the "
            "bundle writes the model scale [-1, 1]")
    weights = {k: v.detach().clone() for k, v in Sampler(getattr(model, EXPORTABLE[meta["model"]])).state_dict().items()}
    script = resources.files("medgen.pipelines").joinpath("templates/bundle/volumes.py").read_text("utf-8")
    with staged_dir(out, overwrite=overwrite, inputs=[checkpoint], command="export") as tmp:
        atomic_write(tmp / "models" / "model.ts", lambda f: torch.jit.save(traced, f))
        atomic_write(tmp / "models" / "model.pt", lambda f: torch.save(weights, f))
        atomic_write_json(tmp / "configs" / "inference.json", inference_config(meta, latent_dim, mapping, codes))
        atomic_write_json(tmp / "configs" / "metadata.json",
                          metadata(meta, latent_dim, shape, mapping, meta["weights"]))
        atomic_write_text(tmp / "scripts" / "__init__.py", "")
        atomic_write_text(tmp / "scripts" / "volumes.py", script)
        atomic_write_text(tmp / "configs" / "logging.conf", LOGGING_CONF)
        atomic_write_text(tmp / "docs" / "README.md", readme(meta, Path(out).name))
    return Path(out)
