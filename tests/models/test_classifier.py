import pytest
import torch

from medgen.models import create_model
from medgen.models.classifier import Classifier, ClassifierOutput
from medgen.runtime import resolve_precision
from medgen.training.steps import Batch, StepContext, create_step

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize(("spatial_dims", "name"),
                         [(3, "resnet18"), (3, "densenet121"), (3, "simple"), (3, "plain"), (2, "resnet18"), (2, "simple"),
                          (2, "plain")])
def test_backbones_shapes_and_backward(name, spatial_dims):
    kw = Classifier.tiny_kwargs(spatial_dims) | {"backbone": name, "num_classes": 4}
    if name == "densenet121":
        kw["image_size"] = 32  # four transitions need at least 32 voxels per edge
    model = create_model("classifier", **kw)
    x = torch.randn(2, 1, *[kw["image_size"]] * spatial_dims)
    out = model(x)
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (2, 4) and out.features.ndim == 2
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_bad_name_and_classes():
    from medgen.errors import MedgenError

    with pytest.raises(MedgenError):
        Classifier(backbone="vgg")
    with pytest.raises(MedgenError):
        Classifier(num_classes=1)


def test_step_reduces_loss_on_a_separable_toy_problem():
    torch.manual_seed(0)
    model = create_model("classifier", **Classifier.tiny_kwargs(3) | {"num_classes": 2})
    step = create_step("classifier", label_smoothing=0.0)
    opt = step.optimizers(model, lr=3e-3)
    x = torch.randn(8, 1, 16, 16, 16)
    y = torch.tensor([0, 1] * 4)
    x[y == 1] += 1.0  # class 1 is brighter
    ctx = StepContext(precision=resolve_precision("fp32", torch.device("cpu")), generator=torch.Generator())
    first = step(model, Batch(x, y), opt, ctx)["loss"].item()
    for _ in range(8):
        last = step(model, Batch(x, y), opt, ctx)["loss"].item()
    assert last < first


def test_input_standardisation_uses_training_statistics_and_survives_state_dict():
    torch.manual_seed(0)
    # instance norm needs more than one voxel on the last 2^3-strided grid: 32^3 input
    kw = Classifier.tiny_kwargs(3) | {"backbone": "plain", "norm": "instance", "standardize": True, "image_size": 32}
    model = create_model("classifier", **kw)
    train = torch.randn(6, 1, 32, 32, 32) * 2 + 3
    model.set_input_statistics(train)
    assert torch.allclose(model.input_mean, train.mean(0, keepdim=True))
    clone = create_model("classifier", **kw)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    x = torch.randn(2, 1, 32, 32, 32)
    assert torch.equal(model(x).logits, clone(x).logits)
    with pytest.raises(Exception, match="shape"):
        model.set_input_statistics(torch.randn(2, 1, 8, 8, 8))


def test_norm_only_for_plain_backbone():
    from medgen.errors import MedgenError

    with pytest.raises(MedgenError, match="plain"):
        Classifier(backbone="resnet18", norm="instance")
    with pytest.raises(MedgenError, match="norm"):
        Classifier(backbone="plain", norm="group")


def test_layer_norm_keeps_what_instance_norm_removes_before_pooling():
    # Instance norm standardises every channel of every sample over space, so the pooled features of a volume
    # and of the same volume with a brighter region barely differ; layer norm (one group) keeps the
    # channels' magnitudes relative to each other, which is where regional intensity shows up after pooling.
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    brighter = x.clone()
    brighter[..., :16, :, :] += 2.0
    spread = {}
    for norm in ("instance", "layer"):
        model = Classifier(image_size=32, base_width=4, backbone="plain", norm=norm).eval()
        with torch.no_grad():
            f = model(torch.cat([x, brighter])).features
        spread[norm] = (f[0] - f[1]).abs().mean().item() / f.abs().mean().item()
    assert spread["layer"] > 1.5 * spread["instance"]


def test_cosine_schedule_warms_up_and_decays_to_zero():
    step = create_step("classifier", schedule="cosine", warmup=0.1)
    f = [step.lr_factor(i, 100) for i in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0
    assert f[10] == pytest.approx(1.0) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert create_step("classifier").lr_factor(50, 100) == 1.0


def test_coordinate_channels_locate_each_axis_and_stay_out_of_the_state_dict():
    kw = Classifier.tiny_kwargs(3) | {"backbone": "plain", "coords": True}
    model = create_model("classifier", **kw)
    assert model.backbone.net[0].conv.in_channels == 1 + 3  # image + one coordinate per axis
    grid = model.grid[0]
    assert grid.shape == (3, 16, 16, 16) and grid.min() == -1 and grid.max() == 1
    assert torch.equal(grid[0, :, 0, 0], torch.linspace(-1, 1, 16)) and grid[0, 3].unique().numel() == 1
    assert "grid" not in model.state_dict()  # rebuilt from image_size: old checkpoints stay loadable
    assert model(torch.randn(2, 1, 16, 16, 16)).logits.shape == (2, 3)

