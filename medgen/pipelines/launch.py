"""cv-evaluate beyond one process: every fold as its own job through submitit (SLURM, or local processes).

The folds of the augmentation experiment are independent: each trains its generators and classifiers on
its own training subjects. The launcher writes the run folder once (run.json, splits, the phantom's fresh
subjects cached), submits one job per unfinished fold (a SLURM job array on a cluster), waits, resubmits
failed folds (they resume: finished arms are kept) and merges. Results equal a single-process run: every
fold and arm seeds itself from the config, not from the process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from medgen.config import Config
from medgen.console import log
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.pipelines.cv import finished_folds, merge, run_cv

LAUNCHERS = ("local", "slurm")
Launcher = Literal["local", "slurm"]


def run_fold_job(cfg: Config, out: str, data: ImageSet | str | None, fold: int, threads: int) -> int:
    """One job: run fold `fold` into the shared run folder (no merge). Returns the fold index."""
    torch.set_num_threads(threads)
    run_cv(cfg, out, data=data, fold=fold, resume=True, merge_when_done=False)
    return fold


def check_launcher(launcher: str) -> None:
    """Fail fast, before any work, when the launcher cannot run here."""
    if launcher not in LAUNCHERS:
        raise MedgenError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    try:
        import submitit  # noqa: F401  (optional: pip install "medgen[cluster]")
    except ImportError:
        raise MedgenError("--launcher needs submitit: pip install 'medgen[cluster]' (or pip install submitit)") from None
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise MedgenError("--launcher slurm: no SLURM here (sbatch not found); use --launcher local to run the fold "
                          "jobs as processes on this machine")


def make_executor(launcher: Launcher, folder: Path, cfg: Config) -> Any:
    """A submitit executor for `launcher` with the config's job resources (logs under `folder`); call
    check_launcher first."""
    import submitit

    lc = cfg.launcher
    if launcher == "local":
        executor = submitit.LocalExecutor(folder=folder / "%j")
        executor.update_parameters(timeout_min=lc.time_minutes, gpus_per_node=lc.gpus_per_task)
        return executor
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    params: dict[str, Any] = dict(job_name="medgen-cv", time=lc.time_minutes, cpus_per_task=lc.cpus_per_task,
                                  mem=f"{lc.mem_gb}GB")
    if lc.gpus_per_task:
        params["gpus_per_node"] = lc.gpus_per_task
    if lc.partition:
        params["partition"] = lc.partition
    executor.update_parameters(**params)
    return executor


def run_cv_jobs(cfg: Config, out: str | Path, *, launcher: Launcher = "slurm", data: ImageSet | str | None = None,
                resume: bool = False, overwrite: bool = False, echo: bool = False) -> dict[str, Any]:
    """Run every unfinished fold as a job, wait, resubmit failures (cfg.launcher.retries times), merge.

    Args:
        cfg: the resolved config; cfg.launcher holds the job resources.
        out: the run folder (shared by the jobs; submitit's job logs go to OUT/jobs).
        launcher: "slurm" (a job array through sbatch) or "local" (one process per fold on this machine).
        data: as run_cv (an ImageSet is pickled into each job; a path is read by each job).
        resume: continue an existing run folder (finished folds are not resubmitted).
        overwrite: replace an existing run folder.
        echo: print the results table at the end.
    Returns:
        the merged results.
    """
    out = Path(out)
    check_launcher(launcher)
    run_cv(cfg, out, data=data, resume=resume, overwrite=overwrite, prepare_only=True)
    executor = make_executor(launcher, out / "jobs", cfg)
    threads = cfg.launcher.cpus_per_task
    for attempt in range(cfg.launcher.retries + 1):
        todo = [k for k in range(cfg.cv.folds) if k not in finished_folds(out, cfg.cv.folds)]
        if not todo:
            break
        with executor.batch():  # one SLURM job array
            jobs = [executor.submit(run_fold_job, cfg, str(out), data, k, threads) for k in todo]
        log(f"submitted {len(jobs)} fold job(s) ({launcher}): {', '.join(j.job_id for j in jobs)}; logs in {out / 'jobs'}")
        failed = []
        for k, job in zip(todo, jobs, strict=True):
            try:
                job.result()
                log(f"fold {k}: job {job.job_id} finished")
            except Exception as e:  # submitit re-raises the job's error (or a missing-result error) here
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                log(f"fold {k}: job {job.job_id} failed ({first[:200]})")
                failed.append(k)
        if failed and attempt == cfg.launcher.retries:
            raise MedgenError(f"fold(s) {', '.join(map(str, failed))} failed after {attempt + 1} attempt(s); job logs "
                              f"in {out / 'jobs'}; fix the cause and rerun with --resume")
        if failed:
            log(f"resubmitting fold(s) {', '.join(map(str, failed))} (finished arms are kept)")
    return merge(out, echo=echo)


__all__ = ["LAUNCHERS", "check_launcher", "make_executor", "run_cv_jobs", "run_fold_job"]
