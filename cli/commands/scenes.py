"""`medgen scenes`: render a seeded procedural multi-object scene dataset."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from medgen.cli.common import OutOpt, OverwriteOpt, echo_json, handle_errors

# medgen.data.scenes.SPLITS, spelled out so that --help needs no numpy (a test checks they agree)
SceneSplit = Literal["train", "test", "same-colour", "more-objects"]


def register(app: typer.Typer) -> None:
    app.command("scenes")(scenes)


@handle_errors
def scenes(
    out: OutOpt,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed; scene i is the same for any --n.")] = 0,
    split: Annotated[SceneSplit, typer.Option("--split", help="Which split's distribution to draw from.")] = "train",
    frames: Annotated[int, typer.Option("--frames", min=1, help="Frames per scene (a camera orbit).")] = 1,
    size: Annotated[int, typer.Option("--size", help="Image size in pixels.")] = 128,
    overwrite: OverwriteOpt = False,
) -> None:
    """Render 128x128 RGB room scenes with 2-5 objects, instance masks and a JSON/CSV index (prints a summary)."""
    from medgen.data.scenes import write_scenes

    echo_json(write_scenes(out, n=n, seed=seed, split=split, frames=frames, size=size, overwrite=overwrite))
