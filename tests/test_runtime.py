"""Runtime defaults: precision per device, channels_last, compile scope, and fast-path correctness."""

import pytest
import torch
from torch import nn

from medgen.runtime import (
    bf16_conv_hazards,
    compile_model,
    cpu_bf16_supported,
    default_channels_last,
    default_precision,
    default_space_to_depth,
    guard_bf16_convs,
    has_instance_norm,
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


def test_bf16_conv_hazards_flags_kernels_larger_than_their_input():
    class Net(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size
            self.down = nn.Conv3d(1, 4, 1)  # a 1^3 kernel is never larger than its input
            self.head = nn.Conv3d(4, 4, 3, 1, 1)
            self.up = nn.ConvTranspose3d(4, 4, 3, 1, 1)

        def example_inputs(self, batch_size, generator):
            return {"x": torch.zeros(batch_size, 1, self.size, self.size, self.size)}

        def forward(self, x):
            return self.up(self.head(self.down(x)))

    assert bf16_conv_hazards(Net(2)) == ["head", "up"]  # k3 on a 2^3 map
    assert bf16_conv_hazards(Net(3)) == []
    assert bf16_conv_hazards(nn.Linear(2, 2)) == ["?"]  # no way to build an input: treated as unsafe


def test_guarded_conv_computes_in_fp32_under_cpu_autocast():
    class Net(nn.Sequential):
        in_channels, image_size, spatial_dims = 1, 2, 3  # the probe's input: [1, 1, 2, 2, 2]

        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    net = Net(nn.Conv3d(1, 32, 1), nn.ReLU(), nn.Conv3d(32, 32, 3, 1, 1))
    x = torch.randn(4, 1, 2, 2, 2)
    keys = list(net.state_dict())

    def grads():
        net.zero_grad()
        with resolve_precision("bf16", CPU).autocast():
            out = net(x)
        out.float().square().sum().backward()
        return out, net[2].weight.grad.clone()

    ref_out = net(x)
    assert guard_bf16_convs(net) == ["2"]
    assert list(net.state_dict()) == keys
    out, gw = grads()
    assert out.dtype == torch.float32  # the guarded layer left autocast
    net.zero_grad()
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out.detach(), rtol=0.02, atol=0.02)  # only the 1^3 conv ran in bf16
    assert torch.isfinite(gw).all()
    assert (gw - net[2].weight.grad).norm() <= 0.05 * net[2].weight.grad.norm()
    assert not has_instance_norm(net) and has_instance_norm(nn.Sequential(nn.InstanceNorm3d(2)))


@pytest.mark.skipif(not cpu_bf16_supported(), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("name", ["gan", "alpha-gan", "vae", "classifier"])
def test_cpu_default_fast_path_gives_right_gradients(name):
    """Every parameter gradient of the default CPU path (bf16 with the conv guard, channels_last_3d,
    space-to-depth) is close to fp32, over several draws (oneDNN's wrong bf16 kernels fail intermittently)."""
    from medgen.models.registry import create_model, get_model_class

    kwargs = get_model_class(name).tiny_kwargs(3)
    if name == "classifier":
        # the quick preset's kind of network (the width-2 ResNet is too ill-conditioned for any bf16 check)
        kwargs.update(backbone="plain", base_width=8, norm="instance", standardize=True, image_size=32)
    for seed in range(4):
        torch.manual_seed(seed)
        ref_model = create_model(name, **kwargs)
        fast = create_model(name, **kwargs)
        fast.load_state_dict(ref_model.state_dict())
        guarded = guard_bf16_convs(fast)
        if name == "classifier":
            assert guarded  # the 16^3 ResNet's last stages run on 1-2 voxel maps
        to_channels_last(fast)
        use_space_to_depth_stems(fast)
        grads = []
        # fp32; the fast path; PyTorch's own bf16 kernels (oneDNN off), the yardstick for bf16 rounding
        for model, prec, onednn in ((ref_model, "fp32", True), (fast, "bf16", True), (ref_model, "bf16", False)):
            model.zero_grad()
            gen = torch.Generator().manual_seed(seed)
            if hasattr(ref_model, "example_inputs"):
                inputs = ref_model.example_inputs(4, gen)  # may hold a generator
            else:
                inputs = {"x": torch.rand(4, kwargs["in_channels"], *[kwargs["image_size"]] * 3, generator=gen)}
            with torch.backends.mkldnn.flags(enabled=onednn), resolve_precision(prec, CPU).autocast():
                out = model(**inputs)
                loss = sum(v.float().square().mean() for v in vars(out).values()
                           if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad)
                loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        ref, got, native = grads
        assert ref.keys() == got.keys() == native.keys()

        def err(g, n=None, ref=ref):
            names = [n] if n else list(ref)
            a = torch.cat([g[k].flatten() for k in names]).double()
            b = torch.cat([ref[k].flatten() for k in names]).double()
            return float((a - b).norm()), float(b.norm())

        # bf16 rounding alone moves single gradients by 10-40% in the generators (most where the exact gradient
        # cancels, e.g. a conv bias before batch norm) and by up to ~100% in the tiny batch-norm ResNet, as
        # PyTorch's own bf16 kernels show; a wrong kernel (the oneDNN case) is off by orders of magnitude or NaN.
        for n in ref:
            assert torch.isfinite(got[n]).all(), n
            e, r = err(got, n)
            assert e <= max(2 * r, 3 * err(native, n)[0]) + 1e-2, (n, seed)
        e, r = err(got)
        assert e <= max(0.2 * r, 1.5 * err(native)[0]), (seed, e / r, err(native)[0] / r)


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
