"""The same synthetic data in the plain and the IM-MIND image layout: has_image and AUC.

Generates one synthetic set twice (images/<news_id>.jpg, and IM-MIND cards named by a shuffled
index with projector.csv), prepares both (the second through --image-map), encodes both with
MiniLM + EfficientNet-Lite0 (the cards cropped to the cover photo) and trains the same ranker
on each. Prints whether the has_image flags agree, and the dev AUC of each layout per seed.

    python benchmarks/im_mind.py --out /tmp/im-mind [--quick] [--seeds 0 1] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.data.synthetic.images import PHOTO_BOX
from mmnewsrec.evaluate.experiment import load_experiment, run_experiment

EXPERIMENT = """title = "{layout} image layout"
data_dir = "data"
out_dir = "."
{images}train_config = "train_cpu"
train_overrides = ["optim.epochs={epochs}"]
seeds = {seeds}
recall_k = [10]

[encoders.effnet]
image_encoder = "efficientnet-lite0"
image_size = {image_size}
fusion = "concat"
{crop}
[rankers.{ranker}]
model = "{ranker}"
"""


def run_layout(out: Path, layout: str, synth: SynthConfig, args: argparse.Namespace) -> dict:
    """Generate, prepare, encode and train one layout; its has_image and AUC per seed."""
    out.mkdir(parents=True, exist_ok=True)
    generate(out / "data", synth, image_layout=layout)
    im_mind = layout == "im-mind"
    path = out / "experiment.toml"
    path.write_text(
        EXPERIMENT.format(
            layout=layout,
            images='image_map = "data/projector.csv"\n' if im_mind else "",
            epochs=args.epochs,
            seeds=list(args.seeds),
            image_size=synth.image_size,
            crop=f"image_crop = {list(PHOTO_BOX)}\n" if im_mind else "",
            ranker=args.ranker,
        )
    )
    started = time.perf_counter()
    run_experiment(load_experiment(path), path)
    seconds = time.perf_counter() - started
    runs = sorted((out / "runs" / args.ranker / "effnet").glob("seed*/metrics.json"))
    per_seed = [json.loads(p.read_text())["auc"] for p in runs]
    has_image = np.load(out / "vectors" / "effnet" / "has_image.npy")
    load = os.getloadavg()[0]
    return {"per_seed": per_seed, "has_image": has_image, "seconds": seconds, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="500 news, 300 users")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ranker", default="fast_rec_transformer")
    args = parser.parse_args()
    synth = SynthConfig.quick() if args.quick else SynthConfig()
    results = {
        layout: run_layout(args.out / layout, layout, synth, args)
        for layout in ("plain", "im-mind")
    }
    plain, cards = results["plain"]["has_image"], results["im-mind"]["has_image"]
    print(
        f"has_image: plain {int(plain.sum())}, im-mind cropped {int(cards.sum())} of "
        f"{len(plain) - 1} news; identical flags: {bool(np.array_equal(plain, cards))}"
    )
    for layout, result in results.items():
        seeds = ", ".join(f"{auc:.4f}" for auc in result["per_seed"])
        print(
            f"{layout:8s} dev AUC ({args.ranker}) per seed {args.seeds}: {seeds}; "
            f"{result['seconds']:.0f} s, load average {result['load']:.2f} "
            f"on {os.cpu_count()} CPUs"
        )


if __name__ == "__main__":
    main()
