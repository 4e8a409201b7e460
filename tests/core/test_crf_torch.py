"""The torch dense CRF (scosparc_core.crf.dense_crf_torch) against pydensecrf, the reference.

Per mean-field iteration, Q must be within 1e-5 of pydensecrf's (``startInference``/``stepInference``) and the
labels must agree on >= 99.99% of pixels, on: the golden fixture (both Gaussian widths), the synthetic sample and
real photos (stage-2 masks from the tiny golden model, and ground-truth masks), and inputs full of ties (flat
colours, gradients, all-0 / all-1 / single-pixel masks, sizes that are not a multiple of 4 pixels).
"""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from scosparc_core.crf import CRF_PRESETS, CRFParams, crf_mean_field, dense_crf, dense_crf_q, dense_crf_torch

REAL = Path(__file__).parents[1] / "realphotos"
Q_TOL = 1e-5
AGREEMENT = 0.9999


@pytest.fixture(autouse=True)
def one_thread():
    # The CRF is many mid-sized ops: on a shared 2-core runner OpenMP barriers cost more than the second core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compare(rgb: np.ndarray, labels: np.ndarray, params: CRFParams, labels_from_q: bool = True) -> dict:
    """Runs both CRFs on a batch (B, H, W, 3) / (B, H, W); returns the worst Q difference per iteration and the
    pixel agreement of the labels with pydensecrf's argmax. Labels are the argmax of the last Q (what
    ``dense_crf_torch`` returns), or with ``labels_from_q=False`` a separate ``dense_crf_torch`` call."""
    rgb_t, labels_t = torch.from_numpy(rgb), torch.from_numpy(labels.astype(np.uint8))
    ours = np.stack([q.numpy() for q in crf_mean_field(rgb_t, labels_t, params)], axis=1)  # (B, T, 2, H, W)
    ref = np.stack([dense_crf_q(rgb[i], labels[i], params) for i in range(len(rgb))])
    if labels_from_q:
        out = (ours[:, -1, 1] > ours[:, -1, 0]).astype(np.uint8)
    else:
        out = dense_crf_torch(rgb_t, labels_t, params).numpy()
    ref_labels = np.argmax(ref[:, -1], axis=1)
    return {
        "q_diff": np.abs(ours - ref).max(axis=(0, 2, 3, 4)),  # per iteration
        "agreement": float((out == ref_labels).mean()),
        "differing_images": [i for i in range(len(out)) if (out[i] != ref_labels[i]).any()],
        "labels": out,
        "ref_labels": ref_labels,
    }


def assert_matches(result: dict) -> None:
    assert result["q_diff"].max() <= Q_TOL, f"Q differs by {result['q_diff']} per iteration"
    assert result["agreement"] >= AGREEMENT, (result["agreement"], result["differing_images"])


@pytest.mark.parametrize("preset", ["coca", "cosal2015"])
def test_golden_fixture_matches_pydensecrf_every_iteration(golden, preset):
    params = CRF_PRESETS[preset]
    result = compare(golden["crf_rgb"], golden["crf_input"], params, labels_from_q=False)
    assert_matches(result)
    # ... and the paper code's own CRF output stored in the fixture.
    assert (result["labels"] == golden[f"crf_{preset}"]).mean() >= AGREEMENT


def test_dense_crf_is_the_last_step_of_the_reference(golden):
    # dense_crf_q steps the same CRF that dense_crf runs: its last argmax is dense_crf's output.
    params = CRF_PRESETS["coca"]
    q = dense_crf_q(golden["crf_rgb"][0], golden["crf_input"][0], params)
    np.testing.assert_array_equal(np.argmax(q[-1], axis=0), dense_crf(golden["crf_rgb"][0], golden["crf_input"][0], params))


def _load_real(group: str, count: int):
    names = sorted((REAL / "image" / group).glob("*.jpg"))[:count]
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in names]
    masks = [cv2.imread(str(REAL / "groundtruth" / group / f"{p.stem}.png"), cv2.IMREAD_GRAYSCALE) for p in names]
    return images, masks


@pytest.fixture(scope="module")
def label_sources():
    """(name, crf colour input (B, 224, 224, 3), labels (B, 224, 224)): stage-2 masks of the tiny golden model
    and ground truth, on the synthetic sample and on real photos (a few of each class)."""
    from conftest import tiny_model
    from pipeline.sample import synthetic_group
    from scosparc_core.image import crf_image, to_rgb

    model = tiny_model()
    sources = []
    groups = {
        "sample horse": synthetic_group("horse", 3),
        "sample disc": synthetic_group("disc", 2),
        "real Sheep": list(zip(*_load_real("Sheep", 3))),
        "real Horse": list(zip(*_load_real("Horse", 3))),
    }
    for name, pairs in groups.items():
        images = [to_rgb(image) for image, _ in pairs]
        rgb = np.stack([crf_image(image) for image in images])
        truth = np.stack([cv2.resize(mask, (224, 224), interpolation=cv2.INTER_NEAREST) > 127 for _, mask in pairs])
        sources.append((f"{name} ground truth", rgb, truth.astype(np.uint8)))
        pred = model.predict_group(images, crf="none")
        keep = [i for i, fallback in enumerate(pred.fallback) if not fallback]  # a fallback map is no label map
        assert keep, name
        sources.append((f"{name} stage 2", rgb[keep], pred.stage2_mask[keep].astype(np.uint8)))
    return sources


def test_sample_and_real_photos_match_pydensecrf(label_sources):
    params = CRF_PRESETS["coca"]
    pixels = agree = 0
    for name, rgb, labels in label_sources:
        result = compare(rgb, labels, params)
        assert result["q_diff"].max() <= Q_TOL, (name, result["q_diff"])
        pixels += result["labels"].size
        agree += int((result["labels"] == result["ref_labels"]).sum())
    assert agree / pixels >= AGREEMENT, agree / pixels


def _ties_batch(height: int, width: int):
    """Flat colours and smooth gradients (equal differences and .5 remainders in the lattice) with masks that
    are all 0, all 1, a single pixel and a block."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    flat_black = np.zeros((height, width, 3), np.uint8)
    flat = np.full((height, width, 3), (128, 64, 33), np.uint8)
    white = np.full((height, width, 3), 255, np.uint8)
    horizontal = np.repeat((xx * 255 / max(width - 1, 1)).astype(np.uint8)[:, :, None], 3, axis=2)
    diagonal = np.stack([(xx + yy) % 256, (2 * xx) % 256, (3 * yy) % 256], axis=2).astype(np.uint8)
    empty = np.zeros((height, width), np.uint8)
    full = np.ones((height, width), np.uint8)
    single = empty.copy()
    single[height // 2, width // 3] = 1
    block = empty.copy()
    block[height // 4 : height // 2, width // 4 :] = 1
    rgb = np.stack([flat_black, flat, white, horizontal, diagonal, flat, horizontal, diagonal])
    labels = np.stack([single, empty, full, block, single, block, full, empty])
    return rgb, labels


@pytest.mark.parametrize("size", [(64, 48), (37, 29)], ids=["multiple-of-4", "padded-lattice"])
def test_ties_and_odd_sizes_match_pydensecrf(size):
    # 37x29 = 1073 pixels: pydensecrf's SSE build pads to 1076 with zero features, whose vertices relay the blur.
    rgb, labels = _ties_batch(*size)
    for params in (CRF_PRESETS["coca"], CRFParams(gaussian_sxy=3, bilateral_sxy=5, bilateral_srgb=13)):
        assert_matches(compare(rgb, labels, params))


def test_a_batch_gives_each_image_its_own_result(golden):
    # One lattice for the whole batch, but images never share a vertex.
    params = CRF_PRESETS["coca"]
    rgb = torch.from_numpy(golden["crf_rgb"][:3, :80, :96].copy())
    labels = torch.from_numpy(golden["crf_input"][:3, :80, :96].astype(np.uint8))
    batched = dense_crf_torch(rgb, labels, params)
    for i in range(3):
        assert torch.equal(batched[i], dense_crf_torch(rgb[i : i + 1], labels[i : i + 1], params)[0])


def test_labels_dtype_device_and_shape_errors(golden):
    params = CRF_PRESETS["coca"]
    rgb = torch.from_numpy(golden["crf_rgb"][:1, :40, :40].copy())
    as_bool = dense_crf_torch(rgb, torch.from_numpy(golden["crf_input"][:1, :40, :40] > 0), params)
    as_uint8 = dense_crf_torch(rgb, torch.from_numpy(golden["crf_input"][:1, :40, :40].astype(np.uint8)), params)
    assert as_bool.dtype == torch.uint8 and as_bool.shape == (1, 40, 40) and torch.equal(as_bool, as_uint8)
    assert dense_crf_torch(rgb[:0], as_uint8[:0], params).shape == (0, 40, 40)
    with pytest.raises(ValueError):
        dense_crf_torch(rgb[0], as_uint8[0], params)
    with pytest.raises(ValueError):
        dense_crf_torch(rgb.float(), as_uint8, params)


def test_gaussian_lattice_is_built_once_per_size():
    from scosparc_core.crf import _gaussian_kernel

    rgb = torch.zeros(1, 24, 20, 3, dtype=torch.uint8)
    labels = torch.zeros(1, 24, 20, dtype=torch.uint8)
    dense_crf_torch(rgb, labels, CRF_PRESETS["coca"])
    hits = _gaussian_kernel.cache_info().hits
    dense_crf_torch(rgb, labels, CRF_PRESETS["coca"])
    assert _gaussian_kernel.cache_info().hits == hits + 1


def test_crf_module_needs_neither_pydensecrf_nor_torch_to_import():
    code = (
        "import sys; sys.modules['pydensecrf'] = None\n"
        "import scosparc_core.crf as crf\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "out = crf.dense_crf_torch(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), torch.ones(1, 8, 8), crf.CRFParams())\n"
        "assert out.sum() == 64\n"
        "try:\n"
        "    crf.dense_crf(__import__('numpy').zeros((8, 8, 3), 'uint8'), __import__('numpy').ones((8, 8), 'uint8'), crf.CRFParams())\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_fused_triton_kernels_equal_the_torch_ops():
    # The CUDA path (Triton kernels for splat, blur, slice and the mean-field step) run by Triton's interpreter
    # on the CPU must give the torch path's Q to the bit (on a GPU the device check compares it with pydensecrf).
    pytest.importorskip("triton")
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import numpy as np, torch\n"
        "from scosparc_core.crf import CRF_PRESETS, crf_mean_field\n"
        "g = np.load('tests/golden/golden_pipeline.npz')\n"
        "from scosparc_core.permutohedral import _use_triton\n"
        "rgb = torch.from_numpy(g['crf_rgb'][:2, 100:111, 90:101].copy())\n"  # 121 pixels: a padded lattice too
        "labels = torch.from_numpy(g['crf_input'][:2, 100:111, 90:101].astype(np.uint8))\n"
        "assert _use_triton(rgb)\n"
        "fused = list(crf_mean_field(rgb, labels, CRF_PRESETS['coca'], iterations=2))\n"
        "os.environ['TRITON_INTERPRET'] = '0'\n"
        "plain = list(crf_mean_field(rgb, labels, CRF_PRESETS['coca'], iterations=2))\n"
        "assert all(torch.equal(a, b) for a, b in zip(fused, plain))\n"
        "assert 0 < float(plain[-1][:, 1].mean()) < 1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
