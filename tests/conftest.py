"""Fixtures shared across test files."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from zim_lightning.data.synthetic import generate


@pytest.fixture(autouse=True)
def _global_random_state_stays_with_its_test() -> Iterator[None]:
    """A test that seeds globally (Lightning's ``seed_everything``, which may draw a random seed and
    leaves it in ``PL_GLOBAL_SEED``) must not decide what the tests after it draw."""
    # numpy: the legacy global state is the one seed_everything seeds
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002
    seed = os.environ.get("PL_GLOBAL_SEED")
    yield
    torch.random.set_rng_state(states[0])
    np.random.set_state(states[1])  # noqa: NPY002
    random.setstate(states[2])
    if seed is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = seed


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """A factory of the smallest synthetic dataset the training stages run on, one per seed, made once."""
    made: dict[int, Path] = {}

    def make(seed: int) -> Path:
        if seed not in made:
            root = tmp_path_factory.mktemp(f"synthetic_seed{seed}")
            generate(
                root,
                seed=seed,
                num_shards=1,
                num_images=2,
                image_size=(96, 128),
                matting_train=8,
                matting_val=4,
                seg=4,
                shard_size=8,
                micromat=2,
                eval_images=1,
            )
            made[seed] = root
        return made[seed]

    return make


@pytest.fixture(scope="session")
def builder_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic datasets the SA1B-Matte builder's tests read: 4 SA-1B shards of 2 images (96x128)."""
    root = tmp_path_factory.mktemp("builder_synthetic")
    generate(
        root,
        seed=0,
        num_shards=4,
        num_images=2,
        image_size=(96, 128),
        matting_train=1,
        matting_val=1,
        seg=1,
        shard_size=1,
        micromat=1,
        eval_images=1,
    )
    return root
