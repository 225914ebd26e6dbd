"""cv-evaluate --launcher: one submitit job per fold gives the results of a single-process run."""

import json

import pytest
import torch
from test_cv import tiny_config, tiny_data

from medgen.errors import MedgenError
from medgen.pipelines import launch
from medgen.pipelines.cv import run_cv

pytestmark = pytest.mark.usefixtures("one_thread")


def _arm_predictions(out, folds, arms):
    return {(f, a): json.loads((out / f"fold_{f}" / "arms" / f"{a}.json").read_text())["test_predictions"]
            for f in range(folds) for a in arms}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The one-process reference run the launch paths are compared with: (run folder, results)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as under one_thread, which is function-scoped
    out = tmp_path_factory.mktemp("single")
    try:
        return out, run_cv(tiny_config(), out, data=tiny_data())
    finally:
        torch.set_num_threads(n)


def test_local_fold_jobs_equal_a_single_process_run(tmp_path, single_run):
    pytest.importorskip("submitit")
    single_out, single = single_run
    cfg = tiny_config()
    cfg.launcher.cpus_per_task = 1
    jobs = launch.run_cv_jobs(cfg, tmp_path / "jobs", launcher="local", data=tiny_data())
    arms = [a["arm"] for a in single["arms"]]
    assert [a["arm"] for a in jobs["arms"]] == arms
    for x, y in zip(single["arms"], jobs["arms"], strict=True):
        for key in ("val_accuracy", "test_accuracy", "test_balanced_accuracy", "test_macro_auc"):
            assert x[key] == y[key], (x["arm"], key)
    assert _arm_predictions(single_out, 2, arms) == _arm_predictions(tmp_path / "jobs", 2, arms)
    logs = list((tmp_path / "jobs" / "jobs").rglob("*_log.out"))
    assert len(logs) == 2  # one submitit job per fold, its log kept in the run folder


def test_fold_worker_processes_equal_a_single_process_run(tmp_path, single_run):
    single_out, single = single_run
    data = tiny_data()
    cfg = tiny_config()
    cfg.cv.workers = 2  # one thread each under the one_thread fixture, as the single run
    parallel = run_cv(cfg, tmp_path / "parallel", data=data)
    arms = [a["arm"] for a in single["arms"]]
    assert [a["arm"] for a in parallel["arms"]] == arms
    assert _arm_predictions(single_out, 2, arms) == _arm_predictions(tmp_path / "parallel", 2, arms)
    # the worker count is not part of the run's identity: a finished run resumes with another
    cfg.cv.workers = 1
    assert run_cv(cfg, tmp_path / "parallel", data=data, resume=True)["arms"] == parallel["arms"]


def test_a_failing_fold_worker_is_one_clear_error(tmp_path):
    data = tiny_data()
    cfg = tiny_config()
    cfg.cv.workers = 2
    cfg.classifier.name = "nonet"  # every fold's first classifier fails to build, in the workers
    with pytest.raises(MedgenError, match="nonet"):
        run_cv(cfg, tmp_path / "run", data=data)
    assert not (tmp_path / "run" / "results.json").exists()


class _InProcessJob:
    def __init__(self, job_id, fn, args, fail):
        self.job_id, self._fn, self._args, self._fail = job_id, fn, args, fail

    def result(self):
        if self._fail:
            raise RuntimeError("job crashed\nnode lost")
        return self._fn(*self._args)


class _FlakyExecutor:
    """Runs jobs in this process; the first job of fold 1 fails (a lost node)."""

    def __init__(self):
        self.submitted = []

    def batch(self):
        import contextlib

        return contextlib.nullcontext()

    def submit(self, fn, *args):
        fold = args[3]
        fail = fold == 1 and fold not in self.submitted
        self.submitted.append(fold)
        return _InProcessJob(str(len(self.submitted)), fn, args, fail)


def test_failed_fold_job_is_resubmitted_then_merged(tmp_path, monkeypatch):
    ex = _FlakyExecutor()
    monkeypatch.setattr(launch, "check_launcher", lambda name: None)
    monkeypatch.setattr(launch, "make_executor", lambda *a: ex)
    cfg = tiny_config()
    cfg.launcher.retries = 1
    results = launch.run_cv_jobs(cfg, tmp_path / "run", launcher="local", data=tiny_data())
    assert ex.submitted == [0, 1, 1]  # only the failed fold went again
    assert (tmp_path / "run" / "results.json").is_file() and results["arms"]

    ex2 = _FlakyExecutor()
    monkeypatch.setattr(launch, "make_executor", lambda *a: ex2)
    cfg.launcher.retries = 0
    with pytest.raises(MedgenError, match=r"fold\(s\) 1 failed after 1 attempt"):
        launch.run_cv_jobs(cfg, tmp_path / "run2", launcher="local", data=tiny_data())
    assert not (tmp_path / "run2" / "results.json").exists()


def test_slurm_launcher_without_slurm_is_one_clear_error(monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    with pytest.raises(MedgenError, match="sbatch not found"):
        launch.check_launcher("slurm")
    with pytest.raises(MedgenError, match="--launcher must be one of"):
        launch.check_launcher("kubernetes")
