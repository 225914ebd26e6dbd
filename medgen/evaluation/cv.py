"""cv-evaluate: does synthetic data improve a classifier? A leakage-safe K-fold augmentation experiment.

Protocol (DESIGN.md section 5):
    1. Subject-level splits: a stratified held-out test set first, then K stratified folds on the rest
       (splits.json). Each fold: (K-1)/K of the subjects train, 1/K validate.
    2. Per fold, each generator (cfg.cv.models) is trained with `fit` on that fold's training subjects only.
    3. Classifier arms per fold: real only; real + classical augmentation; real + synthetic at each
       fraction f (synthetic share of the training set: n_syn = round(f / (1 - f) * n_real)) per
       generator, without and with classical augmentation; train-on-synthetic-test-on-real (TSTR) per
       generator (n_real synthetic volumes). Synthetic volumes follow the real training set's class
       distribution (cfg.cv.synthetic_classes "match"; "balanced" gives equal counts per class), so the
       synthetic data changes the amount of data, not the class prior.
    4. Validation accuracy picks the checkpoint (best.pt); the test set is evaluated once per fold and arm.
    5. Leakage check: the subjects behind every generator and every classifier arm (synthetic volumes
       carry their generator's training subjects) are recorded in fold_k/provenance.json and checked
       against the fold's validation and test subjects before anything trains.

Output folder:
    config.yaml, run.json, splits.json
    fold_k/provenance.json, fold_k/generators/<model>/ (fit run), fold_k/arms/<arm>/ (classifier run),
    fold_k/arms/<arm>.json (the arm's result, written atomically: a finished arm), fold_k/fold.json
    results.json, results.csv, results.md, accuracy.png, confusion.png (once every fold is finished)

Resume: finished folds (fold.json) and finished arms (<arm>.json) are skipped; an unfinished arm is
retrained from scratch; an unfinished generator continues from its last checkpoint (fit's resume is
bit-exact). Every arm and generator is seeded from (seed, fold, name) only, so an interrupted and
resumed run gives the same results as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medgen.config import Config, TrainConfig
from medgen.console import log
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.evaluation.splits import Splits, make_splits
from medgen.evaluation.stats import classification_metrics
from medgen.outputs import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    clear_output_dir,
    make_output_dir,
)

SYNTHETIC_PREFIX = "synthetic:"


class LeakageError(MedgenError):
    """A validation or test subject reached a generator's or a classifier's training data."""


@dataclass(frozen=True)
class Arm:
    """One classifier training recipe.

    Attributes:
        key: file-safe id (e.g. real, real_aug, gan_f33, gan_f33_aug, tstr_gan).
        label: display name (e.g. "gan 33% + aug").
        generator: generative model supplying synthetic volumes, or None.
        fraction: synthetic share of the training set (0 real only, 1 train on synthetic only).
        augment: apply classical augmentation to training batches.
    """

    key: str
    label: str
    generator: str | None = None
    fraction: float = 0.0
    augment: bool = False

    @property
    def tstr(self) -> bool:
        return self.generator is not None and self.fraction >= 1.0


def plan_arms(models: list[str], fractions: list[float], augmentation: list[bool], tstr: bool) -> list[Arm]:
    """All arms of the experiment, in report order (the first is the "real only" reference)."""
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise MedgenError(f"cv.fractions values must be between 0 and 1 (exclusive), got {f:g}")
    arms = [Arm("real", "real only")]
    if True in augmentation:
        arms.append(Arm("real_aug", "real + aug", augment=True))
    for g in models:
        for f in fractions:
            pct = int(round(100 * f))
            for aug in augmentation:
                arms.append(Arm(f"{g}_f{pct}{'_aug' if aug else ''}", f"{g} {pct}%{' + aug' if aug else ''}",
                                generator=g, fraction=f, augment=aug))
        if tstr:
            arms.append(Arm(f"tstr_{g}", f"TSTR {g}", generator=g, fraction=1.0))
    return arms


def derive_seed(seed: int, fold: int, name: str) -> int:
    """A seed that depends only on (seed, fold, name), so order and interruptions do not matter."""
    digest = hashlib.sha256(f"{seed}/{fold}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def n_synthetic(fraction: float, n_real: int) -> int:
    """Synthetic volumes so that they make up `fraction` of the training set: f / (1 - f) * n_real."""
    return int(round(fraction / (1.0 - fraction) * n_real))


def allocate(total: int, class_counts: list[int], mode: str = "match") -> list[int]:
    """Split `total` over classes: proportional to class_counts ("match") or equally ("balanced").

    Largest-remainder rounding so the counts sum to `total`; classes absent from the real data get none.
    """
    present = [c > 0 for c in class_counts]
    weights = np.array(class_counts if mode == "match" else present, dtype=float)
    if weights.sum() == 0:
        return [0] * len(class_counts)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


# ----------------------------------------------------------------------------------------------
# Leakage check


def assert_no_leakage(provenance: dict[str, Any], where: str = "provenance.json") -> None:
    """Fail loudly if a validation or test subject trained a generator or a classifier arm.

    Args:
        provenance: {"fold", "val", "test", "generators": {name: subjects}, "arms": {key: subjects}}.
        where: file named in the error message.
    """
    held_out = {s: "validation" for s in provenance.get("val", [])}
    held_out.update({s: "test" for s in provenance.get("test", [])})
    fold = provenance.get("fold", "?")
    for kind in ("generators", "arms"):
        for name, subjects in sorted(provenance.get(kind, {}).items()):
            for s in subjects:
                if s in held_out:
                    what = "generator" if kind == "generators" else "classifier arm"
                    raise LeakageError(f"{where}: leakage in fold {fold}: {held_out[s]} subject {s} "
                                       f"is in the training data of {what} {name!r}")


def training_subjects(data: ImageSet, generator_subjects: dict[str, list[str]]) -> list[str]:
    """Real subjects behind a training set: real items' own ids plus, for synthetic items, the
    subjects that trained their generator (their provenance)."""
    out: set[str] = set()
    for s in set(data.subjects):
        if s.startswith(SYNTHETIC_PREFIX):
            out.update(generator_subjects[s[len(SYNTHETIC_PREFIX):]])
        else:
            out.add(s)
    return sorted(out)


class Provenance:
    """fold_k/provenance.json: who trained what in one fold (read-modify-write, atomic)."""

    def __init__(self, path: Path, fold: int, train: list[str], val: list[str], test: list[str]) -> None:
        self.path = path
        if path.is_file():
            self.data = json.loads(path.read_text(encoding="utf-8"))
        else:
            self.data = {"fold": fold, "train": train, "val": val, "test": test, "generators": {}, "arms": {}}
        assert_no_leakage({**self.data, "arms": {"split:train": train}}, str(path))

    def record(self, kind: str, name: str, subjects: list[str]) -> None:
        """Record the training subjects of a generator or arm, then check (before training starts)."""
        self.data[kind][name] = sorted(subjects)
        assert_no_leakage(self.data, str(self.path))
        atomic_write_json(self.path, self.data)


# ----------------------------------------------------------------------------------------------
# Data


def load_cv_data(cfg: Config, data: ImageSet | str | Path | None = None) -> tuple[ImageSet, str]:
    """The experiment's data: an ImageSet as given, a --data spec, cfg.data.path, or the phantom cohort.

    Returns:
        (images, a short description of where they came from).
    """
    if isinstance(data, ImageSet):
        return data, "in-memory data"
    from medgen.training.loop import load_config_data

    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    source = cfg.data.path or (f"built-in phantom (n={cfg.phantom.n}, seed={cfg.phantom.seed}, "
                               f"effect_scale={cfg.phantom.effect_scale:g}, size={cfg.phantom.size})")
    return load_config_data(cfg, size=cfg.cv.size), source


def concat(parts: list[ImageSet]) -> ImageSet:
    """Stack ImageSets with the same classes (extras are dropped: the classifier only needs images)."""
    first = parts[0]
    return ImageSet(
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        subjects=[s for p in parts for s in p.subjects],
        class_names=list(first.class_names),
        affine=first.affine,
        normalisation=dict(first.normalisation),
        sources=[s for p in parts for s in (p.sources or [""] * len(p))],
    )


def synthetic_set(images: torch.Tensor, labels: torch.Tensor, generator: str, like: ImageSet) -> ImageSet:
    """Synthetic volumes as an ImageSet whose subject id names the generator (its provenance)."""
    return ImageSet(images=images, labels=labels, subjects=[f"{SYNTHETIC_PREFIX}{generator}"] * len(labels),
                    class_names=list(like.class_names), affine=like.affine,
                    normalisation=dict(like.normalisation), sources=[f"{SYNTHETIC_PREFIX}{generator}"] * len(labels))


# ----------------------------------------------------------------------------------------------
# Classifier training and evaluation


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, batch_size: int = 16) -> np.ndarray:
    """Class probabilities [N, num_classes] of `model` (eval mode) on `data`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for i in range(0, len(data), batch_size):
        logits = model(data.images[i : i + batch_size].to(device)).logits.float()
        probs.append(torch.softmax(logits, dim=1).cpu())
    model.train(was_training)
    return torch.cat(probs).numpy()


def cpu_safe(train: TrainConfig, device: torch.device) -> TrainConfig:
    """On CPU, "auto" precision/memory format become fp32 and contiguous tensors: with bf16 autocast,
    oneDNN's conv3d backward gave intermittent NaN gradients here (9 of 30 tiny ResNet passes with
    channels_last_3d; a NaN loss at iteration 2 of a 32^3 classifier without it; none in fp32)."""
    if device.type != "cpu":
        return train
    return dataclasses.replace(train, precision="fp32" if train.precision == "auto" else train.precision,
                               channels_last=False if train.channels_last is None else train.channels_last)


def classifier_train_config(cfg: Config, n_train: int, device: torch.device | None = None) -> tuple[TrainConfig, int]:
    """TrainConfig for one classifier arm (cfg.classifier epochs over `n_train` items) and the
    iterations per epoch (= validation interval)."""
    c = cfg.classifier
    per_epoch = max(1, n_train // min(c.batch_size, n_train))
    iterations = max(1, c.epochs * per_epoch)
    train = TrainConfig(iterations=iterations, batch_size=c.batch_size, lr=c.lr, ema_decay=0.0,
                        precision=cfg.train.precision, compile=False,
                        channels_last=cfg.train.channels_last,
                        log_every=per_epoch, sample_every=0, checkpoint_every=iterations, max_seconds=None)
    return cpu_safe(train, device or torch.device("cpu")), per_epoch


def run_arm(cfg: Config, arm: Arm, fold: int, train_set: ImageSet, val_set: ImageSet, test_set: ImageSet,
            out: Path, device: torch.device) -> dict[str, Any]:
    """Train one classifier arm with `fit` (validation accuracy picks best.pt) and evaluate it once.

    Returns:
        the arm's result (metrics and predictions on validation and test).
    """
    from medgen.models.classifier import Classifier
    from medgen.training.loop import fit

    seed = derive_seed(cfg.seed, fold, arm.key)
    train, per_epoch = classifier_train_config(cfg, len(train_set), device)
    c = cfg.classifier
    num_classes = len(train_set.class_names)
    model_kwargs = {"backbone": c.name, "base_width": c.base_width, "dropout": c.dropout}
    transform = None
    if arm.augment:
        from medgen.data.transforms import augment_training_batch

        transform = augment_training_batch

    def validate(model: nn.Module) -> dict[str, float]:
        prob = predict(model, val_set)
        return {"accuracy": float((prob.argmax(1) == val_set.labels.numpy()).mean())}

    t0 = time.perf_counter()
    result = fit("classifier", train_set, out, model_kwargs=model_kwargs,
                 step_kwargs={"label_smoothing": c.label_smoothing, "weight_decay": c.weight_decay},
                 train=train, device=device, seed=seed, validate=validate, validate_every=per_epoch,
                 select_metric="accuracy", transform=transform, overwrite=True)
    from medgen.training.checkpoint import model_from_checkpoint

    chosen = result.best or result.checkpoint
    model, meta = model_from_checkpoint(chosen, ema=False, expected_model="classifier")
    assert isinstance(model, Classifier)
    model.to(device)
    out_dict: dict[str, Any] = {
        "arm": arm.key, "label": arm.label, "generator": arm.generator, "fraction": arm.fraction,
        "augment": arm.augment, "fold": fold, "seed": seed,
        "n_real": sum(not s.startswith(SYNTHETIC_PREFIX) for s in train_set.subjects),
        "n_synthetic": sum(s.startswith(SYNTHETIC_PREFIX) for s in train_set.subjects),
        "iterations": result.iterations, "best_iteration": int(meta["step"]),
        "checkpoint": str(Path(chosen).relative_to(out.parent.parent)),
    }
    for role, ds in (("val", val_set), ("test", test_set)):
        prob = predict(model, ds)
        y = ds.labels.numpy()
        out_dict[role] = classification_metrics(y, prob, num_classes)
        out_dict[f"{role}_predictions"] = {"y": y.tolist(), "prob": np.round(prob, 6).tolist()}
    out_dict["seconds"] = round(time.perf_counter() - t0, 2)
    # Keep only the chosen checkpoint (last/final/best are full copies with optimizer state).
    for name in ("last.pt", "final.pt", "best.pt"):
        if out / name != Path(chosen):
            (out / name).unlink(missing_ok=True)
    return out_dict


# ----------------------------------------------------------------------------------------------
# Generators


def train_generator(cfg: Config, name: str, fold: int, train_set: ImageSet, out: Path, device: torch.device,
                    resume: bool) -> Path:
    """Train generator `name` on the fold's training subjects; return its final checkpoint."""
    from medgen.training.loop import fit

    done = out / "done.json"
    if done.is_file():
        return out / json.loads(done.read_text(encoding="utf-8"))["checkpoint"]
    train = cpu_safe(dataclasses.replace(cfg.train), device)
    if cfg.cv.generator_iterations is not None:
        train.iterations = cfg.cv.generator_iterations
    train.sample_every = min(train.sample_every, train.iterations) if train.sample_every else 0
    run = out / "run"
    partial = run.exists() and any(run.iterdir())
    result = fit(name, train_set, run, model_kwargs=dict(cfg.models.get(name, {})),
                 step_kwargs=dict(cfg.steps.get(name, {})), train=train, device=device,
                 seed=derive_seed(cfg.seed, fold, f"generator:{name}"),
                 resume=partial, overwrite=not partial)
    atomic_write_json(done, {"checkpoint": str(result.checkpoint.relative_to(out)), "seconds": round(result.seconds, 2),
                             "iterations": result.iterations})
    (run / "last.pt").unlink(missing_ok=True)  # final.pt is its copy
    return result.checkpoint


def synthesize_pool(cfg: Config, name: str, checkpoint: Path, fold: int, class_counts: list[int],
                    device: torch.device) -> dict[int, torch.Tensor]:
    """Synthetic volumes per class from a trained generator: {class: [n_c, C, *spatial]}.

    Each class is drawn with its own seed, so a smaller fraction uses a prefix of the same volumes.
    """
    from medgen.synthesis import sample_images
    from medgen.training.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(checkpoint, ema=True, expected_model=name)
    pool = {}
    for c, n in enumerate(class_counts):
        if n > 0:
            pool[c] = sample_images(model, [c] * n, seed=derive_seed(cfg.seed, fold, f"synthesis:{name}:{c}"),
                                    batch_size=8, device=device)
    return pool


def take_synthetic(pool: dict[int, torch.Tensor], counts: list[int], name: str, like: ImageSet) -> ImageSet:
    """The first counts[c] pooled volumes of each class, as an ImageSet."""
    images, labels = [], []
    for c, n in enumerate(counts):
        if n > 0:
            images.append(pool[c][:n])
            labels.append(torch.full((n,), c, dtype=torch.int64))
    return synthetic_set(torch.cat(images), torch.cat(labels), name, like)


# ----------------------------------------------------------------------------------------------
# The experiment


def _config_fingerprint(cfg: Config) -> dict[str, Any]:
    """The parts of the config that change results (device does not)."""
    d = cfg.to_dict()
    d.pop("device", None)
    return d


def prepare_run(cfg: Config, out: Path, data: ImageSet, source: str, *, resume: bool, overwrite: bool,
                fold: int | None) -> Splits:
    """Check/create the output folder, write config.yaml, run.json and splits.json; return the splits."""
    splits = make_splits(data.subjects, data.labels.numpy(), data.class_names, folds=cfg.cv.folds,
                         test_size=cfg.cv.test_size, seed=cfg.seed)
    run_json = out / "run.json"
    existing = run_json.is_file()
    # Separate --fold jobs share one folder: joining a run with the same config is allowed.
    joining = fold is not None and existing
    check_output_dir(out, overwrite=overwrite, resume=resume or joining)
    if overwrite and out.exists() and not resume:
        clear_output_dir(out)  # only a folder medgen wrote (check_output_dir refused any other)
        existing = False
    if existing:
        old = json.loads(run_json.read_text(encoding="utf-8"))
        if old.get("config") != _config_fingerprint(cfg):
            diff = sorted(k for k in _config_fingerprint(cfg) if old.get("config", {}).get(k) != cfg.to_dict()[k])
            raise MedgenError(f"{run_json}: this run was started with a different config (section(s) "
                              f"{', '.join(diff) or '?'} differ); use a new --out or --overwrite")
        saved = Splits.load(out / "splits.json")
        if saved.to_dict() != splits.to_dict():
            raise MedgenError(f"{out / 'splits.json'}: the saved splits differ from this data's splits "
                              "(different data?); use a new --out or --overwrite")
        return splits
    make_output_dir(out, "cv-evaluate")
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    splits.save(out / "splits.json")
    atomic_write_json(run_json, {
        "data": source, "n_images": len(data), "n_subjects": len(set(data.subjects)),
        "class_names": list(data.class_names), "class_counts": data.class_counts(),
        "folds": cfg.cv.folds, "n_test_subjects": len(splits.test), "config": _config_fingerprint(cfg),
    })
    return splits


def run_fold(cfg: Config, out: Path, data: ImageSet, splits: Splits, fold: int, device: torch.device,
             resume: bool) -> dict[str, Any]:
    """Run every arm of one fold (skipping finished ones) and write fold_k/fold.json."""
    fdir = out / f"fold_{fold}"
    train_idx = splits.indices(data.subjects, fold, "train")
    val_idx = splits.indices(data.subjects, fold, "val")
    test_idx = splits.indices(data.subjects, fold, "test")
    real = data.subset(train_idx)
    val_set, test_set = data.subset(val_idx), data.subset(test_idx)
    prov = Provenance(fdir / "provenance.json", fold, sorted(set(real.subjects)), sorted(set(val_set.subjects)),
                      sorted(set(test_set.subjects)))
    arms = plan_arms(cfg.cv.models, cfg.cv.fractions, cfg.cv.augmentation, cfg.cv.tstr)
    class_counts = torch.bincount(real.labels, minlength=len(data.class_names)).tolist()
    n_real = len(real)
    t0 = time.perf_counter()

    def arm_done(arm: Arm) -> bool:
        return (fdir / "arms" / f"{arm.key}.json").is_file()

    def do_arm(arm: Arm, train_set: ImageSet, generator_subjects: dict[str, list[str]]) -> None:
        if arm_done(arm):
            return
        prov.record("arms", arm.key, training_subjects(train_set, generator_subjects))
        log(f"fold {fold}: arm {arm.label} ({len(train_set)} training volumes)")
        res = run_arm(cfg, arm, fold, train_set, val_set, test_set, fdir / "arms" / arm.key, device)
        atomic_write_json(fdir / "arms" / f"{arm.key}.json", res)
        log(f"fold {fold}: arm {arm.label}: val acc {res['val']['accuracy']:.3f}, test acc {res['test']['accuracy']:.3f}")

    for arm in arms:
        if arm.generator is None:
            do_arm(arm, real, {})
    for g in cfg.cv.models:
        g_arms = [a for a in arms if a.generator == g]
        if all(arm_done(a) for a in g_arms):
            continue
        gdir = fdir / "generators" / g
        prov.record("generators", g, sorted(set(real.subjects)))
        log(f"fold {fold}: training generator {g} on {len(real)} volumes of {len(set(real.subjects))} subjects")
        ckpt = train_generator(cfg, g, fold, real, gdir, device, resume)
        # One pool per class, large enough for the largest fraction and for TSTR (n_real volumes).
        n_max = max([n_synthetic(a.fraction, n_real) for a in g_arms if not a.tstr] + [n_real if cfg.cv.tstr else 0])
        per_class_max = [max(allocate(n_max, class_counts, cfg.cv.synthetic_classes)[c],
                             class_counts[c] if cfg.cv.tstr else 0) for c in range(len(class_counts))]
        pool = synthesize_pool(cfg, g, ckpt, fold, per_class_max, device)
        gen_subjects = {g: prov.data["generators"][g]}
        for arm in g_arms:
            if arm.tstr:
                counts = class_counts  # as many synthetic volumes per class as real ones
                train_set = take_synthetic(pool, counts, g, real)
            else:
                counts = allocate(n_synthetic(arm.fraction, n_real), class_counts, cfg.cv.synthetic_classes)
                train_set = concat([real, take_synthetic(pool, counts, g, real)])
            do_arm(arm, train_set, gen_subjects)
        del pool
    results = {a.key: json.loads((fdir / "arms" / f"{a.key}.json").read_text(encoding="utf-8")) for a in arms}
    fold_result = {"fold": fold, "n_train": n_real, "n_val": len(val_set), "n_test": len(test_set),
                   "n_train_subjects": len(set(real.subjects)), "arms": results,
                   "seconds": round(time.perf_counter() - t0, 2)}
    assert_no_leakage(prov.data, str(prov.path))
    atomic_write_json(fdir / "fold.json", fold_result)
    return fold_result


def finished_folds(out: Path, folds: int) -> list[int]:
    return [k for k in range(folds) if (out / f"fold_{k}" / "fold.json").is_file()]


def merge(out: str | Path, *, echo: bool = False) -> dict[str, Any]:
    """Aggregate finished folds into results.json/.csv/.md and plots (every fold must be finished)."""
    from medgen.evaluation.report import build_results, write_report

    out = Path(out)
    if not (out / "run.json").is_file():
        raise MedgenError(f"{out} is not a cv-evaluate output folder (no run.json)")
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    folds = int(run["folds"])
    missing = [k for k in range(folds) if k not in finished_folds(out, folds)]
    if missing:
        raise MedgenError(f"{out}: fold(s) {', '.join(map(str, missing))} not finished (no fold_k/fold.json); "
                          "run them with --fold K or --resume before merging")
    fold_results = [json.loads((out / f"fold_{k}" / "fold.json").read_text(encoding="utf-8")) for k in range(folds)]
    results = build_results(fold_results, run["class_names"])
    write_report(out, results, echo=echo)
    return results


def run_cv(cfg: Config, out: str | Path, *, data: ImageSet | str | Path | None = None, fold: int | None = None,
           resume: bool = False, overwrite: bool = False, echo: bool = False) -> dict[str, Any] | None:
    """Run the augmentation experiment (all folds, or one with `fold`) and merge when every fold is done.

    Args:
        cfg: the resolved config (sections cv, classifier, models, steps, train, data, phantom).
        out: output folder.
        data: an ImageSet, a data spec (folder/datalist/table), or None for cfg.data.path / the phantom.
        fold: run only this fold (0-based), e.g. as one job of many sharing `out`.
        resume: continue into an existing folder, skipping finished folds and arms.
        overwrite: replace an existing folder.
        echo: print the results table to stdout at the end.
    Returns:
        the merged results, or None when folds are still missing (a --fold job).
    """
    from medgen.runtime import resolve_device, seed_everything

    out = Path(out)
    if fold is not None and not 0 <= fold < cfg.cv.folds:
        raise MedgenError(f"--fold {fold} is out of range: the run has {cfg.cv.folds} folds (0..{cfg.cv.folds - 1})")
    if cfg.cv.synthetic_classes not in ("match", "balanced"):
        raise MedgenError(f"cv.synthetic_classes must be match or balanced, got {cfg.cv.synthetic_classes!r}")
    plan_arms(cfg.cv.models, cfg.cv.fractions, cfg.cv.augmentation, cfg.cv.tstr)  # validates fractions
    from medgen.models.registry import get_model_class

    for g in cfg.cv.models:
        if not hasattr(get_model_class(g), "sample"):
            raise MedgenError(f"cv.models: {g!r} is not a generative model (it has no sample()); use e.g. vae, gan, alpha-gan")
    check_output_dir(out, overwrite=overwrite, resume=resume or fold is not None)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    images, source = load_cv_data(cfg, data)
    if len(images.class_names) < 2:
        raise MedgenError(f"{source}: cv-evaluate needs two or more classes, found {len(images.class_names)}")
    splits = prepare_run(cfg, out, images, source, resume=resume, overwrite=overwrite, fold=fold)
    todo = [fold] if fold is not None else list(range(cfg.cv.folds))
    for k in todo:
        if (out / f"fold_{k}" / "fold.json").is_file():
            if resume or fold is not None:
                log(f"fold {k}: finished earlier, skipped")
                continue
        log(f"fold {k + 1}/{cfg.cv.folds}")
        run_fold(cfg, out, images, splits, k, device, resume)
    if len(finished_folds(out, cfg.cv.folds)) == cfg.cv.folds:
        return merge(out, echo=echo)
    log(f"folds finished: {len(finished_folds(out, cfg.cv.folds))}/{cfg.cv.folds}; merge when all are done")
    return None


__all__ = ["Arm", "LeakageError", "assert_no_leakage", "merge", "plan_arms", "run_cv"]
