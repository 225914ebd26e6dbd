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
       Controls: a voxel-PCA + logistic baseline ("linear"); a learning curve (real only on a nested,
       class-stratified share of the fold's training subjects); on phantom data an oracle arm per fraction
       (fresh subjects from the same generative process, as many as the synthetic arm adds: the ceiling of
       augmentation); the best generator's (by validation) synthetic volumes with permuted labels.
    4. cfg.classifier.select on the validation fold picks the checkpoint (best.pt; "last": the final one); the held-out test set
       (plus cfg.cv.extra_test fresh phantom subjects) is evaluated once per fold and arm: every fold's
       model sees the same test subjects, so arms are compared on paired predictions.
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from medgen.checkpoint import model_from_checkpoint
from medgen.config import Config, TrainConfig
from medgen.console import log, plain_lines
from medgen.data import default_cache_dir, load_config_data, load_dataset, subjects_per_class
from medgen.data.augmentation import TrainingAugmentation
from medgen.data.datalist import subject_labels
from medgen.data.dataset import ImageSet
from medgen.data.phantom import ensure_cohort, read_parameters
from medgen.errors import MedgenError
from medgen.evaluation.report import build_results
from medgen.evaluation.splits import Splits, make_splits
from medgen.evaluation.stats import classification_metrics
from medgen.models.classifier import Classifier
from medgen.models.registry import create_model, get_model_class
from medgen.models.sampling import sample_images
from medgen.outputs import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    clear_output_dir,
    make_output_dir,
)
from medgen.pipelines.report import write_report
from medgen.pipelines.site import write_page_safely
from medgen.runtime import resolve_device, seed_everything
from medgen.training.loop import fill_model_kwargs, fit

SYNTHETIC_PREFIX = "synthetic:"


class LeakageError(MedgenError):
    """A validation or test subject reached a generator's or a classifier's training data."""


@dataclass(frozen=True)
class Arm:
    """One classifier training recipe.

    Attributes:
        key: file-safe id (e.g. real, real_aug, gan_f33, gan_f33_aug, tstr_gan, oracle_f50, curve_50).
        label: display name (e.g. "gan 33% + aug").
        generator: generative model supplying synthetic volumes, or None (chosen per fold for "permuted").
        fraction: synthetic (or oracle) share of the training set (1: train on synthetic only).
        augment: apply classical augmentation to training batches.
        kind: real, linear, aug, curve, oracle, synthetic, tstr or permuted.
        subjects: share of the fold's real training subjects used (learning curve; 1 otherwise).
    """

    key: str
    label: str
    generator: str | None = None
    fraction: float = 0.0
    augment: bool = False
    kind: str = "synthetic"
    subjects: float = 1.0

    @property
    def tstr(self) -> bool:
        return self.kind == "tstr"


def _pct(f: float) -> int:
    return int(round(100 * f))


def plan_arms(models: list[str], fractions: list[float], augmentation: list[bool], tstr: bool, *,
              curve: list[float] = (), oracle: bool = False, permuted: bool = False,
              linear: bool = False, augment_synthetic: bool = True) -> list[Arm]:
    """All arms of the experiment, in report order (the first is the "real only" reference).

    Args:
        models, fractions, augmentation, tstr: the synthetic arms (cfg.cv).
        curve: learning-curve shares of the real training subjects (each in (0, 1)).
        oracle: add an oracle arm per fraction (fresh real subjects; phantom data only).
        permuted: add a permuted-label arm at the largest fraction (the best generator, chosen per fold).
        linear: add the voxel-PCA + logistic baseline.
        augment_synthetic: also cross the synthetic arms with `augmentation` (else only without).
    """
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise MedgenError(f"cv.fractions values must be between 0 and 1 (exclusive), got {f:g}")
    for share in curve:
        if not 0.0 < share < 1.0:
            raise MedgenError(f"cv.learning_curve values must be between 0 and 1 (exclusive), got {share:g}")
    arms = [Arm("real", "real only", kind="real")]
    if linear:
        arms.append(Arm("linear", "linear baseline (voxel PCA + logistic)", kind="linear"))
    if True in augmentation:
        arms.append(Arm("real_aug", "real + aug", augment=True, kind="aug"))
    for share in sorted(curve):
        arms.append(Arm(f"curve_{_pct(share)}", f"real only, {_pct(share)}% of subjects", kind="curve",
                        subjects=share))
    if oracle:
        for f in fractions:
            arms.append(Arm(f"oracle_f{_pct(f)}", f"oracle {_pct(f)}% (fresh real subjects)", kind="oracle",
                            fraction=f))
    for g in models:
        for f in fractions:
            for aug in augmentation if augment_synthetic else [False]:
                arms.append(Arm(f"{g}_f{_pct(f)}{'_aug' if aug else ''}", f"{g} {_pct(f)}%{' + aug' if aug else ''}",
                                generator=g, fraction=f, augment=aug))
        if tstr:
            arms.append(Arm(f"tstr_{g}", f"TSTR {g}", generator=g, fraction=1.0, kind="tstr"))
    if permuted and models:
        f = max(fractions)
        arms.append(Arm(f"permuted_f{_pct(f)}", f"permuted labels {_pct(f)}% (best generator)", kind="permuted",
                        fraction=f))
    return arms


def cfg_arms(cfg: Config, oracle: bool) -> list[Arm]:
    """The arms a config asks for (`oracle`: whether the data allow the oracle arm)."""
    c = cfg.cv
    return plan_arms(c.models, c.fractions, c.augmentation, c.tstr, curve=c.learning_curve, oracle=oracle,
                     permuted=c.permuted, linear=c.linear_baseline, augment_synthetic=c.augment_synthetic)


def generator_iterations(cfg: Config, name: str) -> int | None:
    """cv.generator_iterations for generator `name` (one number for all, or one per model)."""
    it = cfg.cv.generator_iterations
    if isinstance(it, dict):
        return it.get(name)
    return it


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
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
    source = cfg.data.path or (f"built-in phantom (n={cfg.phantom.n}, seed={cfg.phantom.seed}, "
                               f"effect_scale={cfg.phantom.effect_scale:g}, size={cfg.phantom.size})")
    return load_config_data(cfg, size=cfg.cv.size), source


def phantom_parameters(cfg: Config, data: ImageSet | str | Path | None) -> dict[str, Any] | None:
    """The phantom parameters (n, seed, effect_scale, size) behind the experiment's data: the built-in
    cohort, or a `medgen phantom` folder (or its datalist.json); None for any other data."""
    if isinstance(data, ImageSet):
        return None
    spec = data if data is not None else cfg.data.path
    if spec is None:
        ph = cfg.phantom
        return {"n": ph.n, "seed": ph.seed, "effect_scale": float(ph.effect_scale), "size": ph.size}
    p = Path(spec)
    folder = p if p.is_dir() else p.parent if p.name == "datalist.json" else None
    return read_parameters(folder) if folder is not None else None


def fresh_phantom_subjects(cfg: Config, params: dict[str, Any], n: int, role: str,
                           class_names: list[str]) -> ImageSet:
    """`n` new subjects from the phantom's generative process (same effect sizes, a seed of their own),
    preprocessed like the experiment's data; subject ids are prefixed with `role` ("oracle", "test") so
    they can never collide with the cohort's."""
    seed = derive_seed(int(params["seed"]), 0, f"phantom:{role}")
    cache = Path(cfg.phantom.cache_dir).expanduser() if cfg.phantom.cache_dir else default_cache_dir()
    log(f"{role} pool: {n} fresh phantom subjects (seed {seed}, effect_scale {params['effect_scale']:g})")
    folder = ensure_cohort(cache, n=max(n, 3), seed=seed, effect_scale=float(params["effect_scale"]),
                           size=int(params["size"]))
    pool = load_dataset(folder, size=cfg.cv.size or cfg.data.size, class_names=class_names)
    pool.subjects = [f"{role}:{s}" for s in pool.subjects]
    return pool


def first_per_class(pool: ImageSet, counts: list[int]) -> ImageSet:
    """The first counts[c] items of each class of `pool` (a prefix: smaller counts give a subset)."""
    labels = pool.labels.numpy()
    idx = [i for c, n in enumerate(counts) for i in np.flatnonzero(labels == c)[:n]]
    return pool.subset(sorted(idx))


def subject_subset(data: ImageSet, share: float, seed: int) -> ImageSet:
    """A class-stratified share of `data`'s subjects (all their scans). Per class (a subject's class as the
    splits assign it: its most frequent label) the subjects are put in a seeded order and the first
    round(share * n) kept, so a smaller share is a subset of a larger one."""
    classes = subject_labels(data.labels.tolist(), data.subjects)
    keep: set[str] = set()
    for c in range(len(data.class_names)):
        subs = sorted(s for s, y in classes.items() if y == c)
        order = np.random.default_rng([seed, c]).permutation(len(subs))
        keep.update(subs[i] for i in order[: int(round(share * len(subs)))])
    return data.subset([i for i, s in enumerate(data.subjects) if s in keep])


def check_learning_curve(cfg: Config, data: ImageSet, splits: Splits) -> None:
    """Refuse, before anything trains, a learning-curve share that leaves a class with < 2 subjects."""
    for share in cfg.cv.learning_curve:
        for k in range(cfg.cv.folds):
            real = data.subset(splits.indices(data.subjects, k, "train"))
            small = {c: n for c, n in subjects_per_class(subject_subset(real, share, 0)).items() if n < 2}
            if small:
                c, n = next(iter(small.items()))
                raise MedgenError(f"cv.learning_curve: share {share:g} leaves class {c} with {n} training "
                                  f"subject(s) in fold {k} (at least 2 needed); use a larger share or more data")


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
def predict(model: nn.Module, data: ImageSet, batch_size: int = 16, flip: bool = False) -> np.ndarray:
    """Class probabilities [N, num_classes] of `model` (eval mode) on `data`.

    Args:
        flip: average the probabilities with those of the left-right mirrored images (first spatial axis).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device)
        p = torch.softmax(model(x).logits.float(), dim=1)
        if flip:
            p = 0.5 * (p + torch.softmax(model(x.flip(2)).logits.float(), dim=1))  # dim 2: R-L
        probs.append(p.cpu())
    model.train(was_training)
    return torch.cat(probs).numpy()


def classifier_train_config(cfg: Config, n_train: int) -> tuple[TrainConfig, int]:
    """TrainConfig for one classifier arm (cfg.classifier epochs over `n_train` items) and the
    iterations per epoch (= validation interval). Precision and memory format follow cfg.train: the
    training loop's CPU defaults (bf16 with the oneDNN guard, NCDHW for instance norm) suit the classifier."""
    c = cfg.classifier
    per_epoch = max(1, n_train // min(c.batch_size, n_train))
    iterations = max(1, c.epochs * per_epoch)
    train = TrainConfig(iterations=iterations, batch_size=c.batch_size, lr=c.lr, ema_decay=c.ema_decay,
                        precision=cfg.train.precision, compile=False,
                        channels_last=cfg.train.channels_last,
                        log_every=per_epoch, sample_every=0, checkpoint_every=iterations, max_seconds=None,
                        # batch logs: one line per classifier arm unless asked (cv-evaluate trains dozens)
                        progress_every=cfg.train.progress_every or iterations, tensorboard=cfg.train.tensorboard)
    return train, per_epoch


def spacing_mm(data: ImageSet) -> float:
    """Voxel size of the experiment's grid (for millimetre-based augmentation)."""
    sp = data.normalisation.get("spacing_mm")
    if sp:
        return float(np.mean(sp))
    if data.affine is not None:
        return float(np.mean(nib.affines.voxel_sizes(np.asarray(data.affine))))
    return 3.0


def _arm_record(arm: Arm, fold: int, seed: int, train_set: ImageSet) -> dict[str, Any]:
    return {
        "arm": arm.key, "label": arm.label, "kind": arm.kind, "generator": arm.generator, "fraction": arm.fraction,
        "augment": arm.augment, "subjects_share": arm.subjects, "fold": fold, "seed": seed,
        "n_real": sum(not s.startswith(SYNTHETIC_PREFIX) for s in train_set.subjects),
        "n_real_subjects": len({s for s in train_set.subjects if not s.startswith(SYNTHETIC_PREFIX)}),
        "n_synthetic": sum(s.startswith(SYNTHETIC_PREFIX) for s in train_set.subjects),
    }


def _evaluate(out_dict: dict[str, Any], prob_of: Any, val_set: ImageSet, test_set: ImageSet,
              num_classes: int) -> None:
    for role, ds in (("val", val_set), ("test", test_set)):
        prob = prob_of(ds)
        y = ds.labels.numpy()
        out_dict[role] = classification_metrics(y, prob, num_classes)
        out_dict[f"{role}_predictions"] = {"y": y.tolist(), "prob": np.round(prob, 6).tolist(),
                                           "subjects": list(ds.subjects)}


def run_arm(cfg: Config, arm: Arm, fold: int, train_set: ImageSet, val_set: ImageSet, test_set: ImageSet,
            out: Path, device: torch.device) -> dict[str, Any]:
    """Train one classifier arm with `fit` (cfg.classifier.select on validation picks best.pt) and evaluate
    it once on validation and test. With cfg.classifier.members > 1 the arm is an ensemble of that many
    seeds (their probabilities averaged); "checkpoint" is the first member's.

    Returns:
        the arm's result (metrics and predictions on validation and test).
    """
    seed = derive_seed(cfg.seed, fold, arm.key)
    train, per_epoch = classifier_train_config(cfg, len(train_set))
    c = cfg.classifier
    num_classes = len(train_set.class_names)
    model_kwargs = {"backbone": c.name, "base_width": c.base_width, "dropout": c.dropout}
    if c.norm != "batch":
        model_kwargs["norm"] = c.norm
    if c.standardize:
        model_kwargs["standardize"] = True
    if c.coords:
        model_kwargs["coords"] = True
    transform = None
    if arm.augment or c.flip:
        transform = TrainingAugmentation(spacing_mm(train_set), train_set.spatial_dims, classical=arm.augment,
                                         flip=c.flip, share=cfg.cv.augment_share)
    y_val = val_set.labels.numpy()

    def validate(m: nn.Module) -> dict[str, float]:
        prob = predict(m, val_set, flip=c.test_flip)
        nll = float(-np.log(np.clip(prob[np.arange(len(y_val)), y_val], 1e-8, None)).mean())
        return {"accuracy": float((prob.argmax(1) == y_val).mean()),
                "balanced_accuracy": classification_metrics(y_val, prob, num_classes)["balanced_accuracy"],
                "neg_loss": -nll}

    # "last": validation is still recorded every epoch, but the final (EMA) weights are kept.
    select = {"loss": "neg_loss", "last": None}.get(c.select, c.select)
    step_kwargs = {"label_smoothing": c.label_smoothing, "weight_decay": c.weight_decay}
    if c.schedule != "constant":
        step_kwargs["schedule"] = c.schedule
    t0 = time.perf_counter()
    members: list[tuple[Classifier, dict[str, Any], Any, Path]] = []
    for m in range(c.members):
        # Member 0 is the arm's run folder and seed; further members get their own (an ensemble of seeds).
        m_out = out if m == 0 else out.parent / f"{out.name}.member{m}"
        m_seed = seed if m == 0 else derive_seed(cfg.seed, fold, f"{arm.key}:member{m}")
        torch.manual_seed(m_seed)
        model = create_model("classifier", **fill_model_kwargs("classifier", model_kwargs, train_set))
        if c.standardize:
            model.set_input_statistics(train_set.images)  # the arm's own training set only
        result = fit("classifier", train_set, m_out, model=model, model_kwargs=model_kwargs,
                     step_kwargs=step_kwargs, train=train, device=device, seed=m_seed, validate=validate,
                     validate_every=per_epoch, select_metric=select, transform=transform, overwrite=True)
        chosen = Path(result.best or result.checkpoint)
        best, meta = model_from_checkpoint(chosen, ema=True, expected_model="classifier")  # EMA weights when kept
        assert isinstance(best, Classifier)
        members.append((best.to(device), meta, result, chosen))
        # Keep only the chosen checkpoint (last/final/best are full copies with optimizer state).
        for name in ("last.pt", "final.pt", "best.pt"):
            if m_out / name != chosen:
                (m_out / name).unlink(missing_ok=True)

    def prob_of(ds: ImageSet) -> np.ndarray:
        return np.mean([predict(model, ds, flip=c.test_flip) for model, *_ in members], axis=0)

    _, meta, result, chosen = members[0]
    out_dict = _arm_record(arm, fold, seed, train_set)
    out_dict.update({"iterations": result.iterations, "best_iteration": int(meta["step"]),
                     "checkpoint": str(chosen.relative_to(out.parent.parent))})
    if c.members > 1:
        out_dict["member_checkpoints"] = [str(ch.relative_to(out.parent.parent)) for *_, ch in members]
    _evaluate(out_dict, prob_of, val_set, test_set, num_classes)
    out_dict["seconds"] = round(time.perf_counter() - t0, 2)
    return out_dict


LINEAR_GRID = 32  # the baseline sees voxels average-pooled to at most 32 per edge (PCA on 64^3 is slow on CPU)
LINEAR_COMPONENTS = 100


def _flat_voxels(data: ImageSet) -> np.ndarray:
    x = data.images.float()
    factor = max(1, x.shape[-1] // LINEAR_GRID)
    if factor > 1:
        pool = torch.nn.functional.avg_pool3d if data.spatial_dims == 3 else torch.nn.functional.avg_pool2d
        x = pool(x, factor)
    return x.reshape(len(data), -1).numpy()  # [N, C * prod(spatial)]


def run_linear_arm(arm: Arm, fold: int, seed: int, train_set: ImageSet, val_set: ImageSet,
                   test_set: ImageSet) -> dict[str, Any]:
    """The linear baseline: standardised voxels -> PCA (up to 100 components) -> logistic regression
    (scikit-learn), fitted on the fold's real training volumes only."""
    t0 = time.perf_counter()
    num_classes = len(train_set.class_names)
    n_comp = max(1, min(LINEAR_COMPONENTS, len(train_set) - 1))
    model = make_pipeline(StandardScaler(), PCA(n_components=n_comp, random_state=seed),
                          LogisticRegression(max_iter=5000))
    model.fit(_flat_voxels(train_set), train_set.labels.numpy())
    present = list(model.classes_)

    def prob_of(ds: ImageSet) -> np.ndarray:
        p = np.zeros((len(ds), num_classes))
        p[:, present] = model.predict_proba(_flat_voxels(ds))
        return p

    out_dict = _arm_record(arm, fold, seed, train_set)
    out_dict.update({"iterations": 0, "best_iteration": 0, "checkpoint": None, "components": n_comp})
    _evaluate(out_dict, prob_of, val_set, test_set, num_classes)
    out_dict["seconds"] = round(time.perf_counter() - t0, 2)
    return out_dict


# ----------------------------------------------------------------------------------------------
# Generators


def train_generator(cfg: Config, name: str, fold: int, train_set: ImageSet, out: Path, device: torch.device,
                    resume: bool) -> Path:
    """Train generator `name` on the fold's training subjects; return its final checkpoint."""
    done = out / "done.json"
    if done.is_file():
        return out / json.loads(done.read_text(encoding="utf-8"))["checkpoint"]
    train = dataclasses.replace(cfg.train)
    if generator_iterations(cfg, name) is not None:
        train.iterations = generator_iterations(cfg, name)
    train.sample_every = min(train.sample_every, train.iterations) if train.sample_every else 0
    # An EMA whose window (1 / (1 - decay) iterations) is longer than a tenth of the run averages in the
    # untrained initial weights: short per-fold budgets would sample from a half-initial generator.
    cap = 1.0 - 10.0 / train.iterations
    if train.ema_decay > max(cap, 0.0):
        train.ema_decay = max(cap, 0.0)
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
    """The parts of the config that change results (device, launcher resources and progress/TensorBoard
    tracking do not)."""
    d = cfg.to_dict()
    d.pop("device", None)
    d.pop("launcher", None)
    d["cv"].pop("workers", None)
    for key in ("progress_every", "tensorboard"):
        d["train"].pop(key, None)
    return d


def prepare_run(cfg: Config, out: Path, data: ImageSet, source: str, *, resume: bool, overwrite: bool,
                fold: int | None, notes: list[str] | None = None, n_extra_test: int = 0) -> Splits:
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
        "folds": cfg.cv.folds, "n_test_subjects": len(splits.test) + n_extra_test,
        "n_extra_test_subjects": n_extra_test, "notes": list(notes or []), "config": _config_fingerprint(cfg),
    })
    return splits


@dataclass
class ExtraSubjects:
    """Subjects from outside the cohort's splits (phantom data only): the oracle pool and extra test subjects."""

    oracle: ImageSet | None = None
    test: ImageSet | None = None


def class_agreement(classifier_ckpt: Path, pool: dict[int, torch.Tensor], device: torch.device) -> list[float]:
    """Share of each class's synthetic volumes that the fold's real-only classifier labels as that class."""
    model, _ = model_from_checkpoint(classifier_ckpt, ema=True, expected_model="classifier")  # as run_arm
    model.to(device)
    out = []
    for c in sorted(pool):
        prob = predict(model, ImageSet(images=pool[c], labels=torch.full((len(pool[c]),), c), subjects=[""] * len(pool[c]),
                                       class_names=[]))
        out.append(float((prob.argmax(1) == c).mean()))
    return out


def best_generator(results: dict[str, dict[str, Any]], arms: list[Arm], fraction: float) -> str | None:
    """The generator whose arm at `fraction` (without augmentation) has the best validation balanced accuracy."""
    cands = [a for a in arms if a.kind == "synthetic" and a.fraction == fraction and not a.augment and a.key in results]
    if not cands:
        return None
    return max(cands, key=lambda a: results[a.key]["val"]["balanced_accuracy"]).generator


def run_fold(cfg: Config, out: Path, data: ImageSet, splits: Splits, fold: int, device: torch.device,
             resume: bool, extra: ExtraSubjects | None = None) -> dict[str, Any]:
    """Run every arm of one fold (skipping finished ones) and write fold_k/fold.json."""
    extra = extra or ExtraSubjects()
    fdir = out / f"fold_{fold}"
    train_idx = splits.indices(data.subjects, fold, "train")
    val_idx = splits.indices(data.subjects, fold, "val")
    test_idx = splits.indices(data.subjects, fold, "test")
    real = data.subset(train_idx)
    val_set, test_set = data.subset(val_idx), data.subset(test_idx)
    if extra.test is not None:
        test_set = concat([test_set, extra.test])
    prov = Provenance(fdir / "provenance.json", fold, sorted(set(real.subjects)), sorted(set(val_set.subjects)),
                      sorted(set(test_set.subjects)))
    arms = cfg_arms(cfg, oracle=extra.oracle is not None)
    class_counts = torch.bincount(real.labels, minlength=len(data.class_names)).tolist()
    n_real = len(real)
    t0 = time.perf_counter()
    done: dict[str, dict[str, Any]] = {}

    def arm_path(arm: Arm) -> Path:
        return fdir / "arms" / f"{arm.key}.json"

    def do_arm(arm: Arm, train_set: ImageSet, generator_subjects: dict[str, list[str]]) -> None:
        if arm_path(arm).is_file():
            done[arm.key] = json.loads(arm_path(arm).read_text(encoding="utf-8"))
            return
        prov.record("arms", arm.key, training_subjects(train_set, generator_subjects))
        log(f"fold {fold}: arm {arm.label} ({len(train_set)} training volumes)")
        if arm.kind == "linear":
            res = run_linear_arm(arm, fold, derive_seed(cfg.seed, fold, arm.key), train_set, val_set, test_set)
        else:
            res = run_arm(cfg, arm, fold, train_set, val_set, test_set, fdir / "arms" / arm.key, device)
        atomic_write_json(arm_path(arm), res)
        done[arm.key] = res
        log(f"fold {fold}: arm {arm.label}: val bal. acc {res['val']['balanced_accuracy']:.3f}, "
            f"test bal. acc {res['test']['balanced_accuracy']:.3f}")

    # Arms on real data only (and the oracle's fresh real subjects).
    for arm in arms:
        if arm.kind in ("real", "linear", "aug"):
            do_arm(arm, real, {})
        elif arm.kind == "curve":
            do_arm(arm, subject_subset(real, arm.subjects, derive_seed(cfg.seed, fold, "curve")), {})
        elif arm.kind == "oracle":
            counts = allocate(n_synthetic(arm.fraction, n_real), class_counts, cfg.cv.synthetic_classes)
            do_arm(arm, concat([real, first_per_class(extra.oracle, counts)]), {})
    real_ckpt = fdir / done["real"]["checkpoint"]
    generators: dict[str, Any] = {}
    gen_file = fdir / "generators.json"
    if gen_file.is_file():
        generators = json.loads(gen_file.read_text(encoding="utf-8"))
    permuted = next((a for a in arms if a.kind == "permuted"), None)

    def pool_for(g: str, g_arms: list[Arm]) -> dict[int, torch.Tensor]:
        gdir = fdir / "generators" / g
        prov.record("generators", g, sorted(set(real.subjects)))
        log(f"fold {fold}: training generator {g} on {len(real)} volumes of {len(set(real.subjects))} subjects")
        ckpt = train_generator(cfg, g, fold, real, gdir, device, resume)
        # One pool per class, large enough for the largest fraction and for TSTR (n_real volumes).
        n_max = max([n_synthetic(a.fraction, n_real) for a in g_arms if not a.tstr] + [n_real if cfg.cv.tstr else 0])
        per_class_max = [max(allocate(n_max, class_counts, cfg.cv.synthetic_classes)[c],
                             class_counts[c] if cfg.cv.tstr else 0) for c in range(len(class_counts))]
        return synthesize_pool(cfg, g, ckpt, fold, per_class_max, device)

    for g in cfg.cv.models:
        g_arms = [a for a in arms if a.generator == g]
        if all(arm_path(a).is_file() for a in g_arms) and g in generators:
            for a in g_arms:
                do_arm(a, real, {})  # loads the finished result
            continue
        pool = pool_for(g, g_arms)
        if g not in generators:
            generators[g] = {"class_agreement": class_agreement(real_ckpt, pool, device),
                             "subjects": len(prov.data["generators"][g])}
            atomic_write_json(gen_file, generators)
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
    if permuted is not None:
        g = best_generator(done, arms, permuted.fraction)
        if arm_path(permuted).is_file():
            do_arm(permuted, real, {})
        elif g is not None:
            pool = pool_for(g, [a for a in arms if a.generator == g])
            counts = allocate(n_synthetic(permuted.fraction, n_real), class_counts, cfg.cv.synthetic_classes)
            syn = take_synthetic(pool, counts, g, real)
            # Same volumes, labels shuffled: what is left of a gain without class information.
            perm = np.random.default_rng(derive_seed(cfg.seed, fold, "permuted")).permutation(len(syn))
            syn.labels = syn.labels[torch.as_tensor(perm)]
            arm = dataclasses.replace(permuted, generator=g)
            do_arm(arm, concat([real, syn]), {g: prov.data["generators"][g]})
            del pool
    results = {a.key: done[a.key] for a in arms if a.key in done}
    fold_result = {"fold": fold, "n_train": n_real, "n_val": len(val_set), "n_test": len(test_set),
                   "n_train_subjects": len(set(real.subjects)), "arms": results, "generators": generators,
                   "seconds": round(time.perf_counter() - t0, 2)}
    assert_no_leakage(prov.data, str(prov.path))
    atomic_write_json(fdir / "fold.json", fold_result)
    return fold_result


def _fold_worker(threads: int) -> None:
    """Initialiser of a fold worker process: its share of the machine's torch threads, plain log lines (two
    live progress bars would fight over one terminal)."""
    torch.set_num_threads(threads)
    plain_lines()


def run_folds_in_parallel(cfg: Config, out: Path, data: ImageSet, splits: Splits, folds: list[int],
                          device: torch.device, resume: bool, extra: ExtraSubjects) -> None:
    """Run `folds` in cfg.cv.workers local processes, the parent's torch threads split between them.

    The data travel to the workers through shared memory (torch.multiprocessing), so nothing is loaded twice; a
    worker's error (a MedgenError too) is raised here once the running folds have stopped.
    """
    workers = min(cfg.cv.workers, len(folds))
    threads = max(1, torch.get_num_threads() // workers)
    log(f"folds {', '.join(str(k + 1) for k in folds)} of {cfg.cv.folds}: {workers} worker processes, "
        f"{threads} thread(s) each")
    context = torch.multiprocessing.get_context("spawn")  # fork is unsafe once torch has started its threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_fold_worker,
                             initargs=(threads,)) as pool:
        jobs = {pool.submit(run_fold, cfg, out, data, splits, k, device, resume, extra): k for k in folds}
        try:
            for job in as_completed(jobs):
                job.result()  # re-raises the worker's error
                log(f"fold {jobs[job]}: finished")
        except BaseException:
            # Folds not started are dropped; a running one finishes its current work (its arms are kept for
            # --resume) before the error surfaces.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def finished_folds(out: Path, folds: int) -> list[int]:
    return [k for k in range(folds) if (out / f"fold_{k}" / "fold.json").is_file()]


def merge(out: str | Path, *, echo: bool = False) -> dict[str, Any]:
    """Aggregate finished folds into results.json/.csv/.md and plots (every fold must be finished)."""
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
    results = build_results(fold_results, run["class_names"], notes=run.get("notes"))
    write_report(out, results, echo=echo)
    write_page_safely(out, "cv-evaluate")  # OUT/index.html
    return results


def run_cv(cfg: Config, out: str | Path, *, data: ImageSet | str | Path | None = None, fold: int | None = None,
           resume: bool = False, overwrite: bool = False, echo: bool = False, prepare_only: bool = False,
           merge_when_done: bool = True) -> dict[str, Any] | None:
    """Run the augmentation experiment (all folds, or one with `fold`) and merge when every fold is done.

    Args:
        cfg: the resolved config (sections cv, classifier, models, steps, train, data, phantom).
        out: output folder.
        data: an ImageSet, a data spec (folder/datalist/table), or None for cfg.data.path / the phantom.
        fold: run only this fold (0-based), e.g. as one job of many sharing `out`.
        resume: continue into an existing folder, skipping finished folds and arms.
        overwrite: replace an existing folder.
        echo: print the results table to stdout at the end.
        prepare_only: only check the data and write the run folder (run.json, splits, the phantom's fresh
            subjects cached), for a launcher that then runs the folds as separate jobs.
        merge_when_done: merge when every fold is finished (a launcher's fold jobs leave it to the launcher).
    Returns:
        the merged results, or None when folds are still missing (a --fold job) or with prepare_only.
    """
    out = Path(out)
    if fold is not None and not 0 <= fold < cfg.cv.folds:
        raise MedgenError(f"--fold {fold} is out of range: the run has {cfg.cv.folds} folds (0..{cfg.cv.folds - 1})")
    if cfg.cv.synthetic_classes not in ("match", "balanced"):
        raise MedgenError(f"cv.synthetic_classes must be match or balanced, got {cfg.cv.synthetic_classes!r}")
    cfg_arms(cfg, oracle=True)  # validates fractions and learning-curve shares
    for g in cfg.cv.models:
        if not hasattr(get_model_class(g), "sample"):
            raise MedgenError(f"cv.models: {g!r} is not a generative model (it has no sample()); use e.g. vae, gan, alpha-gan")
    params = phantom_parameters(cfg, data)
    if cfg.cv.oracle and params is None:
        raise MedgenError(f"cv.oracle: the oracle arm adds fresh subjects from the phantom's generative process, so "
                          f"it needs the built-in phantom or a `medgen phantom` folder; {data or cfg.data.path} is "
                          "neither (set cv.oracle: false)")
    if cfg.cv.extra_test < 0:
        raise MedgenError(f"cv.extra_test must be 0 or more, got {cfg.cv.extra_test}")
    use_oracle = params is not None and cfg.cv.oracle is not False
    check_output_dir(out, overwrite=overwrite, resume=resume or fold is not None)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    images, source = load_cv_data(cfg, data)
    if len(images.class_names) < 2:
        raise MedgenError(f"{source}: cv-evaluate needs two or more classes, found {len(images.class_names)}")
    splits = make_splits(images.subjects, images.labels.numpy(), images.class_names, folds=cfg.cv.folds,
                         test_size=cfg.cv.test_size, seed=cfg.seed)
    check_learning_curve(cfg, images, splits)
    extra = ExtraSubjects()
    notes = []
    if use_oracle and any(a.kind == "oracle" for a in cfg_arms(cfg, oracle=True)):
        need = [0] * len(images.class_names)
        for k in range(cfg.cv.folds):
            counts = torch.bincount(images.labels[torch.as_tensor(splits.indices(images.subjects, k, "train"))],
                                    minlength=len(need)).tolist()
            for f in cfg.cv.fractions:
                alloc = allocate(n_synthetic(f, sum(counts)), counts, cfg.cv.synthetic_classes)
                need = [max(a, b) for a, b in zip(need, alloc, strict=True)]
        # The phantom balances its classes, so n = classes * the largest per-class need covers every class.
        extra.oracle = fresh_phantom_subjects(cfg, params, len(need) * max(need), "oracle", images.class_names)
    elif params is None:
        notes.append("no oracle arm: the data are not a medgen phantom, so no fresh subjects from the same "
                     "process exist (the positive control needs the built-in phantom or a `medgen phantom` folder)")
    if cfg.cv.extra_test > 0:
        if params is not None:
            extra.test = fresh_phantom_subjects(cfg, params, cfg.cv.extra_test, "test", images.class_names)
        else:
            notes.append(f"cv.extra_test ({cfg.cv.extra_test}) ignored: only phantom data can draw fresh test subjects")
    for note in notes:
        log(f"note: {note}")
    splits = prepare_run(cfg, out, images, source, resume=resume, overwrite=overwrite, fold=fold, notes=notes,
                         n_extra_test=len(extra.test) if extra.test is not None else 0)
    if prepare_only:
        return None
    todo = [fold] if fold is not None else list(range(cfg.cv.folds))
    if resume or fold is not None:
        for k in finished_folds(out, cfg.cv.folds):
            if k in todo:
                log(f"fold {k}: finished earlier, skipped")
                todo.remove(k)
    if cfg.cv.workers > 1 and len(todo) > 1:
        run_folds_in_parallel(cfg, out, images, splits, todo, device, resume, extra)
    else:
        for k in todo:
            log(f"fold {k + 1}/{cfg.cv.folds}")
            run_fold(cfg, out, images, splits, k, device, resume, extra)
    if not merge_when_done:
        return None
    if len(finished_folds(out, cfg.cv.folds)) == cfg.cv.folds:
        return merge(out, echo=echo)
    log(f"folds finished: {len(finished_folds(out, cfg.cv.folds))}/{cfg.cv.folds}; merge when all are done")
    write_page_safely(out, "cv-evaluate")  # OUT/index.html: the finished folds so far
    return None


__all__ = ["Arm", "LeakageError", "assert_no_leakage", "merge", "plan_arms", "run_cv"]
