"""`medgen phantom`: write the built-in CN / MCI / AD phantom cohort (NIfTI + datalist + table)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from medgen.cli.common import (
    ConfigOpt,
    OutOpt,
    OverwriteOpt,
    config_default,
    echo_json,
    handle_errors,
    load_config,
)


def register(app: typer.Typer) -> None:
    app.command("phantom")(phantom)


@handle_errors
def phantom(
    out: OutOpt,
    n: Annotated[
        int | None, typer.Option("--n", help="Number of subjects, balanced CN/MCI/AD.",
                                 show_default=config_default("phantom.n"))
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", min=0, max=2**32 - 1, help="Cohort seed (overrides the config).",
                                 show_default=config_default("phantom.seed"))
    ] = None,
    effect_scale: Annotated[
        float | None, typer.Option("--effect-scale", help="Multiplies the class mean effects (0: no differences).",
                                   show_default=config_default("phantom.effect_scale"))
    ] = None,
    size: Annotated[
        int | None, typer.Option("--size", help="Voxels per side; 64 gives 3 mm voxels.",
                                 show_default=config_default("phantom.size"))
    ] = None,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Generate the phantom dementia cohort from the MNI152 template; prints a JSON summary."""
    from medgen.config import override
    from medgen.data.phantom import generate_cohort
    from medgen.outputs import check_output_dir

    cfg = load_config(config)
    # the cohort seed: --seed, else the phantom section's seed
    override(cfg, phantom__n=n, phantom__seed=seed, phantom__effect_scale=effect_scale, phantom__size=size)
    pc = cfg.phantom
    check_output_dir(out, overwrite=overwrite, inputs=[config])
    start = time.perf_counter()
    path = generate_cohort(
        out, n=pc.n, seed=pc.seed, effect_scale=pc.effect_scale, size=pc.size, overwrite=overwrite
    )
    seconds = time.perf_counter() - start
    meta = json.loads((path / "phantom.json").read_text())
    echo_json(
        {
            "out": str(path),
            "subjects": pc.n,
            "subjects_per_class": meta["subjects_per_class"],
            "seed": pc.seed,
            "effect_scale": pc.effect_scale,
            "size": pc.size,
            "spacing_mm": meta["spacing_mm"],
            "seconds": round(seconds, 2),
        }
    )
