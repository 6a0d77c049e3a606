"""ZimDataModule: batch contracts per stage, deterministic and complete rank/worker coverage, corrupt data
skipped and counted, reproducible training streams, Lightning integration."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from tests.test_data_sa1b import (
    jpeg,
    matting_members,
    png,
    sa1b_matte_members,
    sa1b_members,
    scene,
    seg_members,
    write_tar,
)
from tests.test_micromat import write_matting_folder, write_micromat
from zim_lightning.data import datamodule as datamodule_module
from zim_lightning.data import micromat
from zim_lightning.data import samples as samples_module
from zim_lightning.data.datamodule import UnpaddedDistributedSampler, ZimDataModule, owner_rank
from zim_lightning.data.shards import assign_shards, expand_shards, is_local
from zim_lightning.data.synthetic import generate

FRAME = 64  # ZIM frame side in these tests (1024 in real runs)
CROP = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """5 matting shards x 3 samples, 1 seg shard, 2 SA1B-Matte shards x 2 images, 3 SA-1B shards x 2."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    matting = []
    for s in range(5):
        members = []
        for i in range(3):
            image, alpha = scene(rng, 40 + 4 * i, 56)
            members += matting_members(f"m{s}_{i}", image, alpha)
        matting.append(str(write_tar(root / f"matting-{s:06d}.tar", members)))
    seg = []
    for i in range(3):
        image, alpha = scene(rng, 40, 40)
        seg += seg_members(f"s{i}", image, np.where(alpha > 127, 255, 0).astype(np.uint8))
    seg_shard = str(write_tar(root / "seg-000000.tar", seg))
    matte = []
    for s in range(2):
        members = []
        for i in range(2):
            image, alpha = scene(rng, 48, 72)
            _, other = scene(rng, 48, 72)
            members += sa1b_matte_members(f"sa_{s}{i}", image, [alpha, other])
        (root / "matte").mkdir(exist_ok=True)
        matte.append(str(write_tar(root / "matte" / f"sa_{s:06d}.tar", members, compress=True)))
    sa1b = []
    for s in range(3):
        members = []
        for i in range(2):
            image, alpha = scene(rng, 48, 72)
            members += sa1b_members(f"sa_{s}{i}", image, [alpha > 127, alpha > 30], first_id=10 * i)
        (root / "sa1b").mkdir(exist_ok=True)
        sa1b.append(str(write_tar(root / "sa1b" / f"sa_{s:06d}.tar", members, compress=True)))
    pattern = str(root / "matting-{000000..000004}.tar")
    return {
        "matting": matting,
        "pattern": pattern,
        "seg": seg_shard,
        "matte": matte,
        "sa1b": sa1b,
        "root": root,
    }


def module(**kwargs) -> ZimDataModule:
    defaults = dict(
        batch_size=2, num_workers=0, crop_size=CROP, image_size=FRAME, shuffle_buffer=4, batches_per_epoch=3
    )
    return ZimDataModule(**{**defaults, **kwargs})


def check_converter_batch(batch: dict, size: int) -> None:
    assert set(batch) == {"image", "mask", "alpha", "is_stl", "key"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (size, 3, CROP, CROP)
    for name in ("mask", "alpha"):  # uint8 labels (255 = 1), made float on the device
        assert batch[name].dtype == torch.uint8 and batch[name].shape == (size, 1, CROP, CROP)
    assert set(batch["mask"].unique().tolist()) <= {0, 255}
    unpacked = samples_module.unpack_batch(batch)
    assert set(unpacked["mask"].unique().tolist()) <= {0.0, 1.0}
    assert unpacked["alpha"].dtype == torch.float32 and 0 <= unpacked["alpha"].min() <= 1
    assert torch.equal(unpacked["alpha"], batch["alpha"].float() * samples_module.ALPHA_SCALE)
    assert batch["is_stl"].dtype == torch.bool and batch["is_stl"].shape == (size,)
    assert isinstance(batch["key"], list) and len(batch["key"]) == size


def check_zim_batch(batch: dict, size: int, num_points: int = 6) -> None:
    assert set(batch) == {
        "image",
        "alpha",
        "point_coords",
        "point_labels",
        "original_size",
        "input_size",
        "key",
    }
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (size, 3, FRAME, FRAME)
    assert batch["alpha"].dtype == torch.uint8 and batch["alpha"].shape == (size, 1, FRAME, FRAME)
    batch = samples_module.unpack_batch(batch)  # as ZimModule does after the transfer
    for name in ("alpha", "valid"):
        assert batch[name].dtype == torch.float32 and batch[name].shape == (size, 1, FRAME, FRAME)
    assert (
        batch["point_coords"].shape == (size, num_points, 2) and batch["point_coords"].dtype == torch.float32
    )
    assert batch["point_labels"].shape == (size, num_points) and batch["point_labels"].dtype == torch.float32
    assert set(batch["point_labels"].unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0, 3.0}
    for name in ("original_size", "input_size"):
        assert batch[name].dtype == torch.int64 and batch[name].shape == (size, 2)
    assert (batch["input_size"].amax(dim=1) == FRAME).all()
    for i in range(size):
        h, w = batch["input_size"][i].tolist()
        assert batch["valid"][i, 0, :h, :w].all() and batch["valid"][i].sum() == h * w
        assert batch["alpha"][i, 0, h:].sum() == 0 and batch["alpha"][i, 0, :, w:].sum() == 0
        real = batch["point_labels"][i] >= 0
        xy = batch["point_coords"][i][real]
        assert (xy[:, 0] <= w - 1).all() and (xy[:, 1] <= h - 1).all() and (xy >= 0).all()


def test_converter_stage_batches_follow_the_contract(shards):
    data = module(
        stage="converter",
        train_shards=shards["pattern"],
        seg_shards=shards["seg"],
        val_shards=shards["matting"][:2],
    )
    train = list(data.train_dataloader())
    assert len(train) == 3 == len(data.train_dataloader())
    for batch in train:
        check_converter_batch(batch, 2)
    val = list(data.val_dataloader())
    assert sum(len(b["key"]) for b in val) == 6
    check_converter_batch(val[0], 2)
    assert not any(b["is_stl"].any() for b in val)
    on_device = data.on_after_batch_transfer(val[0], 0)  # what the module and callbacks then see
    for name in ("mask", "alpha"):
        assert torch.equal(on_device[name], val[0][name].float() * samples_module.ALPHA_SCALE)


def test_zim_stage_reads_sa1b_matte_and_matting_shards(shards):
    data = module(
        stage="zim",
        train_shards=shards["matte"] + shards["matting"][:1],
        val_shards=shards["matte"],
        batch_size=3,
    )
    for batch in data.train_dataloader():
        check_zim_batch(batch, 3)
    val = list(data.val_dataloader())
    keys = [k for b in val for k in b["key"]]
    assert sorted(k.split(".")[0] for k in keys) == ["sa_00", "sa_01", "sa_10", "sa_11"]
    check_zim_batch(val[0], 3)
    assert val[0]["original_size"][0].tolist() == [48, 72] and val[0]["input_size"][0].tolist() == [43, 64]


def test_sa1b_matte_decodes_only_the_chosen_mattes(shards, monkeypatch):
    calls = []
    real = samples_module.decode_matte

    def counting_decode_matte(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(samples_module, "decode_matte", counting_decode_matte)
    rng = np.random.default_rng(3)
    image, alpha = scene(rng, 48, 72)
    members = sa1b_matte_members("sa_9", image, [alpha] * 12)
    record = json.loads(members[1][1])
    for annotation in record["annotations"]:
        annotation["segmentation"]["counts"] = "!!"  # RLE is never decoded in ZIM training
    sample = {"__key__": "sa_9", "jpg": members[0][1], "json": json.dumps(record).encode()}
    sample.update({name.split(".", 1)[1]: data for name, data in members[2:]})
    processor = module(stage="zim", mattes_per_image=2).zim_processor
    out = processor(sample, np.random.default_rng(0), train=True)
    assert len(out) == 2 and len(calls) == 2 and out[0]["key"] != out[1]["key"]


def keys_of(data: ZimDataModule, **kwargs) -> list[str]:
    return [k for batch in data.val_dataset(**kwargs) for k in batch["key"]]


def test_validation_is_deterministic_and_covers_ranks_and_workers_exactly_once(shards, monkeypatch):
    data = module(stage="converter", val_shards=shards["pattern"], batch_size=2)
    everything = keys_of(data, rank=0, world_size=1)
    # local paths, brace patterns, "::" joins and pipe: urls name the same shards
    piped = module(stage="converter", val_shards=f"pipe:cat {shards['matting'][0]}::{shards['matting'][1]}")
    assert keys_of(piped, rank=0, world_size=1) == everything[:6]
    assert sorted(everything) == sorted(f"m{s}_{i}" for s in range(5) for i in range(3))
    first = list(data.val_dataset(rank=0, world_size=1))
    second = list(data.val_dataset(rank=0, world_size=1))
    for a, b in zip(first, second, strict=True):
        assert (
            a["key"] == b["key"] and torch.equal(a["mask"], b["mask"]) and torch.equal(a["image"], b["image"])
        )
    for world_size, num_workers in ((2, 1), (2, 2), (3, 2)):
        seen = [
            keys_of(data, rank=r, world_size=world_size, worker=w, num_workers=num_workers)
            for r in range(world_size)
            for w in range(num_workers)
        ]
        flat = [k for part in seen for k in part]
        assert sorted(flat) == sorted(everything), (world_size, num_workers)
    # the ranks come from RANK / WORLD_SIZE when no trainer is attached; DataLoader workers split for real
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = module(stage="converter", val_shards=shards["pattern"], num_workers=2).val_dataloader()
        assert loader.num_workers == 2
        per_rank.append([k for batch in loader for k in batch["key"]])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    # the same sample gets the same crop and coarse mask whatever the rank layout
    by_key = {k: m for b in first for k, m in zip(b["key"], b["mask"], strict=True)}
    for batch in data.val_dataset(rank=1, world_size=2, worker=0, num_workers=1):
        for k, m in zip(batch["key"], batch["mask"], strict=True):
            assert torch.equal(by_key[k], m)


class _ShardsOfWorkers(torch.utils.data.IterableDataset):
    """(worker id, shard) for the shards that webdataset's splitters give each real DataLoader worker."""

    def __init__(self, urls: list[str], rank: int, world_size: int) -> None:
        self.urls, self.rank, self.world_size = urls, rank, world_size

    def __iter__(self):
        from zim_lightning.data.shards import split_by_dataloader_worker, split_by_rank

        worker = torch.utils.data.get_worker_info().id
        dicts = ({"url": u} for u in self.urls)
        for d in split_by_dataloader_worker(split_by_rank(dicts, rank=self.rank, world_size=self.world_size)):
            yield worker, d["url"]


def test_a_simulated_worker_reads_the_shards_a_real_one_does():
    from torch.utils.data import DataLoader

    from zim_lightning.data.shards import assign_shards

    urls = [f"val_{i:06d}.tar" for i in range(7)]
    world_size, num_workers = 2, 2
    for rank in range(world_size):
        real: dict[int, list[str]] = {w: [] for w in range(num_workers)}
        loader = DataLoader(
            _ShardsOfWorkers(urls, rank, world_size), batch_size=None, num_workers=num_workers
        )
        for worker, url in loader:
            real[int(worker)].append(url)
        for worker in range(num_workers):
            simulated = assign_shards(
                urls, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
            )
            assert simulated == real[worker], (rank, worker)


def test_corrupt_samples_are_skipped_counted_and_the_others_unchanged(shards, tmp_path):
    rng = np.random.default_rng(5)
    good, bad = [], []
    for i in range(4):
        image, alpha = scene(rng, 40, 56)
        members = matting_members(f"g{i}", image, alpha)
        good += members
        bad += members
        if i == 1:
            bad += [("x_jpeg.alpha.png", png(alpha)), ("x_jpeg.jpg", jpeg(image)[:200])]
            bad += [("x_empty.alpha.png", png(np.zeros_like(alpha))), ("x_empty.jpg", jpeg(image))]
            bad += [("x_missing.jpg", jpeg(image))]
            thin = np.full((1, 40 * FRAME), 255, np.uint8)  # its short side rounds to 0 in the frame
            bad += [("x_thin.alpha.png", png(thin)), ("x_thin.jpg", jpeg(np.dstack([thin] * 3)))]
    clean = write_tar(tmp_path / "clean.tar", good)
    dirty = write_tar(tmp_path / "dirty.tar", bad)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(dirty.read_bytes()[: len(dirty.read_bytes()) // 2])

    expected = {
        k: b
        for batch in module(stage="zim", val_shards=str(clean), batch_size=1).val_dataset(
            rank=0, world_size=1
        )
        for k, b in [(batch["key"][0], batch)]
    }
    data = module(stage="zim", val_shards=[str(dirty), str(truncated)], batch_size=1)
    got = [batch for batch in data.val_dataset(rank=0, world_size=1)]
    keys = [b["key"][0] for b in got]
    assert keys[:4] == ["g0", "g1", "g2", "g3"] and set(keys[4:]) <= {"g0", "g1"}
    for batch in got:
        reference = expected[batch["key"][0]]
        for name in ("image", "alpha", "point_coords", "point_labels"):
            assert torch.equal(batch[name], reference[name]), name
    counts = data.skip_counts()
    assert counts["corrupt_image"] >= 1 and counts["empty_mask"] >= 1 and counts["missing_member"] >= 1
    assert counts["truncated_tar"] == 1


@pytest.mark.parametrize("stl", [True, False])
def test_matting_and_segmentation_shards_given_in_each_others_place_stop_training(
    shards, stl, caplog
) -> None:
    data = module(stage="converter", train_shards=shards["seg"], seg_shards=shards["matting"], stl=stl)
    with pytest.raises(RuntimeError, match=r"(segmentation|matting) shards go in (seg|train)_shards"):
        next(iter(data.train_dataset(rank=0, world_size=1)))
    assert data.skip_counts()["other"] >= 1000
    # shards of neither kind (SA-1B) as train_shards: the good STL samples mixed in do not hide them
    wrong = module(stage="converter", train_shards=shards["sa1b"], seg_shards=shards["seg"], stl=stl)
    with pytest.raises(RuntimeError, match="1000 training samples from train_shards in a row"):
        for _ in itertools.islice(wrong.train_dataset(rank=0, world_size=1), 1000):
            pass  # with STL on, batches of segmentation samples alone come first
    right = module(stage="converter", train_shards=shards["matting"], seg_shards=shards["seg"], stl=stl)
    batch = next(iter(right.train_dataset(rank=0, world_size=1)))
    assert right.skip_counts()["other"] == 0 and batch["image"].shape[0] == 2
    # validation: segmentation samples are refused as well, matting ones pass
    mixed = module(stage="converter", val_shards=[shards["seg"], shards["matting"][0]], stl=stl)
    with caplog.at_level("WARNING", logger="zim_lightning.data.skips"):
        validated = [k for b in mixed.val_dataset(rank=0, world_size=1) for k in b["key"]]
    assert validated and all(k.startswith("m") for k in validated) and mixed.skip_counts()["other"] == 3
    assert (
        "a segmentation sample in val_shards, which takes matting shards; the converter validates on mattes"
        in caplog.text
    )


def test_a_skip_is_logged_with_its_shard_once_per_shard(tmp_path, caplog) -> None:
    rng = np.random.default_rng(8)
    image, alpha = scene(rng, 40, 56)
    shards = []
    for name in ("a.tar", "b.tar"):  # the same bad key in two shards: two different samples
        members = matting_members("good", image, alpha) + [("bad.alpha.png", png(alpha))]  # no image
        shards.append(str(write_tar(tmp_path / name, members)))
    data = module(stage="zim", val_shards=shards, batch_size=1)
    with caplog.at_level("WARNING", logger="zim_lightning.data.skips"):
        for _ in range(2):  # read twice: counted every time, logged once per shard
            assert len(list(data.val_dataset(rank=0, world_size=1))) == 2
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped bad")]
    assert [line.split(" (")[0] for line in logged] == [f"skipped bad in {shard}" for shard in shards]
    assert data.skip_counts()["missing_member"] == 4


def test_skips_in_dataloader_workers_reach_the_main_process(shards, tmp_path):
    rng = np.random.default_rng(6)
    parts = []
    for s in range(2):
        image, alpha = scene(rng, 40, 40)
        members = matting_members(f"ok{s}", image, alpha) + [
            ("bad.alpha.png", png(alpha)),
            ("bad.jpg", b"junk"),
        ]
        parts.append(str(write_tar(tmp_path / f"w{s}.tar", members)))
    data = module(stage="converter", val_shards=parts, num_workers=2)
    keys = [k for batch in data.val_dataloader() for k in batch["key"]]
    assert sorted(keys) == ["ok0", "ok1"]
    assert data.skip_counts()["corrupt_image"] == 2 and data.skips.total() == 2
    # validation counts in its own lane: training's persistent workers, which may still prefetch, write
    # the rows of the same worker ids in lane 0
    assert data.skips.tables[1].sum() == 2 and data.skips.tables[0].sum() == 0


def test_training_streams_are_reproducible_per_seed_and_differ_across_ranks(shards):
    def stream(seed: int, rank: int) -> list[str]:
        data = module(stage="zim", train_shards=shards["pattern"], seed=seed, batch_size=2)
        pipeline = data.train_dataset(rank=rank, world_size=2)
        it = iter(pipeline)
        return [k for _ in range(4) for k in next(it)["key"]]

    assert stream(0, 0) == stream(0, 0)
    assert stream(0, 0) != stream(1, 0)
    rank0, rank1 = stream(0, 0), stream(0, 1)
    # 5 shards >= 2 ranks x 1 worker: each rank resamples its own disjoint shards (0, 2, 4 and 1, 3)
    assert {k.split("_")[0] for k in rank0} <= {"m0", "m2", "m4"}
    assert {k.split("_")[0] for k in rank1} <= {"m1", "m3"}


def test_a_validation_between_training_batches_changes_no_augmentation(shards):
    # with num_workers=0 the training and validation pipelines share the sample processor: validation
    # must not restart the training stream's augmentation draws
    def batches(validate: bool) -> list[torch.Tensor]:
        data = module(
            stage="converter",
            train_shards=shards["pattern"],
            val_shards=shards["matting"][0],
            seg_shards=shards["seg"],
            seed=3,
        )
        train = iter(data.train_dataloader())
        first = next(train)["image"]
        if validate:
            for _ in data.val_dataloader():
                pass
        return [first, next(train)["image"], next(train)["image"]]

    for plain, validated in zip(batches(False), batches(True), strict=True):
        assert torch.equal(plain, validated)


def test_stl_segmentation_shards_are_drawn_independently_of_the_matting_shards():
    from itertools import islice

    from zim_lightning.data.datamodule import EpochSeeds, ResampleShards

    def draws(source: int) -> list[str]:
        stage = ResampleShards(seeds=EpochSeeds(seed=0, rank=0, source=source))
        return [d["url"][-1] for d in islice(stage({"url": f"shard{i}"} for i in range(3)), 40)]

    assert draws(0) == draws(0)  # reproducible
    assert draws(1) != draws(0)  # the matting and segmentation streams: not the same shard sequence


def test_missing_shards_are_named_before_anything_runs(shards):
    pattern = str(shards["root"] / "matting-{000003..000007}.tar")  # 3 and 4 exist, 5..7 do not
    with pytest.raises(FileNotFoundError, match=r"3 of the 5 shards .* do not exist: .*matting-000005.tar"):
        module(stage="zim", train_shards=pattern).train_dataset(rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match="matting-000009.tar"):
        module(stage="zim", val_shards=str(shards["root"] / "matting-000009.tar")).val_dataloader()
    # a fit started from Python, not through `zim-lightning fit`: stopped in setup, before the sanity
    # check's validation (which Lightning runs before it asks for the training loader)
    from lightning.pytorch.demos.boring_classes import BoringModel

    data = module(stage="zim", train_shards=pattern, val_shards=shards["matting"][0])
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(FileNotFoundError, match=r"train_shards: 3 of the 5 shards"):
        trainer.fit(BoringModel(), datamodule=data)


def test_training_stops_with_an_error_when_no_batch_can_come(shards, tmp_path, monkeypatch):
    # SA-1B shards given to the ZIM stage (it needs SA1B-Matte or matting shards): every sample is
    # skipped, so the endless stream would never yield a batch.
    monkeypatch.setattr(datamodule_module, "MAX_CONSECUTIVE_SKIPS", 20)
    data = module(stage="zim", train_shards=shards["sa1b"][:1])
    with pytest.raises(
        RuntimeError, match=r"20 training samples in a row were skipped .*missing_member"
    ) as stop:
        next(iter(data.train_dataset(rank=0, world_size=1)))
    assert f"in {shards['sa1b'][0]}); skips so far" in str(stop.value)  # the shard they came from
    # ...and beside SA1B-Matte shards: their good samples do not hide the SA-1B shard, named in the error
    data = module(stage="zim", train_shards=[*shards["matte"], shards["sa1b"][0]])
    with pytest.raises(
        RuntimeError, match="20 training samples in a row from the shard " + re.escape(shards["sa1b"][0])
    ):
        for _ in itertools.islice(data.train_dataset(rank=0, world_size=1), 1000):
            pass
    # Every shard unreadable (here: cut inside its first member): no sample at all.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(shards["matting"][0], "rb").read()[:700])
    data = module(stage="zim", train_shards=[str(cut)])
    with pytest.raises(RuntimeError, match="1000 shards in a row gave no sample"):
        next(iter(data.train_dataset(rank=0, world_size=1)))
    assert data.skip_counts()["truncated_tar"] == 1000


def test_sa1b_matte_annotations_without_an_id_are_keyed_by_their_index():
    from zim_lightning.data.prompts import PromptSampler
    from zim_lightning.data.samples import ZimSampleProcessor

    rng = np.random.default_rng(0)
    image, alpha = scene(rng, 48, 64)
    members = {name.split(".", 1)[1]: data for name, data in sa1b_matte_members("sa_9", image, [alpha])}
    record = json.loads(members["json"])
    del record["annotations"][0]["id"]  # SA-1B's always have one; ours keep working without
    members["json"] = json.dumps(record).encode()
    processor = ZimSampleProcessor(image_size=FRAME, prompts=PromptSampler(), augment=False)
    (sample,) = processor({"__key__": "sa_9", **members}, rng, train=False)
    assert sample["key"] == "sa_9.0"


def _zim_processor(**kwargs):
    from zim_lightning.data.prompts import PromptSampler
    from zim_lightning.data.samples import ZimSampleProcessor

    return ZimSampleProcessor(image_size=FRAME, prompts=PromptSampler(box_ratio=0.0), **kwargs)


def test_zim_points_are_drawn_on_the_matte_in_its_0_1_scale():
    image = np.zeros((64, 64, 3), np.uint8)
    alpha = np.zeros((64, 64), np.uint8)
    alpha[16:48, 16:48] = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))  # a ramp
    raw = {"__key__": "z", **{n.split(".", 1)[1]: d for n, d in matting_members("z", image, alpha)}}
    processor = _zim_processor(augment=False)
    rng = np.random.default_rng(0)
    for _ in range(30):
        (sample,) = processor(raw, rng, train=False)
        values = {int(label): [] for label in (0, 1)}
        for (x, y), label in zip(sample["point_coords"], sample["point_labels"], strict=True):
            if label in (0, 1):
                values[int(label)].append(int(sample["alpha"][int(y), int(x)]))
        assert min(values[1]) >= 0.9 * 255  # positive_threshold
        assert max(values[0], default=0) <= 0.05 * 255  # support_threshold


def test_zim_validation_picks_differ_between_images():
    rng = np.random.default_rng(0)
    image, first = scene(rng, 48, 64)
    alphas = [first, *(scene(rng, 48, 64)[1] for _ in range(2))]
    processor = _zim_processor(augment=False)
    picked = set()
    for i in range(12):
        members = {n.split(".", 1)[1]: d for n, d in sa1b_matte_members(f"sa_{i}", image, alphas)}
        (sample,) = processor(
            {"__key__": f"sa_{i}", **members}, samples_module.key_rng(0, f"sa_{i}"), train=False
        )
        picked.add(sample["key"].split(".", 1)[1])
    assert len(picked) > 1  # drawn per image (key-seeded), not always the first annotation


def test_a_zim_affine_that_pushes_the_matte_out_of_view_is_undone():
    from zim_lightning.data.augment import zim_geometric

    image = np.zeros((64, 64, 3), np.uint8)
    alpha = np.zeros((64, 64), np.uint8)
    alpha[:6, :6] = 255  # a small object in the corner
    raw = {"__key__": "z", **{n.split(".", 1)[1]: d for n, d in matting_members("z", image, alpha)}}
    processor = _zim_processor()
    # shifts of up to 45% of the frame: many push the object out
    processor.geometric = zim_geometric(hflip_p=0.0, affine_p=1.0, rotate=0.0, translate=0.45)
    processor.seed(np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        (sample,) = processor(raw, rng, train=True)
        assert isinstance(sample, dict) and sample["alpha"].any()


def test_a_corrupt_or_vanishing_matte_is_skipped_alone_and_the_images_other_mattes_train():
    from zim_lightning.data.datamodule import EpochSeeds, ProcessSamples
    from zim_lightning.data.skips import SkipCounter

    rng = np.random.default_rng(0)
    image, alpha = scene(rng, 48, 64)
    faint = np.where(alpha > 0, 10, 0).astype(np.uint8)  # below the prompts' support threshold
    members = {
        name.split(".", 1)[1]: data for name, data in sa1b_matte_members("sa_9", image, [alpha, alpha, faint])
    }
    good, corrupt, _ = json.loads(members["json"])["annotations"]
    members[corrupt["matte"]["member"]] = b"junk"
    processor = module(stage="zim", mattes_per_image=3).zim_processor
    counter = SkipCounter()
    stage = ProcessSamples(processor, train=True, seeds=EpochSeeds(seed=0, rank=0), counter=counter)
    out = list(stage(iter([{"__key__": "sa_9", "__url__": "shard.tar", **members}])))
    assert [sample["key"] for sample in out] == [f"sa_9.{good['id']}"]
    counts = counter.counts()
    assert counts["empty_mask"] == 1 and counts["corrupt_image"] == 1 and counter.total() == 2


def test_skips_between_good_samples_never_stop_training(monkeypatch):
    from zim_lightning.data.datamodule import EpochSeeds, ProcessSamples
    from zim_lightning.data.skips import CorruptSample, SkipCounter

    class EveryOtherCorrupt:  # a processor: odd samples are corrupt
        def seed(self, rng) -> None:
            pass

        def __call__(self, sample: dict, rng, *, train: bool) -> list[dict]:
            if sample["__key__"] % 2:
                raise CorruptSample("bad", key=str(sample["__key__"]), reason="corrupt_image")
            return [sample]

    monkeypatch.setattr(datamodule_module, "MAX_CONSECUTIVE_SKIPS", 3)
    counter = SkipCounter()
    stage = ProcessSamples(EveryOtherCorrupt(), train=True, seeds=EpochSeeds(seed=0, rank=0), counter=counter)
    samples = [{"__key__": i, "__url__": "shard.tar"} for i in range(40)]
    assert [s["__key__"] for s in stage(iter(samples))] == list(range(0, 40, 2))
    assert counter.counts()["corrupt_image"] == 20


@pytest.mark.parametrize("one_good", [True, False])
def test_images_whose_every_matte_fails_count_in_a_row_and_one_good_matte_resets(monkeypatch, one_good):
    from zim_lightning.data.datamodule import EpochSeeds, ProcessSamples
    from zim_lightning.data.skips import CorruptSample, SkipCounter

    class FailingMattes:  # a ZIM-like processor: two mattes per image fail alone, one may pass
        def seed(self, rng) -> None:
            pass

        def __call__(self, sample: dict, rng, *, train: bool) -> list:
            key = sample["__key__"]
            failed = [CorruptSample("faint", key=f"{key}.{i}", reason="empty_mask") for i in range(2)]
            return [*failed, {"key": key}] if one_good else failed

    monkeypatch.setattr(datamodule_module, "MAX_CONSECUTIVE_SKIPS", 3)
    counter = SkipCounter()
    stage = ProcessSamples(FailingMattes(), train=True, seeds=EpochSeeds(seed=0, rank=0), counter=counter)
    samples = [{"__key__": str(i), "__url__": "shard.tar"} for i in range(10)]
    if one_good:
        assert [s["key"] for s in stage(iter(samples))] == [str(i) for i in range(10)]
        assert counter.counts()["empty_mask"] == 20
    else:  # three images in a row gave nothing: an endless stream would otherwise never yield
        with pytest.raises(RuntimeError, match="3 training samples in a row"):
            list(stage(iter(samples)))
        assert counter.counts()["empty_mask"] == 6


@pytest.mark.parametrize("num_workers", [0, 1])
def test_epochs_continue_the_stream_to_the_end_of_each_shard(tmp_path, num_workers):
    # One shard of 24 samples, 2 per batch, 3 batches per epoch: were every epoch to start a new stream,
    # it would redraw the shard and read it from its first sample, never reaching the end.
    rng = np.random.default_rng(5)
    members = []
    for i in range(24):
        image, alpha = scene(rng, 40, 40)
        members += matting_members(f"m{i:02d}", image, alpha)
    shard = write_tar(tmp_path / "matting-000000.tar", members)
    data = module(stage="converter", train_shards=[str(shard)], stl=False, num_workers=num_workers)
    loader = data.train_dataloader()
    seen = [key for _ in range(8) for batch in loader for key in batch["key"]]
    assert len(seen) == 48
    positions = sorted({int(key[1:]) for key in seen})
    assert positions[-1] >= 20 and len(positions) >= 20, positions


def test_zim_batches_carry_uint8_alpha_and_unpack_to_the_float_alpha_and_valid_map() -> None:
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (40, 64), (64, 64)]
    samples = [
        {
            "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "alpha": rng.integers(0, 256, (h, w), dtype=np.uint8),
            "point_labels": np.array([1.0], np.float32),
            "input_size": np.array([h, w]),
            "key": str(i),
        }
        for i, (h, w) in enumerate(sizes)
    ]
    batch = samples_module.collate(samples, frame_size=64)
    assert batch["alpha"].dtype == torch.uint8 and "valid" not in batch  # 1 byte a pixel over the bus
    unpacked = samples_module.unpack_batch(batch)
    assert unpacked["image"] is batch["image"] and batch["alpha"].dtype == torch.uint8  # input untouched
    for i, (h, w) in enumerate(sizes):
        expected = np.zeros((64, 64), np.float32)
        expected[:h, :w] = samples[i]["alpha"] * np.float32(1 / 255)  # how float batches were scaled
        np.testing.assert_array_equal(unpacked["alpha"][i, 0].numpy(), expected)
        inside = np.zeros((64, 64), np.float32)
        inside[:h, :w] = 1
        np.testing.assert_array_equal(unpacked["valid"][i, 0].numpy(), inside)
        image = np.zeros((3, 64, 64), np.uint8)  # RGB channels in order, zero padding
        image[:, :h, :w] = samples[i]["image"].transpose(2, 0, 1)
        np.testing.assert_array_equal(batch["image"][i].numpy(), image)
    assert unpacked["alpha"].dtype == unpacked["valid"].dtype == torch.float32
    # a batch already unpacked, or built by hand with float alpha and valid, passes through
    again = samples_module.unpack_batch(unpacked)
    assert again["alpha"] is unpacked["alpha"] and again["valid"] is unpacked["valid"]


def test_zim_samples_keep_image_and_alpha_aligned_through_the_reduced_decode(tmp_path):
    # A large checkerboard: its JPEG is decoded at 1/8 scale (DCT) for the 256 frame, its alpha resized
    # from full size; the two must land on the same pixels (a shift or a one-sided flip would show).
    height, width = 2100, 2800
    yy, xx = np.mgrid[:height, :width]
    board = (((yy // 140) + (xx // 140)) % 2 * 255).astype(np.uint8)
    members = matting_members("board", np.repeat(board[..., None], 3, axis=2), board)
    shard = write_tar(tmp_path / "matting-000000.tar", members)
    data = module(stage="zim", train_shards=[str(shard)], val_shards=[str(shard)], image_size=256)
    batch = samples_module.unpack_batch(next(iter(data.val_dataloader())))
    h, w = batch["input_size"][0].tolist()
    assert (h, w) == (192, 256)
    image = batch["image"][0, 0, :h, :w].float() / 255
    alpha = batch["alpha"][0, 0, :h, :w]

    def error(dy: int, dx: int) -> float:
        shifted = torch.roll(image, shifts=(dy, dx), dims=(0, 1))
        return (shifted - alpha)[2:-2, 2:-2].abs().mean().item()

    assert error(0, 0) < 0.02
    assert min(error(dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))) > 2 * error(0, 0)


class KeyRecorder(L.LightningModule):
    """Records the sample keys of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.keys: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.keys.setdefault(self.current_epoch, []).extend(batch["key"])
        return ((batch["alpha"].float().mean() - self.bias) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _record_keys(
    shards, root: Path, *, batches_per_epoch: int, ckpt_path=None, callbacks=(), **limits
) -> tuple[KeyRecorder, L.Trainer]:
    """Fit a :class:`KeyRecorder` on the zim stage's stream (``limits``: max_epochs or max_steps)."""
    model = KeyRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root,
        **limits,
    )
    data = module(stage="zim", train_shards=shards["pattern"], batches_per_epoch=batches_per_epoch)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, trainer


def test_a_resumed_run_draws_new_samples_instead_of_replaying_epoch_0(shards, tmp_path):
    def fit(epochs: int, ckpt_path=None) -> KeyRecorder:
        model, trainer = _record_keys(
            shards, tmp_path, batches_per_epoch=3, ckpt_path=ckpt_path, max_epochs=epochs
        )
        trainer.save_checkpoint(tmp_path / f"epochs{epochs}.ckpt")
        return model

    first = fit(2)
    resumed = fit(3, ckpt_path=tmp_path / "epochs2.ckpt")
    assert list(resumed.keys) == [2] and len(resumed.keys[2]) == 6
    assert resumed.keys[2] not in (first.keys[0], first.keys[1])
    # ... and a resumed run is as reproducible as a fresh one
    again = fit(3, ckpt_path=tmp_path / "epochs2.ckpt")
    assert again.keys == resumed.keys


def test_a_run_resumed_in_the_middle_of_an_epoch_does_not_replay_its_start(shards, tmp_path):
    # At the default 1000 batches per epoch, every checkpoint of a short run is inside epoch 0: the
    # restored epoch alone cannot tell the resumed stream from the first one, the restored step must.
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt_path=None) -> KeyRecorder:
        every_two = ModelCheckpoint(
            dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1, filename="{step}"
        )
        model, _ = _record_keys(
            shards, tmp_path, batches_per_epoch=10, ckpt_path=ckpt_path, callbacks=[every_two], max_steps=6
        )
        return model

    first = fit()
    resumed = fit(ckpt_path=tmp_path / "checkpoints" / "step=2.ckpt")  # epoch 0, step 2
    assert list(resumed.keys) == [0] and len(resumed.keys[0]) == 2 * len(first.keys[0]) // 3
    assert resumed.keys[0] != first.keys[0][: len(resumed.keys[0])]  # not the first run's batches again


class TinyModule(L.LightningModule):
    """One parameter fitted to the mean alpha: enough for Lightning to drive the loaders."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return ((batch["alpha"].float().mean() - self.bias) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        self.log(
            "val/loss", ((batch["alpha"].float().mean() - self.bias) ** 2).sum(), batch_size=len(batch["key"])
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("stage", ["converter", "zim"])
def test_lightning_fast_dev_run(shards, stage, tmp_path):
    data = module(
        stage=stage,
        train_shards=shards["matting"],
        seg_shards=shards["seg"],
        val_shards=shards["matting"][:1],
    )
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyModule(), datamodule=data)
    assert trainer.state.finished and trainer.global_step == 2


class Instances(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def test_unpadded_rank_slices_cover_each_instance_once():
    dataset = Instances(7)
    slices = [list(UnpaddedDistributedSampler(dataset, rank=r, world_size=3)) for r in range(3)]
    assert slices == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(UnpaddedDistributedSampler(dataset, rank=r, world_size=3)) for r in range(3)] == [3, 2, 2]


def test_ranks_without_an_instance_repeat_one_that_another_rank_owns():
    dataset = Instances(2)
    slices = [list(UnpaddedDistributedSampler(dataset, rank=r, world_size=5)) for r in range(5)]
    assert slices == [[0], [1], [0], [1], [0]]  # no rank is empty (Lightning refuses that)
    owners = [owner_rank(index, 5) for index in (0, 1)]
    assert owners == [0, 1]  # the repeats (ranks 2, 3, 4) own nothing: they save nothing
    assert list(UnpaddedDistributedSampler(Instances(0), rank=1, world_size=2)) == []


def test_eval_stage_wraps_the_evaluation_dataset(tmp_path):

    layout = generate(
        tmp_path / "synth",
        seed=0,
        num_shards=1,
        num_images=1,
        matting_train=1,
        matting_val=1,
        seg=1,
        shard_size=1,
        micromat=5,
        eval_images=1,
        image_size=(64, 64),
    )
    full = micromat.build_eval_dataset(layout.micromat, format="micromat", prompt="box", subset=None)
    seen = []
    for rank in range(2):
        data = module(
            stage="eval",
            eval_root=str(layout.micromat),
            eval_format="micromat",
            eval_prompt="box",
            batch_size=2,
        )
        loader = data.eval_dataloader(rank=rank, world_size=2)
        seen.append([item["index"] for batch in loader for item in batch])
    assert seen[0] == [0, 2, 4] and seen[1] == [1, 3]
    assert sorted(seen[0] + seen[1]) == list(range(len(full)))


def test_configured_from_yaml_with_validated_types(shards, tmp_path):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(ZimDataModule, "data")
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n  stage: converter\n"
        f"  train_shards: '{shards['pattern']}'\n  seg_shards: ['{shards['seg']}']\n"
        "  batch_size: 2\n  num_workers: 0\n  crop_size: 32\n  sga: false\n  stl_ratio: 0.5\n"
        "  coarsen_ops: [dilate, erode]\n"
    )
    data = parser.instantiate_classes(parser.parse_args(["--config", str(config)])).data
    assert isinstance(data, ZimDataModule) and not data.converter_processor.sga
    assert data.converter_processor.coarsen_ops == ("dilate", "erode")
    check_converter_batch(next(iter(data.train_dataloader())), 2)
    with pytest.raises(Exception, match="batch_size"):
        parser.parse_args(["--config", str(config), "--data.batch_size", "two"])
    for ops in ([], ["dilate", "melt"]):  # an empty list is not "all" (None is)
        with pytest.raises(ValueError, match="coarsen_ops must be a non-empty subset"):
            ZimDataModule(stage="converter", coarsen_ops=ops)


# ----------------------------------------------------------------------------- mutation round 9b: splitting, seeds, validation


def test_remote_urls_are_not_checked_for_existence():
    # "scheme://" urls (webdataset opens http(s), s3... through gopen) are not local paths
    urls = ["https://host/sa_000000.tar", "s3://bucket/sa_{000001..000002}.tar", "pipe:cat x.tar"]
    assert not any(is_local(u) for u in ("https://host/a.tar", "s3://b/a.tar", "pipe:cat a"))
    assert expand_shards(urls) == [
        "https://host/sa_000000.tar",
        "s3://bucket/sa_000001.tar",
        "s3://bucket/sa_000002.tar",
        "pipe:cat x.tar",
    ]


@pytest.mark.parametrize(
    ("rank", "world_size", "worker", "num_workers"), [(2, 2, 0, 1), (0, 1, 3, 3), (-1, 2, 0, 1)]
)
def test_assign_shards_refuses_a_rank_or_worker_out_of_range(rank, world_size, worker, num_workers):
    # rank == world_size (or worker == num_workers) would silently get no shard
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size"):
        assign_shards(
            ["a", "b", "c"], rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
        )


def matting_shard(path, prefix: str, count: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    members = []
    for i in range(count):
        image, alpha = scene(rng, 40, 40)
        members += matting_members(f"{prefix}{i}", image, alpha)
    return str(write_tar(path, members))


def as_worker(monkeypatch, worker: int, num_workers: int) -> None:
    """Make the pipeline believe it runs in DataLoader worker ``worker`` (the splitters, seeds and counter read it)."""
    info = SimpleNamespace(id=worker, num_workers=num_workers)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)


def train_keys(data: ZimDataModule, batches: int, **kwargs) -> list[str]:
    it = iter(data.train_dataset(**kwargs))
    return [k for _ in range(batches) for k in next(it)["key"]]


def test_workers_sharing_one_shard_draw_their_own_streams(tmp_path, monkeypatch):
    # what a break looks like: (worker left out of the stream seeds), (a fixed shuffle seed): with fewer shards than workers
    # every worker resamples all shards "with its own seed"; the same seed would send identical batches.
    shard = matting_shard(tmp_path / "m.tar", "k", 6)
    streams = []
    for worker in (0, 1):
        as_worker(monkeypatch, worker, 2)
        data = module(stage="converter", train_shards=[shard], stl=False, num_workers=2)
        streams.append(train_keys(data, 6, rank=0, world_size=1))
    assert streams[0] != streams[1]


def test_a_pipeline_iterated_again_draws_anew(tmp_path):
    # what a break looks like: (epoch left out of the stream seeds): EpochSeeds: "a pipeline iterated again draws anew"
    shard = matting_shard(tmp_path / "m.tar", "k", 6)
    data = module(stage="converter", train_shards=[shard], stl=False)
    pipeline = data.train_dataset(rank=0, world_size=1)
    first = [b["key"] for b in itertools.islice(iter(pipeline), 6)]
    second = [b["key"] for b in itertools.islice(iter(pipeline), 6)]
    assert first != second


def test_the_shuffle_buffer_reorders_samples(tmp_path):
    # shuffle_buffer > 1 must shuffle; without it one shard comes back in file order, cycle after cycle
    shard = matting_shard(tmp_path / "m.tar", "k", 6)
    data = module(stage="converter", train_shards=[shard], stl=False, shuffle_buffer=6)
    keys = train_keys(data, 6, rank=0, world_size=1)
    in_order = [f"k{i % 6}" for i in range(12)]
    assert sorted(set(keys)) == sorted(set(in_order)) and keys != in_order
    plain = module(stage="converter", train_shards=[shard], stl=False, shuffle_buffer=1)
    assert train_keys(plain, 6, rank=0, world_size=1) == in_order  # buffer 1: no shuffling


def test_exactly_ranks_times_workers_shards_give_each_its_own(tmp_path, monkeypatch):
    # what a break looks like: (split only with more shards than ranks x workers), (training not split by worker)
    shards = [matting_shard(tmp_path / f"{p}.tar", p, 3, seed=i) for i, p in enumerate("ab")]
    for rank in (0, 1):  # 2 shards, 2 ranks x 1 worker
        keys = train_keys(
            module(stage="converter", train_shards=shards, stl=False), 8, rank=rank, world_size=2
        )
        assert {k[0] for k in keys} == {"ab"[rank]}, (rank, keys)
    for worker in (0, 1):  # 2 shards, 1 rank x 2 workers
        as_worker(monkeypatch, worker, 2)
        data = module(stage="converter", train_shards=shards, stl=False, num_workers=2)
        keys = train_keys(data, 8, rank=0, world_size=1)
        assert {k[0] for k in keys} == {"ab"[worker]}, (worker, keys)


def test_stl_shards_are_not_drawn_in_the_matting_shards_order(tmp_path):
    # the segmentation stream must get its own seeds (source=1) in the datamodule's wiring
    rng = np.random.default_rng(0)
    matting, seg = [], []
    for i in range(4):
        image, alpha = scene(rng, 40, 40)
        matting.append(str(write_tar(tmp_path / f"m{i}.tar", matting_members(f"m{i}", image, alpha))))
        mask = np.where(alpha > 127, 255, 0).astype(np.uint8)
        seg.append(str(write_tar(tmp_path / f"s{i}.tar", seg_members(f"s{i}", image, mask))))
    data = module(stage="converter", train_shards=matting, seg_shards=seg, stl_ratio=0.5, shuffle_buffer=1)
    keys = train_keys(data, 20, rank=0, world_size=1)
    m = [k[1] for k in keys if k[0] == "m"]
    s = [k[1] for k in keys if k[0] == "s"]
    n = min(len(m), len(s))
    assert n >= 8 and m[:n] != s[:n]


def test_validation_skips_never_stop_it(tmp_path, monkeypatch):
    # MAX_CONSECUTIVE_SKIPS stops training only; a validation pass skips and counts every bad sample
    monkeypatch.setattr(datamodule_module, "MAX_CONSECUTIVE_SKIPS", 2)
    rng = np.random.default_rng(1)
    image, alpha = scene(rng, 40, 40)
    members = [(f"bad{i}.alpha.png", png(alpha)) for i in range(4)] + matting_members("good", image, alpha)
    shard = write_tar(tmp_path / "v.tar", members)
    data = module(stage="zim", val_shards=[str(shard)], batch_size=1)
    keys = [k for b in data.val_dataset(rank=0, world_size=1) for k in b["key"]]
    assert keys == ["good"] and data.skip_counts()["missing_member"] == 4


def test_validation_loader_gets_one_worker_per_shard_of_the_fullest_rank(tmp_path, monkeypatch):
    # 3 shards on 2 ranks: rank 0 reads 2 of them, so 2 workers (not 3 // 2 = 1)
    shards = [matting_shard(tmp_path / f"v{i}.tar", f"v{i}_", 1) for i in range(3)]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert module(stage="zim", val_shards=shards, num_workers=4).val_dataloader().num_workers == 2


def test_val_batch_size_sets_the_validation_batches(tmp_path):
    shard = matting_shard(tmp_path / "v.tar", "v", 5)
    data = module(stage="zim", val_shards=[shard], batch_size=2, val_batch_size=3)
    assert [len(b["key"]) for b in data.val_dataset(rank=0, world_size=1)] == [3, 2]
    write_micromat(tmp_path / "mm")
    ev = module(stage="eval", eval_root=str(tmp_path / "mm"), batch_size=2, val_batch_size=3)
    assert ev.eval_dataloader(rank=0, world_size=1).batch_size == 3


def test_validation_crops_follow_the_data_seed(tmp_path):
    # validation's key-seeded draws are keyed by the data seed too (setup() broadcasts it for that)
    shard = matting_shard(tmp_path / "v.tar", "v", 4)

    def masks(seed: int) -> torch.Tensor:
        data = module(stage="converter", val_shards=[shard], seed=seed)
        return torch.cat([b["mask"] for b in data.val_dataset(rank=0, world_size=1)])

    assert torch.equal(masks(0), masks(0)) and not torch.equal(masks(0), masks(1))


def test_eval_options_reach_the_evaluation_dataset(tmp_path):
    # what a break looks like: (eval_trimaps), (seed of the derived points)
    write_matting_folder(tmp_path)
    common = dict(stage="eval", eval_root=str(tmp_path), eval_format="aim500")
    assert all(r.trimap is not None for r in module(**common).eval_dataset().records)
    assert all(r.trimap is None for r in module(**common, eval_trimaps=False).eval_dataset().records)

    def points(**kwargs) -> np.ndarray:
        return module(**common, eval_prompt="point", **kwargs).eval_dataset()[1]["prompt"]["points"]

    assert not np.array_equal(points(seed=3), points(seed=4))
    # the layout reaches it too, and the set is read once per seed (eval checks it before the run)
    shutil.copytree(tmp_path / "original", tmp_path / "set" / "image")
    shutil.copytree(tmp_path / "mask", tmp_path / "set" / "matte")
    folders = dict(eval_root=str(tmp_path / "set"), eval_format="folders", eval_layout=["image", "matte"])
    data = module(stage="eval", seed=3, **folders)
    first = data.eval_dataset()
    assert first[0]["matte_relpath"] == "matte/s_0.png" and data.eval_dataset() is first
    data.seed = 4  # setup takes rank 0's seed
    assert data.eval_dataset() is not first and data.eval_dataset().seed == 4


def test_a_matting_sample_whose_image_and_alpha_differ_is_skipped_by_the_zim_stage(tmp_path):
    # the ZIM stage would otherwise resize the image to the alpha's frame, misaligned
    rng = np.random.default_rng(5)
    image, alpha = scene(rng, 40, 56)
    members = [("bad.alpha.png", png(alpha[:, :50])), ("bad.jpg", jpeg(image))] + matting_members(
        "good", image, alpha
    )
    data = ZimDataModule(
        stage="zim",
        val_shards=[str(write_tar(tmp_path / "v.tar", members))],
        batch_size=1,
        num_workers=0,
        image_size=64,
    )
    assert [k for b in data.val_dataset(rank=0, world_size=1) for k in b["key"]] == ["good"]
    assert data.skip_counts()["corrupt_image"] == 1
