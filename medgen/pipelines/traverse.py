"""`medgen traverse`: walks through an autoencoder's latent space, written as NIfTI series and labelled PNG strips.

Three walks, each decoded step by step (vae: posterior means; alpha-gan: encoder codes):
    subjects/   from subject A's code to subject B's (linear), the class condition moving from A's class to B's
    classes/    subject A's code held fixed while the class condition moves CN -> MCI -> AD (the trained classes in
                order; between two classes the condition is the weighted mean of their embeddings)
    dims/dim-N/ one latent dimension at a time (the most used: largest spread of the data's codes) from -R to +R
                data SDs around subject A's code
Every volume is a NIfTI file with the training affine and header codes, in the training data's intensity scale
(as `medgen synth` writes). traverse.json lists the walks, subjects.png / classes.png / dims.png show them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.console import log
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.models.sampling import decode, encode
from medgen.outputs import check_output_dir, staged_dir
from medgen.pipelines.autoencoders import (
    checkpoint_data,
    data_label,
    load_autoencoder,
    trained_classes,
    unseen,
    volume_writer,
)
from medgen.pipelines.site import write_page_safely
from medgen.viz import save_strip

MAX_CODED = 400  # scans encoded to measure each latent dimension's spread


def _pick(ds: ImageSet, subject: str | None, cls: int, pool: Sequence[int], what: str) -> int:
    """The first scan of `subject`, else the first scan of class `cls` in `pool` (then in all the data)."""
    if subject is not None:
        hits = [i for i, s in enumerate(ds.subjects) if s == subject]
        if not hits:
            raise MedgenError(f"--{what}: no subject {subject!r} in the data (e.g. {', '.join(ds.subjects[:3])})")
        return hits[0]
    for cand in (pool, range(len(ds))):
        hits = [i for i in cand if int(ds.labels[i]) == cls]
        if hits:
            return hits[0]
    return 0


def _onehot(k: int, n: int) -> torch.Tensor:
    v = torch.zeros(n)
    v[k] = 1.0
    return v


def traverse(checkpoint: str | Path, data: str | Path | ImageSet | None, out: str | Path, *,
             subject_a: str | None = None, subject_b: str | None = None, steps: int = 7, dims: int = 6,
             spread: float = 2.5, batch_size: int = 8, device: str = "cpu", overwrite: bool = False) -> dict[str, Any]:
    """Write the three latent walks of a vae or alpha-gan checkpoint.

    Args:
        checkpoint: a vae or alpha-gan checkpoint or run folder.
        data: the real volumes (dataset spec or ImageSet); None: the data the run trained on.
        out: output folder (refused when it exists, unless overwrite).
        subject_a, subject_b: the two subjects (default: the first held-out subject of the first and of the last
            trained class; any subject when none is held out).
        steps: volumes per walk (per class pair in the class walk), endpoints included.
        dims: how many latent dimensions to walk along.
        spread: the dimension walks span +-spread SDs of the data's codes.
        batch_size: volumes per forward pass.
        device: where the model runs.
        overwrite: replace an existing output folder.
    Returns:
        The description written to traverse.json.
    """
    if steps < 2:
        raise MedgenError(f"--steps must be at least 2, got {steps}")
    if dims < 0 or not spread > 0:
        raise MedgenError("--dims must be >= 0 and --spread > 0")
    inputs = [checkpoint, None if isinstance(data, ImageSet) else data]
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    model, meta = load_autoencoder(checkpoint)
    names = meta["class_names"]
    k = len(names)
    path_classes = [names.index(c) for c in trained_classes(meta)]
    ds = checkpoint_data(meta, data)
    held, _ = unseen(ds, meta) if (meta.get("extra") or {}).get("subjects") is not None else ([], [])
    a = _pick(ds, subject_a, path_classes[0], held, "subject-a")
    b = _pick(ds, subject_b, k - 1 if path_classes[-1] == int(ds.labels[a]) else path_classes[-1],
              [i for i in held if i != a], "subject-b")
    if a == b and subject_b is None:  # one class only: the next scan of another subject
        b = next((i for i in range(len(ds)) if ds.subjects[i] != ds.subjects[a]), a)
    if a == b:
        raise MedgenError(f"subjects A and B are the same scan ({ds.subjects[a]}); name two with --subject-a/--subject-b")
    ya, yb = int(ds.labels[a]), int(ds.labels[b])
    log(f"encoding subjects {ds.subjects[a]} ({names[ya]}) and {ds.subjects[b]} ({names[yb]})")
    z = encode(model, ds.images[[a, b]], [ya, yb], batch_size=batch_size, device=device)  # [2, L]
    ts = torch.linspace(0.0, 1.0, steps)

    def run(zs: torch.Tensor, conds: torch.Tensor) -> torch.Tensor:
        return decode(model, zs, conds, batch_size=batch_size, device=device)[:, 0]  # [T, X, Y, Z]

    # subjects: code and condition move together from A to B
    zs = torch.stack([(1 - t) * z[0] + t * z[1] for t in ts])
    conds = torch.stack([(1 - t) * _onehot(ya, k) + t * _onehot(yb, k) for t in ts])
    subj_vols = run(zs, conds)
    subj_labels = [f"t={float(t):.2f}" for t in ts]

    # classes: A's code fixed, the condition along the trained classes in order
    class_conds, class_labels = [], []
    if len(path_classes) >= 2:
        for c0, c1 in zip(path_classes[:-1], path_classes[1:], strict=True):
            for j, t in enumerate(ts):
                if j == 0 and class_conds:
                    continue  # the pair's start is the previous pair's end
                class_conds.append((1 - t) * _onehot(c0, k) + t * _onehot(c1, k))
                class_labels.append(names[c0] if t == 0 else names[c1] if t == 1 else
                                    f"{names[c0]}>{names[c1]} {float(t):.2f}")
    class_vols = run(z[:1].repeat(len(class_conds), 1), torch.stack(class_conds)) if class_conds else None

    # dimensions: the most used ones, around A's code
    coded_idx = list(range(min(len(ds), MAX_CODED)))
    codes = encode(model, ds.images[coded_idx], ds.labels[coded_idx], batch_size=batch_size, device=device)
    sd = codes.std(dim=0) if len(coded_idx) > 1 else torch.ones(codes.shape[1])
    order = torch.argsort(sd, descending=True)[: min(dims, codes.shape[1])].tolist()
    offsets = torch.linspace(-spread, spread, steps)
    dim_vols = []
    for d in order:
        zs = z[0].repeat(steps, 1)
        zs[:, d] = codes[:, d].mean() + offsets * sd[d]
        dim_vols.append(run(zs, torch.stack([_onehot(ya, k)] * steps)))

    info: dict[str, Any] = {
        "checkpoint": str(meta["path"]), "model": meta["model"], "checkpoint_step": meta["step"],
        "data": data_label(meta, data),
        "subject_a": {"subject": ds.subjects[a], "class": names[ya], "held_out": a in held},
        "subject_b": {"subject": ds.subjects[b], "class": names[yb], "held_out": b in held},
        "steps": steps, "latent_dim": int(codes.shape[1]),
        "classes": [names[c] for c in path_classes] if class_conds else [],
        "class_steps": class_labels,
        "dims": [{"dim": d, "data_mean": round(float(codes[:, d].mean()), 4), "data_sd": round(float(sd[d]), 4)}
                 for d in order],
        "spread_sd": spread, "scale": "training data intensity scale; training affine",
    }
    with staged_dir(out, overwrite=overwrite, inputs=inputs, command="traverse") as tmp:
        write = volume_writer(meta)
        files: dict[str, list[str]] = {"subjects": [], "classes": [], "dims": []}
        for j, vol in enumerate(subj_vols):
            rel = f"subjects/step-{j:02d}_t{float(ts[j]):.2f}.nii.gz"
            write(tmp / rel, vol)
            files["subjects"].append(rel)
        for tag, x in (("A", ds.images[a, 0]), ("B", ds.images[b, 0])):
            write(tmp / f"subjects/real-{tag}_{ds.subjects[a if tag == 'A' else b]}.nii.gz", x)
        row = [ds.images[a, 0].numpy(), *subj_vols.numpy(), ds.images[b, 0].numpy()]
        cols = [f"A real {names[ya]}", *subj_labels, f"B real {names[yb]}"]
        frame = [[True] + [False] * steps + [True]]
        for view, tag in ((0, ""), (1, "-coronal")):
            save_strip([(f"{ds.subjects[a]} > {ds.subjects[b]}", row, cols)], tmp / f"subjects{tag}.png",
                       title=f"{meta['model']}: from subject A to subject B", view=view, highlight=frame)
        if class_vols is not None:
            for j, vol in enumerate(class_vols):
                rel = f"classes/step-{j:02d}_{class_labels[j].replace('>', '-to-').replace(' ', '_')}.nii.gz"
                write(tmp / rel, vol)
                files["classes"].append(rel)
            base = class_vols[0]
            strip = [(f"{ds.subjects[a]} code", list(class_vols.numpy()), class_labels),
                     ("change x4", [np.clip(4 * (v - base).numpy(), -1, 1) for v in class_vols], class_labels)]
            for view, tag in ((0, ""), (1, "-coronal")):
                save_strip(strip, tmp / f"classes{tag}.png", view=view,
                           title=f"{meta['model']}: class condition {' > '.join(info['classes'])} at a fixed code")
        strip = []
        for d, vols in zip(order, dim_vols, strict=True):
            for j, vol in enumerate(vols):
                rel = f"dims/dim-{d:03d}/step-{j:02d}_{float(offsets[j]):+.2f}sd.nii.gz"
                write(tmp / rel, vol)
                files["dims"].append(rel)
            strip.append((f"dim {d}", list(vols.numpy()), [f"{float(o):+.1f} SD" for o in offsets]))
        if strip:
            save_strip(strip, tmp / "dims.png", title=f"{meta['model']}: one latent dimension at a time")
        info["files"] = files
        (tmp / "traverse.json").write_text(json.dumps(info, indent=2) + "\n")
        write_page_safely(tmp, "traverse", name=Path(out).name)
    return info
