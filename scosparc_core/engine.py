"""The group engine: backbone -> stage 1 -> threshold -> prototype -> region filter [-> CRF], for many groups at once.

``SCoSPARC.predict_group`` and the pipeline's stage-1 actor both run this; it is the one place where the method's
stages are put together. It is written for the GPU first, without changing a bit of the CPU float32 results:

- tokens never leave the device; what comes back to the host is small (confidences, uint8 stage-1 masks, one
  cosine per region, and the uint8 mask at 224);
- the backbone packs the images of small groups into full micro-batches on CUDA (stage 1 stays per group; on the
  CPU each group runs on its own, so a group's numbers never depend on its neighbours);
- host -> device copies go through pinned memory, each thread works on its own CUDA stream, so a caller can
  run two batches at once from two threads: one's CPU steps overlap the other's GPU work;
- a group too large to hold (``run_passes``) streams through the backbone in passes over micro-batches with
  device and host memory bounded by the micro-batch, not the group.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .crf import CRFParams, crf_params, dense_crf
from .modeling.backbone import DinoBackbone
from .modeling.stage1 import Stage1Head
from .permutohedral import LatticeTooLarge
from .precision import resolve
from .region_filter import (foreground_means, group_prototype, keep_regions, label_regions, patch_masks,
                            prototype_cosines, prototype_from_means, region_embeddings, stage2_masks)
from .threshold import adaptive_threshold, image_confidences, stage1_map

CRF_BACKENDS = ("auto", "torch", "pydensecrf", "defer")
# Backbone images per forward. CPU: the rate is flat from ~16 up; CUDA: large batches fill the device.
MICRO_BATCH = {"cpu": 32, "cuda": 128}
# Images per call of the torch CRF: ~23 MB of GPU memory each at the peak (6 GB here), and far below the
# lattice's int32 index limit (~7,000 images), however many images a batch of small groups brings.
TORCH_CRF_IMAGES = 256


def default_micro_batch(device: str | torch.device, precision: str = "float32") -> int:
    """Backbone images per forward for a device and a resolved precision: half on CUDA in float64, whose
    attention runs unfused (batch x heads x 785 x 785 float64 scores and their softmax: ~15 GB at 128)."""
    kind = torch.device(device).type
    return MICRO_BATCH.get(kind, 32) // (2 if kind == "cuda" and precision == "float64" else 1)


@dataclass
class GroupDetails:
    """What only the Python API shows: stage1_weights (n, P), stage1_map (n, 224, 224) float32, stage1_mask
    (n, 224, 224) bool, prototype (C,), stage2_mask (n, 224, 224) float32 (the stage-1 map where the image fell
    back), mask (n, 224, 224) float32 (the final map: CRF labels 0/1, or the stage-1 map for a fallback)."""

    stage1_weights: np.ndarray
    stage1_map: np.ndarray
    stage1_mask: np.ndarray
    prototype: np.ndarray
    stage2_mask: np.ndarray
    mask: np.ndarray


@dataclass
class GroupResult:
    """The engine's answer for n images of one group (all of it, or the slice starting at ``start``).

    final: (n, 224, 224) uint8, trunc(255 x the final map) - what the paper code turns into its PNG before
    resizing it to the original size: 0/255 after the CRF; for an image whose stage-1 mask has no region
    (``fallback``) the stage-1 map's values, CRF skipped. With ``crf_applied`` False the CRF is still to run
    (on CPU workers): ``final`` then holds 255 x ``stage2`` for the images that did not fall back.
    stage2: (n, 224, 224) uint8 0/1 (zeros where the image fell back).
    crf_rgb: (n, 224, 224, 3) uint8, the CRF's colour input of these images, when ``run_passes`` read it for a
    deferred CRF (whoever runs that CRF needs it); None otherwise.
    """

    confidence: float
    threshold: float
    image_confidence: np.ndarray  # (n,) float32
    regions_found: np.ndarray  # (n,) int64
    regions_kept: np.ndarray  # (n,) int64
    fallback: np.ndarray  # (n,) bool
    stage2: np.ndarray
    final: np.ndarray
    crf_applied: bool
    start: int = 0
    details: GroupDetails | None = None
    timings: dict = field(default_factory=dict)
    crf_rgb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.fallback)


@dataclass
class _GroupStage1:
    """What ``run_passes``' first three passes leave for the last: stage-1 weights (n, P) on the device,
    confidences (n,), (confidence, threshold), the prototype (C,), region counts (n,) and cosines (sum(counts),)."""

    weights: torch.Tensor
    conf: np.ndarray
    tau: tuple[float, float]
    prototype: torch.Tensor
    counts: np.ndarray
    cosines: np.ndarray


class GroupEngine:
    """Runs the method on groups of decoded images with one backbone and head on one device.

    precision: a name from ``scosparc_core.precision`` (``auto`` resolves per device; the backbone is moved to the
    device, and for ``float64`` converted to float64, in place: one backbone, one precision); micro_batch: images per
    backbone forward; crf_workers >= 2: pydensecrf CRFs in that many processes (spawned, so a script that uses
    them needs the ``if __name__ == "__main__":`` guard).
    """

    def __init__(self, backbone: DinoBackbone, head: Stage1Head, device: str | torch.device = "cpu",
                 precision: str = "auto", micro_batch: int | None = None, crf_workers: int = 0):
        if head.dim != backbone.embed_dim:
            raise ValueError(f"head width {head.dim} does not match backbone width {backbone.embed_dim}")
        self.device = torch.device(device)
        self.precision = resolve(precision, self.device)
        self.micro_batch = max(1, int(micro_batch or default_micro_batch(self.device, self.precision)))
        self.backbone = backbone.to_precision(self.device, self.precision).eval()
        self.head = head.to(self.device).eval()
        self.grid = backbone.grid_size
        self.crf_workers = crf_workers
        self.profile = False  # synchronise the device at each stage so that timings are per stage (benchmarks)
        self._local = threading.local()
        self._backbone = DeviceQueue(self.device)
        self._pool: ProcessPoolExecutor | None = None
        self._crf_warm: set[tuple[int, int, float]] = set()  # (H, W, Gaussian sxy) whose cached lattice is built

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def crf_backend(self, backend: str = "auto") -> str:
        if backend not in CRF_BACKENDS:
            raise ValueError(f"unknown CRF backend {backend!r}; choose one of {', '.join(CRF_BACKENDS)}")
        if backend == "auto":
            return "torch" if self.cuda else "pydensecrf"
        return backend

    # -- whole groups -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, pixels: Sequence[np.ndarray], crf_rgb: Sequence[np.ndarray | None] | None = None,
            crf: str | CRFParams | None = "coca", crf_backend: str = "auto", details: bool = False,
            micro_batch: int | None = None) -> list[GroupResult]:
        """Groups of network pixels, each (n_g, 224, 224, 3) uint8, and the CRF's colour input of the same shape
        (or None when no CRF runs here) -> one GroupResult per group. Empty groups give empty results with NaN
        confidence and threshold. ``micro_batch`` overrides the engine's for this call (smaller after an
        out-of-memory)."""
        params, backend = crf_params(crf), self.crf_backend(crf_backend)
        crf_rgb = list(crf_rgb) if crf_rgb is not None else [None] * len(pixels)
        sizes = [int(p.shape[0]) for p in pixels]
        live = [g for g, n in enumerate(sizes) if n]
        results = [_empty_result(details, self.backbone.embed_dim, self.grid) for _ in pixels]
        if not live:
            return results
        timings: dict = defaultdict(float)
        with thread_stream(self.device, self._local):
            with self._timed(timings, "backbone"):
                tokens = self._tokens([pixels[g] for g in live], micro_batch)
            live_results = self._after_backbone(tokens, [sizes[g] for g in live], [crf_rgb[g] for g in live],
                                                params, backend, details, timings, micro_batch)
        for g, result in zip(live, live_results):
            results[g] = result
        return results

    @torch.inference_mode()
    def run_on_tokens(self, tokens: Sequence[torch.Tensor], crf_rgb: Sequence[np.ndarray | None] | None = None,
                      crf: str | CRFParams | None = "coca", crf_backend: str = "auto",
                      details: bool = False) -> list[GroupResult]:
        """Everything after the backbone, for groups whose tokens (n_g, P, C) are already on the device
        (``run`` calls this; tests feed it the paper code's tokens)."""
        crf_rgb = list(crf_rgb) if crf_rgb is not None else [None] * len(tokens)
        with thread_stream(self.device, self._local):
            all_tokens = torch.cat([t.to(self.device, torch.float32) for t in tokens])
            return self._after_backbone(all_tokens, [len(t) for t in tokens], crf_rgb, crf_params(crf),
                                        self.crf_backend(crf_backend), details, defaultdict(float))

    def _after_backbone(self, all_tokens: torch.Tensor, sizes: list[int], crf_rgb: list, params: CRFParams | None,
                        backend: str, details: bool, timings: dict, micro_batch: int | None = None
                        ) -> list[GroupResult]:
        bounds = np.cumsum([0] + sizes)
        groups = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        with self._timed(timings, "stage1"):
            weights = torch.cat([self._weights(all_tokens[sl], micro_batch) for sl in groups])
            maps = stage1_map(weights, self.grid)
            conf = image_confidences(maps, self.grid).cpu().numpy()
            taus = [adaptive_threshold(conf[sl]) for sl in groups]
            prototypes = torch.stack([group_prototype(all_tokens[sl], weights[sl], tau)
                                      for sl, (_, tau) in zip(groups, taus)])
        group_of = np.repeat(np.arange(len(groups)), np.diff(bounds))
        image_tau = np.array([tau for _, tau in taus], np.float32)[group_of]
        with self._timed(timings, "stage2"):
            labels, counts, cosines = self._region_cosines(maps, image_tau, all_tokens, prototypes, group_of)
        outs = self._finish(maps, weights, image_tau, labels, counts, cosines, crf_rgb, params, backend, details,
                            timings)
        return [_result(outs, sl, taus[j], conf[sl], prototypes[j], details, dict(timings))
                for j, sl in enumerate(groups)]

    # -- one large group in passes ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run_passes(self, n: int, pixels: Callable[[int, int], np.ndarray],
                   colours: Callable[[int, int], np.ndarray] | None = None,
                   crf: str | CRFParams | None = "coca", crf_backend: str = "auto", chunk: int | None = None,
                   progress: Callable[[str, int], None] | None = None,
                   micro_batch: int | None = None, spill: str | None = None) -> Iterator[GroupResult]:
        """A group of ``n`` images too large to hold, streamed: ``pixels(start, stop)`` returns the network pixels
        (m, 224, 224, 3) of images start..stop-1 and ``colours(start, stop)`` their CRF colour inputs (m, 224, 224,
        3), each time they are called; ``colours`` only with a CRF.

        Stage 1 is linear in the images' key sums, so the group is read in passes over micro-batches of
        ``micro_batch`` images: (1) the key sums K_i; (2) the stage-1 weights given the group's K (kept: n x P
        floats) and the confidences, hence the threshold; (3) each image's foreground mean (hence the prototype)
        and its regions' token sums (kept: R x C floats); (4) the region filter's decisions and the CRF, yielding
        GroupResults of ``chunk`` images. The backbone runs three times per image (once with ``spill``); device
        and host memory grow with the micro-batch and n x P + R x C, not with n x P x C. The numbers are those of
        ``run`` on the same group: the head and the filter see the same micro-batches. Pass (4) reads only the
        colour inputs, and only when a CRF is asked for; with ``crf_backend="defer"`` they come back on the
        results (``GroupResult.crf_rgb``).

        ``spill``: a folder on a local disk. When it has room for the group's tokens (n x P x C float32, 2.4 MB
        an image for ViT-B/8), pass (1) writes them to an unnamed temporary file there and passes (2) and (3)
        read them back: the backbone and ``pixels`` run once per image instead of three times, with the same
        numbers. Without room (``SpillFile.open``), on a RAM-backed folder, when a write or a read fails, or with
        None, the passes recompute them.
        """
        if n == 0:
            return
        params, backend = crf_params(crf), self.crf_backend(crf_backend)
        if params is not None and colours is None:
            raise ValueError("the CRF needs the images' colour inputs: pass colours, or crf='none'")
        mb = micro_batch or self.micro_batch
        spans = [(s, min(s + mb, n)) for s in range(0, n, mb)]

        def tokens(start: int, stop: int) -> torch.Tensor:
            kept = store.read(start, stop) if store is not None else None  # None: not written, or failed
            if kept is not None:
                return torch.from_numpy(kept).view(stop - start, self.backbone.num_patches, -1).to(self.device)
            computed = self._tokens([pixels(start, stop)], mb)
            if store is not None:
                store.append(computed)
            return computed

        with thread_stream(self.device, self._local):
            store = SpillFile.open(spill, n, self.backbone.num_patches * self.backbone.embed_dim) if spill else None
            with store if store is not None else contextlib.nullcontext():
                key_sums = self._keys_pass(tokens, spans, progress)
                weights, conf = self._weights_pass(tokens, spans, key_sums, mb, progress)
                tau = adaptive_threshold(conf)
                means, has_fg, embeds, counts = self._regions_pass(tokens, spans, weights, tau[1], progress)
            # the tokens were read for the last time: the file's disk is free for the rest
            prototype = prototype_from_means(means, has_fg)
            cosines = self._cosines(embeds, counts, prototype[None], np.zeros(n, np.int64))
            found = _GroupStage1(weights, conf, tau, prototype, counts, cosines)
            del key_sums, means, has_fg, embeds  # not held on the device through the masks pass
            yield from self._masks_pass(found, colours, max(1, chunk or mb), params, backend, progress)

    def _keys_pass(self, tokens: Callable[[int, int], torch.Tensor], spans: list[tuple[int, int]],
                   progress: Callable[[str, int], None] | None) -> torch.Tensor:
        """Pass 1: every image's key sum K_i (n, C), the key transform once on the whole group's token sums (as
        ``_weights``)."""
        sums = []
        for start, stop in spans:
            sums.append(tokens(start, stop).sum(dim=1))
            _tick(progress, "stage-1 keys", stop)
        return self.head.keys_from_token_sums(torch.cat(sums), self.backbone.num_patches)

    def _weights_pass(self, tokens: Callable[[int, int], torch.Tensor], spans: list[tuple[int, int]],
                      key_sums: torch.Tensor, mb: int, progress: Callable[[str, int], None] | None
                      ) -> tuple[torch.Tensor, np.ndarray]:
        """Pass 2: the stage-1 weights (n, P) given the group's K, and the images' confidences (n,)."""
        n, total = len(key_sums), key_sums.sum(dim=0)
        weights, conf = [], []
        for start, stop in spans:
            w = self.head.weights(tokens(start, stop), key_sums[start:stop], total, n, chunk=mb)
            weights.append(w)
            conf.append(image_confidences(stage1_map(w, self.grid), self.grid).cpu().numpy())
            _tick(progress, "stage-1 weights", stop)
        return torch.cat(weights), np.concatenate(conf)

    def _regions_pass(self, tokens: Callable[[int, int], torch.Tensor], spans: list[tuple[int, int]],
                      weights: torch.Tensor, threshold: float, progress: Callable[[str, int], None] | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """Pass 3: each image's foreground mean (n, C) and whether it has one (n,) (hence the prototype), and its
        stage-1 mask's region token sums e_k (sum(counts), C) and region counts (n,)."""
        means, has_fg, embeds, counts = [], [], [], []
        for start, stop in spans:
            t = tokens(start, stop)
            m, h = foreground_means(t, weights[start:stop], threshold)
            labels, cnt = self._stage1_regions(stage1_map(weights[start:stop], self.grid), threshold)
            means.append(m)
            has_fg.append(h)
            embeds.append(self._region_embeddings(labels, cnt, t))
            counts.append(cnt)
            _tick(progress, "regions", stop)
        return torch.cat(means), torch.cat(has_fg), torch.cat(embeds), np.concatenate(counts)

    def _masks_pass(self, found: _GroupStage1, colours: Callable[[int, int], np.ndarray] | None, step: int,
                    params: CRFParams | None, backend: str, progress: Callable[[str, int], None] | None
                    ) -> Iterator[GroupResult]:
        """Pass 4: the region filter's decisions and the CRF, as GroupResults of ``step`` images."""
        n = len(found.conf)
        offsets = np.concatenate([[0], np.cumsum(found.counts)])
        for start in range(0, n, step):
            stop = min(start + step, n)
            maps = stage1_map(found.weights[start:stop], self.grid)
            taus = np.full(stop - start, found.tau[1], np.float32)
            labels, cnt = self._stage1_regions(maps, taus)
            # the colours only for a CRF, here or deferred: otherwise this pass would decode every image again
            rgb = colours(start, stop) if params is not None else None
            outs = self._finish(maps, found.weights[start:stop], taus, labels, cnt,
                                found.cosines[offsets[start]:offsets[stop]], [rgb], params, backend, False,
                                defaultdict(float))
            result = _result(outs, slice(0, stop - start), found.tau, found.conf[start:stop], found.prototype,
                             False, {}, start=start)
            if backend == "defer":
                result.crf_rgb = rgb
            yield result
            _tick(progress, "masks", stop)

    # -- shared steps -----------------------------------------------------------------------------------------
    def _weights(self, tokens: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
        """One whole group's tokens (n, P, C) -> stage-1 weights (n, P), as ``run_passes`` computes them: token
        sums micro-batch by micro-batch, the key transform once on the whole group's sums. On the CPU the numbers
        are then those of ``Stage1Head.forward`` on the group, whatever the micro-batch."""
        mb = micro_batch or self.micro_batch
        sums = torch.cat([tokens[s:s + mb].sum(dim=1) for s in range(0, len(tokens), mb)]) if len(tokens) \
            else tokens.sum(dim=1)
        key_sums = self.head.keys_from_token_sums(sums, tokens.shape[1])
        return self.head.weights(tokens, key_sums, key_sums.sum(dim=0), len(tokens), chunk=mb)

    def _tokens(self, groups: Sequence[np.ndarray], micro_batch: int | None = None) -> torch.Tensor:
        """Network pixels of several groups -> their tokens (N, P, C) float32 on the device, in micro-batches:
        packed across groups on CUDA, group by group on the CPU."""
        mb = micro_batch or self.micro_batch
        sizes = [int(g.shape[0]) for g in groups]
        total = sum(sizes)
        host = self._host_pixels(groups, total)
        if self.cuda:
            spans = [(s, min(s + mb, total)) for s in range(0, total, mb)]
        else:
            starts = np.concatenate([[0], np.cumsum(sizes)])
            spans = [(int(a + s), int(min(a + s + mb, b))) for a, b in zip(starts[:-1], starts[1:])
                     for s in range(0, b - a, mb)]
        out = torch.empty((total, self.backbone.num_patches, self.backbone.embed_dim), device=self.device)
        pixels = host.to(self.device, non_blocking=True)  # before the turn: overlaps the other caller's backbone
        if self.cuda:  # the pinned buffer is refilled by this thread's next call: not before this copy is done
            self._local.copied = torch.cuda.Event()
            self._local.copied.record()
        with self._backbone.turn():
            for start, stop in spans:
                out[start:stop] = self.backbone.tokens(self.backbone.preprocess(pixels[start:stop]), self.precision)
        return out

    def _host_pixels(self, groups: Sequence[np.ndarray], total: int) -> torch.Tensor:
        """The groups' pixels in one (N, 224, 224, 3) uint8 host tensor: pinned and reused per thread on CUDA."""
        shape = (total, *groups[0].shape[1:])
        if not self.cuda:
            host = torch.empty(shape, dtype=torch.uint8)
        else:
            need = int(np.prod(shape))
            copied = getattr(self._local, "copied", None)
            if copied is not None:
                copied.synchronize()
            buf = getattr(self._local, "pinned", None)
            if buf is None or buf.numel() < need:
                buf = self._local.pinned = torch.empty(need, dtype=torch.uint8, pin_memory=True)
            host = buf[:need].view(shape)
        view, start = host.numpy(), 0
        for g in groups:
            view[start:start + len(g)] = g
            start += len(g)
        return host

    def _stage1_regions(self, maps: torch.Tensor, taus: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 maps (n, 224, 224) on the device and tau (per image, or one) -> the stage-1 masks' region
        labels (n, 224, 224) int32 and counts (n,), on the host."""
        tau = torch.as_tensor(np.asarray(taus, np.float32), device=maps.device).reshape(-1, 1, 1)
        return label_regions((maps >= tau).to(torch.uint8).cpu().numpy())

    def _region_cosines(self, maps: torch.Tensor, taus: np.ndarray, tokens: torch.Tensor, prototypes: torch.Tensor,
                        group_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The region filter's measurements: stage-1 maps (n, 224, 224) on the device, tau per image (n,),
        tokens (n, P, C), the groups' prototypes (G, C) and each image's group (n,) -> the stage-1 masks' region
        labels (n, 224, 224) int32 and counts (n,), and cos(prototype, e_k) of every region (sum(counts),)."""
        labels, counts = self._stage1_regions(maps, taus)
        embeds = self._region_embeddings(labels, counts, tokens)
        return labels, counts, self._cosines(embeds, counts, prototypes, group_of)

    def _region_embeddings(self, labels: np.ndarray, counts: np.ndarray, tokens: torch.Tensor) -> torch.Tensor:
        """Every region's token sum (sum(counts), C), image by image: one matmul per image, as the reference
        filters each image, so CPU results are bit for bit its."""
        masks = torch.from_numpy(patch_masks(labels, counts, self.grid)).to(self.device, non_blocking=True)
        out, start = [], 0
        for i, count in enumerate(counts):
            if count:
                out.append(region_embeddings(masks[start:start + count], tokens[i]))
            start += count
        return torch.cat(out) if out else tokens.new_zeros((0, tokens.shape[-1]))

    def _cosines(self, embeds: torch.Tensor, counts: np.ndarray, prototypes: torch.Tensor,
                 group_of: np.ndarray) -> np.ndarray:
        """Region embeddings -> cos(prototype of the image's group, e_k) for every region, on the host."""
        out, start = [], 0
        for i, count in enumerate(counts):
            if count:
                out.append(prototype_cosines(prototypes[group_of[i]], embeds[start:start + count]))
            start += count
        return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, np.float32)

    def _finish(self, maps: torch.Tensor, weights: torch.Tensor, taus: np.ndarray, labels: np.ndarray,
                counts: np.ndarray, cosines: np.ndarray, crf_rgb: list, params: CRFParams | None, backend: str,
                details: bool, timings: dict) -> dict:
        """Region filter decisions and the CRF for n images whose stage 1 is done. Returns per-image arrays."""
        n = len(counts)
        with self._timed(timings, "stage2"):
            _, keep, kept = keep_regions(cosines, counts)
            stage2 = stage2_masks(labels, counts, keep)
            fallback = counts == 0
            final = stage2 * np.uint8(255)
            fb = np.flatnonzero(fallback)
            if len(fb):  # no region: the paper code keeps the continuous stage-1 map (np.uint8(map * 255))
                final[fb] = (maps[torch.from_numpy(fb).to(self.device)] * 255).to(torch.uint8).cpu().numpy()
        run_crf = params is not None and backend != "defer"
        with self._timed(timings, "crf"):
            todo = np.flatnonzero(~fallback) if run_crf else np.zeros(0, np.int64)
            if len(todo):
                rgb = _concat_rgb(crf_rgb, n)
                final[todo] = self._crf(rgb[todo], stage2[todo], params, backend) * np.uint8(255)
        out = {"stage2": stage2, "final": final, "fallback": fallback, "found": counts, "kept": kept,
               "applied": params is None or run_crf}
        if details:
            maps_np = maps.cpu().numpy()
            out["details"] = {
                "weights": weights.cpu().numpy(), "maps": maps_np,
                "mask": maps_np >= np.asarray(taus, np.float32).reshape(-1, 1, 1),
                "stage2": np.where(fallback[:, None, None], maps_np, stage2.astype(np.float32)),
                "final": np.where(fallback[:, None, None], maps_np, (final // 255).astype(np.float32)),
            }
        return out

    def _crf(self, rgb: np.ndarray, labels: np.ndarray, params: CRFParams, backend: str) -> np.ndarray:
        """The dense CRF on m images: rgb (m, 224, 224, 3) uint8, labels (m, 224, 224) 0/1 -> labels uint8."""
        if backend == "torch":
            from .crf import dense_crf_torch

            def run(a: int, b: int) -> np.ndarray:
                return dense_crf_torch(torch.from_numpy(np.ascontiguousarray(rgb[a:b])).to(self.device),
                                       torch.from_numpy(np.ascontiguousarray(labels[a:b])).to(self.device),
                                       params).to(torch.uint8).cpu().numpy()

            def split(a: int, b: int) -> np.ndarray:
                try:
                    return run(a, b)
                except LatticeTooLarge:  # colours scaled so finely (small srgb) that these images' keys overflow
                    if b - a == 1:
                        raise
                    mid = (a + b) // 2
                    return np.concatenate([split(a, mid), split(mid, b)])

            pieces = [(a, min(a + TORCH_CRF_IMAGES, len(labels))) for a in range(0, len(labels), TORCH_CRF_IMAGES)]
            outs = []
            # The first call per key builds the cached Gaussian lattice that other threads' streams then read: it
            # runs alone and is synchronised before anyone else uses that lattice.
            key = (int(labels.shape[1]), int(labels.shape[2]), float(params.gaussian_sxy))
            if key not in self._crf_warm:
                with self._backbone.lock:
                    outs.append(split(*pieces.pop(0)))
                    if self.cuda:
                        torch.cuda.synchronize(self.device)
                    self._crf_warm.add(key)
            outs += [split(a, b) for a, b in pieces]
            return np.concatenate(outs)
        pool = self._crf_pool() if len(labels) > 1 else None
        if pool is not None:
            return np.stack(list(pool.map(dense_crf, list(rgb), list(labels), [params] * len(labels))))
        return np.stack([dense_crf(r, lab, params) for r, lab in zip(rgb, labels)])

    def _crf_pool(self) -> ProcessPoolExecutor | None:
        # pydensecrf holds the GIL, so a group's CRFs run in parallel only in processes (spawned: no torch fork).
        if self.crf_workers < 2:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.crf_workers, mp_context=multiprocessing.get_context("spawn"))
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    @contextmanager
    def _timed(self, timings: dict, key: str):
        start = time.perf_counter()
        yield
        if self.profile and self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        timings[key] += time.perf_counter() - start


class DeviceQueue:
    """Work that concurrent callers queue on one device runs one caller's after the other's.

    On CUDA each calling thread has its own stream (``thread_stream``); left alone, two threads' backbone batches
    share the device and finish together, and then both threads do their CPU steps while the device idles. In
    turns, each caller's stream waits (on the device, not the host) for the work queued in the turn before, so one
    caller's CPU steps run while the other's backbone does. The lock also keeps process-wide switches (the
    number format's) to one caller at a time. Elsewhere only the lock."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self._done: torch.cuda.Event | None = None  # the end of the work queued in the last turn (CUDA)

    @contextmanager
    def turn(self):
        """Queue work on the current stream inside this; it runs after the work of the turns before."""
        cuda = self.device.type == "cuda"
        with self.lock:
            if cuda and self._done is not None:
                torch.cuda.current_stream(self.device).wait_event(self._done)
            yield
            if cuda:
                self._done = torch.cuda.Event()
                self._done.record(torch.cuda.current_stream(self.device))


@contextmanager
def thread_stream(device: torch.device, local: threading.local):
    """On CUDA each calling thread queues its work on a stream of its own (kept in ``local``): a thread waiting
    for its copies back waits for its own work only, so two threads keep the device busy in turn. Elsewhere a
    no-op."""
    if device.type != "cuda":
        yield
        return
    stream = getattr(local, "stream", None)
    if stream is None:
        stream = local.stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


class SpillFile:
    """Rows of a fixed size on a local disk, written in order, read back by range: an unnamed temporary file (gone
    with the process, whatever happens to it), in the dtype written, so reads give the same numbers. A group's
    tokens between the engine's passes (float32), or its decoded views (uint8, the pipeline). A failed write or
    read closes it, and it reads nothing more: the caller recomputes."""

    _reserved = 0  # bytes the open spill files of this process have yet to write: two groups at once, one disk
    _lock = threading.Lock()

    def __init__(self, fd: int, per_image: int, size: int, dtype: np.dtype):
        self.fd, self.per_image, self.size, self.dtype, self.written = fd, per_image, size, dtype, 0
        self.unwritten = size  # of its reservation; what it wrote already shows in the disk's free space

    @classmethod
    def open(cls, folder: str, n: int, per_image: int, margin: int = 2**30, dtype=np.float32) -> "SpillFile | None":
        """A file for ``n`` rows of ``per_image`` values of ``dtype`` in ``folder``, or None: when the disk lacks
        room (twice the file beside what the other open ones have yet to write, plus ``margin``: others write
        there too), when ``folder`` is RAM-backed (tmpfs: memory that no resource request covers), or when it
        cannot be written."""
        dtype = np.dtype(dtype)
        size = n * per_image * dtype.itemsize
        if not hasattr(os, "preadv") or _memory_fs(folder):
            return None
        try:
            with cls._lock:
                if shutil.disk_usage(folder).free - cls._reserved < 2 * size + margin:
                    return None
                fd, path = tempfile.mkstemp(dir=folder, prefix="scosparc-spill-")
                try:
                    os.unlink(path)
                except OSError:
                    os.close(fd)
                    raise
                cls._reserved += size
            return cls(fd, per_image, size, dtype)
        except OSError:
            return None

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        """The next rows (m, ...) of ``per_image`` values each, in the file's dtype (tokens (m, P, C) float32)."""
        if self.fd < 0 or not len(rows):
            return
        rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
        data = memoryview(np.ascontiguousarray(rows, self.dtype)).cast("B")
        offset = self.written * self.per_image * self.dtype.itemsize
        try:
            while data:
                done = os.pwrite(self.fd, data, offset)
                data, offset = data[done:], offset + done
        except OSError:
            self.close()
            return
        self.written += len(rows)
        with SpillFile._lock:
            done = min(self.unwritten, len(rows) * self.per_image * self.dtype.itemsize)
            self.unwritten -= done
            SpillFile._reserved -= done

    def read(self, start: int, stop: int) -> np.ndarray | None:
        """Rows start..stop-1 -> (stop - start, per_image) of the file's dtype; None when they are not there to
        read."""
        if self.fd < 0 or stop > self.written:
            return None
        buf = np.empty((stop - start, self.per_image), self.dtype)
        if start == stop:
            return buf
        view, offset = memoryview(buf).cast("B"), start * self.per_image * self.dtype.itemsize
        try:
            while view:
                got = os.preadv(self.fd, [view[:2**30]], offset)  # into the array; Linux reads < 2 GiB a call
                if not got:
                    raise OSError("spill file ended early")
                view, offset = view[got:], offset + got
        except OSError:
            self.close()
            return None
        return buf

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            with SpillFile._lock:
                SpillFile._reserved -= self.unwritten
                self.unwritten = 0

    def __enter__(self) -> "SpillFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _memory_fs(folder: str) -> bool:
    """Whether ``folder`` is on a RAM-backed filesystem (Linux's mount table; False where there is none)."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return False
    path = os.path.realpath(folder)
    mount = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
                key=lambda m: len(m[0]), default=None)
    return mount is not None and mount[1] in ("tmpfs", "ramfs")


def _tick(progress, step: str, done: int) -> None:
    if progress is not None:
        progress(step, done)


def _concat_rgb(crf_rgb: list, n: int) -> np.ndarray:
    parts = [r for r in crf_rgb if r is not None]
    if len(parts) != len(crf_rgb) or not parts:
        raise ValueError("the CRF needs every image's colour input (crf_rgb)")
    rgb = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if len(rgb) != n:
        raise ValueError(f"{len(rgb)} CRF colour inputs for {n} images")
    return rgb


def _result(outs: dict, sl: slice, tau: tuple[float, float], conf: np.ndarray, prototype: torch.Tensor,
            details: bool, timings: dict, start: int = 0) -> GroupResult:
    d = None
    if details:
        dd = outs["details"]
        d = GroupDetails(stage1_weights=dd["weights"][sl], stage1_map=dd["maps"][sl], stage1_mask=dd["mask"][sl],
                         prototype=prototype.float().cpu().numpy(), stage2_mask=dd["stage2"][sl],
                         mask=dd["final"][sl])
    return GroupResult(confidence=tau[0], threshold=tau[1], image_confidence=np.asarray(conf, np.float32),
                       regions_found=outs["found"][sl], regions_kept=outs["kept"][sl], fallback=outs["fallback"][sl],
                       stage2=outs["stage2"][sl], final=outs["final"][sl], crf_applied=outs["applied"], start=start,
                       details=d, timings=timings)


def _empty_result(details: bool, dim: int, grid: tuple[int, int]) -> GroupResult:
    z = np.zeros((0, 224, 224), np.uint8)
    d = None
    if details:
        f = np.zeros((0, 224, 224), np.float32)
        d = GroupDetails(np.zeros((0, grid[0] * grid[1]), np.float32), f, f.astype(bool), np.zeros(dim, np.float32),
                         f, f)
    return GroupResult(float("nan"), float("nan"), np.zeros(0, np.float32), np.zeros(0, np.int64),
                       np.zeros(0, np.int64), np.zeros(0, bool), z, z, True, details=d)
