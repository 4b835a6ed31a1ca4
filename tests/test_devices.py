import contextlib

import pytest
import torch

from mmnewsrec.config import ConfigError, load_config
from mmnewsrec.devices import (
    amp_dtype,
    autocast,
    check_device,
    effective_precision,
    half_dtype,
    resolve_device,
)

CUDA = torch.cuda.is_available()


def test_device_and_precision():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert effective_precision(torch.device("cpu"), "bf16") == "fp32"  # half is slow on CPU
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="precision"):
        effective_precision(torch.device("cpu"), "fp8")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(name):
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cpu:0", ""])
def test_device_names_refused_with_the_name(name):
    with pytest.raises(ValueError, match=f"auto, cpu, cuda or cuda:N, not {name!r}"):
        check_device(name)


def test_the_training_config_checks_the_device_the_same_way():
    base = {"data.store_dir": "s", "data.vectors_dir": "v"}
    assert load_config(None, values={**base, "run.device": "cuda:1"}).run.device == "cuda:1"
    with pytest.raises(ConfigError, match="run.device"):
        load_config(None, values={**base, "run.device": "cuda:x"})


def test_a_local_rank_picks_the_gpu_of_a_process():
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    if CUDA:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
        assert resolve_device("cuda:0", local_rank=5) == torch.device("cuda", 0)


def test_no_autocast_on_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype("bf16", cpu) is None and amp_dtype("auto", cpu) is None
    assert half_dtype("bf16") is torch.bfloat16 and half_dtype("fp32") is None
    assert isinstance(autocast(cpu, torch.bfloat16), contextlib.nullcontext)
    with autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
