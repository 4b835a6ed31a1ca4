"""The report's Reproduce block: stage commands in the CLI's own syntax that, run in a fresh
folder, rebuild the same store, vectors and metrics."""

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_encode_encoders import save_tiny_bert, save_tiny_dinov2
from typer.testing import CliRunner

from mmnewsrec.cli import app
from mmnewsrec.config import load_config
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.data.synthetic.images import PHOTO_BOX
from mmnewsrec.evaluate.experiment import load_experiment, run_experiment
from mmnewsrec.evaluate.reproduce import command_line, train_command
from mmnewsrec.formats.store import Store
from mmnewsrec.formats.vectors import NewsVectors

GRID = """title = "reproduce"
data_dir = "{data}"
out_dir = "{out}"
seeds = [0]
recall_k = [10]
{image_map}
[encoders.text_image]
text_encoder = "{bert}"
image_encoder = "{dinov2}"
text_fields = ["title"]
{crop}
[rankers.mean_cosine]
model = "mean_cosine"
[rankers.popularity]
model = "popularity"
per_encoder = false
overrides = ["data.history_len=8"]
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    return {"bert": save_tiny_bert(root / "bert"), "dinov2": save_tiny_dinov2(root / "dinov2")}


def reproduce_block(report: Path) -> list[str]:
    """The command lines of the report's Reproduce block."""
    block = report.read_text().split("## Reproduce", 1)[1].split("```")[1]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("layout", ["plain", "im-mind"])
def test_the_printed_commands_reproduce_the_grid(layout, models, tmp_path):
    data = tmp_path / "data"
    generate(data, SynthConfig.quick(), image_layout=layout)
    im_mind = layout == "im-mind"
    out, again = tmp_path / "out", tmp_path / "again"
    path = tmp_path / "grid.toml"
    path.write_text(
        GRID.format(
            data=data,
            out=out,
            image_map=f'image_map = "{data / "projector.csv"}"' if im_mind else "",
            crop=f"image_crop = {list(PHOTO_BOX)}\nimage_blank_std = 1.5" if im_mind else "",
            **models,
        )
    )
    run_experiment(load_experiment(path), path)
    lines = reproduce_block(out / "report.md")
    assert lines[0] == shlex.join(["mmnewsrec", "experiment", str(path)])
    stages = [shlex.split(line.replace(str(out), str(again))) for line in lines[1:]]
    assert [argv[1] for argv in stages] == ["prepare", "encode", *["train", "evaluate"] * 2]
    for argv in stages:
        assert argv[0] == "mmnewsrec"
        result = CliRunner().invoke(app, argv[1:])
        assert result.exit_code == 0, f"{shlex.join(argv)}\n{result.output}"

    store, copy = Store.load(out / "store"), Store.load(again / "store")
    assert copy.content_hash == store.content_hash
    with_image = store.manifest["num_news_with_image"]
    assert copy.manifest["num_news_with_image"] == with_image and with_image > 100
    vectors = NewsVectors.load(out / "vectors" / "text_image")
    rebuilt = NewsVectors.load(again / "vectors" / "text_image")
    assert rebuilt.hash == vectors.hash
    assert rebuilt.manifest["image"]["crop"] == vectors.manifest["image"]["crop"]
    assert np.array_equal(rebuilt.has_image, vectors.has_image)
    # the same models on the same inputs in the same process
    np.testing.assert_allclose(rebuilt.vectors, vectors.vectors, atol=1e-3)
    for run in ("mean_cosine/text_image/seed0", "popularity/any/seed0"):
        original = json.loads((out / "runs" / run / "config.json").read_text())
        config = json.loads((again / "runs" / run / "config.json").read_text())
        assert json.loads(json.dumps(config).replace(str(again), str(out))) == original
        metrics = json.loads((out / "runs" / run / "metrics.json").read_text())
        reproduced = json.loads((again / "runs" / run / "metrics.json").read_text())
        for key in ("auc", "mrr", "ndcg5", "ndcg10"):
            assert reproduced[key] == pytest.approx(metrics[key], abs=1e-9)


def test_a_command_line_reads_the_cli_definitions():
    line = command_line(
        "encode",
        store_dir=Path("my store"),
        out=Path("emb"),
        text_fields=("category", "subcategory", "title"),  # the default: left out
        image_crop=(15, 15, 215, 180),
        image_blank_std=2.0,
        device="auto",
        force=True,
    )
    assert line == "mmnewsrec encode 'my store' --out emb --image-crop 15,15,215,180 --force"
    prepare = command_line(
        "prepare", data_dir=Path("d"), out=Path("s"), image_map_columns=("id", "file")
    )
    assert prepare == "mmnewsrec prepare d --out s --image-map-columns id,file"
    with pytest.raises(ValueError, match="`mmnewsrec encode` has no parameter crop"):
        command_line("encode", crop=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="no value, and its default is 'auto'"):
        command_line("encode", device=None)


def test_a_train_command_gives_the_config_of_its_values(tmp_path, monkeypatch):
    values = {
        "data.store_dir": tmp_path / "my store",
        "data.vectors_dir": tmp_path / "emb",
        "data.train_split": "2019",  # reads as a number unless quoted
        "data.dev_split": "true",  # reads as a bool unless quoted
        "model.name": "mean_cosine",
        "model.preset": None,
        "run.out_dir": tmp_path / "run",
        "run.seed": 3,
        "run.device": "cpu",
    }
    overrides = ["optim.epochs=2", "run.seed=4"]  # the overrides have the last word
    line = train_command("train_cpu", values, overrides)
    assert "--set 'data.train_split=\"2019\"'" in line and "--seed 3" in line
    seen = []
    monkeypatch.setattr(
        "mmnewsrec.rank.train.run_training",
        lambda config, resume: seen.append(config) or SimpleNamespace(is_main=False),
    )
    result = CliRunner().invoke(app, shlex.split(line)[1:])
    assert result.exit_code == 0, result.output
    expected = load_config("train_cpu", overrides, values)
    assert seen == [expected] and expected.run.seed == 4 and expected.data.dev_split == "true"
