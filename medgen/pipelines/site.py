"""`medgen report`: a static HTML explorer of run folders (no network; opens from file://).

Every run folder gets a page, RUN/index.html, that shows what the folder holds: the resolved config, loss
curves (log.csv), sample montages over iterations (samples/*.png) and validation metrics for a training run;
the verdict, results table, plots and per-fold details for cv-evaluate; panels and scores beside their
baselines for segment; the per-class metrics for evaluate-synth. `build_site` collects many runs into one
self-contained folder: an index of runs (sortable by any column) and a copy of each run's page with the files
it shows.

A page is rendered from a list of sections, each a list of blocks (table, images, svg, list, text, pre, links);
`collect_run` builds them per kind and the Jinja2 templates (package data, medgen/pipelines/templates) draw
them. Image and link paths are relative to the run folder, so the same page works in place and in the site.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch
import yaml

import medgen
from medgen.checkpoint import FINAL_NAME, LAST_NAME
from medgen.console import log
from medgen.errors import MedgenError
from medgen.evaluation.report import table_rows
from medgen.outputs import MARKER, atomic_write_text, staged_dir
from medgen.viz import plot_curves

PAGE = "index.html"
KINDS = ("train", "cv-evaluate", "segment", "evaluate-synth", "traverse", "anomaly", "denoise")
_TOOLKIT = {"traverse": "traverse.json", "anomaly": "metrics.json", "denoise": "metrics.json"}  # kind -> result file
MAX_MONTAGES = 12  # montages shown per training run (evenly spaced, the last always included)
MAX_PANELS = 16
_SKIP_COLUMNS = ("iteration", "seconds")

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("medgen.pipelines", "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
                          undefined=jinja2.StrictUndefined)


@dataclass
class Run:
    """What a page shows about one run folder.

    Attributes:
        path: the run folder (or the evaluate-synth JSON file).
        kind: one of KINDS.
        model: model name ("" when unknown).
        data: the data the run read.
        date: last modification (UTC, "YYYY-MM-DD HH:MM").
        figures: key figures for the index, (label, text, sort value).
        sections: (title, blocks) pairs; a block is a dict with a "type".
        assets: files the page links to, relative to the run folder (copied into a site).
    """

    path: Path
    kind: str
    model: str = ""
    data: str = ""
    date: str = ""
    figures: list[tuple[str, str, float | None]] = field(default_factory=list)
    sections: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    assets: list[str] = field(default_factory=list)
    headline: int = 0  # the figure the index's headline column shows
    label: str = ""  # the run's name when the folder's own is not it (a page written in a staging folder)
    thumb: str = ""  # an asset the index shows as the run's preview (the last montage, a plot, a panel)

    @property
    def name(self) -> str:
        return self.label or (self.path.stem if self.path.is_file() else self.path.name)

    @property
    def root(self) -> Path:
        """The folder the page lives in and its asset paths are relative to."""
        return self.path.parent if self.path.is_file() else self.path


# ---------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _marker_command(folder: Path) -> str | None:
    info = _read_json(folder / MARKER)
    return info.get("command") if isinstance(info, dict) else None


def _is_synth_metrics(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("classes"), dict) and "checkpoint" in obj and any(
        isinstance(v, dict) and "mmd" in v for v in obj["classes"].values())


def _synth_json(folder: Path) -> Path | None:
    """The evaluate-synth result in a folder (metrics.json, quality.json, or any JSON holding one)."""
    names = ["metrics.json", "quality.json", "evaluate_synth.json", "synthesis.json"]
    files = [folder / n for n in names] + sorted(p for p in folder.glob("*.json") if p.name not in names)
    return next((p for p in files if p.is_file() and p.stat().st_size < 5_000_000
                 and _is_synth_metrics(_read_json(p))), None)


def detect_kind(path: str | os.PathLike) -> str | None:
    """The kind of run a folder (or an evaluate-synth JSON file) holds, or None."""
    p = Path(path)
    if p.is_file():
        return "evaluate-synth" if p.suffix == ".json" and _is_synth_metrics(_read_json(p)) else None
    if not p.is_dir():
        return None
    command = _marker_command(p)
    if command == "cv-evaluate" or ((p / "run.json").is_file() and (
            (p / "results.json").is_file() or any(p.glob("fold_*/fold.json")) or (p / "splits.json").is_file())):
        return "cv-evaluate"
    if command == "segment" or ((p / "metrics.json").is_file() and "num_decoders" in (
            _read_json(p / "metrics.json") or {})):
        return "segment"
    if command == "train" or ((p / "log.csv").is_file() and (p / "config.yaml").is_file()):
        return "train"
    if command in _TOOLKIT:
        return command
    if command == "evaluate-synth" or _synth_json(p) is not None:
        return "evaluate-synth"
    return None


def _mtime(paths: Iterable[Path]) -> str:
    times = [p.stat().st_mtime for p in paths if p.exists()]
    if not times:
        return ""
    return dt.datetime.fromtimestamp(max(times), tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def read_log(path: Path) -> list[dict[str, float]]:
    """log.csv as rows of floats (empty cells left out); [] when absent or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = []
            for r in csv.DictReader(f):
                row = {}
                for k, v in r.items():
                    try:
                        row[k] = float(v)
                    except (TypeError, ValueError):
                        continue
                rows.append(row)
            return rows
    except OSError:
        return []


def _columns(rows: Sequence[dict[str, float]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k not in _SKIP_COLUMNS]
    return cols


def fmt(v: Any, digits: int = 4) -> str:
    """A value as table text: floats to `digits` significant digits, nan as n/a, lists joined."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x, digits)}" for k, x in v.items())
    return str(v)


def _pct(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) or math.isnan(v) else f"{100 * v:.1f}%"


def _sortval(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "", cls: str = "") -> dict[str, Any]:
    """A table block; cells are values (formatted with fmt) or already formatted strings."""
    return {"type": "table", "header": list(header), "caption": caption, "cls": cls,
            "rows": [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]}


def images(items: Sequence[tuple[str, str]], cls: str = "") -> dict[str, Any]:
    return {"type": "images", "items": [{"src": s, "caption": c} for s, c in items], "cls": cls}


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat_scalars(v, key + ".")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
        elif isinstance(v, list) and len(v) <= 16 and all(isinstance(x, (int, float)) for x in v):
            out.append((key, v))
    return out


def _rel(run_root: Path, p: Path) -> str:
    return p.relative_to(run_root).as_posix()


def _checkpoint_info(folder: Path) -> dict[str, Any]:
    """model, kwargs, class names and step of a run's checkpoint (memory-mapped: the weights are not read)."""
    for name in (FINAL_NAME, LAST_NAME):
        p = folder / name
        if p.is_file():
            try:
                ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # an unreadable checkpoint only costs the page its model details
                continue
            if isinstance(ckpt, dict):
                return {k: ckpt.get(k) for k in ("model", "kwargs", "step_kwargs", "class_names", "step")}
    return {}


def _config_text(folder: Path) -> tuple[str, dict[str, Any]]:
    p = folder / "config.yaml"
    if not p.is_file():
        return "", {}
    text = p.read_text(encoding="utf-8")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        cfg = None
    return text, cfg if isinstance(cfg, dict) else {}


def _data_of(cfg: dict[str, Any]) -> str:
    data = cfg.get("data") or {}
    if isinstance(data, dict) and data.get("path"):
        return str(data["path"])
    ph = cfg.get("phantom") or {}
    if isinstance(ph, dict) and ph:
        return "phantom " + ", ".join(f"{k} {ph[k]}" for k in ("n", "size", "seed") if k in ph)
    return "phantom" if cfg else ""


def _montages(run_root: Path, folder: Path, limit: int = MAX_MONTAGES) -> list[tuple[str, str]]:
    files = sorted((folder / "samples").glob("*.png"))
    if len(files) > limit:
        idx = sorted({round(i * (len(files) - 1) / (limit - 1)) for i in range(limit)})
        files = [files[i] for i in idx]
    out = []
    for f in files:
        m = re.search(r"(\d+)$", f.stem)
        out.append((_rel(run_root, f), f"iteration {int(m.group(1))}" if m else f.stem))
    return out


def training_blocks(run_root: Path, folder: Path, title: str = "", note_no_validation: bool = False
                    ) -> list[dict[str, Any]]:
    """Loss curves and validation metrics of one `fit` run folder (a train run or a cv generator)."""
    rows = read_log(folder / "log.csv")
    cols = _columns(rows)
    losses = [c for c in cols if not c.startswith("val_")]
    vals = [c for c in cols if c.startswith("val_")]
    blocks: list[dict[str, Any]] = []
    if losses:
        blocks.append({"type": "svg", "svg": plot_curves(rows, losses, title=f"{title} losses".strip()),
                       "caption": f"losses per iteration ({len(rows)} logged rows of log.csv)"})
    else:
        blocks.append({"type": "text", "text": "no losses were logged (log.csv is missing or empty)"})
    if vals:
        val_rows = [r for r in rows if any(c in r for c in vals)]
        blocks.append({"type": "svg", "svg": plot_curves(val_rows, vals, title=f"{title} validation".strip()),
                       "caption": "validation metrics"})
        blocks.append(table(["iteration", *[c[4:] for c in vals]],
                            [[int(r.get("iteration", 0)), *[r.get(c) for c in vals]] for r in val_rows[-20:]],
                            caption="validation metrics (last 20 evaluations)", cls="val-metrics"))
    elif note_no_validation:
        blocks.append({"type": "text", "text": "no validation metrics were logged (log.csv has no val_ columns)"})
    return blocks


# ---------------------------------------------------------------------------------------------- kinds


def _train_run(path: Path) -> Run:
    text, cfg = _config_text(path)
    info = _checkpoint_info(path)
    model = str(info.get("model") or "")
    rows = read_log(path / "log.csv")
    run = Run(path, "train", model=model, data=_data_of(cfg),
              date=_mtime([path / "log.csv", path / FINAL_NAME, path / "config.yaml"]))
    last = rows[-1] if rows else {}
    train_cfg = cfg.get("train") or {}
    its = int(last.get("iteration", 0)) if last else 0
    run.figures.append(("iterations", f"{its}" + (f" / {train_cfg['iterations']}" if train_cfg.get("iterations") else ""),
                        float(its)))
    if "seconds" in last:
        run.figures.append(("time", f"{last['seconds']:.1f} s", last["seconds"]))
    shown = [c for c in _columns(rows) if c in last][:4]
    if shown:
        run.headline = len(run.figures)
    for c in shown:
        run.figures.append((f"last {c}", fmt(last[c]), _sortval(last[c])))
    # Settings: what the reference explorer puts at the top of each experiment (latent size, KL weights, ...).
    settings: list[tuple[str, Any]] = [("model", model or "unknown")]
    kwargs = info.get("kwargs") or (cfg.get("models") or {}).get(model) or {}
    settings += [(f"model.{k}", v) for k, v in kwargs.items()]
    step = (cfg.get("steps") or {}).get(model) or info.get("step_kwargs") or {}
    settings += [(f"step.{k}", v) for k, v in step.items()]
    settings += [(f"train.{k}", v) for k, v in train_cfg.items()
                 if k in ("iterations", "batch_size", "lr", "ema_decay", "precision", "max_seconds", "classes",
                          "holdout") and train_cfg.get(k) not in (None, [], 0.0)]
    if info.get("class_names"):
        settings.append(("classes", ", ".join(map(str, info["class_names"]))))
    settings += [("seed", cfg.get("seed")), ("data", run.data)]
    run.sections.append(("Settings", [table(["setting", "value"], settings, cls="settings")]))
    run.sections.append(("Loss curves and validation", training_blocks(path, path, note_no_validation=True)))
    montages = _montages(path, path)
    run.sections.append(("Samples over iterations", [images(montages, cls="montages")] if montages else
                         [{"type": "text", "text": "no sample montages (train.sample_every is 0, or the model "
                                                   "does not sample)"}]))
    run.assets += [m[0] for m in montages]
    run.thumb = montages[-1][0] if montages else ""
    files = ["config.yaml", "log.csv", "split.json"]
    for p in sorted(path.glob("*.json")):  # `medgen evaluate-synth --json RUN/x.json` results
        res = _read_json(p) if p.stat().st_size < 5_000_000 else None
        if _is_synth_metrics(res):
            run.sections.append((f"Synthesis quality ({p.name})", synth_blocks(res)))
            files.append(p.name)
    _files_and_config(run, path, files, text)
    return run


def _files_and_config(run: Run, folder: Path, names: Sequence[str], config_text: str) -> None:
    files = [n for n in names if (folder / n).is_file()]
    if files:
        run.sections.append(("Files", [{"type": "links", "items": [(n, n) for n in files]}]))
        run.assets += files
    if config_text:
        run.sections.append(("Resolved config", [{"type": "pre", "text": config_text}]))


def _verdict_from_markdown(path: Path) -> list[str]:
    """The bullet lines of the '## Verdict' section of results.md."""
    if not path.is_file():
        return []
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line.strip().lower() == "## verdict"
            continue
        if inside and line.strip():
            lines.append(line.strip().removeprefix("- ").strip())
    return lines


def _markdown_table(path: Path, heading: str = "## Arms") -> tuple[list[str], list[list[str]]]:
    """The first table under `heading` in a markdown file (header, rows); empty when there is none."""
    if not path.is_file():
        return [], []
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            if inside and lines:
                break
            inside = line.strip() == heading
        elif inside and line.startswith("|"):
            lines.append([c.strip() for c in line.strip().strip("|").split("|")])
    rows = [r for r in lines if not all(set(c) <= set("-: ") for c in r)]
    return (rows[0], rows[1:]) if rows else ([], [])


def _cv_run(path: Path) -> Run:
    text, cfg = _config_text(path)
    meta = _read_json(path / "run.json") or {}
    results = _read_json(path / "results.json")
    models = ", ".join((cfg.get("cv") or {}).get("models") or [])
    classifier = (cfg.get("classifier") or {}).get("name")
    model = f"{models} → {classifier}" if classifier else models
    run = Run(path, "cv-evaluate", model=model, data=str(meta.get("data", _data_of(cfg))),
              date=_mtime([path / "results.json", path / "run.json"]))
    folds = int(meta.get("folds") or (cfg.get("cv") or {}).get("folds") or 0)
    done = sorted(path.glob("fold_*/fold.json"), key=lambda p: int(p.parent.name.split("_")[-1]))
    run.figures.append(("folds", f"{len(done)}/{folds}", float(len(done))))
    if isinstance(results, dict):
        real = next((a for a in results.get("arms", []) if a.get("arm") == results.get("reference")), None)
        if real:
            run.headline = len(run.figures)
            v = real["test_balanced_accuracy"]["mean"]
            run.figures.append(("real-only test bal. acc", _pct(v), _sortval(v)))
        gens = results.get("generators") or {}
        if gens:
            name, g = max(gens.items(), key=lambda kv: kv[1].get("gain", -math.inf))
            if isinstance(g.get("gain"), (int, float)):
                run.figures.append(("best gain", f"{name} {100 * g['gain']:+.1f} pts (Holm p {fmt(g.get('p_holm'), 3)})",
                                    _sortval(g["gain"])))
        verdict = results.get("verdict") or _verdict_from_markdown(path / "results.md")
        run.sections.append(("Verdict", [{"type": "list", "items": verdict, "cls": "verdict"}] if verdict else
                             [{"type": "text", "text": "results.md has no verdict"}]))
        try:
            header, rows = table_rows(results)
        except (KeyError, TypeError, ValueError):  # results.json of an older medgen: its results.md table
            header, rows = _markdown_table(path / "results.md")
        run.sections.append(("Results", [table(header, rows, cls="results",
                                               caption="percent, mean ± SD over folds (as in results.md)")]))
        g_rows = []
        for n, g in gens.items():
            try:
                g_rows.append([n, g.get("best_arm_label", ""),
                               f"{100 * g['gain']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]",
                               fmt(g.get("p_holm"), 3), _pct(g.get("oracle_share")),
                               _pct((g.get("tstr_test_balanced_accuracy") or {}).get("mean")),
                               _pct(g.get("class_agreement_mean"))])
            except (KeyError, TypeError):
                continue
        if g_rows:
            run.sections.append(("Generators", [table(["generator", "best arm (validation)", "gain [95% CI] (pts)",
                                                       "Holm p", "oracle share", "TSTR bal. acc",
                                                       "class agreement"], g_rows, cls="generators")]))
        if results.get("learning_curve"):
            run.sections[-1][1].append(table(["training subjects", "test bal. acc"],
                                             [[f"{c['subjects']:.0f}", _pct(c["test_balanced_accuracy"])]
                                              for c in results["learning_curve"]], caption="learning curve (real only)"))
    else:
        verdict = _verdict_from_markdown(path / "results.md")
        if verdict:
            run.sections.append(("Verdict", [{"type": "list", "items": verdict, "cls": "verdict"}]))
        run.sections.append(("Results", [{"type": "text", "text": f"not merged yet: {len(done)} of {folds} folds "
                                          "finished (`medgen cv-evaluate --merge` once all are done)"}]))
    plots = [(n, t) for n, t in (("accuracy.png", "accuracy per arm"), ("confusion.png", "confusion matrices"))
             if (path / n).is_file()]
    if plots:
        run.sections.append(("Plots", [images(plots, cls="plots")]))
        run.assets += [p[0] for p in plots]
        run.thumb = plots[0][0]
    notes = meta.get("notes") or (results.get("notes") if isinstance(results, dict) else None)
    if notes:
        run.sections.append(("Notes", [{"type": "list", "items": list(notes), "cls": ""}]))
    for f in done:
        run.sections.append((f"Fold {f.parent.name.split('_')[-1]}", _fold_blocks(run, path, f.parent)))
    _files_and_config(run, path, ["results.md", "results.csv", "results.json", "splits.json", "run.json",
                                  "config.yaml"], text)
    return run


def _fold_blocks(run: Run, root: Path, fdir: Path) -> list[dict[str, Any]]:
    fold = _read_json(fdir / "fold.json") or {}
    blocks: list[dict[str, Any]] = [{"type": "text", "text": (
        f"{fold.get('n_train', '?')} real training volumes ({fold.get('n_train_subjects', '?')} subjects), "
        f"{fold.get('n_val', '?')} validation, {fold.get('n_test', '?')} test; {fold.get('seconds', '?')} s")}]
    rows = []
    for key, a in (fold.get("arms") or {}).items():
        rows.append([a.get("label", key), a.get("n_real"), a.get("n_synthetic"),
                     _pct((a.get("val") or {}).get("balanced_accuracy")),
                     _pct((a.get("test") or {}).get("balanced_accuracy")),
                     fmt((a.get("test") or {}).get("macro_auc"), 3), a.get("best_iteration", "")])
    if rows:
        blocks.append(table(["arm", "real volumes", "synthetic volumes", "val bal. acc", "test bal. acc",
                             "test AUC", "chosen iteration"], rows, cls="fold-arms"))
    real_run = fdir / "arms" / "real"
    if (real_run / "log.csv").is_file():  # does the reference classifier learn? its loss and validation curves
        blocks.append({"type": "text", "text": "classifier, real only", "cls": "subhead"})
        blocks += training_blocks(root, real_run, title=f"{fdir.name} real only")
    gens = fold.get("generators") or {}
    for g in sorted(p.name for p in (fdir / "generators").glob("*") if p.is_dir()) if (fdir / "generators").is_dir() else []:
        gdir = fdir / "generators" / g
        gdir = gdir / "run" if (gdir / "run" / "log.csv").is_file() else gdir  # cv trains each generator in g/run
        agree = (gens.get(g) or {}).get("class_agreement")
        caption = f"generator {g}" + (f" (class agreement {fmt([round(100 * a) for a in agree])} %)" if agree else "")
        blocks.append({"type": "text", "text": caption, "cls": "subhead"})
        blocks += training_blocks(root, gdir, title=f"{fdir.name} {g}")
        montages = _montages(root, gdir, limit=2)[-1:]
        if montages:
            blocks.append(images(montages, cls="montages"))
            run.assets += [m[0] for m in montages]
    return blocks


def _segment_run(path: Path) -> Run:
    m = _read_json(path / "metrics.json") or {}
    run = Run(path, "segment", model=f"parallel-vae K={m.get('num_decoders', '?')}", data=str(m.get("data", "")),
              date=_mtime([path / "metrics.json"]))
    run.figures.append(("images", str(m.get("images", "?")), _sortval(m.get("images"))))
    scores: list[dict[str, Any]] = []
    sc = m.get("scenes")
    baselines = m.get("baselines") if isinstance(m.get("baselines"), dict) else {}
    if isinstance(sc, dict):
        run.headline = len(run.figures) if "fg_ari" in sc else 0
        for k in ("fg_ari", "msc"):
            if k in sc:
                run.figures.append((k, fmt(sc[k], 3), _sortval(sc[k])))
        names = [k for k, v in sc.items() if isinstance(v, (int, float)) and k != "images"]
        base_names = [b for b, v in baselines.items() if isinstance(v, dict)]
        rows = [[k, sc[k], *[_base_value(baselines[b], "scenes", k) for b in base_names]] for k in names]
        scores.append(table(["metric", "model", *base_names], rows, cls="scores",
                            caption="scene segmentation (means over images)" +
                                    ("" if base_names else "; no baselines in metrics.json")))
        if sc.get("mask_area"):
            scores.append(table(["decoder", "mask area"], [[f"decoder {i}", a] for i, a in enumerate(sc["mask_area"])],
                                caption=f"argmax area per decoder ({sc.get('decoders_used', '?')} used)"))
        if isinstance(sc.get("object_pixels"), dict):
            scores.append(table(["decoder of the pixel", "share of object pixels"],
                                [[role.replace("_", " "), v] for role, v in sc["object_pixels"].items()],
                                caption="where the objects' pixels went (own decoder, a background decoder, another "
                                        "object's, a decoder that owns no region)"))
    tissue = m.get("tissue")
    if isinstance(tissue, dict) and isinstance(tissue.get("dice"), dict):
        run.headline = len(run.figures)
        run.figures.append(("mean Dice", fmt(tissue.get("mean_dice"), 3), _sortval(tissue.get("mean_dice"))))
        base_names = [b for b, v in baselines.items() if isinstance(v, dict)]
        rows = [[t, d, *[_base_value(baselines[b], "tissue", "dice", t) for b in base_names]]
                for t, d in tissue["dice"].items()]
        rows.append(["mean", tissue.get("mean_dice"),
                     *[_base_value(baselines[b], "tissue", "mean_dice") for b in base_names]])
        scores.append(table(["tissue", "model Dice", *base_names], rows, cls="scores",
                            caption="Dice after Hungarian matching of decoders to tissues"))
    probe = m.get("probe")
    if isinstance(probe, dict) and "probe" in probe:
        keys = ["mean_balanced_accuracy", "mean_label_accuracy", "exact_match"]
        rows = [[k, probe["probe"].get(k), (probe.get("pooled") or {}).get(k), (probe.get("baseline") or {}).get(k)]
                for k in keys]
        scores.append(table(["metric", "latent probe", "pooled over decoders", "baseline (majority)"], rows,
                            cls="scores",
                            caption=f"which shapes are present, from the latents ({probe.get('folds', '?')}-fold CV by scene)"))
        run.figures.append(("probe bal. acc", fmt(probe["probe"].get("mean_balanced_accuracy"), 3),
                            _sortval(probe["probe"].get("mean_balanced_accuracy"))))
    obj = m.get("object_probe")
    if isinstance(obj, dict) and "balanced_accuracy" in obj:
        rows = [[f"balanced accuracy ({len(obj.get('labels', []))} shapes)", obj["balanced_accuracy"], obj.get("baseline")],
                ["one-vs-rest balanced accuracy", obj.get("one_vs_rest_balanced_accuracy"), 0.5],
                ["objects matched to a decoder", obj.get("matched"), None]]
        scores.append(table(["metric", "object probe", "baseline (majority)"], rows, cls="scores",
                            caption=f"each object's shape from its matched decoder's latent ({obj.get('objects')} "
                                    f"objects, {obj.get('folds', '?')}-fold CV by scene)"))
        run.figures.append(("object probe bal. acc", fmt(obj["balanced_accuracy"], 3),
                            _sortval(obj["balanced_accuracy"])))
    if not scores:
        scores.append(table(["metric", "value"], _flat_scalars(m)))
    run.sections.append(("Scores", scores))
    panels = sorted((path / "panels").glob("*.png"))[:MAX_PANELS]
    pics = [(_rel(path, p), p.stem) for p in panels]
    if (path / "traversal.png").is_file():
        pics.append(("traversal.png", "latent traversal, one row per decoder"))
    if pics:
        run.sections.append(("Panels", [images(pics, cls="panels")]))
        run.assets += [p[0] for p in pics]
        run.thumb = pics[0][0]
    settings = [(k, m[k]) for k in ("checkpoint", "checkpoint_step", "num_decoders", "latent_dim_per_decoder", "images")
                if k in m]
    run.sections.append(("Settings", [table(["setting", "value"], settings, cls="settings")]))
    _files_and_config(run, path, ["metrics.json", "per_image.csv"], "")
    return run


def _base_value(base: dict[str, Any], *keys: str) -> Any:
    """A baseline's value under the model's key path, also accepting the flat form (no section)."""
    for path in (keys, keys[1:]):
        v: Any = base
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            return v
    return None


def synth_blocks(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-class metrics table and the settings of an evaluate-synth result."""
    classes = res.get("classes") or {}
    metric_names: list[str] = []
    for c in classes.values():
        metric_names += [k for k, v in c.items() if k not in metric_names and isinstance(v, (int, float))]
    rows = [[k, *[c.get(k) for c in classes.values()]] for k in metric_names]  # a row per metric: tables stay narrow
    settings = [("checkpoint", res.get("checkpoint")), ("step", res.get("step")),
                *[(k, v) for k, v in (res.get("settings") or {}).items()]]
    return [table(["metric", *classes], rows, cls="scores synth-metrics", caption="per class"),
            table(["setting", "value"], settings, cls="settings", caption="settings")]


def _synth_run(path: Path) -> Run:
    file = path if path.is_file() else _synth_json(path)
    res = _read_json(file) if file else None
    if not isinstance(res, dict):
        raise MedgenError(f"{path}: no evaluate-synth result found")
    run = Run(path, "evaluate-synth", model=str(res.get("model", "")), data=str(res.get("data", "")),
              date=_mtime([file]))
    classes = res.get("classes") or {}
    for k in ("mmd", "frechet", "nn_ratio"):
        vals = [c[k] for c in classes.values() if isinstance(c.get(k), (int, float))]
        if vals:
            mean = sum(vals) / len(vals)
            run.figures.append((f"mean {k}", fmt(mean, 3), _sortval(mean)))
    run.sections.append(("Synthesis metrics", synth_blocks(res)))
    pics = [(_rel(run.root, p), p.stem) for p in sorted(run.root.glob("*.png"))] if path.is_dir() else []
    pics += [(_rel(run.root, p), p.stem) for p in sorted(run.root.glob("montages/*.png"))] if path.is_dir() else []
    if pics:
        run.sections.append(("Images", [images(pics[:MAX_PANELS], cls="panels")]))
        run.assets += [p[0] for p in pics[:MAX_PANELS]]
        run.thumb = pics[0][0]
    run.sections.append(("Files", [{"type": "links", "items": [(file.name, file.name)]}]))
    run.assets.append(file.name)
    return run


def _pngs(run: Run, names: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    pics = [(n, c) for n, c in names if (run.root / n).is_file()]
    run.assets += [p for p, _ in pics]
    if pics and not run.thumb:
        run.thumb = pics[0][0]
    return pics


def _toolkit_run(path: Path, kind: str) -> Run:
    """A traverse, anomaly or denoise folder: its result file's figures, tables and pictures."""
    res = _read_json(path / _TOOLKIT[kind])
    if not isinstance(res, dict):
        raise MedgenError(f"{path}: no readable {_TOOLKIT[kind]}")
    run = Run(path, kind, model=str(res.get("model", "")), data=str(res.get("data", "")),
              date=_mtime([path / _TOOLKIT[kind]]))
    settings = [(k, res.get(k)) for k in ("checkpoint", "checkpoint_step") if k in res]
    if kind == "anomaly":
        score = res.get("headline_score", "")
        for pair, vals in (res.get("auc") or {}).items():
            run.figures.append((f"AUC {pair.replace('_', ' ')}", fmt(vals.get(score), 3), _sortval(vals.get(score))))
        scores = list(next(iter((res.get("auc") or {}).values()), {}))
        ci = res.get("auc_interval") or {}

        def cell(pair: str, s: str) -> Any:
            v, iv = (res["auc"][pair] or {}).get(s), (ci.get(pair) or {}).get(s)
            return f"{fmt(v, 3)} [{fmt(iv[0], 3)}, {fmt(iv[1], 3)}]" if v is not None and iv else v

        run.sections.append(("ROC AUC (held-out subjects)", [table(
            ["normal vs class", *scores], [[p.replace("_", " "), *[cell(p, s) for s in scores]]
                                           for p in (res.get("auc") or {})], cls="scores",
            caption=f"normal class {res.get('normal')}; headline score {score}; scored per class: "
                    f"{fmt(res.get('scored_per_class'))}; {res.get('leakage_check', '')}"
                    + ("; [95 % bootstrap interval]" if ci else ""))]))
        blocks: list[dict[str, Any]] = []
        for map_name, reg in (res.get("regions") or {}).items():
            if not isinstance(reg, dict):
                continue
            names = list(reg.get("brain_share") or {})
            rows = [["share of the brain", *[reg["brain_share"][n] for n in names]]]
            rows += [[f"top 1 % voxels, {c}", *[v.get(n) for n in names]]
                     for c, v in (reg.get("top_share_per_class") or {}).items()]
            blocks.append(table(["", *names], rows, cls="scores regions",
                                caption=f"{map_name} maps: where each subject's top 1 % brain voxels lie (mean over "
                                        "subjects) against the regions' share of the brain"))
        if isinstance((res.get("regions") or {}).get("reason"), str):
            blocks.append({"type": "text", "text": res["regions"]["reason"]})
        run.sections.append(("Affected regions", blocks))
        pics = _pngs(run, [("roc.png", "ROC"), ("scores.png", "scores per class"), ("overlays.png", "error maps")])
        settings += [("normal", res.get("normal")), *[(f"settings.{k}", v) for k, v in _flat_scalars(res.get("settings") or {})]]
        files = ["metrics.json", "scores.csv"]
    elif kind == "denoise":
        rows = res.get("levels") or []
        at10 = next((r for r in rows if abs(r.get("level", 0) - 0.1) < 1e-9), rows[0] if rows else {})
        if at10:
            run.headline = 0
            run.figures.append((f"PSNR gain at {fmt(at10.get('level_percent'))} %", f"{fmt(at10.get('psnr_gain_db'), 3)} dB",
                                _sortval(at10.get("psnr_gain_db"))))
        cols = ["level_percent", "psnr_noisy", "psnr_denoised", "psnr_smoothed", "psnr_gain_db", "ssim_noisy",
                "ssim_denoised", "ssim_smoothed"]
        run.sections.append(("Denoising (held-out volumes)", [table(
            ["noise %", "PSNR noisy", "PSNR denoised", "PSNR smoothed", "PSNR gain (dB)", "SSIM noisy",
             "SSIM denoised", "SSIM smoothed"], [[r.get(c) for c in cols] for r in rows], cls="scores",
            caption=f"{res.get('volumes')} volumes; clean reconstruction {fmt(res.get('clean_reconstruction'))}; "
                    f"trained with input noise up to {fmt(res.get('input_noise_trained'))}")]))
        pics = _pngs(run, [("psnr.png", "PSNR"), ("ssim.png", "SSIM"), ("examples.png", "examples")])
        settings += [(f"settings.{k}", v) for k, v in _flat_scalars(res.get("settings") or {})]
        files = ["metrics.json", "table.csv", "per_volume.csv"]
    else:
        a, b = res.get("subject_a") or {}, res.get("subject_b") or {}
        run.figures.append(("steps", str(res.get("steps")), _sortval(res.get("steps"))))
        settings += [("subject A", f"{a.get('subject')} ({a.get('class')})"),
                     ("subject B", f"{b.get('subject')} ({b.get('class')})"),
                     ("class walk", " > ".join(res.get("classes") or []) or "none (one trained class)"),
                     ("latent dim", res.get("latent_dim")), ("spread (SD)", res.get("spread_sd")),
                     ("dimensions walked", ", ".join(str(d["dim"]) for d in res.get("dims") or []))]
        pics = _pngs(run, [("subjects.png", "subject A to subject B"), ("subjects-coronal.png", "coronal"),
                           ("classes.png", "class condition at a fixed code"), ("classes-coronal.png", "coronal"),
                           ("dims.png", "one latent dimension at a time")])
        files = ["traverse.json"]
    run.sections.insert(0, ("Settings", [table(["setting", "value"], settings, cls="settings")]))
    if pics:
        run.sections.append(("Pictures", [images(pics, cls="panels")]))
    _files_and_config(run, path, files, "")
    return run


_BUILDERS = {"train": _train_run, "cv-evaluate": _cv_run, "segment": _segment_run, "evaluate-synth": _synth_run,
             **{k: (lambda p, k=k: _toolkit_run(p, k)) for k in _TOOLKIT}}


def collect_run(path: str | os.PathLike, kind: str | None = None, name: str | None = None) -> Run:
    """Read a run folder (or an evaluate-synth JSON file) into what its page shows."""
    p = Path(path)
    kind = kind or detect_kind(p)
    if kind not in _BUILDERS:
        raise MedgenError(f"{p} is not a medgen run folder ({', '.join(KINDS)} output)")
    run = _BUILDERS[kind](p)
    run.label = name or ""
    return run


# ---------------------------------------------------------------------------------------------- rendering


def render_run(run: Run, index_href: str | None = None, source: str | None = None) -> str:
    """The HTML page of one run; in a site, `index_href` links back to the index and `source` names the run
    folder the page was copied from."""
    return _ENV.get_template("run.html").render(run=run, index_href=index_href, source=source,
                                                version=medgen.__version__, title=f"{run.kind}: {run.name}")


def render_index(entries: Sequence[tuple[Run, str]], title: str = "medgen runs") -> str:
    """The index page: one row per (run, href of its page)."""
    return _ENV.get_template("index.html").render(entries=entries, version=medgen.__version__, title=title)


def write_run_page(path: str | os.PathLike, kind: str | None = None, name: str | None = None) -> Path:
    """Write RUN/index.html for a run folder (called at the end of every command that writes one).

    Args:
        path: the run folder.
        kind: its kind (detected when None).
        name: the run's name on the page (default: the folder's name; give it for a staging folder).
    """
    if not Path(path).is_dir():
        raise MedgenError(f"{path} is not a run folder; a page is written into a run folder only")
    run = collect_run(path, kind, name)
    out = run.root / PAGE
    atomic_write_text(out, render_run(run))
    return out


def write_page_safely(path: str | os.PathLike, kind: str | None = None, name: str | None = None) -> Path | None:
    """write_run_page for the end of a pipeline: a page that cannot be drawn costs a warning, not the run."""
    try:
        return write_run_page(path, kind, name)
    except Exception as e:  # the run's results are already written; the page is a view of them
        if os.environ.get("MEDGEN_DEBUG") == "1":
            raise
        log(f"warning: could not write the run page {Path(path) / PAGE}: {e}")
        return None


def refresh_run_page(folder: str | os.PathLike) -> Path | None:
    """Redraw the page of a medgen run folder that just gained a file (e.g. `evaluate-synth --json RUN/x.json`);
    nothing for any other folder."""
    folder = Path(folder)
    if folder.is_dir() and (folder / MARKER).is_file() and detect_kind(folder) in ("train", "cv-evaluate", "segment"):
        return write_page_safely(folder)
    return None


def find_runs(paths: Sequence[str | os.PathLike], max_depth: int = 4) -> list[Path]:
    """The run folders in `paths`: each path is a run, an evaluate-synth JSON file or a folder holding runs
    (searched `max_depth` levels deep; a run's own subfolders are not searched)."""
    found: list[Path] = []

    def walk(p: Path, depth: int) -> None:
        if p.is_dir() and _marker_command(p) == "report":
            return  # a site built earlier: its copies are not runs
        if detect_kind(p) is not None:
            found.append(p)
            return
        if depth >= max_depth or not p.is_dir():
            return
        for child in sorted(p.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                walk(child, depth + 1)

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise MedgenError(f"{p} does not exist")
        before = len(found)
        walk(p, 0)
        if len(found) == before:
            raise MedgenError(f"{p} holds no medgen run folder ({', '.join(KINDS)} output)")
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def build_site(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, overwrite: bool = False,
               title: str = "medgen runs") -> dict[str, Any]:
    """Build the static site: OUT/index.html (every run, sortable) and OUT/runs/<name>/index.html with a copy
    of the files each page shows. Returns a summary (out, runs, pages)."""
    runs = [collect_run(p) for p in find_runs(paths)]
    taken: set[str] = set()
    entries: list[tuple[Run, str]] = []
    with staged_dir(out, overwrite=overwrite, inputs=list(paths), command="report") as tmp:
        for run in runs:
            slug = _slug(run.name, taken)
            page_dir = tmp / "runs" / slug
            page_dir.mkdir(parents=True)
            for rel in dict.fromkeys(run.assets):
                src, dst = run.root / rel, page_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            (page_dir / PAGE).write_text(render_run(run, index_href="../../index.html", source=str(run.path)), encoding="utf-8")
            entries.append((run, f"runs/{slug}/{PAGE}"))
            if run.thumb:
                run.thumb = f"runs/{slug}/{run.thumb}"  # the index links the copy
        (tmp / PAGE).write_text(render_index(entries, title=title), encoding="utf-8")
    return {"out": str(out), "index": str(Path(out) / PAGE), "runs": len(entries),
            "pages": [str(Path(out) / href) for _, href in entries],
            "kinds": {k: sum(r.kind == k for r, _ in entries) for k in KINDS if any(r.kind == k for r, _ in entries)}}


__all__ = ["KINDS", "Run", "build_site", "collect_run", "detect_kind", "find_runs", "render_index", "render_run",
           "refresh_run_page", "write_page_safely", "write_run_page"]
