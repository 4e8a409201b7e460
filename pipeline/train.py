"""Self-supervised training of the stage-1 head with Ray Train (DDP).

Each step, every worker takes its own group and samples at most 24 of its images; the backbone is frozen, and its
features come from the feature cache when it is on. Every epoch: a checkpoint (official head format, optimizer,
state) through Ray Train, ``head_last.pt`` beside it, and, every ``val_every`` epochs, validation on a set with
ground truth that keeps ``head_best.pt``; the per-epoch history goes to ``metrics.parquet``.

Storage under ``<storage>/<name>/``: ``train_config.json`` (settings and the fingerprint of what decides the
result, written first), Ray Train's checkpoints, head_last.pt, head_best.pt, metrics.parquet; the feature cache
under ``<storage>/feature-cache/`` unless told otherwise. Running again with the same name resumes from the last
checkpoint, unless data, weights or settings that change the result differ: that run is refused, naming what
differs. A failed worker is restarted from the last checkpoint (Ray Train's FailureConfig).

Resources. Before anything runs, the job checks within ``placement_timeout`` seconds that the cluster can place
the workers (a placement group of their bundles), and fails with a message naming the missing resource: without
it, a request Ray cannot meet waits for ever (Ray Data's actor pool waits for its actors, and Ray Train retries a
worker group that did not start without limit). The check runs again after the feature-cache pass, so training
starts only once the pass's actors have given their GPUs back.

Collectives: NCCL when every worker has a GPU of its own and there are several; gloo otherwise. Workers that
share one GPU (``gpus_per_worker`` < 1) cannot use NCCL (it refuses two ranks on one device), and a single worker
has no one to talk to. The epoch's sums and the parameter check travel on the backend's device (NCCL has no CPU
tensors).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from scosparc_core import Stage1Head, load_head_checkpoint, save_head_checkpoint, training_loss
from scosparc_core.checkpoints import check_checkpoints, head_state_dict
from scosparc_core.image import INPUT_SIZE
from scosparc_core.metrics import aggregate, image_metrics
from scosparc_core.modeling import DEFAULT_BACKBONE, DinoBackbone
from scosparc_core.precision import PRECISIONS
from scosparc_core.threshold import adaptive_threshold, image_confidences, stage1_map

from .decode import decode_network_views, read_gt, read_many
from .errors import Refusals
from .feature_cache import (BackboneSettings, FeatureCache, backbone_id, build_backbone, build_cache,
                            cache_folder, check_cuda, features, plan_cache)
from .lease import Lease
from .listing import GroupSpec, list_layout, normal_extensions
from .resources import check_placement
from .storage import Storage, URLOptions, redact

ADAM = {"lr": 1e-4, "weight_decay": 1e-4, "betas": (0.9, 0.99)}  # the paper's optimizer
HISTORY = "metrics.parquet"
NO_STEP = "_no_training_step.json"  # left by the workers when an epoch had no image that decoded
BEST = "head_best.pt"
RUN_RECORD = "train_config.json"


class NoUsableGroupsError(RuntimeError):
    """Every training group's images failed to decode (e.g. workers without access to the data)."""


class RunMismatchError(ValueError):
    """A run of that name exists and was started with other data, weights or settings."""


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...]
    storage: str
    name: str
    val: str | None = None
    layout: str = "auto"  # auto | cosod | groups (pipeline.listing)
    extensions: tuple[str, ...] = ()  # the roots' image files (lowercase, no dot); (): every file is an image
    epochs: int = 150
    val_every: int = 1
    max_images: int = 24
    lr: float = ADAM["lr"]
    weight_decay: float = ADAM["weight_decay"]
    workers: int = 1
    gpu: bool = False
    gpus_per_worker: float = 1.0  # with gpu: < 1 lets workers share a GPU (gloo then, see the module docstring)
    cpus_per_worker: float = 1.0
    placement_timeout: float = 180.0  # seconds to wait for the cluster to place workers and cache actors
    feature_cache: bool = True
    cache_url: str | None = None
    backbone: str | None = None
    backbone_name: str = DEFAULT_BACKBONE
    backbone_kwargs: dict = field(default_factory=dict)
    random_init: bool = False  # random backbone when none is given (tests)
    init_head: str | None = None
    dtype: str = "auto"
    micro_batch: int = 32
    seed: int = 0
    max_failures: int = 3
    storage_options: dict = field(default_factory=dict)
    fail_at_epoch: int | None = None  # fault injection for tests: rank 0 is killed once, mid-way through this epoch

    def __post_init__(self):
        object.__setattr__(self, "data", tuple([self.data] if isinstance(self.data, str) else self.data))
        if self.extensions:  # as the listing reads them, once ("JPG,.png" -> ("jpg", "png"))
            object.__setattr__(self, "extensions", normal_extensions(self.extensions))
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(PRECISIONS)}")
        if self.gpu and not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}: a worker drives one GPU")
        for name in ("epochs", "val_every", "max_images", "micro_batch", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        # Adam refuses these only in each worker, after the cache pass; Ray Train reads -1 failures as unlimited
        # retries; a worker bundle without CPUs is empty without --gpu; a wait of 0 s cannot place anything
        for name in ("lr", "cpus_per_worker", "placement_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("weight_decay", "max_failures"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")

    def run_url(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def backend(self) -> str:
        return "nccl" if self.gpu and self.workers > 1 and self.gpus_per_worker >= 1 else "gloo"

    @property
    def worker_resources(self) -> dict:
        """One worker's bundle: what Ray Train reserves per worker."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpu else {})}

    def backbone_settings(self) -> BackboneSettings:
        return BackboneSettings(checkpoint=self.backbone, name=self.backbone_name, kwargs=dict(self.backbone_kwargs),
                                random_init=self.random_init, precision=self.dtype, micro_batch=self.micro_batch,
                                gpu=self.gpu, storage_options=self.storage_options)


@dataclass(frozen=True)
class TrainGroup:
    """A group as training reads it. With the feature cache: its cached rows (the images that decoded, in row
    order) and the version of their arrays, as the cache pass found them; without: the images listed."""

    root: str
    key: str
    image_uris: tuple[str, ...]
    gt_uris: tuple[str | None, ...]
    version: str | None = None


@dataclass(frozen=True)
class LoopSettings:
    """Everything a training worker needs (travels to the Ray Train workers)."""

    backbone: BackboneSettings
    groups: tuple[TrainGroup, ...]
    val_groups: tuple[TrainGroup, ...]
    cache_folders: dict  # data root -> feature cache folder; empty without the cache
    run_url: str
    storage_options: dict
    dim: int
    epochs: int
    val_every: int
    max_images: int
    lr: float
    weight_decay: float
    seed: int
    backend: str
    init_head: str | None = None
    fail_at_epoch: int | None = None


# ---------------------------------------------------------------------------------------------------- data
class GroupFeatures:
    """Tokens and CLS attention for sampled images of a group, on the worker's device: from the cache (read one
    step ahead in a thread, so storage latency overlaps the step), or through the backbone."""

    def __init__(self, settings: LoopSettings, device: torch.device):
        self.settings = settings
        self.device = device
        self.caches = {root: FeatureCache(url, settings.storage_options)
                       for root, url in settings.cache_folders.items()}
        self._backbone = None

    def get(self, group: TrainGroup, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        cache = self.caches.get(group.root)
        if cache is not None:
            tokens, attention = cache.read(group.key, group.version, rows, self.device)
            return tokens, attention, [group.image_uris[r] for r in rows]
        if self._backbone is None:
            self._backbone = build_backbone(self.settings.backbone)
        uris = [group.image_uris[r] for r in rows]
        ok, pixels = decode_network_views(uris, self.settings.storage_options, "train")
        kept = [u for u, good in zip(uris, ok) if good]
        if not kept:
            return torch.zeros(0), torch.zeros(0), []
        backbone, device, dtype = self._backbone
        tokens, attention = features(backbone, pixels, device, dtype, self.settings.backbone.micro_batch)
        # clone: the backbone ran in inference mode, and autograd may not save such tensors for the head's backward
        return tokens.clone(), attention.clone(), kept

    def stream(self, requests: list[tuple[TrainGroup, list[int]]]):
        """Yields ``get`` for each (group, rows), in order."""
        if not self.caches:
            for group, rows in requests:
                yield self.get(group, rows)
            return
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.get, *requests[0]) if requests else None
            for i in range(len(requests)):
                result = pending.result()
                if i + 1 < len(requests):
                    pending = pool.submit(self.get, *requests[i + 1])
                yield result


def epoch_assignment(n_groups: int, epoch: int, rank: int, world: int, seed: int) -> list[int]:
    """This worker's groups for an epoch: a shuffled pass over all groups, split evenly; every worker gets the
    same number of steps (the shortest shares wrap around), as DDP needs."""
    order = np.random.default_rng([seed, epoch]).permutation(n_groups)
    steps = math.ceil(n_groups / world)
    padded = np.resize(order, steps * world)
    return [int(g) for g in padded[rank::world]]


def sample_rows(n: int, k: int, seed: int, epoch: int, group: int) -> list[int]:
    """At most ``k`` distinct images of a group of ``n``, sampled at random (sorted for ranged reads)."""
    rng = np.random.default_rng([seed, epoch, group, 1])
    return sorted(int(i) for i in rng.choice(n, size=min(n, k), replace=False))


def head_digest(head: torch.nn.Module) -> str:
    """sha256 of the head's official-format state_dict: each key (sorted, UTF-8) then its float32 bytes (C order,
    little-endian). Names the exact weights a history row or a head file holds."""
    return state_digest(head_state_dict(head))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- validation
def _score_chunk(masks: np.ndarray, gts: np.ndarray) -> list[dict]:
    return [image_metrics(m, g) for m, g in zip(masks, gts)]


def score_images(masks: list[np.ndarray], gts: list[np.ndarray]) -> list[dict]:
    """Per-image metrics (pysodmetrics: ~30 ms an image on one core) as Ray tasks over the cluster's free CPUs,
    or here when fewer than two are free (a request that cannot be met must not stall the epoch)."""
    import ray

    free = int(ray.available_resources().get("CPU", 0)) if ray.is_initialized() else 0
    tasks = min(free, math.ceil(len(masks) / 16))
    if tasks < 2:
        return _score_chunk(np.asarray(masks), np.asarray(gts))
    remote = ray.remote(num_cpus=1)(_score_chunk)
    bounds = np.linspace(0, len(masks), tasks + 1).astype(int)
    refs = [remote.remote(np.asarray(masks[a:b]), np.asarray(gts[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    return [row for chunk in ray.get(refs) for row in chunk]


def validate(head: torch.nn.Module, groups: tuple[TrainGroup, ...], source: GroupFeatures, gts: dict) -> dict:
    """Max-F and the other CoSOD metrics of the stage-1 masks (224x224) against ground truth resized to 224
    (nearest), as the paper code validates; averaged over images."""
    masks, targets = [], []
    head.eval()
    with torch.inference_mode():
        for group in groups:
            tokens, _, uris = source.get(group, list(range(len(group.image_uris))))
            if not uris:
                continue
            side = math.isqrt(tokens.shape[1])  # square patch grid (28x28 for ViT-B/8 at 224)
            maps = stage1_map(head(tokens), (side, side))
            _, tau = adaptive_threshold(image_confidences(maps, (side, side)))
            binary = (maps.cpu().numpy() >= np.float32(tau)).astype(np.uint8) * 255
            for uri, mask in zip(uris, binary):
                if uri in gts:
                    masks.append(mask)
                    targets.append(gts[uri])
    head.train()
    if not masks:
        return {}
    agg = aggregate(score_images(masks, targets))
    return {f"val_{k}": float(agg[k]) for k in ("max_fm", "mean_fm", "adp_fm", "sm", "max_em", "mean_em", "mae", "wfm")}


def load_val_gts(groups: tuple[TrainGroup, ...], options: dict) -> dict:
    """image URI -> ground truth (224, 224) uint8 0/255 (nearest resize, >128 object)."""
    import cv2

    pairs = [(u, g) for group in groups for u, g in zip(group.image_uris, group.gt_uris) if g]
    out = {}
    for (uri, _), data in zip(pairs, read_many([g for _, g in pairs], options)):
        try:
            out[uri] = cv2.resize(read_gt(data), (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_NEAREST)
        except Exception as exc:  # noqa: BLE001 - that image is left out of validation
            print(f"[train] no ground truth for {uri}: {exc}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------- the loop
def train_loop_per_worker(s: LoopSettings) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if s.backbone.gpu:
        check_cuda(f"training worker {rank}")
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # a resumed run must equal an uninterrupted one
    comm = device if s.backend == "nccl" else torch.device("cpu")
    attempt = uuid.uuid4().hex[:12]  # this start of the loop: a history row keeps the attempt that wrote it
    run = Storage(s.run_url, s.storage_options)
    source = GroupFeatures(s, device)

    torch.manual_seed(s.seed)
    head = Stage1Head(s.dim)
    if s.init_head:
        load_head_checkpoint(head, s.init_head, URLOptions(s.storage_options))
    state = {"epoch": 0, "best_max_fm": None, "best_epoch": None, "history": []}
    optimizer_state = None
    best_head = None  # head_best.pt's bytes; every checkpoint keeps them, so a restart goes back to its own best
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            load_head_checkpoint(head, os.path.join(folder, "head.pt"))
            optimizer_state = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(folder, "state.json")) as f:
                state = json.load(f)
            if os.path.exists(os.path.join(folder, BEST)):
                with open(os.path.join(folder, BEST), "rb") as f:
                    best_head = f.read()
    if rank == 0 and best_head is not None:
        run.write_bytes(BEST, best_head)  # a worker that died after the checkpoint, before publishing it
    model = ray.train.torch.prepare_model(head)
    module = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=ADAM["betas"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    gts = load_val_gts(s.val_groups, s.storage_options) if rank == 0 and s.val_groups else {}

    for epoch in range(state["epoch"], s.epochs):
        start = time.monotonic()
        sums = torch.zeros(4, dtype=torch.float64, device=comm)  # loss, co, sal, steps
        order = epoch_assignment(len(s.groups), epoch, rank, world, s.seed)
        requests = [(s.groups[gi], sample_rows(len(s.groups[gi].image_uris), s.max_images, s.seed, epoch, gi))
                    for gi in order]
        for step, (tokens, attention, _) in enumerate(source.stream(requests)):
            if step == 1:
                _maybe_die(s, run, epoch, rank)
            if not s.cache_folders:
                # without the cache a step may have no image that decoded (with it, every cached row has
                # features); DDP all-reduces in every worker's backward, so the workers agree first
                having = _all_reduce(torch.tensor([float(len(tokens) > 0)], device=comm))
                if not having.item():
                    continue  # nobody has data: no step anywhere (Adam's weight decay alone would move weights)
            if len(tokens):
                parts = training_loss(tokens, attention.reshape(len(tokens), -1), model(tokens))
                loss = parts.loss
                sums += torch.stack([parts.loss.detach(), parts.co.detach(), parts.sal.detach(),
                                     torch.ones((), device=tokens.device)]).to(sums)
            else:  # others have data: a forward through DDP that counts for nothing joins their all-reduce
                loss = model(torch.zeros(1, 1, s.dim, device=device)).sum() * 0
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sums = _all_reduce(sums).cpu()
        seconds = time.monotonic() - start
        steps = sums[3].item()
        if not steps:
            # every worker sees the same sums, so they stop together; rank 0 leaves the reason for the driver (an
            # exception here races Ray Train's teardown, which may blame a dead worker instead, and a report's
            # metrics reach the driver only with a checkpoint)
            if rank == 0:
                run.write_json(NO_STEP, {"epoch": epoch, "groups": len(s.groups)})
            return
        metrics = {"epoch": epoch, "loss": sums[0].item() / steps, "loss_co": sums[1].item() / steps,
                   "loss_sal": sums[2].item() / steps, "groups_per_s": sums[3].item() / seconds,
                   "epoch_seconds": seconds, "workers": world, "params_identical": _params_identical(module, comm),
                   "head_sha256": head_digest(module), "attempt": attempt,
                   "finished_at": datetime.now(timezone.utc).isoformat()}
        validated = rank == 0 and bool(s.val_groups) and (epoch + 1) % s.val_every == 0
        if validated:
            t0 = time.monotonic()
            metrics.update(validate(module, s.val_groups, source, gts))
            metrics["val_seconds"] = time.monotonic() - t0
        improved = False
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                improved = validated and "val_max_fm" in metrics and (
                    state["best_max_fm"] is None or metrics["val_max_fm"] > state["best_max_fm"])
                if improved:
                    state["best_max_fm"], state["best_epoch"] = metrics["val_max_fm"], epoch
                    best_head = _head_bytes(module)
                state["epoch"] = epoch + 1
                state["history"].append(metrics)
                save_head_checkpoint(module, os.path.join(folder, "head.pt"))
                torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
                with open(os.path.join(folder, "state.json"), "w") as f:
                    json.dump(state, f)
                if best_head is not None:
                    with open(os.path.join(folder, BEST), "wb") as f:
                        f.write(best_head)
                run.write_bytes("head_last.pt", _head_bytes(module))
                _write_history(run, state["history"])
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
                _print_epoch(metrics, state, s.epochs)
            ray.train.report(metrics, checkpoint=report_checkpoint)
        # Ray Train registers a checkpoint only when its controller polls the workers (every 2 s): a worker that
        # died before that poll would lose the epoch's checkpoint, and the run would resume from an older one.
        # A worker holds one unpolled report at most, so a second report (no checkpoint) returns only once the
        # controller has taken the first.
        ray.train.report(metrics)
        if improved:
            # only now that its checkpoint is registered: a restart cannot go back to before this best, so
            # head_best.pt never holds an attempt that was thrown away
            run.write_bytes(BEST, best_head)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _params_identical(module: torch.nn.Module, device: torch.device | str = "cpu") -> bool | None:
    """Whether every worker holds bit-identical parameters (DDP's promise): each rank's sha256 of its parameter
    bytes, all-gathered and compared. None when there is nothing to compare (no process group, or one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digest = torch.tensor(list(h.digest()), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _write_history(run: Storage, history: list[dict]) -> None:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(history).to_parquet(buf, index=False)
    run.write_bytes(HISTORY, buf.getvalue())


def _head_bytes(module) -> bytes:
    buf = io.BytesIO()
    save_head_checkpoint(module, buf)
    return buf.getvalue()


def _print_epoch(m: dict, state: dict, epochs: int) -> None:
    done = m["epoch"] + 1
    eta = (epochs - done) * (m["epoch_seconds"] + m.get("val_seconds", 0.0))
    val = ""
    if "val_max_fm" in m:
        val = (f"  val max-F {m['val_max_fm']:.4f} (best {state['best_max_fm']:.4f} @ epoch {state['best_epoch'] + 1}, "
               f"{m['val_seconds']:.1f}s)")
    print(f"[train] epoch {done}/{epochs}  loss {m['loss']:.4f} (co {m['loss_co']:.4f}, sal {m['loss_sal']:.4f})"
          f"{val}  {m['groups_per_s']:.2f} groups/s  {m['epoch_seconds']:.1f}s/epoch  eta {eta:.0f}s", flush=True)


def _maybe_die(s: LoopSettings, run: Storage, epoch: int, rank: int) -> None:
    """Fault injection (tests): rank 0's process is killed (SIGKILL) mid-epoch, once per run."""
    if s.fail_at_epoch != epoch or rank != 0 or run.exists("_injected_failure"):
        return
    import signal

    run.write_bytes("_injected_failure", f"killed mid-way through epoch {epoch + 1}".encode())
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------- what a run is made of
def listing_digest(root: str, groups: list[GroupSpec]) -> str:
    """The data a run saw: every listed image (by path under the root and size) and ground truth (by path)."""
    prefix = Storage(root).url().rstrip("/") + "/"
    h = hashlib.sha256()
    for spec in groups:
        for im in spec.images:
            h.update(f"{im.image_uri.removeprefix(prefix)}\t{im.size}\n".encode())
            if im.gt_uri:
                h.update(f"{im.gt_uri.removeprefix(prefix)}\n".encode())
    return h.hexdigest()


def fingerprint(cfg: TrainConfig, digests: dict[str, str], weights: str | None, init_head: str | None) -> dict:
    """What decides a run's result; a run resumes only under the same fingerprint. As JSON gives it back (tuples
    become lists), so that it compares equal to the recorded one."""
    return json.loads(json.dumps({
        # the listings, not how they were made: --layout and --extensions act through them alone, so a filter
        # that lists the same files resumes its run and one that lists others is refused as other data
        "data": [digests[r] for r in cfg.data],
        "val": digests[cfg.val] if cfg.val else None,
        "backbone": weights or ("random-init" if cfg.random_init else "timm-pretrained"),
        "backbone_name": cfg.backbone_name,
        "backbone_kwargs": dict(cfg.backbone_kwargs),
        "init_head": init_head,
        "precision": cfg.backbone_settings().resolved_precision,
        "feature_cache": cfg.feature_cache,
        "max_images": cfg.max_images,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "workers": cfg.workers,
    }, sort_keys=True, default=str))


def claim_run(run: Storage, cfg: TrainConfig, fp: dict) -> dict | None:
    """Records the run's settings and fingerprint (returns that record); a run there with another fingerprint
    is refused, naming each difference, and so are fewer epochs than it has done. Settings outside the
    fingerprint (more epochs, resources) may change. None, writing nothing: the run has its epochs already."""
    try:
        before = run.read_json(RUN_RECORD) if run.exists(RUN_RECORD) else None
        if before is not None and not isinstance(before, dict):
            raise ValueError(f"a {type(before).__name__}, not an object")
    except ValueError as exc:  # JSONDecodeError too
        raise RunMismatchError(
            f"{redact(run.url(RUN_RECORD))} is damaged ({exc}): without it this run's settings cannot be "
            "checked, so it is not resumed. Give another --name (or --storage) for a new run.") from None
    old = (before or {}).get("fingerprint")
    if old is not None and old != fp and has_progress(run):
        diffs = [f"{k}: was {_short(old.get(k))}, now {_short(fp.get(k))}" for k in sorted(set(old) | set(fp))
                 if old.get(k) != fp.get(k)]
        raise RunMismatchError(
            f"{redact(cfg.run_url())} holds a run started with other data, weights or settings, so it is not resumed "
            f"({'; '.join(diffs)}). Give another --name (or --storage) for a new run, or the original settings "
            "to resume it.")
    done = epochs_done(run)
    if cfg.epochs < done:
        raise ValueError(f"{redact(cfg.run_url())} has trained {done} epochs, more than --epochs {cfg.epochs}: "
                         f"give --epochs {done} or more to resume it, or another --name for a new run")
    if done and cfg.epochs == done:
        return None
    record = {"settings": redact(asdict(cfg)), "fingerprint": fp, "resumed": has_progress(run)}
    run.write_json(RUN_RECORD, record)
    return record


def epochs_done(run: Storage) -> int:
    """Epochs the run's history holds (0 without one)."""
    import pandas as pd

    if not run.exists(HISTORY):
        return 0
    epochs = pd.read_parquet(io.BytesIO(run.fs.cat_file(run.path(HISTORY))), columns=["epoch"])["epoch"]
    return int(epochs.max()) + 1 if len(epochs) else 0


def has_progress(run: Storage) -> bool:
    """Whether a run has trained anything (a history or a Ray Train checkpoint): a run that never started an
    epoch (say, refused by the cluster) may be started again with other settings."""
    if run.exists(HISTORY):
        return True
    return run.exists() and any(p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")
                                for p in run.fs.ls(run.base, detail=False))


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 90 else text[:87] + "..."


@contextlib.contextmanager
def _worker_start_timeout(seconds: float):
    """Ray Train's own bound on starting a worker group (it reads this variable, and passes it on)."""
    name = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    before = os.environ.get(name)
    if before is None:
        os.environ[name] = str(max(1.0, float(seconds)))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)


# ---------------------------------------------------------------------------------------------- driver
def run_training(cfg: TrainConfig):
    """Lists the data, checks the run and the cluster, fills the feature cache (if on), then runs the
    TorchTrainer. Returns the ray.train.Result, or None when the run has its epochs already.

    All that comes before Ray Train checks or prepares the run, inside one Refusals: a failure there (data,
    weights, storage, the run's record, the lease, a cluster that cannot place the workers or the cache actors,
    data none of whose images decode) is raised with ``before_work``, which the CLI prints as one line and exits
    2 on. The feature-cache pass is inside too: what stops it is, short of a bug, the cluster, the weights or the
    data refusing the job, and what it filled a re-run reuses."""
    import pyarrow.fs
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    roots = list(dict.fromkeys([*cfg.data, *([cfg.val] if cfg.val else [])]))
    refusals = Refusals()
    with contextlib.ExitStack() as stack:
        stack.push(refusals)  # first in, so last out: it sees what the lease and Ray's shutdown let through
        listed = _list_roots(cfg, roots)
        dim = DinoBackbone.width(cfg.backbone_name, **cfg.backbone_kwargs)
        # both read on the driver, as the inference job does: a file that carries code, a backbone of another
        # architecture or a head of another width stops the job here, before anything is written (not in every
        # worker, after the feature-cache pass)
        digests = check_checkpoints(cfg.backbone, cfg.init_head, cfg.backbone_name, cfg.backbone_kwargs,
                                    URLOptions(cfg.storage_options), pretrained=not cfg.random_init)
        weights, init_head = digests.get("backbone"), digests.get("head")
        fp = fingerprint(cfg, {r: listing_digest(r, listed[r]) for r in roots}, weights, init_head)
        run = Storage(cfg.run_url(), cfg.storage_options)
        # one job per run, as for inference: a second submit of the same --name would interleave checkpoints;
        # a lost lease stops this one (LeaseLost) before it writes more
        try:
            stack.enter_context(Lease(run, holder={"job": "train"}, stop_main=True))
        except OSError as exc:  # the first write of the run: say which folder it was
            raise OSError(f"cannot write the run folder {redact(cfg.run_url())} ({exc})") from exc
        record = claim_run(run, cfg, fp)
        if record is None:
            print(f"[train] {redact(cfg.run_url())} is already complete: it has its {cfg.epochs} epochs, nothing "
                  "to do (give more --epochs to train on)", file=sys.stderr, flush=True)
            return None
        print(f"[train] {'resuming' if record['resumed'] else 'new run'} {redact(cfg.run_url())}: "
              f"{sum(len(listed[r]) for r in cfg.data)} training groups, "
              f"{sum(len(s.images) for r in cfg.data for s in listed[r])} images; validation: "
              f"{len(listed[cfg.val]) if cfg.val else 0} groups; {cfg.workers} worker(s) x {cfg.worker_resources}, "
              f"{cfg.backend}", file=sys.stderr, flush=True)

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
            stack.callback(ray.shutdown)
        what = f"{cfg.workers} training worker(s)"
        check_placement(cfg.worker_resources, cfg.workers, cfg.placement_timeout, what)
        settings = cfg.backbone_settings()
        cache_folders: dict[str, str] = {}
        cached: dict[str, dict] = {}
        if cfg.feature_cache:
            cache_folders, cached = _fill_feature_cache(cfg, settings, weights, roots, listed, run, record)
            if cfg.gpu:  # the pass's actors must have handed their GPUs back before the workers can start
                check_placement(cfg.worker_resources, cfg.workers, cfg.placement_timeout, what)

        loop = LoopSettings(
            backbone=settings, groups=_usable_groups(list(cfg.data), listed, cache_folders, cached),
            val_groups=_usable_groups([cfg.val] if cfg.val else [], listed, cache_folders, cached),
            cache_folders=cache_folders, run_url=cfg.run_url(), storage_options=cfg.storage_options,
            dim=dim, epochs=cfg.epochs,
            val_every=cfg.val_every, max_images=cfg.max_images, lr=cfg.lr, weight_decay=cfg.weight_decay,
            seed=cfg.seed, backend=cfg.backend, init_head=cfg.init_head, fail_at_epoch=cfg.fail_at_epoch)
        if not loop.groups:
            raise NoUsableGroupsError(
                f"no training group has an image that decoded ({', '.join(redact(r) for r in cfg.data)}): "
                "nothing to train on. Check the workers' access to the data (--storage-option) and the files.")
        storage = Storage(cfg.storage, cfg.storage_options)
        trainer = TorchTrainer(
            # the settings are bound into the function, not passed as train_loop_config: Ray Train's controller
            # unpickles that config, and with it this module and timm (seconds before any worker can start)
            functools.partial(train_loop_per_worker, loop),
            torch_config=TorchConfig(backend=cfg.backend),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                                   resources_per_worker=cfg.worker_resources),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=storage.base,
                storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs)),
                # controller_failure_limit bounds Ray's retries of a worker group that could not start
                # (unlimited by default: the run would wait for ever)
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                       controller_failure_limit=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        if run.exists(NO_STEP):
            run.remove(NO_STEP)  # left by an earlier job whose driver died before reading it
        refusals.working = True  # training: a failure from here on keeps its traceback
        with _worker_start_timeout(cfg.placement_timeout):
            result = trainer.fit()
        if run.exists(NO_STEP):  # nothing trained: the data refuses the job
            stopped = run.read_json(NO_STEP)
            run.remove(NO_STEP)
            refusals.working = False
            raise NoUsableGroupsError(
                f"epoch {stopped['epoch'] + 1}: no training step had an image that decoded ({stopped['groups']} "
                "groups): nothing to train on. Check the workers' access to the data (--storage-option) and the "
                "files.")
    return result


def _list_roots(cfg: TrainConfig, roots: list[str]) -> dict[str, list[GroupSpec]]:
    """Each data root (training and validation) -> its groups; refused when the training roots together have no
    image, or, with --extensions, when the --val root has none: a mistyped filter, not a run on nothing."""
    listed = {root: list_layout(Storage(root, cfg.storage_options), cfg.layout, cfg.extensions) for root in roots}
    wanted = f": no file has one of the extensions {', '.join(cfg.extensions)} (--extensions)" \
        if cfg.extensions else ""
    if not any(spec.images for r in cfg.data for spec in listed[r]):
        raise ValueError(f"no images found under {', '.join(redact(r) for r in cfg.data)}{wanted}")
    if cfg.extensions and cfg.val and not any(spec.images for spec in listed[cfg.val]):
        raise ValueError(f"no images found under --val {redact(cfg.val)}{wanted}")
    return listed


def _fill_feature_cache(cfg: TrainConfig, settings: BackboneSettings, weights: str | None, roots: list[str],
                        listed: dict[str, list[GroupSpec]], run: Storage, record: dict) -> tuple[dict[str, str], dict]:
    """The feature-cache pass over every root's groups (build_cache), its figures printed and kept in the run's
    record. Returns (root -> cache folder, cache folder -> key -> the index of the features it holds)."""
    import ray

    plan = plan_cache(cfg.gpu, ray.cluster_resources())
    cache_root = cfg.cache_url or f"{cfg.storage.rstrip('/')}/feature-cache"
    model = backbone_id(settings, weights)
    cache_folders = {root: cache_folder(cache_root, root, model) for root in roots}
    summaries, cached = build_cache({cache_folders[root]: listed[root] for root in roots}, settings, plan,
                                    cfg.placement_timeout)
    record["feature_cache"] = {}
    for root, folder in cache_folders.items():
        summary = summaries[folder]
        rate = (f", {summary['images_per_s']:.1f} img/s ({summary['busy_images_per_s']:.1f} while the "
                f"actors worked)") if summary["images_per_s"] else ""
        print(f"[train] feature cache {redact(folder)}: {summary['computed']} groups computed "
              f"({summary['images']} images, {summary['errors']} unreadable) in a pass of "
              f"{summary['seconds']:.1f}s{rate}, {summary['cached_before']} reused", file=sys.stderr, flush=True)
        record["feature_cache"][redact(root)] = {"folder": redact(folder), **summary}
    run.write_json(RUN_RECORD, record)
    return cache_folders, cached


def _usable_groups(roots: list[str], listed: dict, cache_folders: dict[str, str], cached: dict
                   ) -> tuple[TrainGroup, ...]:
    """The groups of ``roots`` to train or validate on: with the feature cache, the rows it holds (a group none of
    whose images decoded has none, and is left out); without it, every image."""
    groups = []
    for r in roots:
        for spec in listed[r]:
            gts = {im.image_uri: im.gt_uri for im in spec.images}
            if not cache_folders:
                rows, version = list(gts), None
            else:
                index = cached[cache_folders[r]].get(spec.key, {"image_uris": [], "version": None})
                rows, version = index["image_uris"], index["version"]
            if rows:
                groups.append(TrainGroup(r, spec.key, tuple(rows), tuple(gts[u] for u in rows), version))
    return tuple(groups)


def config_defaults() -> dict:
    """Field -> default of TrainConfig (the CLI's defaults come from here)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
