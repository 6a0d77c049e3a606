"""The Triton relative-position attention kernel computes SAM's attention and its gradients.

Off CUDA the kernel runs in Triton's interpreter, which is read when the kernels are decorated: those
checks run in one subprocess with ``TRITON_INTERPRET=1`` (the rest of the session keeps the plain
path), which saves its outputs; this process compares them with the eager reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zim_lightning.models import relpos_flash
from zim_lightning.models.relpos_flash import (
    kernel_available,
    key_block,
    key_block_supported,
    relpos_attention,
)
from zim_lightning.models.vit_attention import ViTAttention

# Runs every interpreted case of the cases file (argv[1]) and saves their outputs (argv[2]).
INTERPRETED_RUNNER = r"""
import sys
import torch
from zim_lightning.models import relpos_flash
from zim_lightning.models.vit_attention import ViTAttention

assert relpos_flash.INTERPRETED, "TRITON_INTERPRET=1 did not reach the subprocess"


def autotuned_op(q, k, v, rel_h, rel_w, *, scale):
    # The autotuned launch path, which on a GPU times every candidate tile. Only the timer is replaced (it
    # needs a GPU): each candidate still runs in the interpreter, and the fake timings make the last one
    # win, so the output comes from a tile other than the default. The op is called directly, as
    # relpos_attention checks for CUDA tensors when the interpreter flag is off.
    relpos_flash.INTERPRETED = False  # take the autotuned branch (the kernels stay interpreted)
    for _, tuner in relpos_flash._KERNELS.values():
        tuner.cache_results = False  # Triton's disk cache asks the GPU driver for its target
        times = iter(range(1000, 0, -1))
        tuner._do_bench = lambda call, quantiles, times=times: (call(), [float(next(times))] * 3)[1]

    def op(q, k, v, rel_h, rel_w):
        out, _ = torch.ops.zim_lightning.relpos_flash_fwd(q, k, v, rel_h.transpose(-1, -2), rel_w, scale, 0, 0)
        return out

    # Tuning runs every candidate into the same outputs, which would hide a chosen launch that skips some
    # rows. So tune on other inputs of the same shape first; the call returned runs the choice alone.
    warm = [torch.randn_like(t).requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    op(*warm).sum().backward()
    return op(q, k, v, rel_h, rel_w)


results = {}
for name, case in torch.load(sys.argv[1], weights_only=True).items():
    if case["kind"] == "module":
        attn = ViTAttention(**case["config"], backend="triton_relpos")
        attn.load_state_dict(case["state"])
        out = attn(case["x"])
        out.backward(case["grad_out"])
        results[name] = {"out": out.detach(), **{n: p.grad for n, p in attn.named_parameters()}}
        continue
    inputs = [t.clone().requires_grad_() for t in case["inputs"]]

    def run(*args, case=case):
        return relpos_flash.relpos_attention(*args, scale=case["scale"], block_m=case["block_m"])

    if case["kind"] == "compiled":
        run = torch.compile(run, fullgraph=True, backend="aot_eager")
    if case["kind"] == "autotuned":
        run = lambda *args, case=case: autotuned_op(*args, scale=case["scale"])
    out = run(*inputs)
    out.backward(case["grad_out"].to(out.dtype))
    results[name] = {"out": out.detach(), **{n: t.grad for n, t in zip("q k v rel_h rel_w".split(), inputs, strict=True)}}
    if case["kind"] == "autotuned":
        relpos_flash.INTERPRETED = True
        chosen = [c["block_m"] for c in relpos_flash.autotuned_choices()]  # one key per kernel
        results[name]["chosen_block_m"] = torch.tensor(chosen)
torch.save(results, sys.argv[2])
"""


def reference_attention(q, k, v, rel_h, rel_w, scale):
    """SAM's attention with the decomposed bias, dense: logits Bxheads x L x L, bias broadcast from rel_h/rel_w."""
    batch, heads, length, _ = q.shape
    bias = (rel_h[..., :, :, None] + rel_w[..., :, None, :]).reshape(batch, heads, length, length)
    return torch.softmax(scale * q @ k.transpose(-1, -2) + bias, dim=-1) @ v


def kernel_case(*, batch, heads, rows, width, head_dim, block_m, seed, dtype=torch.float32, kind="kernel"):
    """Random inputs large enough that the softmax is far from flat (logit spread of a few units)."""
    gen = torch.Generator().manual_seed(seed)
    length = rows * width
    q, k, v = (1.5 * torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    rel_h = 2.0 * torch.randn(batch, heads, length, rows, generator=gen)
    rel_w = 2.0 * torch.randn(batch, heads, length, width, generator=gen)
    return {
        "kind": kind,
        "inputs": [t.to(dtype) for t in (q, k, v, rel_h, rel_w)],
        "grad_out": torch.randn(batch, heads, length, head_dim, generator=gen),
        "scale": head_dim**-0.5,
        "block_m": block_m,
    }


GLOBAL_BLOCK = {"dim": 128, "num_heads": 2, "use_rel_pos": True, "input_size": (16, 16)}  # d = 64


#: A windowed block of SAM: 14x14 tokens per window (a batch of windows), W = 14 in 16-key tiles.
WINDOW_BLOCK = {"dim": 128, "num_heads": 2, "use_rel_pos": True, "input_size": (14, 14)}


def module_case(seed: int, config: dict = GLOBAL_BLOCK) -> dict:
    torch.manual_seed(seed)
    attn = ViTAttention(**config, backend="eager")
    with torch.no_grad():  # SAM zero-initialises the tables: make the bias count
        attn.rel_pos_h.normal_(0.0, 0.5)
        attn.rel_pos_w.normal_(0.0, 0.5)
    x = torch.randn(2, *config["input_size"], config["dim"])
    return {
        "kind": "module",
        "config": config,
        "state": attn.state_dict(),
        "x": x,
        "grad_out": torch.randn_like(x),
    }


CASES = {
    # B*heads = 4, full query blocks.
    "d64": kernel_case(batch=2, heads=2, rows=16, width=16, head_dim=64, block_m=32, seed=0),
    # Head width padded 80 -> 128; L = 5 * 16 = 80 leaves a partial last query block of 32.
    "d80_partial_block": kernel_case(batch=1, heads=2, rows=5, width=16, head_dim=80, block_m=32, seed=1),
    # Half precision (bf16 is not testable here: the interpreter's tl.dot multiplies bf16 bit patterns).
    "fp16": kernel_case(
        batch=1, heads=2, rows=16, width=16, head_dim=64, block_m=16, seed=2, dtype=torch.float16
    ),
    # Inside torch.compile with fullgraph=True: the custom op must not break the graph.
    "compiled": kernel_case(
        batch=1, heads=2, rows=16, width=16, head_dim=64, block_m=32, seed=3, kind="compiled"
    ),
    "module": module_case(seed=4),
    # Rows narrower than the key tile (14 of 16 keys, and 24 of 32): the padding keys must take no
    # probability. L = 196 leaves a partial last query block of 4.
    "w14": kernel_case(batch=1, heads=2, rows=14, width=14, head_dim=64, block_m=32, seed=9),
    "w24": kernel_case(batch=1, heads=2, rows=3, width=24, head_dim=64, block_m=16, seed=10),
    "window_module": module_case(seed=11, config=WINDOW_BLOCK),
    # The autotuned path (last: it patches the tuners' timers). L = 96: partial blocks for 64 and 128.
    "autotuned": kernel_case(
        batch=1, heads=2, rows=6, width=16, head_dim=64, block_m=None, seed=7, kind="autotuned"
    ),
}
KERNEL_CASES = ["d64", "d80_partial_block", "compiled", "autotuned", "w14", "w24"]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """Outputs and gradients of every case, computed by the kernel in Triton's interpreter."""
    root = tmp_path_factory.mktemp("relpos_flash")
    cases, results = root / "cases.pt", root / "results.pt"
    torch.save(CASES, cases)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETED_RUNNER, str(cases), str(results)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(results, weights_only=True)


def reference_grads(case: dict) -> dict[str, torch.Tensor]:
    inputs = [t.double().requires_grad_() for t in case["inputs"]]
    out = reference_attention(*inputs, case["scale"])
    out.backward(case["grad_out"].double())
    return {
        "out": out.detach(),
        **{n: t.grad for n, t in zip("q k v rel_h rel_w".split(), inputs, strict=True)},
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_CASES)
def test_interpreted_kernel_matches_reference_output_and_all_gradients(interpreted, name):
    case = CASES[name]
    q, k, _, rel_h, rel_w = case["inputs"]
    # The inputs make a peaked softmax (uniform would be 1/L), so a wrong bias or scale shows.
    length = q.shape[-2]
    probs = torch.softmax(
        case["scale"] * q @ k.transpose(-1, -2) + (rel_h[..., None] + rel_w[..., None, :]).flatten(-2), -1
    )
    assert probs.amax(-1).mean() > 20 / length
    expected = reference_grads(case)
    got = dict(interpreted[name])
    if name == "autotuned":  # the fake timings favour each kernel's last candidate: it ran and was kept
        last = [relpos_flash.tuning_candidates(k)[-1].block_m for k in ("fwd", "bwd_dq", "bwd_dkv")]
        assert got.pop("chosen_block_m").tolist() == last
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].double(), value, atol=1e-4, rtol=1e-4, msg=f"{name}: {key}")


@pytest.mark.slow
def test_interpreted_kernel_in_half_precision_is_close_to_float64(interpreted):
    case = CASES["fp16"]
    expected = reference_grads({**case, "inputs": [t.double() for t in case["inputs"]]})
    got = interpreted["fp16"]
    for key, value in expected.items():
        assert got[key].dtype == torch.float16
        error = (got[key].double() - value).abs().max() / value.abs().max()
        assert error < 1e-2, f"fp16 {key}: relative error {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["module", "window_module"])
def test_interpreted_global_and_windowed_blocks_equal_segment_anything_eager(interpreted, name):
    case = CASES[name]
    eager = ViTAttention(**case["config"], backend="eager")
    eager.load_state_dict(case["state"])
    out = eager(case["x"])
    out.backward(case["grad_out"])
    got = interpreted[name]
    torch.testing.assert_close(got["out"], out.detach(), atol=1e-5, rtol=1e-4)
    for name, p in eager.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
    assert got["rel_pos_h"].abs().sum() > 0 and got["rel_pos_w"].abs().sum() > 0


@pytest.mark.skipif(relpos_flash.INTERPRETED, reason="the fallback is the path without the interpreter")
def test_off_cuda_the_backend_is_the_sdpa_fold_path_and_says_so():
    assert not kernel_available(torch.device("cpu"), 16)
    assert "sdpa_fold" in ViTAttention._triton_relpos.__doc__
    torch.manual_seed(5)
    modules = {b: ViTAttention(**GLOBAL_BLOCK, backend=b) for b in ("triton_relpos", "sdpa_fold", "eager")}
    with torch.no_grad():
        modules["eager"].rel_pos_h.normal_(0.0, 0.5)
    for m in modules.values():
        m.load_state_dict(modules["eager"].state_dict())
    x = torch.randn(1, 16, 16, GLOBAL_BLOCK["dim"])
    results = {}
    for backend, m in modules.items():
        out = m(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), m.rel_pos_h.grad)
    for got, want in zip(results["triton_relpos"], results["sdpa_fold"], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for got, want in zip(results["triton_relpos"], results["eager"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(relpos_flash.triton is None, reason="needs Triton's error types")
def test_a_kernel_that_does_not_fit_the_gpu_says_so_and_the_module_takes_the_fold(monkeypatch, caplog):
    # A GPU with less shared memory than an H100 (an RTX card with float32 ViT-H, say) refuses the launch.
    # That cannot happen on this CPU, so the launch and the GPU are stood in for, and nothing else is.
    from triton.runtime.errors import OutOfResources

    class RefusingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(232448, 101376, "shared memory")

            return launch

    monkeypatch.setitem(relpos_flash._KERNELS, "fwd", (RefusingKernel(), RefusingKernel()))
    with pytest.raises(relpos_flash.KernelResourcesError, match="fwd kernel does not fit.*sdpa_fold"):
        relpos_flash._launch("fwd", None, (), block_m=0, head_dim=80, dtype=torch.float32, width=64)

    calls = []

    def refusing_attention(*args, **kwargs):
        calls.append(1)
        raise relpos_flash.KernelResourcesError("relpos_flash: the fwd kernel does not fit this GPU")

    monkeypatch.setattr(relpos_flash, "INTERPRETED", True)  # kernel_available: True on this CPU
    monkeypatch.setattr(relpos_flash, "relpos_attention", refusing_attention)
    monkeypatch.setattr(relpos_flash, "_UNFIT", set())
    torch.manual_seed(6)
    fold = ViTAttention(**GLOBAL_BLOCK, backend="sdpa_fold")
    fused = ViTAttention(**GLOBAL_BLOCK, backend="triton_relpos")
    fused.load_state_dict(fold.state_dict())
    x = torch.randn(1, 16, 16, GLOBAL_BLOCK["dim"])
    with torch.no_grad(), caplog.at_level("WARNING"):
        torch.testing.assert_close(fused(x), fold(x), atol=0, rtol=0)
        torch.testing.assert_close(fused(x), fold(x), atol=0, rtol=0)
    assert len(calls) == 1  # remembered: the second call goes straight to the fold
    assert "does not fit" in caplog.text and "sdpa_fold path" in caplog.text


def test_kernel_is_not_offered_for_float64_or_more_sequences_than_a_launch_takes(monkeypatch):
    monkeypatch.setattr(relpos_flash, "INTERPRETED", True)
    available = relpos_flash.triton is not None
    assert kernel_available(torch.device("cpu"), 16, dtype=torch.bfloat16) == available
    assert not kernel_available(torch.device("cpu"), 16, dtype=torch.float64)
    assert not kernel_available(torch.device("cpu"), 16, sequences=relpos_flash.MAX_SEQUENCES + 1)


def test_kernel_takes_grid_widths_8_to_128_in_power_of_two_tiles():
    widths = (4, 7, 8, 14, 16, 24, 32, 64, 128, 129, 256)
    assert [w for w in widths if key_block_supported(w)] == [8, 14, 16, 24, 32, 64, 128]
    assert [key_block(w) for w in (8, 14, 16, 24, 64, 100, 128)] == [16, 16, 16, 32, 64, 128, 128]
    # SAM's windowed blocks (14x14) run the kernel on CUDA too; W = 256 (a 4096-pixel grid) does not.
    assert kernel_available(torch.device("cuda"), 14) == (relpos_flash.triton is not None)
    assert not kernel_available(torch.device("cuda"), 256)


def test_bad_inputs_raise_clear_errors():
    q = torch.zeros(1, 2, 256, 64)
    with pytest.raises(ValueError, match=r"rel_h, rel_w: expected L = H \* W .* L=256 .* H=8 .* W=16"):
        relpos_attention(q, q, q, torch.zeros(1, 2, 256, 8), torch.zeros(1, 2, 256, 16), scale=0.125)
    with pytest.raises(ValueError, match=r"rel_w: the grid width W must be in \[8, 128\] .* got W=4"):
        relpos_attention(
            q[..., :16, :], q[..., :16, :], q[..., :16, :],
            torch.zeros(1, 2, 16, 4), torch.zeros(1, 2, 16, 4), scale=0.125,
        )  # fmt: skip
    with pytest.raises(ValueError, match="k: expected the shape of q"):
        relpos_attention(q, q[:, :1], q, torch.zeros(1, 2, 256, 16), torch.zeros(1, 2, 256, 16), scale=0.125)
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 16"):
        rel = torch.zeros(1, 2, 256, 16)
        relpos_attention(q, q, q, rel, rel, scale=0.125, block_m=24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("grid", "batch", "head_dim", "dtype", "autotune"),
    [
        (
            64,
            2,
            64,
            torch.bfloat16,
            True,
        ),  # the training and predictor path: autotuned (or its cached choice)
        (64, 2, 64, torch.bfloat16, False),
        (64, 2, 64, torch.float32, False),
        (64, 2, 80, torch.bfloat16, False),  # ViT-H's head width
        (14, 50, 64, torch.bfloat16, True),  # the windowed blocks: 2 images x 25 windows of 14x14
    ],
)
def test_cuda_kernel_matches_reference_at_vit_b_size(grid, batch, head_dim, dtype, autotune, monkeypatch):
    monkeypatch.setattr(relpos_flash, "AUTOTUNE", autotune)
    case = kernel_case(
        batch=batch, heads=4, rows=grid, width=grid, head_dim=head_dim, block_m=None, seed=6, dtype=dtype
    )
    case["inputs"] = [t.cuda() for t in case["inputs"]]
    inputs = [t.clone().requires_grad_() for t in case["inputs"]]
    tuned_before = len(relpos_flash.autotuned_choices())
    out = relpos_attention(*inputs, scale=case["scale"])
    out.backward(case["grad_out"].cuda().to(dtype))
    # Autotuned: each of the three kernels chose for this new problem size (by timing, or from Triton's
    # disk cache); fixed tiles: no choice was made.
    assert len(relpos_flash.autotuned_choices()) == tuned_before + (3 if autotune else 0)
    got = {
        "out": out.detach(),
        **{n: t.grad for n, t in zip("q k v rel_h rel_w".split(), inputs, strict=True)},
    }
    expected = reference_grads({**case, "grad_out": case["grad_out"].cuda()})
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for key, value in expected.items():
        error = (got[key].double() - value).abs().max() / value.abs().max()
        assert error < tolerance, f"{key}: relative error {error:.2e}"
