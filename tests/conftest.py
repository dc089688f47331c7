"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from runs import make_tiny_dataset


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on shared 2-core machines, 2 threads stall on every op while another job runs.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.2 * torch.randn(module.num_features, generator=g))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(module.num_features, generator=g))
            module.weight.data.copy_(0.5 + torch.rand(module.num_features, generator=g))
            module.bias.data.copy_(0.1 * torch.randn(module.num_features, generator=g))


@pytest.fixture
def randomise_batchnorm() -> Callable[[torch.nn.Module], None]:
    """Gives BatchNorm layers non-trivial running statistics and affine parameters (in place, under no_grad by the
    caller), so eval paths that fold BatchNorm into convolutions are really exercised."""
    return _randomise_batchnorm


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """8 train / 4 validation / 4 test pairs of the bundled Kvasir-SEG sample, saved to disk (``runs.py``)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "kvasir-tiny")
