"""The GPU benchmark scripts (benchmarks/) and their profiler helper, run on the CPU with the tiny model, so
they cannot rot between the sessions that have a GPU to run them on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from zim_lightning import speed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_profile_top_ops_ranks_the_dominant_operator_first():
    a = torch.randn(384, 384)

    def step() -> torch.Tensor:
        return (a @ a @ a).relu() + 1.0

    top = speed.profile_top_ops(step, device="cpu", steps=3, top=5)
    assert top[0]["name"] in {"aten::mm", "aten::matmul"}
    mm = next(e for e in top if e["name"] == "aten::mm")
    assert mm["calls_per_step"] == pytest.approx(2.0)  # two products per step
    assert all(0.0 <= e["share"] <= 1.0 for e in top)
    assert [e["ms_per_step"] for e in top] == sorted((e["ms_per_step"] for e in top), reverse=True)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        speed.profile_top_ops(step, device="cpu", steps=0)


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


def test_predictor_latency_reports_every_call_and_the_alpha_agreement(tmp_path: Path):
    script = _script("predictor_latency")
    out = tmp_path / "latency.json"
    args = "--model tiny --image-size 128 --device cpu --precision fp32 --compile none --warmup 0 --repeats 1"
    assert script.main([*args.split(), "--attention", "sdpa_fold", "--json-out", str(out)]) == 0
    results = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"stock_sam/fp32", "zim/eager/fp32", "zim/sdpa_fold/fp32/channels_last"}
    for result in results.values():
        assert "error" not in result, result.get("error")
        for call in ("set_image", "one_box", "set_image_plus_one_box", "boxes16"):
            assert result[f"{call}_ms"]["median"] > 0
    assert results["zim/sdpa_fold/fp32/channels_last"]["alpha_mse_vs_plain_fp32"] < 1e-10
