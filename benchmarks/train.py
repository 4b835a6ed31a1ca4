"""Training throughput of the rerankers and the projected time of one MIND-small epoch.

Random news vectors and random behaviors (MIND-small-like: mean history ~32 clicks, 5-60
candidates, 1-3 clicks per impression); no download. For each model it times full training
steps (batch building, forward, listwise loss, backward, clipping, AdamW) and reports samples/s
(one sample = 1 click + K negatives, so 1 + K candidates), then the time of one epoch of
MIND-small (236,344 clicks) at that rate, and dev scoring speed (candidates/s).

`--memory small|large` measures memory at MIND size instead: random train and dev behaviors of
that size (MIND-large: 2,232,748 train impressions, ~83M candidates; 376,471 dev impressions)
are saved as store arrays, then one child process builds the training table (samples,
negatives, impression index) and draws two epochs' negatives, and another makes one evaluation
pass over the whole dev split (scores and metrics); each prints its peak RSS.

    python benchmarks/train.py                      # CPU: both variants at the default config
    python benchmarks/train.py --device cuda        # also the gpu and seed presets, with AMP
    python benchmarks/train.py --memory large       # peak RSS at MIND-large size
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmnewsrec.data.store import Behaviors
from mmnewsrec.encode.base import effective_precision, resolve_device
from mmnewsrec.rank.batches import ListwiseDataset, collate
from mmnewsrec.rank.model import build_model
from mmnewsrec.rank.ranker import autocast, score_behaviors
from mmnewsrec.rank.train import ranking_loss

MIND_SMALL_CLICKS = 236_344
MIND_SMALL_DEV_CANDIDATES = 2_740_998
SIZES = {  # (train impressions, dev impressions, news) of MIND
    "small": (156_965, 73_152, 65_238),
    "large": (2_232_748, 376_471, 101_527),
}

# Run alone in a fresh process, on the memory-mapped arrays (as training reads a store).
MEMORY_CHILD = """
import sys, time
from pathlib import Path
import numpy as np, torch
from mmnewsrec.data.store import Behaviors
folder, phase = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
if phase == "train":
    from mmnewsrec.rank.batches import ListwiseDataset, ResumableSampler, collate
    dataset = ListwiseDataset(Behaviors.load(folder / "train", "train", True), 4, 50, seed=0)
    dataset.set_epoch(1)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, 128, sampler=sampler, collate_fn=collate)
    batches = sum(1 for _, batch in zip(range(50), loader))
    done = f"{len(dataset):,} samples, negatives of 2 epochs, {batches} batches"
else:
    from mmnewsrec.evaluate.metrics import evaluate_scores
    from mmnewsrec.rank.model import build_model
    from mmnewsrec.rank.ranker import score_behaviors
    dev = Behaviors.load(folder / "dev", "dev", True)
    model = build_model(sys.argv[3], {}, np.load(folder / "vectors.npy", mmap_mode="r"))
    scores = score_behaviors(model, dev, 50, torch.device("cpu"), 4096)
    metrics = evaluate_scores(scores, dev.candidate_labels, dev.candidate_offsets)
    done = f"{len(scores):,} candidates scored by {sys.argv[3]}, auc {metrics['auc']:.3f}"
hwm_kib = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(f"{time.perf_counter() - start:.1f} s, peak RSS {hwm_kib / 2**20:.2f} GiB: {done}")
"""


@dataclass
class RandomBehaviors:
    """CSR arrays shaped like MIND-small behaviors (fields as in `Behaviors`)."""

    history_offsets: np.ndarray
    history_items: np.ndarray
    candidate_offsets: np.ndarray
    candidate_items: np.ndarray
    candidate_labels: np.ndarray

    @classmethod
    def make(cls, impressions: int, news: int, rng: np.random.Generator) -> RandomBehaviors:
        hist_len = np.minimum(rng.geometric(1 / 32, impressions), 300)
        cand_len = rng.integers(5, 70, impressions)  # mean 37, as in MIND
        clicks = np.minimum(rng.integers(1, 4, impressions), cand_len - 1)
        h_off = np.concatenate([[0], np.cumsum(hist_len)])
        c_off = np.concatenate([[0], np.cumsum(cand_len)])
        labels = np.zeros(c_off[-1], dtype=np.int8)
        first = c_off[:-1]
        for k in range(3):  # the first `clicks` candidates of each impression are clicked
            labels[first[clicks > k] + k] = 1
        return cls(
            h_off,
            rng.integers(1, news + 1, h_off[-1]).astype(np.int32),
            c_off,
            rng.integers(1, news + 1, c_off[-1]).astype(np.int32),
            labels,
        )

    def save(self, folder: Path) -> None:
        """Write the arrays as a store split (ids, users and times are placeholders)."""
        n = len(self.candidate_offsets) - 1
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        zeros = {"impression_ids": np.arange(n), "user_index": np.zeros(n), "times": np.zeros(n)}
        Behaviors(split=folder.name, labelled=True, **fields, **zeros).save(folder)


def measure_memory(size: str, model: str) -> None:
    """Peak RSS of the training table and of one dev evaluation pass at MIND size."""
    train, dev, news = SIZES[size]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for split, impressions in (("train", train), ("dev", dev)):
            behaviors = RandomBehaviors.make(impressions, news, rng)
            behaviors.save(folder / split)
            print(
                f"{split}: {impressions:,} impressions, "
                f"{len(behaviors.candidate_items):,} candidates"
            )
            del behaviors
        vectors = rng.standard_normal((news + 1, 384), dtype=np.float32).astype(np.float16)
        np.save(folder / "vectors.npy", vectors)
        for phase in ("train", "dev"):
            load = f"load average {os.getloadavg()[0]:.2f}"
            done = subprocess.run(
                [sys.executable, "-c", MEMORY_CHILD, str(folder), phase, model],
                check=True,
                capture_output=True,
                text=True,
            )
            print(f"{phase} ({load}): {done.stdout.strip()}", flush=True)


def time_training(model, dataset, batch_size, device, dtype, steps, warmup) -> float:
    """Samples per second over `steps` timed steps after `warmup` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True
    )
    model.train()
    it = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        batch = next(it).to(device, non_blocking=True)
        with autocast(device, dtype):
            scores = model(batch.history, batch.candidates)
        loss = ranking_loss(scores, batch, "listwise")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def time_scoring(model, behaviors, history_len, device, dtype, impressions) -> float:
    """Dev scoring speed over the first `impressions`: candidates per second (inference mode)."""
    score_behaviors(model, behaviors, history_len, device, 8192, 20, dtype)  # warm-up
    sync(device)
    start = time.perf_counter()
    scores = score_behaviors(model, behaviors, history_len, device, 8192, impressions, dtype)
    sync(device)
    return len(scores) / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cases(device: torch.device) -> list[tuple[str, str, int]]:
    """(model, preset, global batch): the default config, plus the GPU configs on CUDA."""
    default = [("fast_rec_transformer", "cpu", 128), ("rec_transformer", "cpu", 128)]
    if device.type != "cuda":
        return default
    return default + [
        ("fast_rec_transformer", "gpu", 512),
        ("rec_transformer", "gpu", 512),
        ("rec_transformer", "seed", 256),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--news", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384, help="news vector size")
    parser.add_argument("--impressions", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (CPU)")
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--memory", choices=sorted(SIZES), help="peak RSS at this MIND size")
    parser.add_argument("--eval-model", default="popularity", help="model of the --memory pass")
    args = parser.parse_args()
    if args.memory:
        return measure_memory(args.memory, args.eval_model)

    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(effective_precision(device))
    steps = args.steps if device.type == "cpu" else max(args.steps, 30)
    eval_impressions = 400 if device.type == "cpu" else args.impressions
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(args.news + 1, args.dim), dim=1)
    vectors[0] = 0
    behaviors = RandomBehaviors.make(args.impressions, args.news, rng)
    dataset = ListwiseDataset(behaviors, args.negatives, args.history, seed=0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"load average {os.getloadavg()[0]:.1f} (other work on the machine slows CPU figures); "
        f"device {device} ({name}), {torch.get_num_threads()} threads, precision "
        f"{effective_precision(device)}; {args.news} news x {args.dim}-d, L={args.history}, "
        f"K={args.negatives}"
    )
    header = f"{'model':22} {'preset':6} {'batch':>5} {'params':>7} {'samples/s':>10} "
    print(header + f"{'MIND-small epoch':>17} {'dev cand/s':>11} {'dev scoring':>12}")
    for model_name, preset, batch in cases(device):
        model = build_model(model_name, {"preset": preset, "max_history": args.history}, vectors)
        model.to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rate = time_training(model, dataset, batch, device, dtype, steps, warmup=2)
        eval_rate = time_scoring(model, behaviors, args.history, device, dtype, eval_impressions)
        epoch_min = MIND_SMALL_CLICKS / rate / 60
        dev_min = MIND_SMALL_DEV_CANDIDATES / eval_rate / 60
        print(
            f"{model_name:22} {preset:6} {batch:>5} {params:>6.2f}M {rate:>10.0f} "
            f"{epoch_min:>13.1f} min {eval_rate:>11.0f} {dev_min:>8.1f} min",
            flush=True,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
