"""Data-parallel training on CPU: 2 gloo processes vs one process with the same global batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from medgen.errors import MedgenError
from medgen.training import distributed as D

GLOBAL_BATCH = 4
ITERATIONS = 3
MODELS = {
    # Instance/layer norms only: per-sample statistics, so sharding the batch changes nothing.
    "alpha-gan": dict(spatial_dims=3, in_channels=1, num_classes=3, image_size=16, base_width=4, latent_dim=8,
                      code_hidden=16, g_norm="instance", e_norm="instance"),
    "classifier": dict(spatial_dims=3, in_channels=1, num_classes=3, image_size=16, base_width=2,
                       backbone="simple"),
}


def _train(model_name: str, rank: int, world: int) -> tuple[list[dict[str, float]], torch.Tensor]:
    """A few iterations of the real Step on sharded global batches; losses reduced over ranks."""
    from medgen.models.registry import create_model
    from medgen.runtime import resolve_precision
    from medgen.training.steps import Batch, StepContext, create_step

    torch.manual_seed(0)
    model = create_model(model_name, **MODELS[model_name])
    D.broadcast_model(model)
    step = create_step(model_name)
    opt = step.optimizers(model, 1e-3)
    prec = resolve_precision("fp32", torch.device("cpu"))
    ctx = StepContext(precision=prec, generator=torch.Generator().manual_seed(1), total_iterations=ITERATIONS,
                      grad_sync=D.average_gradients if world > 1 else None, rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(8, 1, 16, 16, 16, generator=gen) * 2 - 1
    labels = torch.arange(8) % 3
    order = torch.randperm(8, generator=gen)
    history = []
    for it in range(ITERATIONS):
        idx = order[(it * GLOBAL_BATCH) % 8:][:GLOBAL_BATCH]
        local = D.shard(idx, rank, world)
        ctx.iteration = it
        losses = step(model, Batch(images[local], labels[local]), opt, ctx)
        history.append(D.reduce_losses({k: float(v) for k, v in losses.items()}))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return history, params


def _data():
    import numpy as np

    from medgen.data.dataset import ImageSet

    gen = torch.Generator().manual_seed(3)
    images = torch.rand(8, 1, 16, 16, 16, generator=gen) * 2 - 1
    return ImageSet(images=images, labels=torch.arange(8) % 3, subjects=[f"s{i}" for i in range(8)],
                    class_names=["CN", "MCI", "AD"], affine=np.eye(4) * 3)


def _fit(out: str):
    """fit() itself: under torchrun env it shards, averages gradients and reduces the logged losses."""
    from medgen.config import TrainConfig
    from medgen.training.loop import fit

    train = TrainConfig(iterations=ITERATIONS, batch_size=GLOBAL_BATCH, ema_decay=0.0, precision="fp32",
                        channels_last=False, log_every=1, sample_every=0, checkpoint_every=0)
    kwargs = {k: v for k, v in MODELS["classifier"].items() if k not in ("spatial_dims", "in_channels",
                                                                         "num_classes", "image_size")}
    result = fit("classifier", _data(), out, model_kwargs=kwargs, train=train, device="cpu", seed=0)
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info, _ = D.init_distributed(torch.device("cpu"))
    assert info.world_size == world and info.rank == rank and info.backend == "gloo"
    results = {name: _train(name, rank, world) for name in MODELS}
    results["fit"] = _fit(f"{out}_fit")
    torch.save(results, f"{out}.{rank}")
    D.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_and_local_batch():
    idx = torch.arange(8)
    assert D.shard(idx, 1, 2).tolist() == [4, 5, 6, 7]
    assert D.local_batch_size(8, 4) == 2
    with pytest.raises(MedgenError, match="batch_size 6 does not split over 4"):
        D.local_batch_size(6, 4)


def test_single_process_helpers_are_no_ops():
    info, dev = D.init_distributed(torch.device("cpu"))
    assert not info.enabled and info.is_main and dev.type == "cpu"
    assert D.reduce_losses({"a": 1.5}) == {"a": 1.5}


def test_two_gloo_processes_match_one_process(tmp_path):
    out = str(tmp_path / "rank")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    single_fit = _fit(str(tmp_path / "single_fit"))
    assert ranks[0]["fit"] == ranks[1]["fit"]
    assert len(single_fit) == ITERATIONS
    for a, b in zip(ranks[0]["fit"], single_fit, strict=True):
        assert a["iteration"] == b["iteration"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    assert (tmp_path / "rank_fit" / "final.pt").is_file()  # written by rank 0
    for name in MODELS:
        single_hist, single_params = _train(name, 0, 1)
        (hist0, params0), (hist1, params1) = ranks[0][name], ranks[1][name]
        # Replicas stay identical: every optimizer step used the same averaged gradients.
        assert torch.equal(params0, params1), name
        assert hist0 == hist1  # logged losses are the all-reduced, global-batch values
        if name == "classifier":  # no noise: the whole run equals the single-process run
            for a, b in zip(hist0, single_hist, strict=True):
                for k in b:
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
            # Adam normalises each gradient, so an element whose gradient is ~0 can move by ~lr either way
            # on rounding noise; without gradient averaging nearly every element would differ.
            differ = ((params0 - single_params).abs() > 1e-5).float().mean().item()
            assert differ < 0.01, differ
        else:  # all noise (latents, gradient-penalty weights) comes from ctx.randn: the same run as one process
            for a, b in zip(hist0, single_hist, strict=True):
                for k in b:
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
            torch.testing.assert_close(params0, single_params, rtol=1e-4, atol=1e-5)
