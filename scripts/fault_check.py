"""Driver of scripts/fault-check: run medgen on bad inputs and faults; count the clean outcomes.

Each case runs `python -m cli ...` in a subprocess. Clean means: exit 0 where the input is valid;
otherwise a non-zero exit, exactly one line on stderr that is not a generic "Type: message (set
MEDGEN_DEBUG=1 ...)" line (typer's own usage-error box, exit 2, counts as one message), no traceback,
the expected words in it when the case names some, and every user file the case protects still there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

MEDGEN = [sys.executable, "-m", "medgen"]
TINY = """\
seed: 0
models:
  vae: {base_width: 4, latent_dim: 8}
  parallel-vae: {base_width: 4}
train: {iterations: 2, batch_size: 2, log_every: 1, sample_every: 0, checkpoint_every: 2}
data: {size: 16}
"""
AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])


@dataclass
class Case:
    name: str
    args: list[str]
    ok: bool = False  # True: valid input, must exit 0
    expect: str | None = None  # words the error line must hold
    keep: list[Path] = field(default_factory=list)  # files that must survive
    absent: list[Path] = field(default_factory=list)  # paths that must not be created
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    run: Callable[[Case], tuple[int, str]] | None = None  # custom runner (kills, races)
    timeout: float = 120


def medgen(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 120) -> tuple[int, str]:
    e = {**os.environ, **(env or {})}
    try:
        p = subprocess.run(MEDGEN + args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -999, f"timed out after {timeout:.0f} s"
    return p.returncode, p.stderr


def judge(case: Case, rc: int, err: str) -> str | None:
    """None when clean, else why not."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    lost = [str(p) for p in case.keep if not p.exists()]
    made = [str(p) for p in case.absent if p.exists()]
    if lost:
        return f"lost {', '.join(lost)}"
    if made:
        return f"left {', '.join(made)}"
    if "Traceback" in err:
        return "traceback"
    if case.ok:
        return None if rc == 0 else f"exit {rc}: {lines[-1] if lines else ''}"
    if rc == 0:
        return "exit 0 on bad input"
    if rc == -999:
        return err
    usage = rc == 2 and any("Invalid value" in ln or "Error" in ln for ln in lines)
    if not usage and len(lines) != 1:
        return f"{len(lines)} lines on stderr"
    if "set MEDGEN_DEBUG=1" in err:
        return f"generic: {lines[0]}"
    if case.expect and case.expect.lower() not in err.lower():
        return f"unclear: {lines[0] if lines else ''}"
    return None


def write_volumes(folder: Path, n: int, shape=(16, 16, 16), affine: np.ndarray | None = AFFINE, labels=None) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        x = rng.random(shape).astype(np.float32) + (i % 3)
        img = nib.Nifti1Image(x, affine)
        if affine is None:  # a zero affine: an all-zero sform, no qform
            h = nib.Nifti1Header()
            h.set_data_shape(shape)
            h.set_data_dtype(np.float32)
            h.set_qform(None, code=0)
            h.set_sform(np.zeros((4, 4)), code=1)
            img = nib.Nifti1Image(x, None, header=h)
        nib.save(img, str(folder / f"s{i}.nii.gz"))
        lab = labels[i] if labels else ["CN", "MCI", "AD"][i % 3]
        items.append({"image": f"s{i}.nii.gz", "label": lab, "subject": f"p{i}"})
    return items


def datalist(folder: Path, items: list[dict], name: str = "datalist.json") -> Path:
    p = folder / name
    p.write_text(json.dumps({"training": items}))
    return p


def background(args: list[str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(MEDGEN + args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(pred: Callable[[], bool], timeout: float = 60) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def partials(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")] if out.parent.exists() else []


def phantom_in_flight(out: Path, n: int) -> subprocess.Popen:
    """A background `medgen phantom` into `out`, returned once its partial folder exists."""
    p = background(["phantom", "--n", str(n), "--size", "16", "--out", str(out)])
    wait_for(lambda: bool(partials(out)))
    return p


def nan_then_synth(w: Path, ph: Path, cfg: Path) -> tuple[int, str]:
    """Training into NaN must stop with an error; synth on what it left must refuse or write finite volumes."""
    out = w / "run-nan"
    rc, err = medgen(["train", "vae", "--data", str(ph), "--config", str(cfg), "--out", str(out)])
    if rc == 0:
        return 0, err
    if not (out / "last.pt").exists():
        return rc, err
    rc2, err2 = medgen(["synth", "--checkpoint", str(out), "--out", str(w / "syn-nan"), "--n", "3"])
    if rc2 == 0:
        for f in (w / "syn-nan").rglob("*.nii.gz"):
            x = np.asarray(nib.load(str(f)).dataobj)
            if not np.isfinite(x).all() or float(x.max() - x.min()) == 0.0:
                return 1, f"synth wrote a NaN or constant volume from the last good checkpoint: {f.name}"
        return rc, err  # the checkpoint named good is good; train's own error line is judged
    return rc2, err2


def build_cases(w: Path) -> list[Case]:
    cfg = w / "tiny.yaml"
    cfg.write_text(TINY)
    ph, run = w / "ph", w / "run"
    rc, err = medgen(["phantom", "--n", "6", "--size", "16", "--out", str(ph)])
    assert rc == 0, err
    rc, err = medgen(["train", "vae", "--data", str(ph), "--config", str(cfg), "--out", str(run)])
    assert rc == 0, err
    home = w / "home"
    home.mkdir()
    s = w / "s"
    s.mkdir()
    (s / "keep.txt").write_text("x")
    foreign = w / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    (w / "afile").write_text("x")
    good = write_volumes(w / "vols", 6)
    vols = w / "vols"

    def bad_cfg(name: str, text: str) -> Path:
        p = w / f"{name}.yaml"
        p.write_text(TINY + text if not text.startswith("!") else text[1:])
        return p

    def train_with(name: str, text: str, expect: str, *extra: str) -> Case:
        out = w / f"run-{name}"
        return Case(f"train config {name}", ["train", "vae", "--data", str(ph), "--config", bad_cfg(name, text).as_posix(),
                                             "--out", str(out), *extra], expect=expect, absent=[out])

    cases: list[Case] = []
    add = cases.append
    # ---- item 1: dangerous --out
    add(Case("phantom --out . --overwrite", ["phantom", "--n", "3", "--size", "16", "--out", ".", "--overwrite"],
             cwd=s, keep=[s / "keep.txt"], expect="current folder"))
    add(Case("phantom --out '' --overwrite", ["phantom", "--n", "3", "--size", "16", "--out", "", "--overwrite"],
             cwd=s, keep=[s / "keep.txt"], expect="--out"))
    add(Case("phantom --out .. --overwrite", ["phantom", "--n", "3", "--size", "16", "--out", "..", "--overwrite"],
             cwd=s, keep=[s / "keep.txt"], expect="parent"))
    add(Case("train --out . --overwrite", ["train", "vae", "--data", str(ph), "--config", str(cfg), "--out", ".",
                                           "--overwrite"], cwd=s, keep=[s / "keep.txt"], expect="current folder"))
    add(Case("phantom --out /", ["phantom", "--n", "3", "--size", "16", "--out", "/", "--overwrite"], expect="root"))
    add(Case("phantom --out $HOME", ["phantom", "--n", "3", "--size", "16", "--out", str(home), "--overwrite"],
             env={"HOME": str(home)}, expect="home"))
    add(Case("phantom --out under a file", ["phantom", "--n", "3", "--size", "16", "--out", str(w / "afile" / "o")],
             expect="afile"))
    # ---- item 2: --out is or holds an input
    add(Case("synth --out RUN(checkpoint)", ["synth", "--checkpoint", str(run), "--out", str(run), "--n", "3",
                                              "--overwrite"], keep=[run / "last.pt"], expect="input"))
    add(Case("train --out DATA", ["train", "vae", "--data", str(ph), "--config", str(cfg), "--out", str(ph),
                                  "--overwrite"], keep=[ph / "datalist.json"], expect="input"))
    add(Case("train --out holds datalist", ["train", "vae", "--data", str(vols / "dl.json"), "--config", str(cfg),
                                            "--out", str(vols), "--overwrite"], keep=[vols / "s0.nii.gz"], expect="input"))
    add(Case("phantom --overwrite foreign folder", ["phantom", "--n", "3", "--size", "16", "--out", str(foreign),
                                                    "--overwrite"], keep=[foreign / "thesis.tex"], expect="not written by medgen"))
    add(Case("phantom --config inside --out", ["phantom", "--n", "3", "--size", "16", "--config", str(w / "cfgdir" / "c.yaml"),
                                               "--out", str(w / "cfgdir"), "--overwrite"],
             keep=[w / "cfgdir" / "c.yaml"], expect="input"))
    (w / "cfgdir").mkdir()
    (w / "cfgdir" / "c.yaml").write_text("seed: 1\n")
    (w / "cfgdir" / ".medgen").write_text("{}")
    datalist(vols, good, "dl.json")
    add(Case("phantom --overwrite own output", ["phantom", "--n", "3", "--size", "16", "--out", str(w / "own")], ok=True))
    add(Case("phantom --overwrite own output again", ["phantom", "--n", "3", "--size", "16", "--out", str(w / "own"),
                                                      "--overwrite"], ok=True))

    # ---- item 3: races and concurrent writers
    def concurrent(case: Case) -> tuple[int, str]:
        out = w / "conc"
        first = background(["phantom", "--n", "5000", "--size", "16", "--seed", "1", "--out", str(out)])
        wait_for(lambda: (w / ".conc.writer.lock").exists())
        rc, err = medgen(["phantom", "--n", "6", "--size", "16", "--seed", "2", "--out", str(out)])
        still = first.poll() is None
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
        if not still:
            return 1, "the first writer finished before the second started (make it longer)"
        if out.exists() and (out / "phantom.json").is_file():
            return 1, "the second writer wrote its output over the first one's"
        return rc, err

    add(Case("two concurrent phantom runs", [], run=concurrent, expect="another medgen process"))

    def appears(case: Case) -> tuple[int, str]:
        out = w / "race"
        p = phantom_in_flight(out, 40)
        out.mkdir()
        (out / "precious.txt").write_text("mine")
        p.wait(timeout=300)
        return p.returncode, p.stderr.read()

    add(Case("folder appears during phantom", [], run=appears, keep=[w / "race" / "precious.txt"], expect="appeared"))

    # ---- item 9: kills
    def sigterm(case: Case) -> tuple[int, str]:
        out = w / "term"
        p = phantom_in_flight(out, 200)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        err = p.stderr.read()
        if p.returncode != 143:
            return p.returncode if p.returncode else 1, f"exit {p.returncode} (expected 143): {err}"
        if partials(out) or out.exists():
            return 1, "SIGTERM left a partial folder"
        return p.returncode, err

    add(Case("SIGTERM of phantom", [], run=sigterm, expect="terminated"))

    def kill9(case: Case) -> tuple[int, str]:
        out = w / "k9"
        p = phantom_in_flight(out, 200)
        p.kill()
        p.wait()
        if not partials(out):
            return 1, "no partial folder to test with"
        rc, err = medgen(["phantom", "--n", "3", "--size", "16", "--out", str(out)])
        if partials(out):
            return 1, "stale partial folder of the killed run left"
        return rc, err

    add(Case("kill -9 then rerun removes the partial", [], run=kill9, ok=True))

    # ---- item 8: YAML alias bomb and model/step names
    bomb = "!a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "models: {vae: {x: *i}}\n"
    add(train_with("bomb", bomb, "aliases"))
    add(train_with("vea", "steps: {vea: {kl_weight: 1.0}}\n", "did you mean 'vae'"))
    add(Case("train config models.vea", ["train", "vae", "--data", str(ph), "--config",
                                         bad_cfg("mvea", "!models: {vea: {base_width: 4}}\n").as_posix(),
                                         "--out", str(w / "run-mvea")], expect="did you mean", absent=[w / "run-mvea"]))
    # ---- items 10-12: config values found before anything is created
    for name, text, expect in [
        ("ema2", "!train: {ema_decay: 2}\n", "ema_decay"),
        ("log-neg", "!train: {log_every: -1}\n", "log_every"),
        ("sample-neg", "!train: {sample_every: -1}\n", "sample_every"),
        ("ckpt-neg", "!train: {checkpoint_every: -1}\n", "checkpoint_every"),
        ("maxsec-neg", "!train: {max_seconds: -1}\n", "max_seconds"),
        ("lr-neg", "!train: {lr: -0.001}\n", "train.lr"),
        ("lr-nan", "!train: {lr: .nan}\n", "train.lr"),
        ("size20", "!data: {size: 20}\n", "data.size"),
        ("kwarg-typo", "!models: {vae: {base_widht: 4}}\n", "base_widht"),
        ("steps-typo", "!steps: {vae: {kl_wieght: 1.0}}\n", "kl_wieght"),
        ("seed-huge", "!seed: 100000000000000000000000\n", "seed"),
        ("kwarg-negative", "!models: {vae: {base_width: -3}}\n", "base_width"),
    ]:
        add(train_with(name, text, expect))
    add(Case("train --precision fp8", ["train", "vae", "--data", str(ph), "--config", str(cfg), "--out",
                                       str(w / "run-fp8"), "--precision", "fp8"], expect="precision", absent=[w / "run-fp8"]))
    add(Case("train --seed 1e23", ["train", "vae", "--data", str(ph), "--config", str(cfg), "--out",
                                   str(w / "run-seed"), "--seed", str(10**23)], expect="seed", absent=[w / "run-seed"]))
    add(Case("synth --batch-size 0", ["synth", "--checkpoint", str(run), "--out", str(w / "sy0"), "--n", "3",
                                      "--batch-size", "0"], expect="batch-size"))
    add(Case("synth --n 1e12", ["synth", "--checkpoint", str(run), "--out", str(w / "sy1"), "--n", str(10**12)],
             expect="--n"))
    add(Case("segment --panels -1", ["segment", "--checkpoint", str(run), "--data", str(ph), "--out", str(w / "sg"),
                                     "--panels", "-1"], expect="panels"))
    add(Case("evaluate-synth --n 0", ["evaluate-synth", "--checkpoint", str(run), "--data", str(ph), "--n", "0"],
             expect="--n"))
    add(Case("evaluate-synth --pairs 0", ["evaluate-synth", "--checkpoint", str(run), "--data", str(ph), "--pairs", "0"],
             expect="pairs"))
    add(Case("evaluate-synth --json DIR", ["evaluate-synth", "--checkpoint", str(run), "--data", str(ph),
                                           "--json", str(w)], expect="folder"))
    add(Case("synth valid", ["synth", "--checkpoint", str(run), "--out", str(w / "syn"), "--n", "3"], ok=True))

    # ---- item 12: file-system faults and hostile inputs
    loop = w / "loop.json"
    os.symlink(loop, loop)
    add(Case("data-check symlink loop", ["data-check", "--data", str(loop)], expect="loop"))
    deep = w / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    add(Case("data-check 200k-deep JSON", ["data-check", "--data", str(deep)], expect="deep"))
    rgb_dir = w / "rgb"
    rgb_dir.mkdir()
    rgb = np.zeros((16, 16, 16, 1, 3), dtype=np.uint8)
    nib.save(nib.Nifti1Image(rgb, AFFINE), str(rgb_dir / "rgb.nii.gz"))
    datalist(rgb_dir, [{"image": "rgb.nii.gz", "label": "CN"}] + [{**g, "image": str(vols / g["image"])} for g in good[1:3]])
    add(Case("data-check RGB NIfTI", ["data-check", "--data", str(rgb_dir / "datalist.json")], expect="rgb.nii.gz"))

    # ---- item 13: misleading messages
    (w / "m1").mkdir()
    datalist(w / "m1", [{"image": 12, "label": "CN"}])
    add(Case("datalist image: 12", ["data-check", "--data", str(w / "m1" / "datalist.json")], expect="path string"))
    (w / "m2" / "adir").mkdir(parents=True)
    datalist(w / "m2", [{"image": "adir", "label": "CN"}])
    add(Case("datalist image is a folder", ["data-check", "--data", str(w / "m2" / "datalist.json")], expect="folder"))

    # ---- items 4-7 (results that lie)
    nan_cfg = bad_cfg("lr1e8", "!train: {iterations: 6, batch_size: 2, lr: 1.0e+8, checkpoint_every: 1, sample_every: 0}\n"
                      "models: {vae: {base_width: 4, latent_dim: 8}}\ndata: {size: 16}\n")
    add(Case("train lr 1e8 (NaN) then synth", [], run=lambda c: nan_then_synth(w, ph, nan_cfg)))
    add(Case("train --resume with another seed", ["train", "vae", "--data", str(ph), "--config", str(cfg), "--out",
                                                  str(run), "--resume", "--seed", "99"], expect="seed"))
    zero = w / "zero"
    items = write_volumes(zero, 6, affine=None)
    datalist(zero, items)
    add(Case("data-check zero affine", ["data-check", "--data", str(zero / "datalist.json")], expect="affine"))
    tiny_vol = w / "tiny2"
    datalist(tiny_vol, write_volumes(tiny_vol, 6, shape=(2, 2, 2)))
    add(Case("data-check 2x2x2 volume", ["data-check", "--data", str(tiny_vol / "datalist.json")], expect="small"))
    fl = w / "float"
    datalist(fl, write_volumes(fl, 6, labels=[0, 1, 1.5, 0, 1, 1.5]))
    add(Case("datalist label 1.5", ["data-check", "--data", str(fl / "datalist.json")], expect="1.5"))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-k", default="", help="run only cases whose name holds this")
    ap.add_argument("-v", action="store_true", help="print every case's stderr")
    a = ap.parse_args()
    w = Path(tempfile.mkdtemp(prefix="medgen-fault-"))
    os.environ.setdefault("MEDGEN_CACHE_DIR", str(w / "cache"))
    start = time.time()
    try:
        cases = [c for c in build_cases(w) if a.k in c.name]
        clean = 0
        failed = []
        for c in cases:
            rc, err = c.run(c) if c.run else medgen(c.args, cwd=c.cwd, env=c.env, timeout=c.timeout)
            why = judge(c, rc, err)
            clean += why is None
            print(f"{'clean' if why is None else 'FAIL '}  {c.name}" + ("" if why is None else f"  -- {why}"))
            if a.v:
                print("    " + err.strip().replace("\n", "\n    "))
            if why is not None:
                failed.append(c.name)
        print(f"{len(cases)} tried / {clean} clean ({time.time() - start:.0f} s)")
        return 0 if clean == len(cases) else 1
    finally:
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
