"""Pictures: montage views and orientation, real reference rows, loss curves, effects and score charts."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from medgen.viz import (
    plot_effects,
    plot_fidelity,
    plot_loss_curves,
    ras_views,
    save_loss_curves,
    save_montage,
)


def test_ras_views_put_left_left_anterior_and_superior_up():
    vol = np.zeros((16, 16, 16))
    vol[:4] = 1.0  # low x: the subject's left
    axial, coronal, sagittal = ras_views(vol)
    assert axial[:, :4].mean() == 1.0 and axial[:, -4:].mean() == 0.0
    assert coronal[:, :4].mean() == 1.0
    vol = np.zeros((16, 16, 16))
    vol[:, -4:] = 1.0  # high y: anterior
    axial, _, sagittal = ras_views(vol)
    assert axial[:4].mean() == 1.0 and sagittal[:, -4:].mean() == 1.0  # anterior up (axial), right (sagittal)
    vol = np.zeros((16, 16, 16))
    vol[:, :, -4:] = 1.0  # high z: superior
    _, coronal, sagittal = ras_views(vol)
    assert coronal[:4].mean() == 1.0 and sagittal[:4].mean() == 1.0


def test_montage_with_reference_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    synth = torch.rand(4, 1, 16, 16, 16, generator=g) * 2 - 1
    save_montage(synth, [0, 0, 1, 1], ["CN", "AD"], tmp_path / "a.png", title="t")
    save_montage(synth, [0, 0, 1, 1], ["CN", "AD"], tmp_path / "b.png", title="t",
                 reference=synth[:2], reference_labels=[0, 1])
    ha, hb = Image.open(tmp_path / "a.png").size[1], Image.open(tmp_path / "b.png").size[1]
    assert hb > ha * 1.3  # two more rows
    save_montage(torch.rand(3, 1, 8, 8), [0, 1, 1], ["CN", "AD"], tmp_path / "c.png",
                 reference=torch.rand(1, 1, 8, 8), reference_labels=[0])  # 2D grid
    assert (tmp_path / "c.png").stat().st_size > 0


def test_loss_curves_and_charts(tmp_path):
    rows = [{"iteration": i, "seconds": 0.1 * i, "loss_g": 1.0 / i, "loss_d": float(np.sin(i))} for i in range(1, 40)]
    assert plot_loss_curves(rows, "run").startswith(b"\x89PNG")
    save_loss_curves(rows, tmp_path / "loss.png")
    save_loss_curves([], tmp_path / "none.png")
    assert (tmp_path / "loss.png").is_file() and not (tmp_path / "none.png").exists()
    eff = {"AD vs CN": {"ventricle_csf_ml": {"fraction": 0.6, "fraction_low": 0.2, "fraction_high": 1.1,
                                             "reference": {"fraction": 1.0, "fraction_low": 0.5,
                                                           "fraction_high": 1.6}}}}
    assert plot_effects(eff).startswith(b"\x89PNG")
    assert plot_fidelity([("auc", {"CN": 0.9, "overall": 0.8}, {"CN": 0.5, "overall": 0.5})]).startswith(b"\x89PNG")
