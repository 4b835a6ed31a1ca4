from pathlib import Path

import pytest

from mmnewsrec.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_value,
    shipped_configs,
)
from mmnewsrec.rank.model import MODELS, model_config


def test_shipped_configs_parse_and_name_real_models():
    names = {p.stem for p in shipped_configs()}
    assert {"train_cpu", "train_gpu", "train_seed"} <= names
    for path in shipped_configs():
        cfg = load_config(path)
        assert cfg.model.name in MODELS, path
        model_config(cfg.model.name, {"preset": cfg.model.preset, **cfg.model.args})


def test_file_then_values_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[data]\nstore_dir = "s"\nvectors_dir = "v"\n'
        '[model]\nname = "rec_transformer"\n[model.args]\nn_layers = 3\n'
        "[optim]\nlr = 0.1\nepochs = 9\n"
    )
    cfg = load_config(
        path,
        overrides=[
            "optim.lr=2e-3",
            "model.args.d_model=64",
            "run.out_dir=x/y",
            "data.loss=pointwise",
        ],
        values={"optim.epochs": 2, "run.seed": None, "data.store_dir": Path("/abs/store")},
    )
    assert cfg.optim.lr == 2e-3 and cfg.optim.epochs == 2 and cfg.run.seed == 0
    assert cfg.model.args == {"n_layers": 3, "d_model": 64}
    assert cfg.run.out_dir == Path("x/y") and cfg.data.loss == "pointwise"
    resolved = cfg.resolved()
    assert resolved.data.store_dir == Path("/abs/store")
    assert resolved.data.vectors_dir.is_absolute() and resolved.run.out_dir.is_absolute()
    assert TrainConfig.model_validate(resolved.to_dict()) == resolved


def test_another_model_drops_the_file_model_args(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nstore_dir = "s"\nvectors_dir = "v"\n[model.args]\nn_layers = 3\n')
    cfg = load_config(path, values={"model.name": "popularity"})
    assert cfg.model.name == "popularity" and cfg.model.args == {}


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"a b"') == "a b"
    assert parse_value("cuda:1") == "cuda:1" and parse_value("runs/x") == "runs/x"


@pytest.mark.parametrize(
    ("override", "rule"),
    [
        ([], ""),
        (["data.valid_split=last-day"], "last-day"),
        (["data.valid_split=0.1"], "0.1"),  # read as a TOML number
        (["data.valid_split=2019-11-14"], "2019-11-14"),  # read as a TOML date
        (["data.valid_split=dev"], "dev"),
        (['data.valid_split=""'], ""),
    ],
)
def test_valid_split_takes_a_day_a_fraction_dev_or_nothing(override, rule):
    values = {"data.store_dir": "s", "data.vectors_dir": "v"}
    assert load_config(None, override, values).data.valid_split == rule


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lrr=1", "optim.lrr"),
        ("run.device=tpu", "run.device"),
        ("data.loss=hinge", "data.loss"),
        ("data.valid_split=1.5", "data.valid_split"),
        ("data.valid_split=yesterday", "data.valid_split"),
        ("data.valid_split=2019-13-01", "data.valid_split"),
    ],
)
def test_bad_values_name_the_field_and_file(tmp_path, override, message):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nstore_dir = "s"\nvectors_dir = "v"\n')
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, [override])
    assert str(path) in str(err.value)


def test_missing_required_keys_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="data.store_dir"):
        load_config(None, ["data.vectors_dir=v"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)
