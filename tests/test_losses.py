"""The matting loss against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from zim_lightning.losses import ConverterLoss, MattingLoss, gradient_loss, l1_loss


def _m(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_l1_and_gradient_by_hand():
    pred = _m([[0.0, 1.0], [0.0, 0.0]])
    target = _m([[0.0, 0.0], [0.0, 0.5]])
    # |diff| = [[0, 1], [0, 0.5]] -> mean 1.5 / 4
    assert l1_loss(pred, target).item() == pytest.approx(0.375)
    # diff = [[0, 1], [0, -0.5]]; dx = [1, -0.5] -> mean 0.75; dy = [0, -1.5] -> mean 0.75
    assert gradient_loss(pred, target).item() == pytest.approx(1.5)
    terms = MattingLoss()(pred, target)
    assert terms["loss"].item() == pytest.approx(0.375 + 10 * 1.5)
    assert MattingLoss(grad_weight=0.0)(pred, target)["loss"].item() == pytest.approx(0.375)


def test_valid_weight_ignores_padding():
    pred = _m([[0.2, 0.9], [0.2, 0.9]])
    target = _m([[0.0, 0.0], [0.0, 0.0]])
    valid = _m([[1.0, 0.0], [1.0, 0.0]])  # right column is padding
    # only the left column counts: |0.2| twice -> 0.2; no horizontal pair is valid; dy of diff is 0
    assert l1_loss(pred, target, valid).item() == pytest.approx(0.2)
    assert gradient_loss(pred, target, valid).item() == pytest.approx(0.0)
    # the padding's error would count without the weight
    assert l1_loss(pred, target).item() == pytest.approx(0.55)


def test_identical_mattes_give_zero_and_shapes_are_checked():
    a = torch.rand(2, 1, 8, 8)
    assert MattingLoss()(a, a)["loss"].item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        l1_loss(a, a[:, :, :4])


def test_a_one_pixel_wide_matte_has_a_finite_gradient_loss():
    # no horizontal pixel pairs: that term is 0 (not the NaN of an empty mean), with or without weights
    pred = torch.tensor([0.0, 1.0, 1.0, 0.5]).reshape(1, 1, 4, 1)
    target = torch.zeros(1, 1, 4, 1)
    # dy of diff = [1, 0, -0.5] -> mean 0.5
    assert gradient_loss(pred, target).item() == pytest.approx(0.5)
    assert gradient_loss(pred, target, torch.ones_like(pred)).item() == pytest.approx(0.5)
    assert gradient_loss(pred.mT, target.mT, per_sample=True).tolist() == pytest.approx([0.5])


def test_converter_loss_weights_outputs():
    target = torch.zeros(1, 1, 4, 4)
    outs = {
        "alpha_os1": torch.full((1, 1, 4, 4), 0.1),
        "alpha_os4": torch.full((1, 1, 4, 4), 0.4),
        "alpha_os8": torch.full((1, 1, 4, 4), 0.8),
    }
    terms = ConverterLoss()(outs, target)
    # constant errors: no gradient term; weights 2, 1, 1 over 4
    assert terms["loss"].item() == pytest.approx((2 * 0.1 + 0.4 + 0.8) / 4)
    with pytest.raises(KeyError, match="alpha_os8"):
        ConverterLoss()({"alpha_os1": target, "alpha_os4": target}, target)


def test_band_weighted_converter_loss_counts_the_refined_outputs_in_their_bands_only():
    target = torch.zeros(1, 1, 4, 4)
    os4 = torch.full((1, 1, 4, 4), 0.4)
    os4[..., :, 2:] = 0.9  # wrong outside its band: must not count
    band_os4 = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    band_os4[..., :, :2] = True
    outs = {
        "alpha_os1": torch.full((1, 1, 4, 4), 0.1),
        "alpha_os4": os4,
        "alpha_os8": torch.full((1, 1, 4, 4), 0.8),
        "band_os4": band_os4,
        "band_os1": torch.zeros(1, 1, 4, 4, dtype=torch.bool),  # empty (an STL sample): adds nothing
    }
    terms = ConverterLoss(band_weighted=True, grad_weight=0.0)(outs, target)
    assert terms["loss"].item() == pytest.approx((2 * 0.0 + 0.4 + 0.8) / 4)
    everywhere = ConverterLoss(grad_weight=0.0)(outs, target)["loss"].item()
    assert everywhere == pytest.approx((2 * 0.1 + (0.4 + 0.9) / 2 + 0.8) / 4)
    del outs["band_os1"]
    with pytest.raises(KeyError, match="band_os1"):
        ConverterLoss(band_weighted=True)(outs, target)


def test_bce_term_is_cross_entropy_on_the_logits_and_keeps_a_gradient_when_saturated():
    target = _m([[1.0, 0.0], [0.0, 0.0]])
    valid = _m([[1.0, 1.0], [1.0, 0.0]])  # the last pixel is padding
    logits = _m([[-30.0, -30.0], [-30.0, 5.0]]).requires_grad_(True)  # an empty matte, saturated
    paper = MattingLoss()(torch.sigmoid(logits), target, valid)["loss"]
    (paper_grad,) = torch.autograd.grad(paper, logits)
    assert paper_grad.abs().max().item() < 1e-10  # sigmoid'(-30): the paper loss alone is stuck here

    loss = MattingLoss(bce_weight=2.0)(torch.sigmoid(logits), target, valid, logits=logits)["loss"]
    # BCE with logits over the 3 valid pixels: softplus(30) for the object pixel, softplus(-30) twice
    bce = (
        torch.nn.functional.softplus(torch.tensor(30.0))
        + 2 * torch.nn.functional.softplus(torch.tensor(-30.0))
    ) / 3
    assert loss.item() == pytest.approx(paper.item() + 2.0 * bce.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 0, 0, 0].item() == pytest.approx(-2.0 / 3, rel=1e-4)  # (p - y) / 3 pixels * weight
    assert grad[0, 0, 1, 1].item() == 0.0  # padding

    with pytest.raises(ValueError, match="needs the logits"):
        MattingLoss(bce_weight=1.0)(torch.sigmoid(logits), target)
    with pytest.raises(ValueError, match="bce_weight must be >= 0"):
        MattingLoss(bce_weight=-1.0)


def test_the_gradient_loss_drops_differences_that_touch_an_invalid_pixel_on_either_side():
    # zero weight on the left column (then the top row): a difference counts only where both of its
    # pixels are valid, whichever side the invalid one is on (the converter's bands are any shape)
    target = torch.zeros(1, 1, 2, 2)
    pred = torch.tensor([[0.9, 0.2], [0.9, 0.2]]).view(1, 1, 2, 2)
    valid = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    assert l1_loss(pred, target, valid).item() == pytest.approx(0.2)
    assert gradient_loss(pred, target, valid).item() == 0.0
    assert gradient_loss(pred.mT, target, valid.mT).item() == 0.0


def test_fractional_weights_give_the_weighted_mean():
    # sum(valid * |pred - target|) / sum(valid), also when the weights sum to less than 1
    pred, target = torch.full((1, 1, 1, 2), 0.5), torch.zeros(1, 1, 1, 2)
    valid = torch.tensor([0.25, 0.25]).view(1, 1, 1, 2)
    assert l1_loss(pred, target, valid).item() == pytest.approx(0.5)
    assert l1_loss(pred, target, torch.zeros_like(valid)).item() == 0.0  # nothing valid: 0, not NaN
