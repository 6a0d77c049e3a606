"""Fixtures shared across test files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from zim_lightning.data.synthetic import generate


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
