"""Config parsing, --set overrides with type conversion, and one-line errors for bad input."""

import pytest

from fl_sim.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)


def test_quickstart_loads_with_defaults():
    cfg = load_config()
    assert cfg.name == "quickstart"
    assert cfg.clients == 100 and cfg.sampled_per_round() == 10
    assert cfg.data.name == "synthetic" and cfg.model.name == "mlp"


def test_overrides_convert_types():
    raw = apply_overrides({}, ["train.lr=0.1", "rounds=3", "model.hidden=[64,32]", "data.synthetic_iid=true"])
    cfg = config_from_dict(raw)
    assert cfg.train.lr == 0.1 and isinstance(cfg.train.lr, float)
    assert cfg.rounds == 3 and isinstance(cfg.rounds, int)
    assert cfg.model.hidden == [64, 32]
    assert cfg.data.synthetic_iid is True


def test_fraction_of_clients():
    cfg = config_from_dict({"clients": 1000, "clients_per_round": 0.01})
    assert cfg.sampled_per_round() == 10


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"rounds": 3, "trian": {}}, ["trian", "allowed"]),
        ({"train": {"lrr": 0.1}}, ["train.lrr", "allowed"]),
        ({"rounds": "many"}, ["rounds", "integer"]),
        ({"train": {"lr": -0.1}}, ["train.lr", "-0.1", "> 0"]),
        ({"clients": 10, "clients_per_round": 20}, ["clients_per_round", "20", "<= clients"]),
        ({"data": {"alpha": 0}}, ["data.alpha", "> 0"]),
        ({"data": {"alpha": -1.0}}, ["data.alpha"]),
        ({"model": {"name": "vgg"}}, ["model.name", "vgg", "lenet5"]),
        ({"strategy": {"name": "fedfoo"}}, ["strategy.name", "fedfoo"]),
        ({"data": {"name": "imagenet"}}, ["data.name", "imagenet"]),
        ({"data": "synthetic"}, ["data", "mapping"]),
    ],
)
def test_bad_config_one_line_error(raw, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])


def test_codec_and_strategy_options_collected_and_round_trip():
    cfg = config_from_dict(
        {"strategy": {"name": "compressed", "error_feedback": "classic"}, "codec": {"name": "topk", "k": 10}}
    )
    assert cfg.strategy.options == {"error_feedback": "classic"}
    assert cfg.codec.params == {"k": 10}
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_yaml_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "missing.yaml")


def test_validation_reads_the_registries(monkeypatch):
    """One source of truth: a strategy added to fl_sim.strategies.STRATEGIES is a valid
    strategy.name without editing config.py (which kept its own tuple of names), and codec.name is
    checked against the codec registry at load time (it was not checked before round 1)."""
    from fl_sim import strategies
    from fl_sim.config import ConfigError, config_from_dict

    monkeypatch.setitem(strategies.STRATEGIES, "my_method", "fl_sim.strategies.compressed:CompressedFedAvg")
    assert config_from_dict({"strategy": {"name": "my_method"}}).strategy.name == "my_method"
    with pytest.raises(ConfigError, match="codec.name='nope'.*topk"):
        config_from_dict({"codec": {"name": "nope"}})
