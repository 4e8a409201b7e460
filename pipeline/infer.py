"""The inference job: list -> decode (CPU tasks) -> stage 1 (GPU actors) -> CRF + outputs (CPU actors).

Outputs under ``output``: ``masks/<group>/<stem>.png``, ``predictions/*.parquet`` (one row per input image),
``_run.json`` (settings, written first), ``_manifest.json`` and finally ``_SUCCESS``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

import pyarrow.dataset as pads

from scosparc_core.checkpoints import load_state_dict
from scosparc_core.modeling import DEFAULT_BACKBONE

from .decode import DEFAULT_MAX_PIXELS, decode_group
from .listing import GroupSpec, list_layout, list_manifest
from .refine import PART_NAME, RefineActor, part_key
from .stage1 import Stage1Actor
from .storage import Storage, redact

# Settings that change what is written: a re-run into the same output must share them.
RESULT_SETTINGS = ("input", "manifest", "backbone", "head", "random_init", "backbone_name", "backbone_kwargs", "crf", "dtype")
CLUSTER_MARKER = "scosparc_head"  # a resource cluster.yaml gives its head node
STAGE_RESOURCES = {"stage1": "scosparc_stage1", "refine": "scosparc_stage2"}


@dataclass
class InferConfig:
    input: str | None = None
    output: str = "out/run"
    manifest: str | None = None
    backbone: str | None = None
    head: str | None = None
    random_init: bool = False
    backbone_name: str = DEFAULT_BACKBONE
    backbone_kwargs: dict = field(default_factory=dict)
    crf: str = "coca"
    dtype: str = "auto"  # bfloat16 on GPU, float32 on CPU
    micro_batch: int = 32
    chunk_size: int = 32
    compile: bool = False
    gpu_actors: int | None = None
    gpus_per_actor: float | None = None
    cpu_actors: int | None = None
    stage1_cpus: float | None = None
    refine_cpus: float | None = None
    decode_cpus: float = 0.25
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress_interval: float = 30.0
    fault: dict | None = None  # fault injection for tests (see Stage1Actor._maybe_die); not on the command line

    def fingerprint(self) -> dict:
        return redact({k: getattr(self, k) for k in RESULT_SETTINGS})


@dataclass
class Plan:
    """How many actors of each kind, and what each asks Ray for."""

    stage1_actors: int
    stage1_args: dict
    refine_actors: int
    refine_args: dict
    decode_args: dict
    cpu_threads: int


def plan_resources(cfg: InferConfig, cluster: dict) -> Plan:
    """Actor counts and resource requests from the config and ``ray.cluster_resources()``.

    With GPUs: one GPU per stage-1 actor, one actor per GPU, every remaining CPU a CRF actor. Without: one
    stage-1 actor whose torch uses all of its node's cores, and fractional CPU requests everywhere so that a
    2-core laptop runs all three stages at once. A cluster started from cluster.yaml (its head carries the
    ``scosparc_head`` resource) also pins stage-1 actors to GPU nodes and CRF actors to CPU nodes.
    """
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    gpu_mode = per_actor > 0
    stage1_actors = cfg.gpu_actors or (max(1, int(gpus // per_actor)) if gpu_mode else 1)
    stage1_cpus = cfg.stage1_cpus if cfg.stage1_cpus is not None else (2.0 if gpu_mode else 0.5)
    refine_cpus = cfg.refine_cpus if cfg.refine_cpus is not None else (1.0 if gpu_mode else 0.5)
    spare = cpus - stage1_actors * stage1_cpus - 2 * cfg.decode_cpus
    refine_actors = cfg.cpu_actors or max(1, int(spare // refine_cpus))
    stage1_args = {"num_cpus": stage1_cpus, "num_gpus": per_actor}
    refine_args = {"num_cpus": refine_cpus}
    if CLUSTER_MARKER in cluster:
        stage1_args["resources"] = {STAGE_RESOURCES["stage1"]: 1}
        refine_args["resources"] = {STAGE_RESOURCES["refine"]: 1}
    return Plan(stage1_actors, stage1_args, refine_actors, refine_args, {"num_cpus": cfg.decode_cpus},
                0 if gpu_mode else int(cpus))


def list_input(cfg: InferConfig) -> list[GroupSpec]:
    if cfg.manifest:
        return list_manifest(cfg.manifest, cfg.storage_options)
    if not cfg.input:
        raise ValueError("give --input (a URL or path) or --manifest")
    storage = Storage(cfg.input, cfg.storage_options)
    if not storage.fs.exists(storage.base):
        raise FileNotFoundError(f"input {cfg.input} does not exist")
    return list_layout(storage)


def existing_parts(out: Storage) -> dict[str, set[tuple[int, int]]]:
    """group key -> {(part, parts)} of the Parquet parts already written."""
    found: dict[str, set] = {}
    folder = out.path("predictions")
    if not out.fs.exists(folder):
        return found
    for path in out.fs.ls(folder, detail=False):
        m = PART_NAME.match(path.rsplit("/", 1)[-1])
        if m:
            found.setdefault(m["key"], set()).add((int(m["part"]), int(m["parts"])))
    return found


def is_complete(parts: set[tuple[int, int]]) -> bool:
    totals = {total for _, total in parts}
    return len(totals) == 1 and {p for p, _ in parts} == set(range(totals.pop()))


def prepare_output(cfg: InferConfig, out: Storage) -> None:
    """--overwrite clears only what this job writes; otherwise a re-run must share the settings of the run there."""
    if cfg.overwrite:
        for key in ("predictions", "masks", "_manifest.json", "_SUCCESS", "_run.json"):
            out.remove(key)
    elif out.exists("_run.json"):
        before = out.read_json("_run.json").get("settings", {})
        now = json.loads(json.dumps(cfg.fingerprint(), default=str))
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            raise RuntimeError(
                f"{cfg.output} holds a run with other settings ({', '.join(diff)}); resuming would mix results. "
                "Use --overwrite, or another --output."
            )
    out.remove("_SUCCESS")  # a run in progress is not a success, whatever was there before


def group_row(spec: GroupSpec) -> dict:
    return {
        "group": spec.group,
        "group_key": spec.key,
        "names": [im.name for im in spec.images],
        "image_uris": [im.image_uri for im in spec.images],
        "gt_uris": [im.gt_uri or "" for im in spec.images],
        "mask_keys": [im.mask_key for im in spec.images],
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("scosparc", "torch", "timm", "ray", "numpy", "pyarrow", "pandas", "fsspec", "s3fs", "pillow",
                 "opencv-python-headless", "pydensecrf2", "pysodmetrics"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Progress:
    """The periodic one-line summary beside Ray Data's own progress bars."""

    def __init__(self, groups: int, images: int, interval: float, stream=sys.stderr):
        self.groups, self.images, self.interval, self.stream = groups, images, interval, stream
        self.start = self.last = time.monotonic()
        self.done_groups = self.done_images = self.errors = 0
        self.parts: dict[str, int] = {}

    def update(self, row: dict) -> None:
        self.done_images += int(row["images"])
        self.errors += int(row["errors"])
        self.parts[row["group"]] = self.parts.get(row["group"], 0) + 1
        if self.parts[row["group"]] == int(row["parts"]):
            self.done_groups += 1
        if time.monotonic() - self.last >= self.interval:
            self.print()

    def print(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = self.done_images / elapsed if elapsed > 0 else 0.0
        eta = (self.images - self.done_images) / rate if rate > 0 else float("nan")
        print(f"[infer] groups {self.done_groups}/{self.groups}  images {self.done_images}/{self.images}  "
              f"{rate:.2f} img/s  errors {self.errors}  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
              file=self.stream, flush=True)


def count_output(out: Storage) -> dict:
    """Rows, statuses and error kinds of everything under predictions/ (reads two columns)."""
    folder = out.path("predictions")
    if not out.fs.exists(folder):
        return {"rows": 0, "ok": 0, "errors": 0, "errors_by_kind": {}}
    table = pads.dataset(folder, format="parquet", filesystem=out.fs).to_table(columns=["status", "error_kind"])
    statuses = Counter(table.column("status").to_pylist())
    kinds = Counter(k for k in table.column("error_kind").to_pylist() if k)
    return {"rows": table.num_rows, "ok": statuses.get("ok", 0), "errors": table.num_rows - statuses.get("ok", 0),
            "errors_by_kind": dict(sorted(kinds.items()))}


def run_inference(cfg: InferConfig) -> dict:
    """Runs the job on the Ray cluster this process is connected to (or starts a local one). Returns the manifest."""
    import ray

    started, t0 = _now(), time.monotonic()
    if cfg.head:  # fail here, with the checkpoint's own error, rather than in every actor
        load_state_dict(cfg.head, cfg.storage_options)
    out = Storage(cfg.output, cfg.storage_options)
    prepare_output(cfg, out)
    groups = list_input(cfg)
    n_images = sum(len(g.images) for g in groups)
    parts = existing_parts(out)
    todo = [g for g in groups if not is_complete(parts.get(g.key, set()))]
    for g in todo:  # parts of a half-done group are rewritten from scratch; stale ones must not linger
        for part, total in parts.get(g.key, ()):
            out.remove(part_key(g.key, part, total))
    out.write_json("_run.json", {"settings": cfg.fingerprint(), "started": started})
    print(f"[infer] {len(groups)} groups, {n_images} images in {cfg.manifest or cfg.input}; "
          f"{len(groups) - len(todo)} groups already done in {cfg.output}", file=sys.stderr, flush=True)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    try:
        plan = plan_resources(cfg, ray.cluster_resources())
        progress = Progress(len(todo), sum(len(g.images) for g in todo), cfg.progress_interval)
        t_data = time.monotonic()
        if todo:
            _run_dataset(cfg, plan, todo, progress)
        data_seconds = time.monotonic() - t_data
        progress.print()
    finally:
        if started_ray:
            ray.shutdown()

    counts = count_output(out)
    manifest = {
        "config": redact(asdict(cfg)),
        "versions": versions(),
        "started": started,
        "finished": _now(),
        "seconds": time.monotonic() - t0,
        "input": {"groups": len(groups), "images": n_images,
                  "empty_groups": [g.group for g in groups if not g.images]},
        "resumed_groups": len(groups) - len(todo),
        "processed": {"groups": len(todo), "images": progress.done_images},
        "output": counts,
        "images_per_s": progress.done_images / max(time.monotonic() - t0, 1e-9),
        "dataset_seconds": data_seconds,  # the Ray Data execution alone (no listing, Ray start-up, counting)
    }
    out.write_json("_manifest.json", manifest)
    if counts["rows"] != n_images:
        raise RuntimeError(f"{counts['rows']} rows written for {n_images} input images; _SUCCESS not written")
    out.write_bytes("_SUCCESS", b"")
    print(f"[infer] done: {counts['rows']} rows ({counts['errors']} errors) -> {out.url()}", file=sys.stderr, flush=True)
    return manifest


def _run_dataset(cfg: InferConfig, plan: Plan, todo: list[GroupSpec], progress: Progress) -> None:
    import ray

    model_cfg = {
        "backbone": cfg.backbone, "head": cfg.head, "random_init": cfg.random_init,
        "backbone_name": cfg.backbone_name, "backbone_kwargs": cfg.backbone_kwargs, "dtype": cfg.dtype,
        "micro_batch": cfg.micro_batch, "compile": cfg.compile,
        "num_gpus": plan.stage1_args["num_gpus"], "cpu_threads": plan.cpu_threads,
        "storage_options": cfg.storage_options, "fault": cfg.fault,
    }
    ds = ray.data.from_items([group_row(g) for g in todo], override_num_blocks=min(len(todo), 10_000))
    ds = ds.map(decode_group, fn_kwargs={"storage_options": cfg.storage_options, "max_pixels": cfg.max_pixels},
                **plan.decode_args)
    ds = ds.map_batches(
        Stage1Actor,
        fn_constructor_kwargs={"model_cfg": model_cfg, "chunk_size": cfg.chunk_size},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=plan.stage1_actors),
        **plan.stage1_args,
    )
    ds = ds.map_batches(
        RefineActor,
        fn_constructor_kwargs={"output": cfg.output, "storage_options": cfg.storage_options, "crf": cfg.crf},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.refine_actors),
        **plan.refine_args,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for row in ds.iter_rows():
            progress.update(row)
