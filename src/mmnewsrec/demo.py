"""`mmnewsrec demo`: the whole pipeline on a synthetic data set, offline, in minutes.

Synthesize MIND-format data with images and a known click model, prepare a store, encode the news
with the shipped MiniLM (text) and EfficientNet-Lite0 (image), train the baselines and the
rerankers, evaluate them against the oracle, and write a report. Everything lands under OUT; the
experiment file written there re-runs the grid (`mmnewsrec experiment OUT/experiment.toml`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.data.synthetic.images import PHOTO_BOX
from mmnewsrec.evaluate.experiment import Stopwatch, load_experiment, run_experiment
from mmnewsrec.evaluate.reproduce import command_line

logger = logging.getLogger(__name__)

# Training settings of the grid (over the train_cpu config: every train impression, the last
# weights). The default size trains 2 epochs, so that the whole demo fits in 5 minutes on 2
# cores (see the README); the quick size 3.
TRAIN_OVERRIDES = {"default": ["optim.epochs=2"], "quick": ["optim.epochs=3"]}

# The longest runs first, so that the training jobs finish together. The neural rankers read
# every behaviour signal (train_cpu's default); the content-only transformer shows what the
# signals add, on the multimodal vectors.
RANKERS = """
[rankers.fast_rec_transformer]
model = "fast_rec_transformer"

[rankers.fast_rec_transformer_content]
model = "fast_rec_transformer"
overrides = ["model.signals=[]"]
encoders = ["minilm+effnet"]

[rankers.additive_attention]
model = "additive_attention"

[rankers.mean_cosine]
model = "mean_cosine"

[rankers.popularity]
model = "popularity"
per_encoder = false

[rankers.random]
model = "random"
per_encoder = false
"""

ENCODERS = """
[encoders.minilm]
image_encoder = "none"
fusion = "text"

[encoders."minilm+effnet"]
image_encoder = "efficientnet-lite0"
image_size = {image_size}
fusion = "concat"
{crop}"""


def demo_files(out: Path, quick: bool, image_layout: str = "plain") -> tuple[SynthConfig, str]:
    """The synthetic data configuration and the experiment file text of the demo.

    image_layout "im-mind": the images are IM-MIND cards named through data/projector.csv; the
    store maps them and the image encoder sees the photo box only."""
    synth = SynthConfig.quick() if quick else SynthConfig()
    overrides = json.dumps(TRAIN_OVERRIDES["quick" if quick else "default"])
    import torch

    jobs = min(2, torch.get_num_threads())  # two runs at a time, each on its own cores
    rerun = command_line("experiment", config=out / "experiment.toml")
    header = f"""# The demo grid; re-run with: {rerun}
title = "mmnewsrec demo: synthetic MIND data ({"quick" if quick else "default"} size)"
data_dir = "data"
out_dir = "."
train_config = "train_cpu"
train_overrides = {overrides}
seeds = [0]
recall_k = [10, 50, 200]
device = "auto"
jobs = {jobs}
baseline = "popularity"
"""
    crop = ""
    if image_layout == "im-mind":
        header += 'image_map = "data/projector.csv"\n'
        crop = f"image_crop = {list(PHOTO_BOX)}\n"
    return synth, header + ENCODERS.format(image_size=synth.image_size, crop=crop) + RANKERS


def run_demo(out: Path, quick: bool = False, image_layout: str = "plain") -> Path:
    """Run the demo into `out` and return the report path."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    synth, experiment = demo_files(out, quick, image_layout)
    watch = Stopwatch()
    with watch.phase("synth"):
        summary = generate(out / "data", synth, image_layout=image_layout)
    logger.info("%s", summary)
    path = out / "experiment.toml"
    path.write_text(experiment)
    return run_experiment(load_experiment(path), path, watch)


def best_run(out: Path) -> tuple[Path, float] | None:
    """(run folder, dev AUC) of the demo's trained run with the best dev AUC; None when
    no run has been evaluated."""
    scored = [
        (metrics.parent, json.loads(metrics.read_text()).get("auc"))
        for metrics in sorted(Path(out).glob("runs/**/metrics.json"))
        if (metrics.parent / "checkpoint.pt").is_file()
    ]
    scored = [(run, float(auc)) for run, auc in scored if auc is not None]
    return max(scored, key=lambda pair: pair[1], default=None)
