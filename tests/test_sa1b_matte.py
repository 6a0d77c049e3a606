"""Tests of the SA1B-Matte builder: format, one matte per good mask, crash safety, resuming, bad input.

Every build runs a tiny converter with random weights over synthetic SA-1B shards in the real format.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from zim_lightning.models.converter import converter_model_registry
from zim_lightning.sa1b_matte import (
    CLAIMS_DIR,
    MANIFEST_DIR,
    CropConfig,
    OutputLock,
    ShardClaims,
    ShardDataset,
    build,
    converter_mask,
    crop_square,
    launched_layout,
    mask_box,
    matte_box,
    project_matte,
    resample_square,
)
from zim_lightning.sa1b_matte.cli import _parser
from zim_lightning.sa1b_matte.job import _several_processes
from zim_lightning.sa1b_matte.reading import _shard_batches

# Small enough that a full build takes seconds on two cores; 4 shards so a kill lands mid-run.
NUM_SHARDS = 4  # the SA-1B shards of the builder_synthetic fixture (conftest)
BATCH_SIZE = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny converter's random weights, saved like a trained one, so every build uses the same net."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("converter") / "converter_tiny.pt"
    torch.save(converter_model_registry["converter_tiny"]().state_dict(), path)
    return path


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Every build of these tests runs the converter on one thread: byte-equal comparisons between builds
    then hold on CPUs whose kernels round differently at other thread counts (seen with oneDNN below AVX2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def _build(sa1b: Path, out: Path, checkpoint: Path, *, num_workers: int = 0, **options) -> dict:
    """The tiny converter's build on the CPU; ``options`` add to or replace :func:`build`'s arguments."""
    arguments = {"sa1b": [str(sa1b)], "out": out, "model": "converter_tiny", "checkpoint": str(checkpoint)}
    arguments.update(config=CropConfig(crop_size=64), batch_size=BATCH_SIZE, num_workers=num_workers)
    return build(**{**arguments, "accelerator": "cpu", "devices": 1, **options})


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _read_input(shard: Path) -> dict[str, dict]:
    """key -> {"jpg": bytes, "json": dict} of an SA-1B shard (gzip tar)."""
    samples: dict[str, dict] = {}
    with tarfile.open(shard, "r:*") as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            data = tar.extractfile(member).read()
            samples.setdefault(key, {})[suffix] = json.loads(data) if suffix == "json" else data
    return samples


@pytest.fixture(scope="module")
def synthetic(builder_synthetic: Path) -> Path:
    return builder_synthetic


@pytest.fixture(scope="module")
def clean_build(synthetic: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "sa1b_matte"
    # two DataLoader workers interleave the shards' batches at the writer; the other builds use none,
    # so comparing with them also checks that the bytes do not depend on the worker count
    summary = _build(synthetic / "sa1b", out, checkpoint, num_workers=2)
    assert summary["done"] == NUM_SHARDS and not summary["missing"]
    return out


def test_output_parses_and_every_good_mask_has_its_matte(synthetic: Path, clean_build: Path) -> None:
    for shard in sorted((synthetic / "sa1b").glob("*.tar")):
        expected = _read_input(shard)
        manifest = json.loads((clean_build / MANIFEST_DIR / f"{shard.stem}.json").read_text())
        with tarfile.open(clean_build / shard.name, "r:") as tar:  # plain, uncompressed tar
            members = tar.getmembers()
            data = {m.name: tar.extractfile(m).read() for m in members}
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
        mattes = 0
        for key, sample in expected.items():
            assert data[f"{key}.jpg"] == sample["jpg"]
            record = json.loads(data[f"{key}.json"])
            height, width = record["image"]["height"], record["image"]["width"]
            assert len(record["annotations"]) == len(sample["json"]["annotations"])
            for annotation in record["annotations"]:
                entry = annotation["matte"]
                assert entry["member"] == f"matte_{annotation['id']}.png"
                x, y, w, h = entry["box"]
                png = cv2.imdecode(
                    np.frombuffer(data[f"{key}.{entry['member']}"], np.uint8), cv2.IMREAD_UNCHANGED
                )
                assert png.dtype == np.uint8 and png.shape == (h, w)
                assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
                # the matte box holds the whole mask
                rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
                mask = mask_utils.decode(rle)
                assert mask[y : y + h, x : x + w].sum() == mask.sum()
                mattes += 1
        assert manifest["masks"] == mattes and manifest["images"] == len(expected)
        assert manifest["skipped_total"] == 0


def _mattes(out: Path) -> dict[str, np.ndarray]:
    mattes = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard, "r:") as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    blob = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                    mattes[f"{shard.name}/{member.name}"] = cv2.imdecode(blob, cv2.IMREAD_UNCHANGED)
    return mattes


def test_channels_last_build_gives_the_same_mattes(
    synthetic: Path, checkpoint: Path, clean_build: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sa1b_matte"
    net = converter_model_registry["converter_tiny"](checkpoint=str(checkpoint))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    nhwc = torch.channels_last
    assert convs and not any(c.weight.is_contiguous(memory_format=nhwc) for c in convs)
    summary = _build(synthetic / "sa1b", out, checkpoint, net=net, channels_last=True)
    assert summary["done"] == NUM_SHARDS
    # The switch reached the network that ran: every spatial convolution now holds NHWC weights.
    assert all(c.weight.is_contiguous(memory_format=nhwc) for c in convs)
    plain, fast = _mattes(clean_build), _mattes(out)
    assert plain and plain.keys() == fast.keys()
    for name, matte in plain.items():  # NHWC convolutions may round differently: one 8-bit level at most
        assert np.abs(matte.astype(int) - fast[name]).max() <= 1, name


def test_resampling_round_trip_keeps_the_mask(tmp_path: Path) -> None:
    """Crop + resize for the converter, then projection back, reproduces a mask passed through unchanged."""
    height, width = 300, 420
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (250, 120), (60, 35), 20, 0, 360, 1, -1)
    box = mask_box(mask)
    for mode, size in (("crop", 256), ("whole", 256)):  # crop: enlarged for the converter; whole: shrunk
        config = CropConfig(crop_size=size, mode=mode, min_crop=16)
        square = crop_square(box, (height, width), config)
        bx, by, bw, bh, _ = matte_box(box, (height, width), config.margin)
        x0, y0, side = square
        assert x0 <= bx and y0 <= by and bx + bw <= x0 + side and by + bh <= y0 + side
        converter_view = converter_mask(mask, *square, size)
        assert set(np.unique(converter_view)) == {0, 255}  # binary, as the converter's training masks
        back = project_matte(converter_view, square, (bx, by, bw, bh)).astype(np.float32) / 255
        truth = mask[by : by + bh, bx : bx + bw].astype(np.float32)
        error = np.abs(back - truth)
        assert error.mean() < 0.02, (mode, error.mean())
        assert ((back > 0.5) == (truth > 0.5)).mean() > 0.99


def test_the_converter_gets_binary_masks_as_in_its_training(synthetic: Path) -> None:
    # Small SA-1B masks are enlarged to the crop size, which bilinear resampling turns into ramps.
    shard = sorted((synthetic / "sa1b").glob("*.tar"))[0]
    config = CropConfig(crop_size=256, min_crop=16)
    masks = torch.cat([batch["mask"] for batch in _shard_batches(shard, config, batch_size=4)])
    assert len(masks) > 0 and set(masks.unique().tolist()) == {0, 255}


def test_a_mask_thinner_than_half_an_output_pixel_does_not_vanish() -> None:
    mask = np.zeros((1500, 2250), np.uint8)
    mask[:, 1001:1003] = 1  # a 2-pixel pole, shrunk 2.2x with the whole image: under half coverage
    view = converter_mask(mask, 0, -375, 2250, 1024)
    assert set(np.unique(view)) == {0, 255} and view.any()
    wide = np.zeros_like(mask)
    wide[:, 900:1100] = 1
    ramp = resample_square(wide, 0, -375, 2250, 1024, gain=255)
    np.testing.assert_array_equal(converter_mask(wide, 0, -375, 2250, 1024) > 0, ramp > 127)  # half cut


@pytest.mark.parametrize("context, margin, min_crop", [(0.1, 0.1, 1), (0.25, 0.25, 1), (0.5, 0.1, 128)])
def test_the_matte_box_always_lies_inside_the_converter_square(context, margin, min_crop) -> None:
    config = CropConfig(crop_size=32, context=context, margin=margin, min_crop=min_crop)
    rng = np.random.default_rng(0)
    alpha = np.full((32, 32), 200, np.uint8)
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(20, 400, size=2))
        w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
        box = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
        x0, y0, side = crop_square(box, (height, width), config)
        bx, by, bw, bh, _ = matte_box(box, (height, width), config.margin)
        assert x0 <= bx and y0 <= by and bx + bw <= x0 + side and by + bh <= y0 + side, (box, height, width)
        assert project_matte(alpha, (x0, y0, side), (bx, by, bw, bh)).shape == (bh, bw)
    with pytest.raises(ValueError, match="not inside the converter's square"):
        project_matte(alpha, (10, 10, 50), (5, 10, 20, 20))


def _build_in_child(sa1b: Path, out: Path, checkpoint: Path) -> None:
    # one thread: OpenMP's pool does not survive fork, and the child only needs to be killable mid-run
    torch.set_num_threads(1)
    _build(sa1b, out, checkpoint)


def _main_in_child(sa1b: Path, out: Path, checkpoint: Path) -> None:
    from zim_lightning.sa1b_matte import main

    torch.set_num_threads(1)
    args = [
        "--sa1b",
        str(sa1b),
        "--out",
        str(out),
        "--model",
        "converter_tiny",
        "--checkpoint",
        str(checkpoint),
    ]
    args += ["--crop-size", "64", "--batch-size", str(BATCH_SIZE), "--num-workers", "0"]
    sys.exit(main([*args, "--accelerator", "cpu", "--devices", "1"]))


def _signal_after_the_first_shard(target, args: tuple, out: Path, signum: int) -> int:
    """Run ``target(*args)`` in a forked child (everything imported: it starts within a second), send it
    ``signum`` once its first output shard appears, and return its exit code."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not any(out.glob("sa_*.tar")):
            assert child.is_alive(), f"the build exited ({child.exitcode}) before writing a shard"
            assert time.monotonic() < deadline, "no output shard appeared in time"
            time.sleep(0.005)
        os.kill(child.pid, signum)
        child.join(timeout=60)
    finally:
        if child.is_alive():  # an assertion above failed: the child must not outlive the test
            os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=60)
    return child.exitcode


@pytest.mark.slow
def test_sigterm_mid_run_stops_with_143_and_a_rerun_finishes_the_clean_result(
    synthetic: Path, checkpoint: Path, clean_build: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sa1b_matte"
    # a preemption: Lightning's predict loop never stopped for it
    code = _signal_after_the_first_shard(
        _main_in_child, (synthetic / "sa1b", out, checkpoint), out, signal.SIGTERM
    )
    assert code == 128 + signal.SIGTERM
    assert len(list(out.glob("sa_*.tar"))) < NUM_SHARDS  # it stopped, not ran to the end
    summary = _build(synthetic / "sa1b", out, checkpoint)
    assert summary["done"] == NUM_SHARDS and _files(out) == _files(clean_build)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_clean_result(
    synthetic: Path, checkpoint: Path, clean_build: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sa1b_matte"
    code = _signal_after_the_first_shard(
        _build_in_child, (synthetic / "sa1b", out, checkpoint), out, signal.SIGKILL
    )
    assert code == -signal.SIGKILL
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("sa_*.tar")}
    assert 1 <= len(finished) < NUM_SHARDS, "the kill should land between the first and the last shard"
    # a run killed inside the rest also leaves temporary files; plant one for a shard not yet written
    pending = sorted(set(_files(clean_build)) - set(_files(out)))
    (out / (Path(pending[-1]).name + ".partial")).write_bytes(b"half a shard")

    summary = _build(synthetic / "sa1b", out, checkpoint)

    assert summary["done"] == NUM_SHARDS
    assert not list(out.rglob("*.partial"))
    assert _files(out) == _files(clean_build)  # same set, byte for byte: no duplicates, no partial files
    for name, mtime in finished.items():  # finished shards were skipped, not rewritten
        assert (out / name).stat().st_mtime_ns == mtime


def test_ranks_claim_shards_first_come_first_served(synthetic: Path, tmp_path: Path) -> None:
    shards = sorted((synthetic / "sa1b").glob("*.tar"))
    out = tmp_path / "out"
    (out / shards[3].name).parent.mkdir(parents=True)
    (out / shards[3].name).write_bytes(b"finished by an earlier run")
    (out / MANIFEST_DIR).mkdir()
    (out / MANIFEST_DIR / f"{shards[3].stem}.json").write_text("{}")  # with its manifest
    killed = ShardClaims(out=out, run_id="killed-run")
    killed.begin()
    assert killed.claim(shards[0])  # a run killed while building shard 0
    claims = ShardClaims(out=out, run_id="this-run")
    assert not claims.visible(timeout_s=0)  # what a node that does not share OUT sees
    claims.begin()  # removes the killed run's claims
    assert claims.visible(timeout_s=0) and [p.name for p in (out / CLAIMS_DIR).iterdir()] == ["this-run"]
    fast, slow = (
        ShardDataset(shards=shards, config=CropConfig(crop_size=64), batch_size=4, claims=claims)
        for _ in "ab"
    )

    def built(batches) -> set[str]:
        return {batch["shard"] for batch in batches}

    slow_batches = iter(slow)
    slow_first = next(slow_batches)  # the slow rank claims shard 0 (the killed run's claim is no obstacle)
    fast_shards = built(fast)  # the fast rank builds everything else that is unfinished...
    slow_shards = built([slow_first, *slow_batches])  # ...and the slow one finds nothing left
    assert slow_shards == {shards[0].name}
    assert fast_shards == {shards[1].name, shards[2].name}  # a static split would give it shard 2 alone
    assert not claims.claim(shards[1]) and not claims.claim(shards[3])  # claimed, finished
    claims.remove()
    assert not (out / CLAIMS_DIR).exists()


def test_a_second_build_into_the_same_out_is_refused(
    synthetic: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    running = OutputLock(out)  # another build's rank 0 (flock: another open file conflicts, same process too)
    assert running.acquire() is None
    with pytest.raises(ValueError, match=rf'another build is writing into .*"pid": {os.getpid()}'):
        _build(synthetic / "sa1b", out, checkpoint)
    assert not list(out.glob("sa_*.tar*"))  # it wrote nothing
    running.release()  # that build ends (or dies: the system drops its lock)
    orphan = OutputLock(out)  # ...but a rank of it outlived its rank 0
    orphan.join()
    with pytest.raises(ValueError, match="ranks of an earlier build are still writing"):
        _build(synthetic / "sa1b", out, checkpoint)
    orphan.release()
    assert _build(synthetic / "sa1b", out, checkpoint)["done"] == NUM_SHARDS
    assert (out / ".build.lock").read_text() == ""  # released, no holder named


def test_an_out_that_holds_the_input_shards_is_refused_before_anything_is_written(
    synthetic: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tmp_path / "sa1b"
    shutil.copytree(synthetic / "sa1b", inputs)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    monkeypatch.chdir(tmp_path)  # and as typed: --sa1b sa1b --out sa1b
    for sa1b, out in [
        (inputs, inputs),
        (inputs, tmp_path / "." / "sa1b" / ".." / "sa1b"),
        (Path("sa1b"),) * 2,
    ]:
        with pytest.raises(ValueError, match="is where the SA-1B input shards lie"):
            _build(sa1b, out, checkpoint)
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # nothing written or replaced


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"devices": 0}, "devices=0"),  # Lightning's MisconfigurationException, said as a usage error
        ({"precision": "foo"}, "Precision 'foo' is invalid"),
        ({"model": "foo"}, "unknown converter 'foo'"),
        ({"sa1b": "missing/sa_000000.tar"}, "missing"),  # bad input: not "finished shards are kept"
    ],
)
def test_a_refused_build_leaves_nothing_in_a_new_out(
    synthetic: Path, checkpoint: Path, tmp_path: Path, options: dict, words: str, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sa1b_matte"
    options = dict(options)
    with pytest.raises(ValueError, match=words):
        _build(Path(options.pop("sa1b", synthetic / "sa1b")), out, checkpoint, **options)
    assert not out.exists()


@pytest.mark.parametrize("side", ["context", "margin"])
def test_a_crop_context_or_margin_of_nan_is_refused(side: str) -> None:
    with pytest.raises(ValueError, match="margin and context must be finite"):  # NaN passed every comparison
        CropConfig(crop_size=64, **{side: float("nan")})


@pytest.mark.slow
def test_two_processes_share_the_shards_and_write_the_bytes_of_one(
    synthetic: Path, checkpoint: Path, clean_build: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sa1b_matte"
    # Lightning launches the second rank by rerunning this command, so the build runs as a command
    command = [sys.executable, "-m", "zim_lightning.sa1b_matte", "--sa1b", str(synthetic / "sa1b")]
    command += ["--out", str(out), "--model", "converter_tiny", "--converter", str(checkpoint)]
    command += ["--crop-size", "64", "--batch-size", str(BATCH_SIZE), "--num-workers", "1"]
    command += ["--accelerator", "cpu", "--devices", "2"]
    # one thread per rank, as the other builds here (Lightning keeps an OMP_NUM_THREADS it finds)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    built = {int(r): int(n) for r, n in re.findall(r"rank (\d+): (\d+) shards, ", result.stderr)}
    assert set(built) == {0, 1} and sum(built.values()) == NUM_SHARDS  # both ran; each shard built once
    assert _files(out) == _files(clean_build)  # every shard once, the same bytes; no claims left


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_corrupt_samples_are_skipped_counted_and_a_rerun_changes_nothing(
    synthetic: Path, checkpoint: Path, tmp_path: Path
) -> None:
    source = _read_input(synthetic / "sa1b" / "sa_000000.tar")
    (k_jpeg, s_jpeg), (k_rle, s_rle), (k_json, s_json) = sorted(
        {**source, **_read_input(synthetic / "sa1b" / "sa_000001.tar")}.items()
    )[:3]
    height, width = s_rle["json"]["image"]["height"], s_rle["json"]["image"]["width"]
    record = json.loads(json.dumps(s_rle["json"]))
    good = len(record["annotations"])
    bad_rle = dict(
        record["annotations"][0], id=900001, segmentation={"size": [height, width], "counts": "!!!"}
    )
    empty = mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))
    empty_mask = dict(
        record["annotations"][0],
        id=900002,
        segmentation={"size": [height, width], "counts": empty["counts"].decode()},
    )
    repeated = json.loads(json.dumps(record["annotations"][-1]))  # the same id twice: the first counts
    wrong_size = json.loads(json.dumps(record["annotations"][0]))
    wrong_size["id"], wrong_size["segmentation"]["size"] = 900003, [height + 1, width]
    no_id = {key: value for key, value in record["annotations"][0].items() if key != "id"}
    record["annotations"] += [bad_rle, empty_mask, repeated, wrong_size, no_id]
    shards = tmp_path / "bad"
    shards.mkdir()
    members = [
        (f"{k_jpeg}.jpg", s_jpeg["jpg"][:200] + b"\x00" * 300),  # corrupt JPEG
        (f"{k_jpeg}.json", json.dumps(s_jpeg["json"]).encode()),
        (f"{k_rle}.jpg", s_rle["jpg"]),
        (f"{k_rle}.json", json.dumps(record).encode()),
        (f"{k_json}.jpg", s_json["jpg"]),
        (f"{k_json}.json", b'{"image": {"width": 3'),  # malformed json
    ]
    (shards / "sa_000100.tar").write_bytes(_tar_bytes(members))
    whole = (synthetic / "sa1b" / "sa_000000.tar").read_bytes()
    (shards / "sa_000101.tar").write_bytes(whole[: len(whole) * 2 // 3])  # truncated download

    out = tmp_path / "out"
    summary = _build(shards, out, checkpoint)

    # the truncated download is not finished (a rerun would otherwise skip its missing tail for good)
    assert summary["done"] == 1 and summary["missing"] == ["sa_000101.tar"]
    assert "sa_000101.tar" in summary["failed"] and "--accept-truncated" in summary["failed"]["sa_000101.tar"]
    assert not (out / "sa_000101.tar").exists() and not list(out.rglob("*.partial"))
    first = json.loads((out / MANIFEST_DIR / "sa_000100.json").read_text())
    assert first["skipped"]["corrupt_image"] == 1 and first["skipped"]["bad_json"] == 3  # + repeat, no id
    assert first["skipped"]["bad_rle"] == 2 and first["skipped"]["empty_mask"] == 1
    assert first["images"] == 1 and first["masks"] == good  # the bad masks did not cost their image
    with tarfile.open(out / "sa_000100.tar") as tar:
        kept = json.loads(tar.extractfile(f"{k_rle}.json").read())
        names = tar.getnames()
    converted = [a["id"] for a in kept["annotations"] if "matte" in a]
    assert len(converted) == good and not {900001, 900002, 900003} & set(converted)
    assert len(kept["annotations"]) == good + 5  # the bad ones stay in the json, without a matte
    assert not any(n.startswith(k_jpeg) or n.startswith(k_json) for n in names)
    assert len(names) == len(set(names))  # one matte per annotation id
    assert summary["skipped_total"] == 7

    def finished_mtimes() -> dict[str, int]:  # each run rewrites the failure note and takes the lock
        return {
            n: (out / n).stat().st_mtime_ns for n in _files(out) if not n.endswith((".failed.json", ".lock"))
        }

    before, snapshot = finished_mtimes(), _files(out)
    again = _build(shards, out, checkpoint)  # finished shards stay as they are; the damaged one fails again
    assert again["built"] == 0 and again["failed_this_rank"] == ["sa_000101.tar"] and _files(out) == snapshot
    assert finished_mtimes() == before

    accepted = _build(shards, out, checkpoint, accept_truncated=True)  # keep what the damaged one holds
    assert accepted["done"] == 2 and accepted["failed"] == {}
    second = json.loads((out / MANIFEST_DIR / "sa_000101.json").read_text())
    assert second["skipped"]["truncated_tar"] == 1 and 0 < second["images"] < len(source)
    assert not (out / MANIFEST_DIR / "sa_000101.failed.json").exists()


def test_resuming_into_shards_built_differently_is_refused(
    synthetic: Path, checkpoint: Path, clean_build: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(clean_build, out)
    with pytest.raises(ValueError, match=r"built differently .*crop_size 64 \(now 96\)"):
        build(
            sa1b=[str(synthetic / "sa1b")],
            out=out,
            model="converter_tiny",
            checkpoint=str(checkpoint),
            config=CropConfig(crop_size=96),
            accelerator="cpu",
            devices=1,
        )
    renamed = tmp_path / "renamed.pt"  # the same weights under another name resume
    shutil.copy(checkpoint, renamed)
    assert _build(synthetic / "sa1b", out, renamed)["built"] == 0
    other = tmp_path / "retrained" / checkpoint.name  # same name, other weights: another run's last.ckpt
    other.parent.mkdir()
    torch.save({k: v + 1 for k, v in torch.load(checkpoint, weights_only=True).items()}, other)
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        _build(synthetic / "sa1b", out, other)
    inputs = tmp_path / "sa1b"
    shutil.copytree(synthetic / "sa1b", inputs)
    first = sorted(inputs.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes() + b"\0" * 1024)  # a re-downloaded input of another size
    with pytest.raises(ValueError, match=f"{first.name}: input of .* the input has changed"):
        _build(inputs, out, checkpoint)
    assert _files(out) == _files(clean_build)  # nothing was touched
    older = tmp_path / "older"  # a build from before the converter got binary masks (not recorded then)
    shutil.copytree(clean_build, older)
    manifest = sorted((older / MANIFEST_DIR).glob("*.json"))[0]
    document = json.loads(manifest.read_text())
    del document["build"]["converter_input"]
    manifest.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"converter_input 'coverage' \(now 'binary'\)"):
        _build(synthetic / "sa1b", older, checkpoint)
    # bf16 and float32 mattes differ by a few levels: another precision does not resume either
    with pytest.raises(ValueError, match=r"precision '32-true' \(now 'bf16-mixed'\)"):
        _build(synthetic / "sa1b", out, checkpoint, precision="bf16-mixed")
    assert _files(out) == _files(clean_build)


def test_a_shard_without_its_manifest_is_built_again_and_a_bad_manifest_is_named(
    synthetic: Path, checkpoint: Path, clean_build: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(clean_build, out)
    manifests = sorted((out / MANIFEST_DIR).glob("sa_*.json"))
    manifests[0].unlink()  # a shard copied in alone: no recorded settings to check a resume against
    summary = _build(synthetic / "sa1b", out, checkpoint)
    assert summary["built"] == 1 and summary["done"] == NUM_SHARDS and not summary["missing"]
    assert _files(out) == _files(clean_build)  # rebuilt as it was
    manifests[1].write_text("")  # truncated
    with pytest.raises(ValueError, match=rf"manifest .*{manifests[1].name} cannot be read"):
        _build(synthetic / "sa1b", out, checkpoint)


def test_zim_stage_loads_a_batch_from_the_built_shards(clean_build: Path) -> None:
    """ZIM's training data reads SA1B-Matte as built: alpha = the stored matte in the SAM frame."""
    from zim_lightning.data.datamodule import ZimDataModule
    from zim_lightning.data.samples import unpack_batch

    shards = [str(p) for p in sorted(clean_build.glob("sa_*.tar"))]
    data = ZimDataModule(
        stage="zim", val_shards=shards, batch_size=2, num_workers=0, image_size=128, pin_memory=False
    )
    batch = unpack_batch(next(iter(data.val_dataset(rank=0, world_size=1))))
    assert batch["image"].shape == (2, 3, 128, 128) and batch["alpha"].shape == (2, 1, 128, 128)
    assert data.skips.total() == 0
    for row, sample_key in enumerate(batch["key"]):
        key, ann_id = sample_key.split(".")
        with tarfile.open(next(p for p in shards if key in _members(p))) as tar:
            record = json.loads(tar.extractfile(f"{key}.json").read())
            (annotation,) = [a for a in record["annotations"] if str(a["id"]) == ann_id]
            x, y, w, h = annotation["matte"]["box"]
            png = tar.extractfile(f"{key}.{annotation['matte']['member']}").read()
        height, width = record["image"]["height"], record["image"]["width"]
        stored = np.zeros((height, width), np.float32)
        stored[y : y + h, x : x + w] = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE) / 255
        # 96x128 images need no resize into the 128 frame: the batch's alpha is the stored matte
        assert batch["original_size"][row].tolist() == [height, width] == batch["input_size"][row].tolist()
        np.testing.assert_allclose(batch["alpha"][row, 0, :height, :width].numpy(), stored, atol=1 / 255)


def _members(shard: str) -> set[str]:
    with tarfile.open(shard) as tar:
        return {name.split(".")[0] for name in tar.getnames()}


@pytest.mark.parametrize(
    "devices, num_nodes, several",
    [("auto", 1, False), (1, 1, False), ("1", 1, False), (2, 1, True), ("0,1", 1, True), (1, 2, True)],
)
def test_builds_over_several_processes_get_the_long_barrier_timeout(devices, num_nodes, several) -> None:
    # (on this CPU-only machine "auto" is one process; on a multi-GPU node it is one per GPU)
    assert _several_processes(devices, num_nodes=num_nodes, gpu=False) is several


def test_a_fit_checkpoint_names_its_converter(
    synthetic: Path, checkpoint: Path, clean_build: Path, tmp_path: Path
):
    # What `zim-lightning fit` writes: the network under net. and its config (NET_SPEC_KEY); the builder
    # then needs no --model (the default, converter_hiera_b_plus, would not fit these weights).
    from zim_lightning.models.checkpoint import NET_SPEC_KEY

    weights = torch.load(checkpoint, weights_only=True)
    spec = {
        "class_path": "zim_lightning.models.converter.build_converter_tiny",
        "init_args": {"checkpoint": None},
    }
    fit_ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in weights.items()}, NET_SPEC_KEY: spec}, fit_ckpt)
    out = tmp_path / "out"
    with _one_thread():
        summary = build(
            sa1b=[str(synthetic / "sa1b")],
            out=out,
            checkpoint=str(fit_ckpt),
            config=CropConfig(crop_size=64),
            batch_size=BATCH_SIZE,
            num_workers=0,
            accelerator="cpu",
            devices=1,
        )
    assert summary["done"] == NUM_SHARDS
    assert summary["per_shard"][0]["build"]["model"] == "converter_tiny"
    for name in (p.name for p in sorted((synthetic / "sa1b").glob("*.tar"))):  # the same mattes
        assert (out / name).read_bytes() == (clean_build / name).read_bytes()


class _ConstantConverter(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"alpha": torch.full_like(masks, self.value)}


def test_the_build_rounds_alpha_to_the_nearest_8_bit_level() -> None:
    from zim_lightning.lit.build_module import MatteBuildModule

    batch = {
        "image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
        "mask": torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
    }
    for value, level in ((0.999, 255), (0.5, 128), (0.001, 0)):  # truncation would give 254, 127
        out = MatteBuildModule(net=_ConstantConverter(value)).predict_step(batch, 0)
        assert out.dtype == torch.uint8 and out.unique().tolist() == [level]


def test_torchrun_sets_the_devices_and_nodes_a_default_command_line_leaves_open(monkeypatch) -> None:
    # On the CPU, Lightning's "auto" is one device: each torchrun process would build alone.
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launched_layout("auto", 1) == ("auto", 1)  # not under torchrun
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launched_layout("auto", 1) == (4, 2)
    assert launched_layout(2, 3) == (2, 3)  # what the user gave stands


def test_the_converter_checkpoint_option_has_the_other_commands_name_and_keeps_its_old_one() -> None:
    required = ["--sa1b", "in", "--out", "out"]
    assert _parser().parse_args([*required, "--checkpoint", "a.ckpt"]).converter == "a.ckpt"
    assert _parser().parse_args([*required, "--converter", "b.ckpt"]).converter == "b.ckpt"


def test_a_build_stopped_by_sigterm_says_which_error_the_signal_caused(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from zim_lightning.lit.preemption import stop_message
    from zim_lightning.sa1b_matte import cli

    args = ["--sa1b", str(tmp_path), "--out", str(tmp_path / "out"), "--model", "converter_tiny"]
    args += ["--accelerator", "cpu", "--devices", "1"]
    for stop, said in (
        (SIGTERMException(), "stopped by SIGTERM; a rerun resumes"),  # Lightning's own stop
        (  # an error after the signal (job.build raises it so): named, not hidden
            SIGTERMException(stop_message(OSError(28, "No space left on device"))),
            "stopped by SIGTERM (then OSError: [Errno 28] No space left on device); a rerun resumes",
        ),
    ):

        def build(**kwargs):
            raise stop  # noqa: B023 (called at once, in this iteration)

        monkeypatch.setattr(cli, "build", build)
        assert cli.main(args) == 128 + signal.SIGTERM
        assert capsys.readouterr().err.strip() == f"zim-lightning build-sa1b-matte: {said}"
