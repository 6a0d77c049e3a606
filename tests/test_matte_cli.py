"""Tests of `zim-lightning matte` (matte_cli.py) with the tiny model and random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zim_lightning.matte_cli import main
from zim_lightning.models.build import zim_model_registry
from zim_lightning.predictor import ZimPredictor

HEIGHT, WIDTH = 240, 320


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A synthetic photo: a shaded background with a bright disc (the object), as a JPEG-free PNG."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, np.full_like(xx, 80)], axis=-1)
    disc = (xx - 180) ** 2 + (yy - 110) ** 2 < 60**2
    image[disc] = (240, 200, 60)
    image = image.astype(np.uint8)
    path = tmp_path_factory.mktemp("photo") / "disc.png"
    Image.fromarray(image).save(path)
    return path, image


def _check_outputs(out: Path, image: np.ndarray) -> np.ndarray:
    alpha = np.asarray(Image.open(out / "disc_alpha.png"))
    cutout_image = Image.open(out / "disc_cutout.png")
    assert cutout_image.mode == "RGBA"
    cutout = np.asarray(cutout_image)
    assert alpha.dtype == np.uint8 and alpha.shape == (HEIGHT, WIDTH)
    assert cutout.shape == (HEIGHT, WIDTH, 4)
    np.testing.assert_array_equal(cutout[..., 3], alpha)
    np.testing.assert_array_equal(cutout[..., :3], image)
    return alpha


def _predicted(image: np.ndarray, **prompt: np.ndarray) -> np.ndarray:
    """The 8-bit alpha ZimPredictor gives the command's network (tiny, seed 0) for a prompt."""
    torch.manual_seed(0)
    predictor = ZimPredictor(zim_model_registry["tiny"]().eval())
    predictor.set_image(image)
    masks, _, _ = predictor.predict(**prompt, multimask_output=False)
    return np.round(np.clip(masks[0], 0, 1) * 255).astype(np.uint8)


def test_box_prompt_writes_alpha_and_cutout(photo, tmp_path) -> None:
    path, image = photo
    torch.manual_seed(0)
    argv = [str(path), "--box", "120,50,240,170", "--model", "tiny", "--out", str(tmp_path / "box")]
    assert main(argv) == 0
    alpha = _check_outputs(tmp_path / "box", image)
    # the predictor's matte for the box in the original image's (X, Y) pixels (not swapped, not resized)
    np.testing.assert_array_equal(alpha, _predicted(image, box=np.array([120, 50, 240, 170])))


def test_an_input_with_transparency_keeps_it_in_the_cutout(photo, tmp_path) -> None:
    # the cut-out's opacity is the matte's times the input's: what the input hid stays hidden
    path, image = photo
    hidden = np.zeros((HEIGHT, WIDTH), np.uint8)
    hidden[:, WIDTH // 2 :] = (np.arange(HEIGHT * (WIDTH - WIDTH // 2)) % 256).reshape(
        HEIGHT, -1
    )  # every level
    rgba = tmp_path / "disc.png"
    Image.fromarray(np.dstack([image, hidden])).save(rgba)
    torch.manual_seed(0)
    assert (
        main([str(rgba), "--box", "120,50,240,170", "--model", "tiny", "--out", str(tmp_path / "out")]) == 0
    )
    alpha = np.asarray(Image.open(tmp_path / "out" / "disc_alpha.png"))
    cutout = np.asarray(Image.open(tmp_path / "out" / "disc_cutout.png"))
    np.testing.assert_array_equal(alpha, _predicted(image, box=np.array([120, 50, 240, 170])))  # the matte
    assert alpha[:, : WIDTH // 2].any()  # the matte reaches the hidden half...
    assert not cutout[:, : WIDTH // 2, 3].any()  # ...which the cut-out keeps hidden
    # and elsewhere the opacity is the product, rounded, at every level of the input's alpha
    seen = alpha[:, WIDTH // 2 :].astype(np.float64) * hidden[:, WIDTH // 2 :] / 255
    assert len(np.unique(alpha[:, WIDTH // 2 :])) > 10  # a matte of many levels, so rounding shows
    np.testing.assert_array_equal(cutout[:, WIDTH // 2 :, 3], np.round(seen).astype(np.uint8))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_colour_key_hides_its_pixels_in_the_cutout(photo, tmp_path, mode: str) -> None:
    # PNG's tRNS colour key (one grey level or RGB colour is transparent), not only a palette's
    _, image = photo
    keyed = image.copy()
    keyed[:40, :60] = 7  # the keyed colour, and only there
    picture = Image.fromarray(keyed).convert(mode) if mode == "L" else Image.fromarray(keyed)
    path = tmp_path / "disc.png"
    picture.save(path, transparency=7 if mode == "L" else (7, 7, 7))
    torch.manual_seed(0)
    assert main([str(path), "--box", "0,0,320,240", "--model", "tiny", "--out", str(tmp_path / "out")]) == 0
    cutout = np.asarray(Image.open(tmp_path / "out" / "disc_cutout.png"))
    hidden = np.asarray(picture.convert("RGB")).sum(axis=2) == 3 * 7
    assert hidden[:40, :60].all() and not cutout[hidden, 3].any()


def test_an_output_name_taken_by_a_folder_is_refused_before_anything_is_written(
    photo, tmp_path, capsys
) -> None:
    path, _ = photo
    (tmp_path / "disc_cutout.png").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--box", "120,50,240,170", "--model", "tiny", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "disc_cutout.png" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disc_cutout.png"]  # no matte without its cut-out


def test_a_box_of_the_whole_image_is_accepted(photo, tmp_path) -> None:
    # corners are pixel-edge coordinates: x2 = width and y2 = height close a box at the far edges
    path, image = photo
    torch.manual_seed(0)
    assert main([str(path), "--box", f"0,0,{WIDTH},{HEIGHT}", "--model", "tiny", "--out", str(tmp_path)]) == 0
    np.testing.assert_array_equal(
        _check_outputs(tmp_path, image), _predicted(image, box=np.array([0, 0, WIDTH, HEIGHT]))
    )


def test_bf16_precision_writes_the_fp32_matte_within_rounding(photo, tmp_path) -> None:
    path, image = photo
    alphas = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same random network both times
        out = tmp_path / precision
        argv = [str(path), "--box", "120,50,240,170", "--model", "tiny", "--out", str(out)]
        assert main([*argv, "--precision", precision]) == 0
        alphas.append(_check_outputs(out, image).astype(np.int16))
    assert (alphas[0] != alphas[1]).any()  # bf16 really ran
    assert np.abs(alphas[0] - alphas[1]).max() <= 3  # 8-bit alpha levels


def test_point_prompts_with_labels(photo, tmp_path) -> None:
    path, image = photo
    torch.manual_seed(0)
    argv = [
        str(path),
        "--point",
        "180,110",
        "--point",
        "20,20,0",
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "pt"),
    ]
    assert main(argv) == 0
    alpha = _check_outputs(tmp_path / "pt", image)
    expected = _predicted(image, point_coords=np.array([[180, 110], [20, 20]]), point_labels=np.array([1, 0]))
    np.testing.assert_array_equal(alpha, expected)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--box", "1,2,3"], "four numbers"),
        (["--box", "200,50,100,170"], "x1 < x2"),
        (["--box", "10,10,10,50"], "x1 < x2"),  # a box of no width, or of no height, is no box
        (["--box", "10,10,50,10"], "x1 < x2"),
        (["--point", "10,10,1,1"], "x,y or x,y,label"),
        (["--point", "10,10,-1"], "label must be 0"),
        (["--point", "a,b"], "x,y or x,y,label"),
        (["--point", "10,10,2"], "label must be 0"),
        ([], "one of the arguments --box --point is required"),
        (["--box", "1,2,3,4", "--point", "5,5"], "not allowed with"),
        (["--point", "500,10"], "outside the 320x240 image"),
        (["--box=-10,0,50,50"], "outside the 320x240 image"),
        (["--box", "10,10,330,50"], "outside the 320x240 image"),  # the second corner is checked too
        (["--point", "10,250"], "outside the 320x240 image"),  # Y is bounded by the height
        (["--box", "1,2,30,40", "--box", "5,5,50,50"], "--box: given twice"),
    ],
)
def test_prompt_errors(photo, tmp_path, capsys, extra: list[str], message: str) -> None:
    path, _ = photo
    with pytest.raises(SystemExit) as exc:
        main([str(path), *extra, "--model", "tiny", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_image_too_elongated_for_the_frame_is_a_usage_error(tmp_path, capsys) -> None:
    path = tmp_path / "line.png"
    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(path)
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--point", "10,0", "--model", "tiny", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "3000x1 (WxH) pixels is too elongated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_and_unreadable_images(tmp_path, capsys) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    for image, message in (
        (tmp_path / "missing.jpg", "does not exist"),
        (bad, "could not be read as an image"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(image), "--box", "1,2,3,4", "--model", "tiny", "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_network_or_an_out_file_is_a_usage_error(photo, tmp_path, capsys) -> None:
    path, _ = photo
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                str(path),
                "--box",
                "1,2,30,40",
                "--model",
                "tiny",
                "--checkpoint",
                str(wrong),
                "--out",
                str(tmp_path),
            ]
        )
    assert exc.value.code == 2 and "wrong.pt" in capsys.readouterr().err
    # a fit checkpoint of the 256-frame tiny config, given with --model tiny (1024): the error says to
    # leave --model out (the checkpoint names its network)
    from zim_lightning.models.build import build_zim
    from zim_lightning.models.checkpoint import NET_SPEC_KEY

    spec = {
        "class_path": "zim_lightning.models.build.build_zim",
        "init_args": {"variant": "tiny", "image_size": 256},
    }
    net = build_zim(variant="tiny", image_size=256)
    fit = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, NET_SPEC_KEY: spec}, fit)
    argv = [str(path), "--box", "1,2,30,40", "--checkpoint", str(fit), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--model", "tiny"])
    assert exc.value.code == 2 and "leave out --model and its switches" in capsys.readouterr().err
    from zim_lightning import zim_model_registry
    from zim_lightning.models.checkpoint import CheckpointError

    with pytest.raises(
        CheckpointError, match=r"build it with zim_lightning.models.build.zim_from_checkpoint"
    ):
        zim_model_registry["tiny"](checkpoint=str(fit))  # the same mistake from Python
    assert main(argv) == 0
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--box", "1,2,30,40", "--model", "tiny", "--out", str(taken)])
    assert exc.value.code == 2 and "is a file; expected a folder" in capsys.readouterr().err
