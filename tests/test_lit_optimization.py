"""The warm-up cosine schedule and the optimiser factory."""

from __future__ import annotations

import functools

import pytest
import torch

from zim_lightning.lit.optimization import WarmupCosineLR, configure_optimization, parameter_groups
from zim_lightning.models.build import zim_model_registry


def _lrs(scheduler: WarmupCosineLR, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_to_the_floor():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=10, warmup_steps=4, warmup_start_ratio=0.0, min_lr_ratio=0.1)
    lrs = _lrs(sched, 12)
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # halfway through the cosine (step 7 of 4..10) the factor is the mean of 1 and the floor
    assert lrs[7] == pytest.approx(0.55)
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_a_warmup_as_long_as_the_run_is_cut_to_a_tenth_with_a_warning(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level("WARNING", logger="zim_lightning"):
        sched = WarmupCosineLR(opt, total_steps=20, warmup_steps=20, warmup_start_ratio=0.0)
    assert sched.warmup_steps == 2 and "warming up for 2 steps instead" in caplog.text
    lrs = _lrs(sched, 20)
    assert lrs[2] == pytest.approx(1.0) and lrs[19] < 0.05  # a peak, then the cosine down to the floor


def test_a_warmup_cut_by_the_trainers_run_length_starts_at_the_cut_schedules_rate():
    # the length comes after construction (from the trainer); the first step must run at the rate of
    # the schedule as cut (no warm-up left: the peak), not at the warm-up's start rate
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=10, warmup_start_ratio=0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    sched.set_total_steps(5)
    assert sched.warmup_steps == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0) and sched.get_last_lr() == pytest.approx([1.0])


def test_bad_schedule_arguments_are_named():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(opt, total_steps=-1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupCosineLR(opt, total_steps=5, min_lr_ratio=2.0)


def test_frozen_parameters_are_left_out_and_the_scheduler_steps_per_iteration():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)
    config = configure_optimization(
        net.parameters(),
        functools.partial(torch.optim.AdamW, lr=1e-3),
        functools.partial(WarmupCosineLR, total_steps=100),
    )
    params = [p for group in config["optimizer"].param_groups for p in group["params"]]
    assert len(params) == 2 and all(p.requires_grad for p in params)
    assert config["lr_scheduler"]["interval"] == "step"
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        configure_optimization(net.parameters(), torch.optim.AdamW, None)


def test_the_run_length_comes_from_the_trainer_when_the_config_leaves_it_out():
    net = torch.nn.Linear(2, 2)
    config = configure_optimization(
        net.parameters(), functools.partial(torch.optim.SGD, lr=1.0), WarmupCosineLR, total_steps=8
    )
    scheduler = config["lr_scheduler"]["scheduler"]
    assert scheduler.total_steps == 8
    assert _lrs(scheduler, 9)[4] == pytest.approx(0.5) and scheduler.get_last_lr()[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="max_steps"):
        configure_optimization(net.parameters(), torch.optim.SGD, WarmupCosineLR, total_steps=float("inf"))


def test_no_weight_decay_on_biases_norms_positions_tables_and_embeddings():
    net = zim_model_registry["tiny"]()
    net.image_encoder.requires_grad_(False)  # frozen parameters leave their group, empty groups vanish
    config = configure_optimization(
        parameter_groups(net), functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05), None
    )
    names = {id(p): n for n, p in net.named_parameters()}
    groups = {
        g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in config["optimizer"].param_groups
    }
    decayed, kept = groups[0.05], groups[0.0]
    assert "mask_decoder.transformer.layers.0.self_attn.q_proj.weight" in decayed
    for name in (
        "mask_decoder.transformer.layers.0.self_attn.q_proj.bias",
        "mask_decoder.transformer.norm_final_attn.weight",
        "mask_decoder.iou_token.weight",
        "mask_decoder.mask_tokens.weight",
        "prompt_encoder.not_a_point_embed.weight",
        "prompt_encoder.point_embeddings.2.weight",
    ):
        assert name in kept, name
    assert not any(n.startswith("image_encoder.") for n in decayed | kept)
    encoder = {n: p for n, p in net.named_parameters() if n.startswith("image_encoder.")}
    exempt = {names[id(p)] for p in parameter_groups(net)[1]["params"]}
    assert {n for n in encoder if "pos_embed" in n or "rel_pos" in n} <= exempt
    # one group, everything decayed: the layout of optimiser states saved before the switch
    single = parameter_groups(net, exempt=False)
    assert len(single) == 1 and len(single[0]["params"]) == len(list(net.parameters()))


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_every_bad_schedule_argument_is_refused():
    # what a break looks like: (negative warm-up accepted), (warmup_start_ratio unchecked), (a run of 0 steps accepted)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineLR(_sgd(), total_steps=5, warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_start_ratio"):
        WarmupCosineLR(_sgd(), total_steps=5, warmup_start_ratio=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(_sgd(), total_steps=0)


def test_stepping_before_the_run_length_is_known_is_an_error():
    # the schedule has no shape yet; a silent constant rate would hide a missing set_total_steps
    sched = WarmupCosineLR(_sgd())
    sched.optimizer.step()
    with pytest.raises(RuntimeError, match="set_total_steps"):
        sched.step()


def test_a_resumed_schedule_takes_the_restored_steps_rate_of_the_new_length():
    # what a break looks like: (rate of step 0 applied), (the saved length kept), (the old rate kept): extending a
    # run from 4 to 8 steps resumes at step 2 of the 8-step cosine
    first = WarmupCosineLR(_sgd(), total_steps=4)
    for _ in range(2):
        first.optimizer.step()
        first.step()
    state = first.state_dict()
    opt = _sgd()
    opt.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # as the optimiser state restores it
    opt.param_groups[0]["initial_lr"] = 1.0
    second = WarmupCosineLR(opt, total_steps=8, last_epoch=-1)
    second.load_state_dict(state)
    assert second.total_steps == 8 and second.last_epoch == 2
    expected = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 8))).item()
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert second.get_last_lr() == pytest.approx([expected])


def test_the_trainers_run_length_does_not_override_a_configured_one_and_empty_groups_go():
    # what a break looks like: (trainer's total_steps wins over the config's), (frequency), (empty groups kept)
    net = torch.nn.Linear(2, 2)
    config = configure_optimization(
        net.parameters(),
        functools.partial(torch.optim.SGD, lr=1.0),
        functools.partial(WarmupCosineLR, total_steps=10),
        total_steps=1000,
    )
    assert config["lr_scheduler"]["scheduler"].total_steps == 10
    assert config["lr_scheduler"]["frequency"] == 1
    net.weight.requires_grad_(False)  # leaves the decayed group empty
    config = configure_optimization(parameter_groups(net), functools.partial(torch.optim.AdamW, lr=1.0), None)
    assert [g["name"] for g in config["optimizer"].param_groups] == ["no_decay"]
