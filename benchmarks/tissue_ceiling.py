"""How well any grouping of voxels by intensity can match the phantom's tissue labels (a bound, not a baseline).

Uses the labels: per-tissue intensity Gaussians and the population tissue-frequency map are fitted on the
training subjects, then each held-out voxel goes to its most likely tissue by intensity alone, and by
intensity times the frequency prior. Hungarian-matched Dice as `medgen segment` reports it.

    python benchmarks/tissue_ceiling.py [--size 32] [--held-out 60]
"""

from __future__ import annotations

import argparse
import json

import torch

from medgen.config import load_config
from medgen.data.sources import load_config_data
from medgen.evaluation.segmentation import tissue_dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=60, help="first N subjects scored, the rest fitted")
    args = parser.parse_args()
    ds = load_config_data(load_config("tissue"), size=args.size)
    n = args.held_out
    tissue = ds.extras["tissue"].reshape(len(ds), *ds.images.shape[2:]).long()  # [N, *S]
    img = ds.images[:, 0]
    fit_t, fit_x = tissue[n:], img[n:]
    classes = range(int(tissue.max()) + 1)
    mean = torch.stack([fit_x[fit_t == c].mean() for c in classes])
    sd = torch.stack([fit_x[fit_t == c].std() for c in classes])
    prior = torch.nn.functional.one_hot(fit_t, len(mean)).float().mean(0).clamp_min(1e-3)  # [*S, C]
    loglik = -0.5 * ((img[:n, ..., None] - mean) / sd) ** 2 - sd.log()  # [n, *S, C]
    result = {}
    for name, score in (("intensity", loglik), ("intensity_and_prior", loglik + prior.log()),
                        ("prior_only", prior.log().expand_as(loglik))):
        dice = tissue_dice(score.argmax(-1), tissue[:n], len(mean))["dice"]
        result[name] = {k: round(float(v), 3) for k, v in dice.items()}
    print(json.dumps({"size": args.size, "held_out": n, "fitted": len(ds) - n, "dice": result}, indent=2))


if __name__ == "__main__":
    main()
