"""Self-supervised training of the stage-1 head with Ray Train (DDP: NCCL on GPU, gloo on CPU).

Each step, every worker takes its own group and samples at most 24 of its images; the backbone is frozen, and its
features come from the feature cache when it is on. Every epoch: a checkpoint (official head format, optimizer,
state) through Ray Train, ``head_last.pt`` beside it, and, every ``val_every`` epochs, validation on a set with
ground truth that keeps ``head_best.pt`` and the metrics history in ``metrics.parquet``.

Storage under ``<storage>/<name>/``: Ray Train's checkpoints, head_last.pt, head_best.pt, metrics.parquet, and
the feature cache under ``<storage>/feature-cache/`` unless told otherwise. Running again with the same name
resumes from the last checkpoint; a failed worker is restarted from it (Ray Train's FailureConfig).
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from scosparc_core import Stage1Head, load_head_checkpoint, save_head_checkpoint, training_loss
from scosparc_core.image import INPUT_SIZE
from scosparc_core.metrics import aggregate, image_metrics
from scosparc_core.modeling import DEFAULT_BACKBONE
from scosparc_core.threshold import adaptive_threshold, image_confidences, stage1_map

from .decode import decode_image, read_many
from .feature_cache import FeatureCache, build_backbone, build_cache, cache_folder, features
from .infer import InferConfig, plan_resources
from .listing import GroupSpec, list_layout
from .refine import read_gt
from .storage import Storage, redact

ADAM = {"lr": 1e-4, "weight_decay": 1e-4, "betas": (0.9, 0.99)}  # DESIGN.md §3
HISTORY = "metrics.parquet"


@dataclass
class TrainConfig:
    data: list[str]
    storage: str
    name: str
    val: str | None = None
    epochs: int = 150
    val_every: int = 1
    max_images: int = 24
    lr: float = ADAM["lr"]
    weight_decay: float = ADAM["weight_decay"]
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
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

    def run_url(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    def model_cfg(self) -> dict:
        return {"backbone": self.backbone, "backbone_name": self.backbone_name, "backbone_kwargs": self.backbone_kwargs,
                "random_init": self.random_init, "dtype": self.dtype, "micro_batch": self.micro_batch,
                "num_gpus": 1 if self.gpu else 0, "storage_options": self.storage_options}


# ---------------------------------------------------------------------------------------------------- data
def _group_dict(root: str, spec: GroupSpec) -> dict:
    return {"root": root, "group": spec.group, "key": spec.key, "image_uris": [im.image_uri for im in spec.images],
            "gt_uris": [im.gt_uri for im in spec.images]}


class GroupFeatures:
    """Tokens and CLS attention for sampled images of a group: from the cache, or through the backbone."""

    def __init__(self, cfg: dict, cache_folders: dict[str, str] | None):
        self.cfg = cfg
        self.options = cfg.get("storage_options") or {}
        self.caches = {root: FeatureCache(url, self.options) for root, url in (cache_folders or {}).items()}
        self._backbone = None
        self._indexes: dict[tuple[str, str], dict] = {}

    def _index(self, group: dict) -> dict:
        key = (group["root"], group["key"])
        if key not in self._indexes:
            self._indexes[key] = self.caches[group["root"]].index(group["key"])
        return self._indexes[key]

    def sizes(self, group: dict) -> int:
        if group["root"] in self.caches:
            return int(self._index(group)["count"])
        return len(group["image_uris"])

    def get(self, group: dict, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        cache = self.caches.get(group["root"])
        if cache is not None:
            tokens, attention = cache.read(group["key"], rows)
            return tokens, attention, [self._index(group)["image_uris"][r] for r in rows]
        if self._backbone is None:
            self._backbone = build_backbone(self.cfg)
        uris = [group["image_uris"][r] for r in rows]
        pixels, kept = [], []
        for uri, data in zip(uris, read_many(uris, self.options)):
            try:  # a bad file is skipped here: training has no rows to report it in
                if isinstance(data, BaseException):
                    raise data
                pixels.append(decode_image(data)[0])
                kept.append(uri)
            except Exception as exc:  # noqa: BLE001
                print(f"[train] skipping {uri}: {exc}", file=sys.stderr)
        if not pixels:
            return torch.zeros(0), torch.zeros(0), []
        backbone, device, dtype = self._backbone
        tokens, attention = features(backbone, np.stack(pixels), device, dtype, int(self.cfg.get("micro_batch", 32)))
        # clone: the backbone ran in inference mode, and autograd may not save such tensors for the head's backward
        return tokens.cpu().clone(), attention.cpu().clone(), kept


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


# ---------------------------------------------------------------------------------------------- validation
def validate(head: torch.nn.Module, groups: list[dict], source: GroupFeatures, gts: dict, device) -> dict:
    """Max-F and the other CoSOD metrics of the stage-1 masks (224x224) against ground truth resized to 224
    (nearest), as the paper code validates; averaged over images."""
    rows = []
    head.eval()
    with torch.inference_mode():
        for group in groups:
            n = source.sizes(group)
            tokens, _, uris = source.get(group, list(range(n)))
            if not uris:
                continue
            side = math.isqrt(tokens.shape[1])  # square patch grid (28x28 for ViT-B/8 at 224)
            w = head(tokens.to(device))
            maps = stage1_map(w, (side, side))
            _, tau = adaptive_threshold(image_confidences(maps, (side, side)))
            masks = (maps.cpu().numpy() >= np.float32(tau)).astype(np.uint8) * 255
            for uri, mask in zip(uris, masks):
                if uri in gts:
                    rows.append(image_metrics(mask, gts[uri]))
    head.train()
    if not rows:
        return {}
    agg = aggregate(rows)
    return {f"val_{k}": float(agg[k]) for k in ("max_fm", "mean_fm", "adp_fm", "sm", "max_em", "mean_em", "mae", "wfm")}


def load_val_gts(groups: list[dict], options: dict) -> dict:
    """image URI -> ground truth (224, 224) uint8 0/255 (nearest resize, >128 object)."""
    import cv2

    pairs = [(u, g) for group in groups for u, g in zip(group["image_uris"], group["gt_uris"]) if g]
    out = {}
    for (uri, _), data in zip(pairs, read_many([g for _, g in pairs], options)):
        try:
            out[uri] = cv2.resize(read_gt(data), (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_NEAREST)
        except Exception as exc:  # noqa: BLE001 - that image is left out of validation
            print(f"[train] no ground truth for {uri}: {exc}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg, groups, val_groups = config["cfg"], config["groups"], config["val_groups"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run = Storage(config["run_url"], cfg["storage_options"])
    source = GroupFeatures(cfg, config["cache_folders"])

    torch.manual_seed(config["seed"])
    head = Stage1Head(config["dim"])
    if config.get("init_head"):
        load_head_checkpoint(head, config["init_head"], cfg["storage_options"])
    state = {"epoch": 0, "best_max_fm": None, "best_epoch": None, "history": []}
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            load_head_checkpoint(head, os.path.join(folder, "head.pt"))
            optimizer_state = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(folder, "state.json")) as f:
                state = json.load(f)
    model = ray.train.torch.prepare_model(head)
    module = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"],
                                 betas=ADAM["betas"])
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    gts = load_val_gts(val_groups, cfg["storage_options"]) if rank == 0 and val_groups else {}
    sizes = [source.sizes(g) for g in groups]

    for epoch in range(state["epoch"], config["epochs"]):
        start = time.monotonic()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, co, sal, steps
        for step, gi in enumerate(epoch_assignment(len(groups), epoch, rank, world, config["seed"])):
            if step == 1:
                _maybe_die(config, run, epoch)
            rows = sample_rows(sizes[gi], config["max_images"], config["seed"], epoch, gi)
            tokens, attention, _ = source.get(groups[gi], rows)
            if tokens.numel() == 0:
                continue
            tokens, attention = tokens.to(device), attention.to(device)
            parts = training_loss(tokens, attention.reshape(len(tokens), -1), model(tokens))
            optimizer.zero_grad()
            parts.loss.backward()
            optimizer.step()
            sums += torch.tensor([parts.loss.item(), parts.co.item(), parts.sal.item(), 1.0], dtype=torch.float64)
        sums = _all_reduce(sums)
        seconds = time.monotonic() - start
        steps = max(sums[3].item(), 1.0)
        metrics = {"epoch": epoch, "loss": sums[0].item() / steps, "loss_co": sums[1].item() / steps,
                   "loss_sal": sums[2].item() / steps, "groups_per_s": sums[3].item() / seconds,
                   "epoch_seconds": seconds, "params_identical": _params_identical(module)}
        validated = rank == 0 and val_groups and (epoch + 1) % config["val_every"] == 0
        if validated:
            metrics.update(validate(module, val_groups, source, gts, device))
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                improved = validated and "val_max_fm" in metrics and (
                    state["best_max_fm"] is None or metrics["val_max_fm"] > state["best_max_fm"])
                if improved:
                    state["best_max_fm"], state["best_epoch"] = metrics["val_max_fm"], epoch
                    save_head_checkpoint(module, run.url("head_best.pt"), cfg["storage_options"])
                state["epoch"] = epoch + 1
                state["history"].append(metrics)
                save_head_checkpoint(module, os.path.join(folder, "head.pt"))
                torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
                with open(os.path.join(folder, "state.json"), "w") as f:
                    json.dump(state, f)
                save_head_checkpoint(module, run.url("head_last.pt"), cfg["storage_options"])
                _write_history(run, state["history"])
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
                _print_epoch(metrics, state, config["epochs"])
            ray.train.report(metrics, checkpoint=report_checkpoint)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _params_identical(module: torch.nn.Module) -> bool:
    """Whether every worker holds the same parameters (DDP's promise), checked bit for bit via a digest."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    flat = torch.cat([p.detach().flatten().cpu().double() for p in module.parameters()])
    digest = torch.tensor([flat.sum().item(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum().item()])
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _write_history(run: Storage, history: list[dict]) -> None:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(history).to_parquet(buf, index=False)
    run.write_bytes(HISTORY, buf.getvalue())


def _print_epoch(m: dict, state: dict, epochs: int) -> None:
    done = m["epoch"] + 1
    eta = (epochs - done) * m["epoch_seconds"]
    val = ""
    if "val_max_fm" in m:
        val = f"  val max-F {m['val_max_fm']:.4f} (best {state['best_max_fm']:.4f} @ epoch {state['best_epoch'] + 1})"
    print(f"[train] epoch {done}/{epochs}  loss {m['loss']:.4f} (co {m['loss_co']:.4f}, sal {m['loss_sal']:.4f})"
          f"{val}  {m['groups_per_s']:.2f} groups/s  {m['epoch_seconds']:.1f}s/epoch  eta {eta:.0f}s", flush=True)


def _maybe_die(config: dict, run: Storage, epoch: int) -> None:
    """Fault injection (tests): rank 0's process is killed (SIGKILL) mid-epoch, once per run."""
    if config.get("fail_at_epoch") != epoch:
        return
    import signal

    import ray.train

    if ray.train.get_context().get_world_rank() == 0 and not run.exists("_injected_failure"):
        run.write_bytes("_injected_failure", f"killed mid-way through epoch {epoch + 1}".encode())
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- driver
def run_training(cfg: TrainConfig):
    """Lists the data, fills the feature cache (if on), then runs the TorchTrainer. Returns the ray.train.Result."""
    import pyarrow.fs
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    roots = list(dict.fromkeys(cfg.data + ([cfg.val] if cfg.val else [])))
    listed = {root: list_layout(Storage(root, cfg.storage_options)) for root in roots}
    if not any(listed[r] for r in cfg.data):
        raise ValueError(f"no images found under {cfg.data}")
    print(f"[train] {sum(len(listed[r]) for r in cfg.data)} training groups, "
          f"{sum(len(s.images) for r in cfg.data for s in listed[r])} images; validation: "
          f"{len(listed[cfg.val]) if cfg.val else 0} groups", file=sys.stderr, flush=True)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    try:
        model_cfg = cfg.model_cfg()
        cache_folders: dict[str, str] = {}
        if cfg.feature_cache:
            # the feature pass is the inference job's stage 1 without the head: plan its actors the same way
            plan = plan_resources(InferConfig(gpus_per_actor=1.0 if cfg.gpu else 0.0), ray.cluster_resources())
            cache_root = cfg.cache_url or f"{cfg.storage.rstrip('/')}/feature-cache"
            for root in roots:
                folder = cache_folder(cache_root, root, model_cfg)
                t0 = time.monotonic()
                summary = build_cache(listed[root], folder, {**model_cfg, "cpu_threads": plan.cpu_threads},
                                      actors=plan.stage1_actors, actor_args=plan.stage1_args)
                print(f"[train] feature cache {folder}: {summary} in {time.monotonic() - t0:.1f}s",
                      file=sys.stderr, flush=True)
                cache_folders[root] = folder

        def usable(rs: list[str]) -> list[dict]:
            # with the cache, a group whose images all failed to decode has no features: leave it out
            return [_group_dict(r, spec) for r in rs for spec in listed[r]
                    if not cache_folders or FeatureCache(cache_folders[r], cfg.storage_options).has(spec.key)]

        groups, val_groups = usable(cfg.data), usable([cfg.val] if cfg.val else [])
        dim = _embed_dim(model_cfg)
        storage = Storage(cfg.storage, cfg.storage_options)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": model_cfg, "groups": groups, "val_groups": val_groups,
                "cache_folders": cache_folders or None, "run_url": cfg.run_url(), "dim": dim,
                "epochs": cfg.epochs, "val_every": cfg.val_every,
                "max_images": cfg.max_images, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
                "init_head": cfg.init_head, "fail_at_epoch": cfg.fail_at_epoch,
            },
            torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                                   resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=storage.base,
                storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs)),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        result = trainer.fit()
        Storage(cfg.run_url(), cfg.storage_options).write_json("train_config.json", redact(asdict(cfg)))
        return result
    finally:
        if started_ray:
            ray.shutdown()


def _embed_dim(model_cfg: dict) -> int:
    import timm

    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    if "embed_dim" in kwargs:
        return int(kwargs["embed_dim"])
    return int(timm.create_model(model_cfg["backbone_name"], pretrained=False, num_classes=0, depth=1).embed_dim)
