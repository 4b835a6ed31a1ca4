"""Encoding speed: titles/s of `encode_store` against a bare `SentenceTransformer.encode` over
the same texts in the same run, and images/s of EfficientNet-Lite0 (reading included).

Both text paths include loading the model; each is run --repeat times, alternating, and the
best run counts. The pipeline sees the default text fields (category, subcategory, title) and
the bare encoder gets exactly those strings, once as they are and once deduplicated (the work
the pipeline does after its dedupe: the difference is the pipeline's overhead). Wall and
process CPU time are both shown: on a shared CPU machine the CPU time is the steadier measure.
On a GPU all run under the same autocast, and the agreement of half-precision vectors with
fp32 ones is printed.

    python benchmarks/encode.py                          # synthetic news (generated)
    python benchmarks/encode.py --data ../shared/data/mind-samples/small_train_5k
    python benchmarks/encode.py --device cuda --batch-size 256 --news 20000
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.devices import effective_precision, inference, resolve_device
from mmnewsrec.encode.image import EfficientNetLiteEncoder
from mmnewsrec.encode.pipeline import DEFAULT_FIELDS, EncodeConfig, encode_store, news_texts
from mmnewsrec.encode.text import DEFAULT_TEXT_ENCODER, text_model_path
from mmnewsrec.formats.store import Store


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="MIND folder (default: synthetic news)")
    parser.add_argument("--news", type=int, default=3000, help="synthetic news items")
    parser.add_argument("--images", type=int, default=192, help="images to encode")
    parser.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER)
    parser.add_argument("--efficientnet-weights", help="state dict (default: the shipped one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, help="default: 64 on CPU, 256 on GPU")
    parser.add_argument("--repeat", type=int, default=2)
    return parser.parse_args()


def make_store(args: argparse.Namespace, tmp: Path) -> Store:
    data = args.data
    if data is None:
        data = tmp / "synth"
        generate(data, SynthConfig(news=args.news, users=200, impressions=200, image_share=0.5))
    return build_store(data, tmp / "store")


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of `work()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def bare_encode(texts: list[str], args: argparse.Namespace, device: torch.device) -> None:
    """Load the model and encode `texts` with sentence-transformers alone."""
    from sentence_transformers import SentenceTransformer

    precision = effective_precision(device, args.precision)
    model = SentenceTransformer(text_model_path(args.text_encoder), device=str(device))
    with inference(device, precision):
        model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)


def pipeline_encode(store: Store, out: Path, args: argparse.Namespace) -> None:
    """encode_store (text only), forced to re-encode."""
    config = EncodeConfig(
        text_encoder=args.text_encoder,
        image_encoder="none",
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
    )
    encode_store(store.path, out, config, force=True)


def half_precision_agreement(texts: list[str], args: argparse.Namespace) -> str:
    """Min and mean cosine between GPU autocast vectors and fp32 vectors of the same texts."""
    from mmnewsrec.encode.text import SentenceEncoder

    encoder = SentenceEncoder(args.text_encoder)
    half = encoder.encode(texts, args.batch_size, "cuda", args.precision)
    full = encoder.encode(texts, args.batch_size, "cuda", "fp32")
    cosine = (half * full).sum(axis=1)
    return f"min {cosine.min():.5f}, mean {cosine.mean():.5f}"


def image_rate(store: Store, args: argparse.Namespace) -> tuple[int, float]:
    """(images, images/s) of EfficientNet-Lite0 over the store's first image files."""
    paths = store.news["image_path"].drop_nulls().head(args.images).to_list()
    encoder = EfficientNetLiteEncoder(weights=args.efficientnet_weights)
    encoder.encode(paths[:8], args.batch_size, args.device, args.precision)  # warm-up
    start = time.perf_counter()
    _, has_image, _ = encoder.encode(paths, args.batch_size, args.device, args.precision)
    seconds = time.perf_counter() - start
    assert has_image.all()
    return len(paths), len(paths) / seconds


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(args, Path(tmp))
        texts = news_texts(store.news, DEFAULT_FIELDS).to_list()
        unique = len(set(texts))
        bare_encode(texts[:64], args, device)  # warm-up: imports, page cache, CUDA context
        work = {
            "bare": lambda: bare_encode(texts, args, device),
            "bare, unique texts": lambda: bare_encode(list(dict.fromkeys(texts)), args, device),
            "encode_store": lambda: pipeline_encode(store, Path(tmp) / "emb", args),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in work}
        for _ in range(args.repeat):
            for name, run in work.items():
                runs[name].append(timed(run))
        best = {name: np.min(times, axis=0) for name, times in runs.items()}  # (wall, cpu)
        n = len(texts)
        precision = effective_precision(device, args.precision)
        print(f"device {device} ({precision}), batch {args.batch_size}")
        print(f"texts: {n:,} ({unique:,} unique), model {args.text_encoder}")
        for name, (wall, cpu) in best.items():
            print(f"  {name:24} {n / wall:8.1f} texts/s  ({wall:6.2f} s wall, {cpu:6.2f} s CPU)")
        ratio = best["encode_store"] / best["bare"]
        overhead = best["encode_store"] / best["bare, unique texts"] - 1
        print(f"  encode_store / bare time         wall {ratio[0]:.3f}, CPU {ratio[1]:.3f}")
        print(f"  overhead over the same work      wall {overhead[0]:+.1%}, CPU {overhead[1]:+.1%}")
        if device.type == "cuda":
            agreement = half_precision_agreement(texts[:2048], args)
            print(f"  autocast vs fp32 cosine          {agreement}")
        if args.images and store.news["image_path"].is_not_null().any():
            count, rate = image_rate(store, args)
            print(f"images: EfficientNet-Lite0, {count} files  {rate:8.1f} images/s")
    print("runs (wall s):", {name: [round(t[0], 2) for t in times] for name, times in runs.items()})


if __name__ == "__main__":
    main()
