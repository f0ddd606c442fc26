"""Models by name: shapes, parameter counts, seeded init that leaves the global RNG alone."""

import pytest
import torch

from fl_sim.models import MODEL_NAMES, build_model, count_parameters


@pytest.mark.parametrize(
    "name, shape, params",
    [
        ("logreg", (60,), 610),
        ("mlp", (60,), 14_210),
        ("lenet5", (1, 28, 28), 61_706),
        ("lenet5", (1, 8, 8), 61_706),
        ("lenet5", (3, 32, 32), 62_006),
        ("cifarnet", (3, 32, 32), 1_068_298),
    ],
)
def test_shapes_and_counts(name, shape, params):
    m = build_model(name, shape, 10)
    assert count_parameters(m) == params
    assert m(torch.zeros(3, *shape)).shape == (3, 10)


def test_resnet18_cifar_variant():
    m = build_model("resnet18", (3, 32, 32), 10)
    assert count_parameters(m) == 11_173_962
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_seeded_init_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mlp", (10,), 3, hidden=[5], seed=4)
    after = torch.rand(1)
    b = build_model("mlp", (10,), 3, hidden=[5], seed=4)
    c = build_model("mlp", (10,), 3, hidden=[5], seed=5)
    assert torch.equal(before, after)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="image input"):
        build_model("lenet5", (60,), 10)
    assert set(MODEL_NAMES) == {"logreg", "mlp", "lenet5", "cifarnet", "resnet18"}
