"""data.num_workers: auto by default, never more workers than usable CPUs, one warning at most."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from detection.config import ConfigError, load_config
from detection.data import build_dataloader, resolve_num_workers
from detection.data.loader import AUTO_MAX_WORKERS

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class _Tiny(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        index = index[0] if isinstance(index, tuple) else index
        return torch.zeros(3, 4, 4), {"image_id": torch.tensor(index)}

    def image_sizes(self):
        return [(4, 4)] * 4


def test_auto_is_the_default_and_bounded_by_the_cpus() -> None:
    assert load_config(None).data.num_workers == "auto"
    assert resolve_num_workers("auto") == min(AUTO_MAX_WORKERS, CPUS)
    assert resolve_num_workers(0) == 0
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0 or auto; got -1"):
        load_config(None, ["data.num_workers=-1"])


def test_too_many_workers_give_one_warning_and_torch_none() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_dataloader(_Tiny(), batch_size=2, train=False, num_workers=CPUS + 3, aspect_ratio_grouping=False)
        assert sum(1 for _ in loader) == 2
    assert loader.num_workers == CPUS
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and f"num_workers={CPUS + 3} but this process may use {CPUS} CPU(s)" in messages[0]
