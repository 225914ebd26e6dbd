"""Runtime defaults: precision per device, channels_last, compile scope, and fast-path correctness."""

import pytest
import torch
from torch import nn

from medgen.runtime import (
    compile_model,
    cpu_bf16_supported,
    default_channels_last,
    default_precision,
    default_space_to_depth,
    memory_format,
    resolve_precision,
    to_channels_last,
    use_space_to_depth_stems,
)

CPU = torch.device("cpu")


def test_default_precision_cpu_is_bf16_only_with_native_kernels():
    name = default_precision(CPU)
    assert name in ("fp32", "bf16")
    if not cpu_bf16_supported():
        assert name == "fp32"
    prec = resolve_precision("auto", CPU)
    assert prec.name == name
    assert not prec.needs_scaler


def test_bf16_autocast_runs_convs_in_bf16_on_cpu():
    prec = resolve_precision("bf16", CPU)
    conv = nn.Conv3d(2, 4, 3, padding=1)
    with prec.autocast():
        y = conv(torch.randn(1, 2, 8, 8, 8))
    assert y.dtype == torch.bfloat16


def test_memory_format_and_channels_last_give_same_outputs():
    assert memory_format(5) == torch.channels_last_3d
    assert memory_format(4) == torch.channels_last
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.ConvTranspose3d(4, 2, 4, 2, 1))
    x = torch.randn(2, 1, 8, 8, 8)
    ref = net(x)
    to_channels_last(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    out = net(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_space_to_depth_stem_gives_same_values_and_double_backward(channels_last):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv3d(8, 4, 4, 2, 1),
                        nn.Conv3d(4, 4, 3, 1, 1))
    x = torch.randn(2, 1, 16, 16, 16, requires_grad=True)

    def grads():
        out = net(x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x)
        gx, = torch.autograd.grad(out.square().sum(), x, create_graph=True)  # as in the gradient penalty
        gw, = torch.autograd.grad(gx.square().sum(), net[0].weight)
        return out, gx, gw

    ref = grads()
    keys = list(net.state_dict())
    if channels_last:
        to_channels_last(net)
    assert use_space_to_depth_stems(net) == 1  # only the 1-channel k4 s2 p1 layer
    assert type(net[2]) is nn.Conv3d and type(net[3]) is nn.Conv3d
    assert list(net.state_dict()) == keys
    for a, b in zip(grads(), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    odd = torch.randn(1, 1, 15, 15, 15)  # odd sizes fall back to the direct convolution
    assert net[0](odd).shape == (1, 8, 7, 7, 7)


def test_bf16_channels_last_hazards_flags_padded_convs_on_tiny_maps():
    from medgen.runtime import bf16_channels_last_hazards

    class Net(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size
            self.down = nn.Conv3d(1, 4, 1)  # unpadded: never a hazard
            self.head = nn.Conv3d(4, 4, 3, 1, 1)

        def example_inputs(self, batch_size, generator):
            return {"x": torch.zeros(batch_size, 1, self.size, self.size, self.size)}

        def forward(self, x):
            return self.head(self.down(x))

    assert bf16_channels_last_hazards(Net(2)) == ["head"]  # k3 p1 on a 2^3 map
    assert bf16_channels_last_hazards(Net(8)) == []
    assert bf16_channels_last_hazards(nn.Linear(2, 2)) == ["?"]  # no way to build an input: treated as unsafe


@pytest.mark.skipif(not cpu_bf16_supported(), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("name", ["gan", "alpha-gan", "vae"])
def test_cpu_default_fast_path_gives_right_gradients(name):
    """Every parameter gradient of the default CPU path (bf16, channels_last_3d, space-to-depth) is close to
    fp32, over several draws (oneDNN's wrong bf16 channels_last kernels fail intermittently)."""
    from medgen.models.registry import create_model, get_model_class
    from medgen.runtime import bf16_channels_last_hazards

    kwargs = get_model_class(name).tiny_kwargs(3)
    for seed in range(4):
        torch.manual_seed(seed)
        ref_model = create_model(name, **kwargs)
        fast = create_model(name, **kwargs)
        fast.load_state_dict(ref_model.state_dict())
        assert bf16_channels_last_hazards(fast) == []
        to_channels_last(fast)
        use_space_to_depth_stems(fast)
        grads = []
        for model, prec in ((ref_model, "fp32"), (fast, "bf16")):
            inputs = ref_model.example_inputs(4, torch.Generator().manual_seed(seed))  # may hold a generator
            with resolve_precision(prec, CPU).autocast():
                out = model(**inputs)
            loss = sum(v.float().square().mean() for v in vars(out).values()
                       if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad)
            loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        ref, got = grads
        assert ref.keys() == got.keys()
        # bf16 rounding through a deep G -> D chain moves single gradients by 10-40% (most where the exact
        # gradient cancels, e.g. a conv bias before batch norm); a wrong kernel (the oneDNN case) gives values
        # off by orders of magnitude or NaN.
        for n in ref:
            assert torch.isfinite(got[n]).all(), n
            assert (got[n] - ref[n]).norm() <= 2 * ref[n].norm() + 1e-3, (n, seed)
        a = torch.cat([got[n].flatten() for n in ref]).double()
        b = torch.cat([ref[n].flatten() for n in ref]).double()
        assert (a - b).norm() <= 0.2 * b.norm(), (seed, float((a - b).norm() / b.norm()))


def test_default_channels_last_is_a_bool():
    assert isinstance(default_channels_last(CPU), bool)


class _WithCritic(nn.Module):
    compile_children = ("encoder", "generator")

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.generator = nn.Linear(2, 2)
        self.discriminator = nn.Linear(2, 1)


def test_compile_model_leaves_critics_eager():
    model = _WithCritic()
    keys = set(model.state_dict())
    done = compile_model(model)
    assert done == ["encoder", "generator"]
    assert model.generator._compiled_call_impl is not None
    assert model.discriminator._compiled_call_impl is None
    assert set(model.state_dict()) == keys  # checkpoints unchanged by compilation


def test_compile_model_compiles_critic_free_models_whole():
    model = nn.Sequential(nn.Linear(2, 2))
    assert compile_model(model) == [""]
    assert model._compiled_call_impl is not None


def _first_step_losses(name: str, precision: str, channels_last: bool, device: torch.device,
                       space_to_depth: bool = False) -> dict[str, float]:
    from medgen.models.registry import create_model, get_model_class
    from medgen.training.steps import Batch, StepContext, create_step

    torch.manual_seed(0)
    kwargs = get_model_class(name).tiny_kwargs(3)
    model = create_model(name, **kwargs).to(device)
    if channels_last:
        to_channels_last(model)
    if space_to_depth:
        use_space_to_depth_stems(model)
    step = create_step(name)
    opt = step.optimizers(model, 1e-4)
    prec = resolve_precision(precision, device)
    s = kwargs["image_size"]
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(4, 1, s, s, s, generator=gen) * 2 - 1).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last_3d)
    ctx = StepContext(precision=prec, generator=torch.Generator(device=device).manual_seed(2),
                      scalers={k: prec.make_scaler() for k in opt})
    losses = step(model, Batch(images, (torch.arange(4) % 3).to(device)), opt, ctx)
    return {k: float(v) for k, v in losses.items()}


def _assert_close_losses(fast: dict[str, float], ref: dict[str, float], rtol: float, atol: float) -> None:
    assert fast.keys() == ref.keys()
    for k in ref:
        assert abs(fast[k] - ref[k]) <= atol + rtol * abs(ref[k]), (k, fast[k], ref[k])


@pytest.mark.parametrize("name", ["gan", "alpha-gan"])
def test_default_cpu_fast_path_matches_fp32_losses(name):
    ref = _first_step_losses(name, "fp32", False, CPU)
    fast = _first_step_losses(name, default_precision(CPU), default_channels_last(CPU), CPU,
                              default_space_to_depth(CPU))
    _assert_close_losses(fast, ref, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not cpu_bf16_supported(), reason="no native bf16 on this CPU")
def test_bf16_channels_last_cpu_matches_fp32_losses():
    ref = _first_step_losses("alpha-gan", "fp32", False, CPU)
    fast = _first_step_losses("alpha-gan", "bf16", True, CPU)
    _assert_close_losses(fast, ref, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_cuda_defaults_are_bf16_channels_last():
    dev = torch.device("cuda")
    assert default_precision(dev) == ("bf16" if torch.cuda.is_bf16_supported() else "tf32")
    assert default_channels_last(dev)
    resolve_precision("bf16", dev)
    assert torch.backends.cudnn.allow_tf32
    resolve_precision("fp32", dev)
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gan", "alpha-gan"])
def test_cuda_fast_path_matches_fp32_losses(name):
    dev = torch.device("cuda")
    ref = _first_step_losses(name, "fp32", False, dev)
    fast = _first_step_losses(name, default_precision(dev), True, dev)
    _assert_close_losses(fast, ref, rtol=5e-2, atol=5e-2)
