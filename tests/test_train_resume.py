"""Training that survives a crash: last.pt at every evaluation and on a timer, a clean stop on
SIGTERM / SIGINT on every rank, and early stopping that a resume continues exactly."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from test_train import build_data, make_config, read_log, settings

from mmnewsrec.config import TrainConfig
from mmnewsrec.rank import train as train_module
from mmnewsrec.rank.distributed import DistInfo, init_distributed
from mmnewsrec.rank.interrupt import TrainingInterrupted
from mmnewsrec.rank.train import TrainRecipe, run_training


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_data(tmp_path_factory.mktemp("mind"))


@pytest.fixture
def one_thread():
    """Serial kernels, as in the subprocesses (OMP_NUM_THREADS=1): runs compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def log_rows(run: Path) -> list[dict]:
    """log.csv without the throughput column (wall-clock)."""
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_log(run)]


# ------------------------------------------------------------------ a killed process resumes

# 320 samples / 8 = 40 steps per epoch, 2 epochs; last.pt at each evaluation (every 10 steps)
CRASH = ("optim.batch_size=8", "run.eval_every=10", "run.patience=0", "model.args.dropout=0.2")
TOTAL_STEPS = 80


def start_training(data: Path, out: Path, *args: str) -> subprocess.Popen:
    """`mmnewsrec train` in its own process, on one thread (as `one_thread`)."""
    command = ["train", "--store", str(data / "store"), "--vectors", str(data / "emb")]
    command += ["--out", str(out), *(a for s in [*settings(), *CRASH] for a in ("--set", s))]
    command += args
    code = "from mmnewsrec.cli import app; app()"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    code, err = finish(start_training(data, run))
    assert code == 0, err
    return run


def cut_when_last_appears(process: subprocess.Popen, run: Path, how: signal.Signals) -> None:
    """Send `how` to the training process as soon as its first last.pt exists."""
    last = run / "last.pt"
    while process.poll() is None and not last.exists():
        time.sleep(0.005)
    process.send_signal(how)


def assert_same_run(run: Path, full: Path) -> None:
    """Same final and best checkpoints, and the same log, as the run that never stopped."""
    assert_same_weights(load(run / "last.pt")["model"], load(full / "last.pt")["model"])
    best, full_best = load(run / "checkpoint.pt"), load(full / "checkpoint.pt")
    assert (best["step"], best["metrics"]) == (full_best["step"], full_best["metrics"])
    assert_same_weights(best["model"], full_best["model"])
    assert log_rows(run) == log_rows(full)


def test_a_killed_run_resumes_from_its_last_checkpoint(data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    process = start_training(data, run)
    cut_when_last_appears(process, run, signal.SIGKILL)
    code, err = finish(process)
    assert code == -signal.SIGKILL, f"the run ended before it was killed ({code}): {err}"
    progress = load(run / "last.pt")["progress"]
    assert not progress["finished"] and 10 <= progress["step"] < TOTAL_STEPS
    assert progress["step"] % 10 == 0  # written at an evaluation

    code, err = finish(start_training(data, run, "--resume"))
    assert code == 0, err
    assert f"resumed {run / 'last.pt'} at step {progress['step']}" in err
    assert_same_run(run, uninterrupted)


def test_sigterm_stops_after_the_step_with_last_pt_and_says_how_to_resume(
    data, tmp_path, uninterrupted
):
    run = tmp_path / "run"
    process = start_training(data, run)
    cut_when_last_appears(process, run, signal.SIGTERM)
    code, err = finish(process)
    assert code == 128 + signal.SIGTERM, f"exit {code}: {err}"
    stopped = re.search(r"stopped by SIGTERM after step (\d+); .*last\.pt .*--resume", err)
    assert stopped, err
    progress = load(run / "last.pt")["progress"]
    assert progress["step"] == int(stopped[1]) < TOTAL_STEPS and not progress["finished"]

    code, err = finish(start_training(data, run, "--resume"))
    assert code == 0, err
    assert_same_run(run, uninterrupted)


# ------------------------------------------------------------------ when last.pt is written


def saves_of(recipe: TrainRecipe, monkeypatch) -> list[int]:
    """The steps at which `recipe` writes last.pt."""
    steps: list[int] = []
    save = recipe.save_last
    monkeypatch.setattr(recipe, "save_last", lambda: steps.append(recipe.progress.step) or save())
    return steps


def test_last_pt_is_written_at_every_evaluation_and_on_the_clock(
    data, tmp_path, monkeypatch, one_thread
):
    # 10 steps per epoch, 2 epochs; evaluations at 4, 8, 10 (epoch end), 12, 16, 20
    common = ("run.eval_every=4", "run.patience=0")
    recipe = TrainRecipe(make_config(data, tmp_path / "a", *common), torch.device("cpu"))
    recipe.setup()
    saves = saves_of(recipe, monkeypatch)
    recipe.train()
    assert saves == [4, 8, 10, 12, 16, 20]
    evals = [int(r["step"]) for r in read_log(tmp_path / "a") if r["auc"]]
    assert evals == [4, 8, 10, 12, 16, 20]  # step 20 (an evaluation step, the end) only once

    # a clock at which every step takes 25 s: with checkpoint_minutes = 1, a save every 3 steps
    # (counted from the last save, evaluations included); no evaluation but the final one
    timed = ("run.eval_each_epoch=false", "run.checkpoint_minutes=1")
    steps = {"done": 0}
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: 25.0 * steps["done"])})
    monkeypatch.setattr(train_module, "time", clock)
    recipe = TrainRecipe(make_config(data, tmp_path / "b", *timed), torch.device("cpu"))
    recipe.setup()
    step = recipe._train_step
    monkeypatch.setattr(
        recipe, "_train_step", lambda b: steps.update(done=steps["done"] + 1) or step(b)
    )
    saves = saves_of(recipe, monkeypatch)
    recipe.train()
    assert saves == [3, 6, 9, 12, 15, 18, 20]

    off = ("run.eval_each_epoch=false", "run.checkpoint_minutes=0")
    recipe = TrainRecipe(make_config(data, tmp_path / "c", *off), torch.device("cpu"))
    recipe.setup()
    saves = saves_of(recipe, monkeypatch)
    recipe.train()
    assert saves == [20]


def test_sigint_stops_after_the_step_and_the_resumed_run_logs_as_one_that_never_stopped(
    data, tmp_path, monkeypatch, one_thread
):
    common = ("run.eval_every=4", "model.args.dropout=0.2")
    run_training(make_config(data, tmp_path / "full", *common))
    step = TrainRecipe._train_step

    def interrupted_at_step_3(recipe, batch):
        if recipe.progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # during step 3
        return step(recipe, batch)

    monkeypatch.setattr(TrainRecipe, "_train_step", interrupted_at_step_3)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT after step 3") as stop:
        run_training(make_config(data, tmp_path / "run", *common))
    assert stop.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is handler
    assert load(tmp_path / "run" / "last.pt")["progress"]["step"] == 3

    monkeypatch.setattr(TrainRecipe, "_train_step", step)
    run_training(make_config(data, tmp_path / "run", *common), resume=True)
    # the loss row at step 5 averages steps 1-5, two of them before the stop, as in one run
    assert_same_run(tmp_path / "run", tmp_path / "full")


# ------------------------------------------------------------------ early stopping


def scripted_evaluate(aucs: dict[int, float]):
    """TrainRecipe.evaluate replaced by metrics chosen by step."""

    def evaluate(recipe):
        auc = aucs.get(recipe.progress.step, 0.5)
        return {"auc": auc, "mrr": auc / 2, "ndcg5": auc / 3, "ndcg10": auc / 4}

    return evaluate


# evaluations every 2 steps; the best at step 6, then worse: patience 3 stops at step 12 (a
# step after the epoch's end at 10, which must count once)
AUCS = {2: 0.60, 4: 0.65, 6: 0.80, 8: 0.70, 10: 0.75, 12: 0.79, 14: 0.95, 16: 0.96}
EARLY = ("run.eval_every=2", "run.patience=3", "model.args.dropout=0.2")


def test_early_stopping_keeps_the_best_step_and_a_resume_stops_at_the_same_step(
    data, tmp_path, monkeypatch, one_thread
):
    monkeypatch.setattr(TrainRecipe, "evaluate", scripted_evaluate(AUCS))
    full = run_training(make_config(data, tmp_path / "full", *EARLY))
    assert full.stopped_early and full.finished and full.step == 12
    assert [int(r["step"]) for r in read_log(tmp_path / "full") if r["auc"]] == [2, 4, 6, 8, 10, 12]
    best = load(tmp_path / "full" / "checkpoint.pt")
    assert best["step"] == 6 and best["metrics"]["auc"] == 0.80 == full.best_metrics["auc"]
    at_six = run_training(make_config(data, tmp_path / "six", *EARLY, "run.stop_after=6"))
    assert at_six.step == 6
    assert_same_weights(best["model"], load(tmp_path / "six" / "last.pt")["model"])

    # stopped after two bad evaluations (8, 10): the resumed run needs one more, as the full one
    cut = run_training(make_config(data, tmp_path / "cut", *EARLY, "run.stop_after=10"))
    assert not cut.finished and load(tmp_path / "cut" / "last.pt")["progress"]["bad_evals"] == 2
    resumed = run_training(make_config(data, tmp_path / "cut", *EARLY), resume=True)
    assert (resumed.step, resumed.stopped_early) == (12, True)
    assert resumed.best_metrics == full.best_metrics
    assert_same_run(tmp_path / "cut", tmp_path / "full")


# ------------------------------------------------------------------ every rank stops together


def stop_worker(rank: int, world: int, port: int, config: dict, out: str, resume: bool) -> None:
    """A rank of a gloo run; on rank 1 alone a SIGTERM arrives during step 3. Writes what the
    rank saw to out/rank{rank}.txt."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    info = DistInfo.from_env()
    device = torch.device("cpu")
    init_distributed(device, info)
    recipe = TrainRecipe(TrainConfig.model_validate(config), device, info)
    step = TrainRecipe._train_step

    def signalled(batch):
        if rank == 1 and recipe.progress.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(recipe, batch)

    try:
        recipe.setup(resume=resume)
        if not resume:
            recipe._train_step = signalled
        try:
            result = f"finished {recipe.train().step}"
        except TrainingInterrupted as stop:
            result = f"stopped {stop.step} {signal.Signals(stop.signum).name}"
        Path(out, f"rank{rank}.txt").write_text(result)
    finally:
        recipe.cleanup()


def spawn_ranks(config: dict, out: Path, resume: bool, timeout: float = 240) -> list[str]:
    context = mp.spawn(
        stop_worker,
        args=(2, free_port(), config, str(out), resume),
        nprocs=2,
        join=False,
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not stop together (one waits in a collective)")
    return [(out / f"rank{r}.txt").read_text() for r in range(2)]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(data, tmp_path):
    config = make_config(data, tmp_path / "run", "optim.epochs=1", "run.patience=0").to_dict()
    assert spawn_ranks(config, tmp_path, resume=False) == ["stopped 3 SIGTERM"] * 2
    saved = load(tmp_path / "run" / "last.pt")
    assert saved["progress"]["step"] == 3 and saved["world_size"] == 2
    assert spawn_ranks(config, tmp_path, resume=True) == ["finished 10"] * 2
