"""Models by name: forward shapes on every input they serve, parameter counts, seeded init that
leaves the global RNG alone, clear errors."""

import pytest
import torch

from fl_sim.models import MODEL_NAMES, build_model, count_parameters

SHAPES = [(60,), (1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize(
    "name, shape", [(n, s) for n in ("logreg", "mlp", "lenet5", "cifarnet") for s in SHAPES if n in ("logreg", "mlp") or len(s) == 3]
)
def test_forward_shapes(name, shape):
    m = build_model(name, shape, 7, hidden=[16, 8])
    with torch.no_grad():
        out = m(torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, shape, hidden, params",
    [
        ("logreg", (60,), None, 61 * 10),
        ("logreg", (1, 28, 28), None, 785 * 10),
        ("mlp", (60,), None, 61 * 200 + 201 * 10),
        ("mlp", (1, 28, 28), [300, 100], 785 * 300 + 301 * 100 + 101 * 10),
        # LeNet-5: conv 1·6·25+6, 6·16·25+16, fc 400·120+120, 120·84+84, 84·10+10
        ("lenet5", (1, 28, 28), None, 156 + 2416 + 48120 + 10164 + 850),
        ("lenet5", (1, 8, 8), None, 156 + 2416 + 48120 + 10164 + 850),
        ("lenet5", (3, 32, 32), None, 456 + 2416 + 48120 + 10164 + 850),
        # CifarNet: 3·64·25+64, 64·64·25+64, 2304·384+384, 384·192+192, 192·10+10 = 1.07M (Abdi)
        ("cifarnet", (3, 32, 32), None, 4864 + 102464 + 885120 + 73920 + 1930),
    ],
)
def test_parameter_counts(name, shape, hidden, params):
    assert count_parameters(build_model(name, shape, 10, hidden=hidden)) == params


def test_classic_lenet_feature_maps():
    """28x28 (conv1 padded) and 32x32 (unpadded) reach LeNet-5's 16x5x5 map before the adaptive pool."""
    for shape in ((1, 28, 28), (3, 32, 32)):
        m = build_model("lenet5", shape, 10)
        assert m.features[:6](torch.zeros(1, *shape)).shape == (1, 16, 5, 5)


def test_resnet18_cifar_variant():
    m = build_model("resnet18", (3, 32, 32), 10)
    assert count_parameters(m) == 11_173_962  # torchvision resnet18 with the 3x3/1 stem, 10 classes
    assert m.stem[0].kernel_size == (3, 3) and m.stem[0].stride == (1, 1)
    m.eval()
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_seeded_init_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("lenet5", (1, 8, 8), 3, seed=4)
    after = torch.rand(1)
    b = build_model("lenet5", (1, 8, 8), 3, seed=4)
    c = build_model("lenet5", (1, 8, 8), 3, seed=5)
    assert torch.equal(before, after)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("vgg", (3, 32, 32), 10), {}, "choose one of: logreg, mlp, lenet5, cifarnet, resnet18"),
        (("lenet5", (60,), 10), {}, "image input"),
        (("resnet18", (1, 28), 10), {}, "image input"),
        (("mlp", (60,), 10), {"hidden": [0]}, "widths must be >= 1"),
        (("logreg", (60,), 1), {}, "at least 2 classes"),
        (("logreg", (0,), 10), {}, "positive sizes"),
    ],
)
def test_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(*args, **kwargs)
    assert MODEL_NAMES == ("logreg", "mlp", "lenet5", "cifarnet", "resnet18")
