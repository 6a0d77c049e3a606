"""The GPU benchmark scripts (benchmarks/) and their profiler helper, run on the CPU with the tiny model, so
they cannot rot between the sessions that have a GPU to run them on."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from zim_lightning import benchmarking
from zim_lightning.metrics import matting_errors
from zim_lightning.models import relpos_flash

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_profile_top_ops_ranks_the_dominant_operator_first():
    # ~40 ms of products per step: a preemption inside the cheap ops (a scheduler slice, a few ms on a
    # busy box) cannot make one of them look dominant (at 384 x 384 it did, about once in 30 loaded runs)
    a = torch.randn(1024, 1024)

    def step() -> torch.Tensor:
        return (a @ a @ a).relu() + 1.0

    step()  # warm-up, unprofiled
    top = benchmarking.profile_top_ops(step, device="cpu", steps=3, top=5)
    assert top[0]["name"] in {"aten::mm", "aten::matmul"}
    mm = next(e for e in top if e["name"] == "aten::mm")
    assert mm["calls_per_step"] == pytest.approx(2.0)  # two products per step
    assert all(0.0 <= e["share"] <= 1.0 for e in top)
    assert [e["ms_per_step"] for e in top] == sorted((e["ms_per_step"] for e in top), reverse=True)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        benchmarking.profile_top_ops(step, device="cpu", steps=0)


def test_train_throughput_runs_stock_and_zim_and_profiles(tmp_path: Path):
    script = _script("train_throughput")
    out = tmp_path / "train.json"
    args = "--model tiny --image-size 128 --device cpu --precision fp32 --batch-size 2 --warmup 1 --steps 1"
    assert (
        script.main(
            [*args.split(), "--configs", "stock,sdpa_fold+cl+fused", "--profile", "1", "--json-out", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [r["config"] for r in report["results"]] == ["stock", "sdpa_fold+cl+fused"]
    for result in report["results"]:
        assert "error" not in result, result.get("error")
        assert result["finite"] and result["images_per_s"] > 0 and result["mfu"] > 0
        assert result["profile"] and result["profile"][0]["ms_per_step"] > 0
    assert report["model_gflops_per_image"]["zim"] > report["model_gflops_per_image"]["stock"] > 0
    # the training as it runs (ZimModule in a Trainer) takes the same steps on the same batch
    assert script.main([*args.split(), "--configs", "sdpa_fold+fused+lit", "--json-out", str(out)]) == 0
    (lit,) = json.loads(out.read_text())["results"]
    assert "error" not in lit, lit.get("error")
    assert lit["step_ms"]["mean"] > 0 and lit["images_per_s"] > 0
    assert lit["final_loss"] == pytest.approx(report["results"][1]["final_loss"], rel=1e-4)


def test_build_throughput_scores_the_mattes_and_splits_them_by_zoom(tmp_path: Path):
    # The mask passed through the build (identity model) must score about as the mask itself; every
    # instance falls in one zoom bucket; a smaller --min-crop enlarges small masks more.
    script = _script("build_throughput")
    args = "--model identity --quality --crop-size 256 --images 2 --shards 1 --image-size 192x256"
    buckets = {}
    for min_crop in (16, 256):
        out = tmp_path / f"build_{min_crop}.json"
        argv = [*args.split(), "--skip", "cpu", "forward", "--num-workers", "0", "--min-crop", str(min_crop)]
        assert script.main([*argv, "--json-out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["min_crop"] == min_crop
        quality = report["quality"]
        assert quality["instances"] > 0
        assert quality["matte"]["sad"] == pytest.approx(quality["mask"]["sad"], rel=0.25)
        by_zoom = quality["matte_sad_by_zoom"]
        assert sum(b["instances"] for b in by_zoom.values()) == quality["instances"]
        buckets[min_crop] = set(by_zoom)
    assert buckets[256] == {"(0, 1]"}  # a square of at least the crop size is never enlarged
    assert buckets[16] - {"(0, 1]"}, buckets  # small masks enlarged past 1x


def test_predictor_latency_reports_every_call_and_the_alpha_agreement(tmp_path: Path, monkeypatch):
    script = _script("predictor_latency")
    out = tmp_path / "latency.json"

    def broken_profiler(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    # a profiler that fails (CUPTI on a lent GPU, say) costs the profile, never the timings or the alpha
    monkeypatch.setattr(benchmarking, "profile_top_ops", broken_profiler)
    args = "--model tiny --image-size 128 --device cpu --precision fp32 --compile none --warmup 0 --repeats 1"
    assert (
        script.main([*args.split(), "--attention", "sdpa_fold", "--profile", "1", "--json-out", str(out)])
        == 0
    )
    results = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"stock_sam/fp32", "zim/eager/fp32", "zim/sdpa_fold/fp32/channels_last"}
    for result in results.values():
        assert "error" not in result, result.get("error")
        assert "CUPTI_ERROR_NOT_INITIALIZED" in result["profile_error"]
        for call in ("set_image", "one_box", "set_image_plus_one_box", "boxes16"):
            assert result[f"{call}_ms"]["median"] > 0
    assert results["zim/sdpa_fold/fp32/channels_last"]["alpha_mse_vs_plain_fp32"] < 1e-10
    # the weights make the agreement mean something: an alpha spread towards 0 and 1, not all near 0.5
    report = json.loads(out.read_text())
    assert report["logit_scale"] > 1 and report["plain_alpha"]["variance"] > 0.05


def test_preprocess_latency_times_both_resize_modes_and_compares_their_pixels(tmp_path: Path):
    out = tmp_path / "preprocess.json"
    report = _script("preprocess_latency").main(
        [
            "--device",
            "cpu",
            "--sizes",
            "1024x1024,300x200",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--json-out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == report
    same, small = report["sizes"]
    assert same["frame"] == [1024, 1024] and small["frame"] == [1024, 683]
    for entry in (same, small):
        assert min(entry["segment_anything_ms"], entry["pil_ms"], entry["tensor_ms"]) > 0
        assert entry["max_level_difference"] <= 1 and entry["pixels_differing"] < 0.01


def test_eval_scoring_times_both_protocols_and_their_costly_parts(tmp_path: Path):
    out = tmp_path / "scoring.json"
    args = ["--device", "cpu", "--sizes", "64x96,33x17", "--warmup", "0", "--repeats", "1"]
    report = _script("eval_scoring").main([*args, "--json-out", str(out)])
    assert json.loads(out.read_text()) == report and report["environment"]["device"] == "cpu"
    assert [entry["size"] for entry in report["sizes"]] == [[64, 96], [33, 17]]
    assert report["sizes"][0]["megapixels"] == 0.01
    for entry in report["sizes"]:
        times = ("paper_ms", "dim_ms", "sobel_ms", "gaussian_gradient_ms", "conn_ms")
        assert min(entry[name] for name in times) > 0
        # what was scored: the noisy disc, with an error in every metric of the paper protocol
        pred, gt = _script("eval_scoring").disc_pair(*entry["size"], device=torch.device("cpu"))
        assert entry["paper_errors"] == matting_errors(pred, gt, "paper")
        assert min(entry["paper_errors"].values()) > 0


def test_image_sizes_parse_hxw_lists_and_refuse_anything_else():
    assert benchmarking.image_sizes("1024x1024, 33X17") == [(1024, 1024), (33, 17)]
    for bad in ("1024", "0x5", "ax5", "3x4x5", "3x4,"):
        with pytest.raises(argparse.ArgumentTypeError, match="HxW sizes"):
            benchmarking.image_sizes(bad)


def test_relpos_kernels_compile_for_hopper_without_spilling(tmp_path: Path):
    """Every launch setting the autotuner may pick, compiled for an H100 (sm_90) with Triton's own ptxas:
    no register spills, tensor-core matrix products, and at least one program per SM."""
    script = _script("kernel_resources")
    out = tmp_path / "resources.json"
    assert script.main(["--configs", "candidates", "--json-out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for kernel in script.KERNELS:
        assert len([r for r in results if r["kernel"] == kernel]) == len(
            relpos_flash.tuning_candidates(kernel)
        )
    for r in results:
        where = f"{r['kernel']} block_m={r['block_m']} warps={r['num_warps']} stages={r['num_stages']}"
        assert (r["arch"], r["dtype"], r["head_dim"]) == (90, "bf16", 64)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert r["tensor_cores"] in {"wgmma", "mma"}, where
        assert 0 < r["registers"] <= 255 and r["programs_per_sm"] >= 1, where
    # Hopper's warpgroup products wherever a program has at least 64 queries.
    assert all(r["tensor_cores"] == "wgmma" for r in results if r["block_m"] >= 64)


def test_relpos_kernel_defaults_compile_for_vit_h_and_for_ampere(tmp_path: Path):
    """The default tiles at ViT-H's head width (80, padded to 128) fit an H100 without spills; on an A100
    (sm_80) they compile, with Ampere's mma.sync."""
    script = _script("kernel_resources")
    out = tmp_path / "resources.json"
    assert (
        script.main(["--arch", "80", "90", "--dtype", "fp16", "--head-dim", "80", "--json-out", str(out)])
        == 0
    )
    results = json.loads(out.read_text())["results"]
    assert sorted((r["arch"], r["kernel"]) for r in results) == sorted(
        (arch, kernel) for arch in (80, 90) for kernel in script.KERNELS
    )
    assert all(r["spill_stores"] == 0 for r in results if r["arch"] == 90)
    assert all(r["tensor_cores"] == "mma" for r in results if r["arch"] == 80)


def test_relpos_kernels_compile_for_sam_windows(tmp_path: Path):
    """14-key rows in 16-key tiles (SAM's windowed blocks): the masked variant builds for an H100 without
    spills, on Hopper's warpgroup products."""
    script = _script("kernel_resources")
    out = tmp_path / "resources.json"
    assert script.main(["--width", "14", "--json-out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in results] == list(script.KERNELS)
    assert all(r["spill_stores"] == 0 and r["tensor_cores"] == "wgmma" for r in results), results


def test_programs_per_sm_counts_registers_shared_memory_and_threads():
    script = _script("kernel_resources")
    # 255 registers in 4 warps: 8192 per warp, 32768 per program: two programs in 64K registers.
    assert script.programs_per_sm(90, registers=255, shared_bytes=1024, num_warps=4) == 2
    # 128 registers in 8 warps: 32768 per program (two), but 100 KB of shared memory allows only two
    # programs in 228 KB, and 160 KB only one.
    assert script.programs_per_sm(90, registers=128, shared_bytes=100 * 1024, num_warps=8) == 2
    assert script.programs_per_sm(90, registers=128, shared_bytes=160 * 1024, num_warps=8) == 1
    # More shared memory than a program may have on an A100: it does not run at all.
    assert script.programs_per_sm(80, registers=32, shared_bytes=200 * 1024, num_warps=4) == 0
    # Few registers: threads are the limit (2048 per SM, 256 per program).
    assert script.programs_per_sm(90, registers=16, shared_bytes=0, num_warps=8) == 8


def test_attention_layer_times_every_backend_and_checks_it_against_eager(tmp_path: Path):
    script = _script("attention_layer")
    out = tmp_path / "attention.json"
    args = "--device cpu --precision fp32 --batch-size 1 --heads 2 --grid 16 --warmup 0 --repeats 1"
    backends = "eager,sdpa_fold,flex,triton_relpos,sdpa_nobias"
    assert script.main([*args.split(), "--backends", backends, "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    results = {r["backend"]: r for r in report["results"]}
    assert list(results) == backends.split(",")
    # flex has no backward on the CPU: its error is reported and the other backends still ran.
    assert "no backward" in results.pop("flex")["error"]
    for backend, result in results.items():
        assert result["forward_ms"]["median"] > 0 and result["train_ms"]["median"] > 0, backend
        assert result["attention_tflops"] > 0, backend
    for backend in ("sdpa_fold", "triton_relpos"):
        errors = results[backend]["max_error"]
        assert {"out", "grad_x", "grad_rel_pos_h", "grad_rel_pos_w", "grad_qkv.weight"} <= set(errors)
        assert max(errors.values()) < 1e-5, (backend, errors)
    assert results["triton_relpos"]["kernel_ran"] is False  # off CUDA it is the sdpa_fold fallback
    assert "max_error" not in results["sdpa_nobias"]  # another function: not compared
    assert report["attention_gflops_forward"] == pytest.approx(4 * 256**2 * 64 * 2 / 1e9)


def test_attention_layer_forces_the_sdpa_kernel_it_is_told(tmp_path: Path):
    script = _script("attention_layer")
    out = tmp_path / "attention.json"
    args = "--device cpu --precision fp32 --batch-size 1 --heads 2 --grid 16 --warmup 0 --repeats 1"
    assert script.main([*args.split(), "--backends", "eager,sdpa_fold,sdpa_nobias", "--sdpa-kernel", "flash",
                        "--json-out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    results = {r["backend"]: r for r in report["results"]}
    assert report["sdpa_kernel"] == "flash"
    # Flash attention takes neither a bias nor unequal q/k and v widths: the fold cannot run on it, and
    # says so; the bias-free layer and the eager one (no SDPA at all) still run.
    assert "No available kernel" in results["sdpa_fold"]["error"]
    assert "error" not in results["sdpa_nobias"] and "error" not in results["eager"]


def _timing(ms: float) -> dict:
    return {"median": ms, "min": ms, "max": ms, "repeats": 3}


def test_suite_report_checks_the_targets_on_gpu_reports_only(tmp_path):
    report = _script("suite_report")
    h100 = {"torch": "2.x", "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}
    latency = {
        "model": "vit_b",
        "image_size": 1024,
        "environment": h100,
        "complete": False,  # cut off after these rows
        "results": [
            {"config": "stock_sam/fp32", "set_image_plus_one_box_ms": _timing(42.6)},
            {"config": "zim/eager/fp32", "set_image_plus_one_box_ms": _timing(47.5)},
            # fastest, but its alpha disagrees: it cannot count for the latency target
            {"config": "zim/a", "set_image_plus_one_box_ms": _timing(5.0), "alpha_mse_vs_plain_fp32": 3e-4},
            {"config": "zim/b", "set_image_plus_one_box_ms": _timing(7.5), "alpha_mse_vs_plain_fp32": 2e-7},
            {"config": "zim/c", "error": "OutOfMemoryError: CUDA out of memory | tried 2 GiB"},
        ],
    }
    train = {
        "model": "vit_b",
        "image_size": 1024,
        "batch_size": 8,
        "environment": h100,
        "complete": True,
        "results": [
            {"config": "stock", "images_per_s": 15.0, "peak_memory_gib": 68.0, "finite": True},
            {"config": "fast", "images_per_s": 120.0, "peak_memory_gib": 45.0, "finite": True},  # over 40 GiB
            {"config": "lean", "images_per_s": 80.0, "peak_memory_gib": 18.0, "finite": True},
            {"config": "lean+ckpt", "images_per_s": 60.0, "peak_memory_gib": 6.4, "finite": True},
            {"config": "diverged", "images_per_s": 200.0, "peak_memory_gib": 10.0, "finite": False},
        ],
    }
    smoke = dict(train, model="tiny", image_size=256, environment={"device": "cpu"})
    smoke["results"] = [{"config": "quick", "images_per_s": 500.0, "peak_memory_gib": 1.0, "finite": True}]
    for name, data in {"latency_graphs": latency, "train_eager": train, "train_compile": smoke}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    reports = report.read_reports(tmp_path)
    checks = report.check_targets(reports)
    assert checks["predictor_set_image_plus_one_box_ms"] == {
        "status": "met",
        "value": 7.5,
        "target": 8.0,
        "config": "zim/b",
        "step": "latency_graphs",
        "gpu": "NVIDIA H100 80GB HBM3",
        "failed": [
            "zim/c: OutOfMemoryError: CUDA out of memory | tried 2 GiB",
            "zim/a: alpha MSE 3.0e-04 > 0.0001",
        ],
    }
    assert checks["alpha_mse_vs_plain_fp32"]["status"] == "missed"  # zim/a's 3e-4
    # "fast" is over the memory target, "diverged" failed, the CPU smoke report does not count: "lean" is best
    assert checks["train_images_per_s"]["failed"] == [
        "diverged: the loss was not finite",
        "fast: peak 45.0 GiB > 40",
    ]
    assert (checks["train_images_per_s"]["status"], checks["train_images_per_s"]["config"]) == (
        "missed",
        "lean",
    )
    # measured, but only outside the target's conditions: a miss, not "not measured"; and stock with
    # switches is the baseline, never a candidate
    only = {**train, "results": [train["results"][1], {**train["results"][0], "config": "stock+cl+fused+compile", "images_per_s": 99.0, "peak_memory_gib": 20.0}]}  # fmt: skip
    (tmp_path / "train_eager.json").write_text(json.dumps(only))
    alone = report.check_targets(report.read_reports(tmp_path))["train_images_per_s"]
    assert (alone["status"], alone["config"], alone["value"]) == ("missed", "fast", 120.0)
    (tmp_path / "train_eager.json").write_text(json.dumps(train))
    assert checks["checkpointed_peak_gib"]["status"] == "met"
    text = report.markdown(reports)
    assert "failed: OutOfMemoryError: CUDA out of memory \\| tried 2 GiB |" in text  # the cell stays one cell
    # a fast path whose alpha is NaN misses the agreement target, wherever it comes in the report
    latency["results"].append({"config": "zim/nan", "alpha_mse_vs_plain_fp32": float("nan")})
    (tmp_path / "latency_graphs.json").write_text(json.dumps(latency))
    nan_check = report.check_targets(report.read_reports(tmp_path))["alpha_mse_vs_plain_fp32"]
    assert (nan_check["status"], nan_check["config"]) == ("missed", "zim/nan")
    assert "`latency_graphs` (cut off)" in text and "| lean+ckpt | 8 |" in text
    assert report.main([str(tmp_path / "absent")]) == 2


def test_suite_report_counts_only_configurations_whose_loss_and_alpha_agree(tmp_path):
    report = _script("suite_report")
    h100 = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}
    row = {"peak_memory_gib": 18.0, "finite": True}
    train = {
        "model": "vit_b",
        "image_size": 1024,
        "batch_size": 8,
        "environment": h100,
        "results": [
            {"config": "stock", "images_per_s": 15.0, **row, "final_loss": 0.9},  # its own model: no check
            {"config": "sdpa_fold+cl+fused", "images_per_s": 40.0, **row, "final_loss": 0.426},  # reference
            {"config": "sdpa_fold+cl+fused+compile", "images_per_s": 60.0, **row, "final_loss": 0.427},
            # fastest, but its gradients are wrong: its loss went elsewhere from the same start
            {"config": "triton_relpos+cl+fused+compile", "images_per_s": 95.0, **row, "final_loss": 0.52},
            {"config": "triton_relpos+cl+fused+ckpt", "images_per_s": 30.0, **row, "final_loss": 0.6},
        ],
    }
    latency = {
        "model": "vit_b",
        "image_size": 1024,
        "environment": h100,
        "results": [
            {"config": "zim/fast", "set_image_plus_one_box_ms": _timing(6.0), "alpha_error": "OOM"},
            {"config": "zim/ok", "set_image_plus_one_box_ms": _timing(9.0), "alpha_mse_vs_plain_fp32": 1e-6},
        ],
    }
    (tmp_path / "train_compile.json").write_text(json.dumps(train))
    (tmp_path / "latency_compile.json").write_text(json.dumps(latency))
    checks = report.check_targets(report.read_reports(tmp_path))
    train_check = checks["train_images_per_s"]
    assert (train_check["status"], train_check["config"], train_check["value"]) == (
        "missed",
        "sdpa_fold+cl+fused+compile",
        60.0,
    )
    assert train_check["failed"] == [
        "triton_relpos+cl+fused+compile: final loss 0.5200 vs 0.4260 of sdpa_fold+cl+fused (over 2% apart)"
    ]
    assert checks["checkpointed_peak_gib"]["status"] == "missed"  # only a disagreeing ckpt row was measured
    latency_check = checks["predictor_set_image_plus_one_box_ms"]
    assert (latency_check["config"], latency_check["value"]) == ("zim/ok", 9.0)
    assert latency_check["failed"] == ["zim/fast: no alpha agreement (OOM)"]
    assert checks["alpha_mse_vs_plain_fp32"]["failed"] == ["zim/fast: no alpha agreement (OOM)"]
    text = report.markdown(report.read_reports(tmp_path))
    assert "| 0.5200 | final loss 0.5200 vs 0.4260" in text and "no alpha: OOM" in text
