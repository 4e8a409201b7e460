"""Defined behaviour for inputs the paper code never met."""
import io
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.sample import synthetic_group
from scosparc_core.crf import CRFParams
from scosparc_core.image import to_rgb
from scosparc_core.region_filter import group_prototype, keep_regions


def jpeg(image: Image.Image, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def rgb():
    return synthetic_group("horse", 1)[0][0]


def test_modes_become_rgb(rgb):
    base = Image.fromarray(rgb)
    gray = base.convert("L")
    out = to_rgb(gray)
    assert out.shape == rgb.shape and (out[..., 0] == out[..., 1]).all()
    np.testing.assert_array_equal(to_rgb(base.convert("RGBA")), rgb)  # alpha dropped, as convert('RGB')
    assert to_rgb(base.convert("P")).shape == rgb.shape
    pal = base.convert("P")
    pal.info["transparency"] = 0
    assert to_rgb(pal).dtype == np.uint8
    cmyk = jpeg(base.convert("CMYK"))
    assert cmyk.mode == "CMYK"
    assert np.abs(to_rgb(cmyk).astype(int) - rgb.astype(int)).mean() < 12
    assert to_rgb(base.convert("1")).shape == rgb.shape


def test_16_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out = to_rgb(Image.fromarray(ramp))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert 100 < out[32, 0, 0] < 155  # the middle stays mid-grey (convert('RGB') would make it white)
    arr = to_rgb(np.stack([ramp] * 3, axis=2))
    assert arr.dtype == np.uint8 and arr[-1, -1, 0] == 255


def test_exif_rotation_is_applied(rgb):
    base = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    base.save(buf, format="JPEG", exif=exif, quality=95)
    out = to_rgb(Image.open(io.BytesIO(buf.getvalue())))
    assert out.shape == (rgb.shape[1], rgb.shape[0], 3)


def test_arrays(rgb):
    np.testing.assert_array_equal(to_rgb(rgb), rgb)
    assert to_rgb(rgb[..., 0]).shape == rgb.shape
    np.testing.assert_array_equal(to_rgb(np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])), rgb)
    assert to_rgb(rgb / 255.0).dtype == np.uint8
    with pytest.raises(ValueError, match="shape"):
        to_rgb(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        to_rgb(np.zeros((4, 4, 3), np.int8))
    with pytest.raises(ValueError, match="no pixels"):
        to_rgb(np.zeros((0, 4, 3), np.uint8))


def test_group_of_mixed_sizes_and_modes(model, rgb):
    group = synthetic_group("horse", 3)
    images = [Image.fromarray(group[0][0]).convert("L"), Image.fromarray(group[1][0]).convert("RGBA"),
              group[2][0], np.full((1, 1, 3), 128, np.uint8), np.zeros((2600, 3100, 3), np.uint8)]
    pred = model.predict_group(images, crf="coca")
    assert len(pred) == 5 and pred.mask.shape == (5, 224, 224)
    assert [m.shape for m in pred.masks] == [g[0].shape[:2] for g in group] + [(1, 1), (2600, 3100)]
    assert all(m.dtype == np.uint8 for m in pred.masks)
    assert np.isfinite(pred.stage1_map).all() and np.isfinite(pred.threshold)


def test_group_of_one_and_empty_group(model, rgb):
    one = model.predict_group([rgb], crf="none")
    assert len(one) == 1 and np.isfinite(one.confidence) and one.masks[0].shape == rgb.shape[:2]
    empty = model.predict_group([])
    assert len(empty) == 0 and empty.mask.shape == (0, 224, 224) and np.isnan(empty.threshold)


def test_unknown_crf_preset_fails_before_work(model, rgb):
    with pytest.raises(ValueError, match="unknown CRF preset"):
        model.predict_group([rgb], crf="cocaa")


def test_image_without_foreground_patch_is_left_out_of_the_prototype():
    tokens = torch.stack([torch.ones(4, 3), torch.full((4, 3), 5.0)])
    weights = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(group_prototype(tokens, weights, 0.5), torch.ones(3))
    assert torch.equal(group_prototype(tokens, weights * 0, 0.5), torch.zeros(3))


def test_empty_stage1_mask_falls_back_to_the_stage1_map(model):
    # identical patches: min-max has no range, every weight is sigmoid(-0.65/0.15), no confidence, tau > 1
    tokens = torch.ones(3, 784, model.backbone.embed_dim)
    rgb = np.zeros((3, 224, 224, 3), np.uint8)
    r = model.engine.run_on_tokens([tokens], [rgb], crf="coca", details=True)[0]
    assert r.fallback.all() and (r.regions_found == 0).all() and r.threshold > 1
    np.testing.assert_array_equal(r.details.mask, r.details.stage1_map)  # CRF skipped, the map kept
    np.testing.assert_array_equal(r.final, (r.details.stage1_map * 255).astype(np.uint8))


def region_filter(engine, stage1_mask, tokens, prototype, crf=None, rgb=None) -> dict:
    """One image's stage-1 mask (224, 224) bool, tokens (P, C) and group prototype (C,) through the engine's region
    filter and CRF, as a group's run reaches them: the stage-1 map is the mask itself (0/1, tau 0.5)."""
    maps = torch.from_numpy(stage1_mask.astype(np.float32))[None]
    taus = np.full(1, 0.5, np.float32)
    labels, counts, cosines = engine._region_cosines(maps, taus, tokens[None], prototype[None], np.zeros(1, np.int64))
    out = engine._finish(maps, maps, taus, labels, counts, cosines, [rgb], CRFParams() if crf else None,
                         "pydensecrf", False, defaultdict(float))
    return {"found": int(out["found"][0]), "kept": int(out["kept"][0]), "mask": out["stage2"][0],
            "final": out["final"][0], "scores": keep_regions(cosines, counts)[0].tolist()}


def test_all_foreground_mask_is_one_region_and_crf_keeps_it(model):
    tokens = torch.randn(784, 8)
    kept = region_filter(model.engine, np.ones((224, 224), bool), tokens, tokens.mean(0), crf="coca",
                         rgb=np.full((1, 224, 224, 3), 90, np.uint8))
    assert kept["found"] == 1 and kept["kept"] == 1 and kept["mask"].all()
    assert (kept["final"] == 255).all()  # the paper code's min-max would have turned this into an empty mask


def test_region_filter_keeps_regions_like_the_prototype(model):
    mask = np.zeros((224, 224), bool)
    mask[8:64, 8:64] = True  # region A: patches with token a
    mask[150:210, 150:210] = True  # region B: patches with token b
    tokens = torch.zeros(28, 28, 2)
    tokens[:, :14] = torch.tensor([1.0, 0.0])
    tokens[:, 14:] = torch.tensor([0.0, 1.0])
    tokens[14:, 14:] = torch.tensor([-1.0, 0.2])
    kept = region_filter(model.engine, mask, tokens.reshape(784, 2), torch.tensor([1.0, 0.0]))
    assert kept["found"] == 2 and kept["kept"] == 1
    assert kept["scores"][0] == 100 and kept["scores"][1] < 0
    assert kept["mask"][30, 30] and not kept["mask"][180, 180]


def test_best_region_score_zero_keeps_the_zero_regions(model):
    mask = np.zeros((224, 224), bool)
    mask[8:64, 8:64] = True
    mask[150:210, 150:210] = True
    tokens = torch.zeros(28, 28, 2)
    tokens[:14, :14] = torch.tensor([0.0, 1.0])  # orthogonal to the prototype: score 0
    tokens[14:, 14:] = torch.tensor([-1.0, 0.0])  # opposite: score -100
    kept = region_filter(model.engine, mask, tokens.reshape(784, 2), torch.tensor([1.0, 0.0]))
    assert kept["scores"] == [0, -100] and kept["kept"] == 1 and kept["mask"][30, 30]


@pytest.mark.parametrize("bad", [dict(gt_prob=1.0), dict(gt_prob=0.0), dict(gt_prob=float("nan")),
                                 dict(gaussian_sxy=0), dict(bilateral_sxy=-1.0), dict(bilateral_srgb=float("inf")),
                                 dict(gaussian_compat=float("nan")), dict(bilateral_compat=float("-inf")),
                                 dict(iterations=-1), dict(iterations=2.5)])
def test_crf_params_refuse_what_pydensecrf_would_refuse_or_divide_by(bad):
    """Checked once, so that neither backend runs them (the torch CRF gave all background for gt_prob 1)."""
    with pytest.raises(ValueError, match=f"CRFParams.{next(iter(bad))}"):
        CRFParams(**bad)


def test_crf_params_at_the_edges_are_accepted():
    CRFParams(gt_prob=0.5, iterations=0, gaussian_compat=0, bilateral_compat=-3, gaussian_sxy=1e3, bilateral_srgb=0.1)
