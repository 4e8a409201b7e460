"""The group engine: its shortcuts against the plain forms, passes against one pass, threads against serial."""
import os
import threading

import cv2
import numpy as np
import pytest
import torch

from conftest import tiny_model
from pipeline.sample import synthetic_group
from scosparc_core.image import crf_image, network_pixels
from scosparc_core.region_filter import label_regions, patch_masks, stage2_masks


def _blobs(rng, n):
    masks = []
    for i in range(n):
        side = int(rng.integers(4, 40))
        small = rng.random((side, side)) < rng.uniform(0.2, 0.8)
        masks.append(cv2.resize(small.astype(np.uint8), (224, 224), interpolation=cv2.INTER_NEAREST))
    masks.append((rng.random((224, 224)) < 0.5).astype(np.uint8))  # salt and pepper: hundreds of regions
    masks.append(np.ones((224, 224), np.uint8))
    masks.append(np.zeros((224, 224), np.uint8))
    return np.stack(masks)


def test_patch_masks_equal_opencv_per_region():
    rng = np.random.default_rng(3)
    labels, counts = label_regions(_blobs(rng, 40))
    fast = patch_masks(labels, counts, (28, 28))
    expected = [cv2.resize((labels[i] == k).astype(np.uint8), (28, 28), interpolation=cv2.INTER_LINEAR).reshape(-1)
                for i in range(len(labels)) for k in range(1, counts[i] + 1)]
    assert fast.shape == (counts.sum(), 784) and counts.sum() > 500
    np.testing.assert_array_equal(fast, np.stack(expected).astype(np.float32))
    # a scale that is not an even integer goes through OpenCV region by region
    odd = patch_masks(labels[:5], counts[:5], (32, 32))
    expected = [cv2.resize((labels[i] == k).astype(np.uint8), (32, 32), interpolation=cv2.INTER_LINEAR).reshape(-1)
                for i in range(5) for k in range(1, counts[i] + 1)]
    np.testing.assert_array_equal(odd, np.stack(expected).astype(np.float32))


def test_stage2_masks_are_each_images_kept_regions():
    rng = np.random.default_rng(5)
    labels, counts = label_regions(_blobs(rng, 30))
    keep = rng.random(int(counts.sum())) < 0.5
    got = stage2_masks(labels, counts, keep)
    assert got.dtype == np.uint8 and got.shape == labels.shape
    start = 0
    for i, count in enumerate(counts):
        kept = 1 + np.flatnonzero(keep[start:start + count])
        np.testing.assert_array_equal(got[i], np.isin(labels[i], kept).astype(np.uint8))
        start += count
    assert got.any() and not got.all()


def _group(kind, n, seed=0):
    images = [img for img, _ in synthetic_group(kind, n, seed)]
    return np.stack([network_pixels(i) for i in images]), np.stack([crf_image(i) for i in images])


@pytest.fixture(scope="module")
def engine():
    return tiny_model(micro_batch=8).engine


@pytest.fixture(scope="module")
def groups():
    return [_group("horse", 5), _group("disc", 3, seed=1), _group("horse", 11, seed=2)]


def _reader(views, log: list):
    """``views[a:b]`` for ``run_passes``, each call's range appended to ``log``."""
    return lambda a, b: log.append((a, b)) or views[a:b]


def _same(a, b):
    assert (a.confidence, a.threshold) == (b.confidence, b.threshold)
    for field in ("image_confidence", "regions_found", "regions_kept", "fallback", "stage2", "final"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_a_batch_of_groups_equals_each_group_alone(engine, groups):
    together = engine.run([p for p, _ in groups], [r for _, r in groups], crf="coca")
    for (pixels, rgb), got in zip(groups, together):
        _same(got, engine.run([pixels], [rgb], crf="coca")[0])
    assert all(r.crf_applied for r in together)


def test_passes_equal_one_pass(engine):
    pixels, rgb = _group("horse", 29, seed=4)
    whole = engine.run([pixels], [rgb], crf="coca", details=True)[0]
    loads = []
    chunks = list(engine.run_passes(len(pixels), _reader(pixels, loads), _reader(rgb, loads), crf="coca", chunk=10))
    assert [c.start for c in chunks] == [0, 10, 20] and sum(len(c) for c in chunks) == 29
    assert max(stop - start for start, stop in loads) <= 10  # a micro-batch (8) or an output chunk (10)
    for c in chunks:
        sl = slice(c.start, c.start + len(c))
        assert (c.confidence, c.threshold) == (whole.confidence, whole.threshold)
        for field in ("image_confidence", "regions_found", "regions_kept", "fallback", "stage2", "final"):
            np.testing.assert_array_equal(getattr(c, field), getattr(whole, field)[sl], err_msg=field)


def test_passes_with_a_spill_read_the_tokens_back_instead_of_recomputing_them(engine, tmp_path, monkeypatch):
    """spill: the backbone and ``pixels`` run once per image (and ``colours`` once, for the CRF), the masks are
    those of the passes without it, and no file is left. A write or a read that fails, a disk without room (also
    when other groups' files hold it) and a RAM-backed folder fall back to recomputing, with the same masks (those
    runs without the CRF: it is 80% of this test's time, and the spill is only about the first three passes)."""
    import errno
    import shutil

    import scosparc_core.engine as engine_module

    pixels, rgb = _group("horse", 19, seed=4)  # 3 micro-batches of 8
    n = len(pixels)
    plain = {crf: list(engine.run_passes(n, lambda a, b: pixels[a:b], lambda a, b: rgb[a:b], crf=crf, chunk=10))
             for crf in ("coca", "none")}
    tokens, backbone = engine._tokens, []

    def counted_tokens(groups, micro_batch=None):
        backbone.extend(len(g) for g in groups)
        return tokens(groups, micro_batch)

    def run(crf: str = "none") -> dict:
        backbone.clear()
        loads = {"pixels": [], "colours": []}
        reserved = engine_module.SpillFile._reserved
        for a, b in zip(plain[crf], engine.run_passes(n, _reader(pixels, loads["pixels"]),
                                                      _reader(rgb, loads["colours"]), crf=crf, chunk=10,
                                                      spill=str(tmp_path)), strict=True):
            for field in ("image_confidence", "regions_found", "regions_kept", "fallback", "stage2", "final"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing to clean up
        assert engine_module.SpillFile._reserved == reserved  # given back
        return {"backbone": sum(backbone), **{k: sum(b - a for a, b in v) for k, v in loads.items()}}

    monkeypatch.setattr(engine, "_tokens", counted_tokens)
    monkeypatch.setattr(engine_module, "_memory_fs", lambda folder: False)  # whatever this machine's /tmp is
    assert run("coca") == {"backbone": n, "pixels": n, "colours": n}  # pass 1, then the CRF's colours in pass 4
    once, recomputed = {"backbone": n, "pixels": n, "colours": 0}, {"backbone": 3 * n, "pixels": 3 * n, "colours": 0}
    writes, pwrite, preadv = [], os.pwrite, os.preadv

    def filling(fd, data, offset):  # the disk fills up during pass 1
        writes.append(len(data))
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    assert run() == recomputed and len(writes) == 3
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "preadv", lambda *args: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    assert run() == recomputed
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(engine_module, "_memory_fs", lambda folder: True)  # tmpfs: memory, not disk
    assert run() == recomputed
    monkeypatch.setattr(engine_module, "_memory_fs", lambda folder: False)
    per_image = engine.backbone.num_patches * engine.backbone.embed_dim
    room = shutil.disk_usage(tmp_path)._replace(free=2 * n * per_image * 4 + 2**30)  # for one such group
    monkeypatch.setattr(engine_module.shutil, "disk_usage", lambda path: room)
    other = engine_module.SpillFile.open(str(tmp_path), n, per_image)  # another group's file takes it
    assert other is not None and run() == recomputed
    other.close()
    assert run() == once
    written = engine_module.SpillFile.open(str(tmp_path), n, per_image)  # its rows are in the disk's used space:
    written.append(np.zeros((n, per_image), np.float32))  # they no longer count against the room
    assert run() == once
    written.close()


def test_deferred_crf_leaves_the_stage2_mask_for_cpu_workers(engine, groups):
    pixels, rgb = groups[0]
    done = engine.run([pixels], [rgb], crf="coca", crf_backend="pydensecrf")[0]
    deferred = engine.run([pixels], None, crf="coca", crf_backend="defer")[0]
    assert done.crf_applied and not deferred.crf_applied
    keep = ~deferred.fallback
    np.testing.assert_array_equal(deferred.final[keep], deferred.stage2[keep] * 255)
    none = engine.run([pixels], None, crf="none")[0]
    assert none.crf_applied  # nothing left to do
    np.testing.assert_array_equal(none.final, deferred.final)


def test_the_torch_crf_runs_a_large_batch_in_pieces_with_the_same_masks(engine, groups, monkeypatch):
    """A batch of many small groups can bring thousands of images to one CRF call: it runs TORCH_CRF_IMAGES at a
    time (bounded GPU memory, below the lattice's index limit), and each image's mask is the same."""
    import scosparc_core.crf as crf_module
    import scosparc_core.engine as engine_module

    pixels, rgb = [p for p, _ in groups], [r for _, r in groups]
    whole = engine.run(pixels, rgb, crf="coca", crf_backend="torch")
    sizes = []
    dense = crf_module.dense_crf_torch
    monkeypatch.setattr(engine_module, "TORCH_CRF_IMAGES", 3)
    monkeypatch.setattr(crf_module, "dense_crf_torch", lambda r, lab, p: sizes.append(len(lab)) or dense(r, lab, p))
    pieces = engine.run(pixels, rgb, crf="coca", crf_backend="torch")
    assert max(sizes) == 3 and len(sizes) >= 3  # 19 images, the few without a region aside
    for a, b in zip(whole, pieces):
        _same(a, b)


def test_two_threads_share_the_engine(engine, groups):
    serial = [engine.run([p], [r], crf="none")[0] for p, r in groups]
    out = {}

    def work(i):
        out[i] = engine.run([groups[i][0]], [groups[i][1]], crf="none")[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        _same(out[i], expected)


def test_empty_groups_among_others(engine, groups):
    empty = np.zeros((0, 224, 224, 3), np.uint8)
    results = engine.run([empty, groups[1][0], empty], [empty, groups[1][1], empty], crf="coca")
    assert [len(r) for r in results] == [0, 3, 0]
    assert np.isnan(results[0].threshold) and np.isfinite(results[1].threshold)


def test_backbone_paths_agree():
    """Inference tokens (timm's forward_features) equal the attention path's tokens (module by module)."""
    backbone = tiny_model().backbone
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        a = backbone(x, with_attention=False).tokens
        b = backbone(x, with_attention=True).tokens
    assert torch.equal(a, b)


def test_results_do_not_depend_on_the_micro_batch(engine):
    """K_i comes from token sums taken micro-batch by micro-batch and one key transform per group, and rep from a
    row sum: so weights, threshold and masks are the same bit for bit for any micro-batch (an out-of-memory retry
    halves it), in passes too, and equal the head's forward on the whole group (training, SCoSPARC.stage1)."""
    pixels, rgb = _group("horse", 37, seed=5)
    runs = {mb: engine.run([pixels], [rgb], crf="none", details=True, micro_batch=mb)[0] for mb in (32, 5, 1)}
    with torch.inference_mode():
        tokens = engine._tokens([pixels])
        forward = engine.head(tokens).numpy()
    for mb, r in runs.items():
        np.testing.assert_array_equal(r.details.stage1_weights, forward, err_msg=f"micro-batch {mb}")
        _same(r, runs[32])
    passes = list(engine.run_passes(len(pixels), lambda a, b: pixels[a:b], crf="none", micro_batch=5))
    assert {(p.confidence, p.threshold) for p in passes} == {(runs[32].confidence, runs[32].threshold)}
    np.testing.assert_array_equal(np.concatenate([p.final for p in passes]), runs[32].final)


def test_scosparc_stage1_gives_the_weights_of_predict_group(model):
    pixels, rgb = _group("disc", 6, seed=6)
    r = model.engine.run([pixels], [rgb], crf="none", details=True)[0]
    with torch.inference_mode():
        tokens = model.engine._tokens([pixels])
    np.testing.assert_array_equal(model.stage1(tokens).numpy(), r.details.stage1_weights)


def test_passes_read_the_colour_views_only_for_a_crf_and_return_a_deferred_crfs(engine):
    """The last pass needs no backbone: it reads the colour views, and only when a CRF runs (here or deferred);
    the first three read only the network views. A deferred CRF gets each chunk's own views on its result; a CRF
    without colours is refused."""
    pixels, _ = _group("horse", 20, seed=7)
    rgb = np.stack([np.full((224, 224, 3), i, np.uint8) for i in range(20)])  # image i's colour view is all i
    for crf, backend, colours in (("none", "auto", False), ("coca", "defer", True), ("coca", "pydensecrf", True)):
        loads = {"pixels": [], "colours": []}
        chunks = list(engine.run_passes(20, _reader(pixels, loads["pixels"]), _reader(rgb, loads["colours"]),
                                        crf=crf, crf_backend=backend, chunk=6))
        backbone_loads = 3 * len(range(0, 20, engine.micro_batch))  # three passes of micro-batches (8)
        assert len(loads["pixels"]) == backbone_loads, (crf, backend, loads)
        assert len(loads["colours"]) == (len(chunks) if colours else 0), (crf, backend, loads)
        for c in chunks:
            if backend == "defer":
                assert not c.crf_applied
                np.testing.assert_array_equal(c.crf_rgb, rgb[c.start:c.start + len(c)])
            else:
                assert c.crf_applied and c.crf_rgb is None
    with pytest.raises(ValueError, match="colour inputs"):
        next(engine.run_passes(20, _reader(pixels, []), crf="coca"))


def _crf_images(n, size, seed):
    """Random colour images (each with a black and a white pixel: the same colour range) and blob labels."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (n, size, size, 3), np.uint8)
    rgb[:, 0, 0], rgb[:, 0, 1] = 0, 255
    labels = (cv2.GaussianBlur(rng.random((n, size, size)).astype(np.float32).transpose(1, 2, 0), (5, 5), 2)
              .transpose(2, 0, 1) > 0.5).astype(np.uint8)
    return rgb, labels


def test_the_torch_crf_halves_a_piece_whose_lattice_keys_overflow(engine, monkeypatch):
    """With colours scaled this finely (srgb 0.075) one lattice over 16 or more of these images needs 64-bit keys:
    the engine splits the piece instead of failing, and each image gets the CRF pydensecrf gives it."""
    import scosparc_core.crf as crf_module
    from scosparc_core.crf import CRFParams, dense_crf

    rgb, labels = _crf_images(20, 12, seed=8)
    params = CRFParams(bilateral_srgb=0.075)
    sizes = []
    dense = crf_module.dense_crf_torch
    monkeypatch.setattr(crf_module, "dense_crf_torch", lambda r, lab, p: sizes.append(len(lab)) or dense(r, lab, p))
    out = engine._crf(rgb, labels, params, "torch")
    assert sizes == [20, 10, 5, 5, 10, 5, 5]  # tried, halved, halved again: 5 images fit
    np.testing.assert_array_equal(out, np.stack([dense_crf(r, lab, params) for r, lab in zip(rgb, labels)]))


def test_the_torch_crf_warms_up_once_per_gaussian_lattice():
    """The first torch CRF call per (H, W, Gaussian sxy) builds a cached lattice that other threads' CUDA streams
    then read: each such first call runs alone (under the engine's lock, then a device synchronise)."""
    from scosparc_core.crf import CRF_PRESETS

    engine = tiny_model().engine
    entered = []

    class CountingLock:
        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            entered.append(1)
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    engine._backbone.lock = CountingLock()
    rgb, labels = _crf_images(2, 16, seed=9)
    for preset in ("coca", "coca", "cosal2015", "cosod3k", "cosal2015"):  # sxy 10, 10, 20, 10, 20
        engine._crf(rgb, labels, CRF_PRESETS[preset], "torch")
    engine._crf(rgb[:, :12], labels[:, :12], CRF_PRESETS["coca"], "torch")  # another size
    assert len(entered) == 3 and engine._crf_warm == {(16, 16, 10.0), (16, 16, 20.0), (12, 16, 10.0)}


def test_cls_attention_is_float32_under_autocast():
    """Only the backbone changes format: the CLS attention (L_sal's target) is computed in float32 even inside a
    bfloat16 autocast, whose matmul would otherwise round the logits to bfloat16."""
    backbone = tiny_model().backbone
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention = backbone(x, with_attention=True).cls_attention
    assert attention.dtype == torch.float32
    # float32 softmax values are almost never bfloat16 numbers; bfloat16 arithmetic gives nothing else
    assert (attention != attention.bfloat16().float()).float().mean() > 0.9


def test_auto_is_float32_on_every_device_and_names_resolve_to_themselves():
    """--dtype auto: float32 on the CPU and on CUDA (the only format whose GPU masks came near the reference's;
    float64 kept no more of them at half the rate); an explicit name stays itself, but TF32 off CUDA is float32."""
    from scosparc_core.precision import resolve

    assert resolve("auto", "cuda") == resolve("auto", "cuda:1") == resolve("auto", "cpu") == "float32"
    assert [resolve(name, "cuda") for name in ("float16", "bfloat16", "tf32", "float64")] == [
        "float16", "bfloat16", "tf32", "float64"]
    assert resolve("tf32", "cpu") == "float32" and resolve(torch.bfloat16, "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve("fp8", "cuda")


def test_a_float64_backbone_rounds_its_tokens_once(groups):
    """precision float64: the backbone's weights and arithmetic in float64 (timm's own forward in float64, bit for
    bit), its tokens rounded once to float32; the same model in float32 is not changed by it."""
    from scosparc_core.precision import resolve

    assert resolve("float64", "cuda") == resolve("float64", "cpu") == "float64"
    engine64, engine32 = tiny_model(dtype="float64").engine, tiny_model().engine
    assert engine64.precision == "float64" and {p.dtype for p in engine64.backbone.parameters()} == {torch.float64}
    pixels, rgb = groups[0]
    with torch.inference_mode():
        got, in_float32 = engine64._tokens([pixels]), engine32._tokens([pixels])
        vit = tiny_model().backbone.vit.double()
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double().div(255)
        mean, std = engine32.backbone.pixel_mean.double(), engine32.backbone.pixel_std.double()
        expected = vit.forward_features((x - mean) / std)[:, vit.num_prefix_tokens:].float()
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert not torch.equal(got, in_float32)  # float32's rounding is not float64's
    torch.testing.assert_close(got, in_float32, rtol=1e-4, atol=1e-4)
    assert {p.dtype for p in engine32.backbone.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="needs the backbone's weights in torch.float64"):
        engine32.backbone.tokens(engine32.backbone.preprocess(torch.from_numpy(pixels[:1])), "float64")
    result = engine64.run([pixels], [rgb], crf="coca")[0]
    assert result.final.shape == (len(pixels), 224, 224) and result.final.dtype == np.uint8
