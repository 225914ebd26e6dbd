"""The run folder of a training run: config, log, sample montages and checkpoints (written by rank 0 only).

    config.yaml   the resolved config
    log.csv       iteration, seconds, one column per loss
    loss.png      the log's curves, redrawn as training goes
    samples/      montages iter_NNNNNN.png (EMA samples, fixed seed)
    last.pt       latest checkpoint (every train.checkpoint_every iterations and at the end; --resume reads it)
    final.pt      the checkpoint at the end of the run (what synth/evaluate use for a run folder)
    best.pt       with validation: the checkpoint with the best select_metric
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
import yaml

from medgen.checkpoint import BEST_NAME, FINAL_NAME, LAST_NAME, save_checkpoint
from medgen.outputs import (
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    clear_output_dir,
    make_output_dir,
)
from medgen.training import distributed


class RunDir:
    """The files of one run. Every write is a no-op on ranks other than 0 (`main` False).

    Args:
        path: the run folder.
        main: whether this process owns the folder (rank 0).
    """

    def __init__(self, path: str | Path, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        self.last, self.final, self.best = self.path / LAST_NAME, self.path / FINAL_NAME, self.path / BEST_NAME
        self.log_path = self.path / "log.csv"
        self.loss_curve_path = self.path / "loss.png"
        self.log_fields: list[str] = []
        self.good_checkpoint: Path | None = None  # the newest checkpoint known to hold finite weights

    def check(self, *, overwrite: bool, resume: bool) -> None:
        """Refuse a non-empty folder unless resume or overwrite (before anything is built)."""
        if self.main:
            check_output_dir(self.path, overwrite=overwrite, resume=resume)

    def open(self, *, overwrite: bool, resume: bool) -> bool:
        """Create the folder with medgen's marker (emptied first with overwrite: only a folder medgen wrote,
        check_output_dir refused any other); return whether the run resumes from last.pt."""
        resuming = resume and self.last.is_file()
        if self.main and overwrite and not resuming:
            clear_output_dir(self.path)
        if self.main:
            make_output_dir(self.path, "train")
        distributed.barrier()
        if resuming:
            self.log_fields = _log_fields(self.log_path)
            self.good_checkpoint = self.last
        return resuming

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(_yaml_safe(config), sort_keys=False))

    def read_log(self, upto: int) -> list[dict[str, Any]]:
        """The logged rows up to iteration `upto` (later rows are dropped from the file)."""
        return _read_log(self.log_path, upto)

    def append_log(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        if self.main:
            _append_log(self.log_path, row, self.log_fields, history)

    def montage_path(self, iteration: int) -> Path:
        return self.path / "samples" / f"iter_{iteration:06d}.png"

    def save_last(self, checkpoint: dict[str, Any]) -> None:
        if self.main:
            save_checkpoint(self.last, checkpoint)
            self.good_checkpoint = self.last

    def save_best(self, checkpoint: dict[str, Any]) -> None:
        if self.main:
            save_checkpoint(self.best, checkpoint)

    def finalise(self, checkpoint: Any) -> None:
        """last.pt (`checkpoint()` builds it when none was written) copied to final.pt; ranks wait for it."""
        if self.main:
            if not self.last.is_file():
                save_checkpoint(self.last, checkpoint())
            atomic_write_bytes(self.final, self.last.read_bytes())  # final.pt: a copy of the last checkpoint
        distributed.barrier()  # other ranks return only once rank 0's checkpoint is in place


def _yaml_safe(obj: Any) -> Any:
    """Tensors in a config dict become lists so yaml.safe_dump can write them."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _yaml_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_safe(v) for v in obj]
    return obj


def _log_fields(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f).fieldnames or [])


def _append_log(path: Path, row: dict[str, Any], fields: list[str], history: list[dict[str, Any]]) -> None:
    """Append one row to log.csv; when the row brings new columns, rewrite the file from `history`.

    Args:
        path: the CSV file.
        row: the new row (already appended to history).
        fields: the current header (extended in place).
        history: every row so far.
    """
    if not fields or any(k not in fields for k in row):
        fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(path, buf.getvalue())
        return
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=fields).writerow(row)


def _read_log(path: Path, upto: int | None) -> list[dict[str, Any]]:
    """Rows of log.csv as dicts of floats (iteration as int); with `upto`, rows past it are dropped
    and the file is rewritten (a resumed run repeats the iterations after its last checkpoint)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [{k: (int(v) if k == "iteration" else float(v)) for k, v in r.items() if v not in ("", None)}
                for r in reader]
    if upto is not None:
        rows = [r for r in rows if r["iteration"] <= upto]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
    return rows
