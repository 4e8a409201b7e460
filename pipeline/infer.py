"""The inference job's driver: check -> lease -> plan -> list -> decode -> stage 1 -> refine -> shards -> manifest.

Outputs under ``output``: ``masks/<group>/<stem>.png`` (or mask shards), ``predictions/part-*.parquet`` (one row per
input image) with a commit record each under ``_commits/``, ``_run.json`` (settings, written before any work),
``_manifest.json`` and finally ``_SUCCESS``. The driver does no per-image work: listing, decoding and writing
run in Ray tasks, and the counts come from the commit records.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from scosparc_core.checkpoints import check_checkpoints
from scosparc_core.crf import crf_params
from scosparc_core.engine import CRF_BACKENDS, default_micro_batch
from scosparc_core.modeling import DEFAULT_BACKBONE
from scosparc_core.precision import PRECISIONS, resolve

from .decode import DEFAULT_MAX_PIXELS, DecodeSettings, decode_group
from .errors import Refusals
from .lease import Lease
from .listing import LAYOUTS, InputSpec, check_input, group_dataset, normal_extensions, summarize
from .output_state import (RUN_FILE, OutputState, check_settings, clear_output, groups_to_do, groups_with_images,
                           remove_orphans)
from .predictions import MASK_FORMATS, PredictionsSink
from .progress import JobState, Printer
from .refine import RefineActor, RefineSettings
from .resources import Plan, choose_device, cluster_view, plan_resources, release_requests, unplaceable
from .stage1 import ModelSettings, Stage1Actor, Stage1Settings
from .storage import Storage, URLOptions, canonical_location, redact, redact_url

DEVICES = ("auto", "cuda", "cpu")
CRF_BACKEND_CHOICES = tuple(b for b in CRF_BACKENDS if b != "defer")  # defer: the job's own choice on CPUs


@dataclass(frozen=True)
class InferConfig:
    """Every setting of the job, with its default: the one source of truth for the CLI and the API."""

    input: str | None = None  # URL or path: <root>/image/<group>/* (CoSOD layout) or <root>/<group>/*
    manifest: str | None = None  # Parquet, CSV or CSV.gz with columns group, image_uri [, gt_uri]
    layout: str = "auto"  # auto | cosod | groups
    output: str = "out/run"
    backbone: str | None = None  # DINO state_dict, path or URL; None: timm's pretrained weights (network)
    head: str | None = None  # stage-1 checkpoint in the official format, path or URL
    random_init: bool = False  # random weights for what is not given (tests, demos)
    backbone_name: str = DEFAULT_BACKBONE
    backbone_kwargs: dict = field(default_factory=dict)
    crf: str = "coca"  # coca | cosal2015 | cosod3k | none (Cosal2015 needs cosal2015)
    crf_backend: str = "auto"  # auto: torch beside stage 1 on GPUs, pydensecrf on CPU workers otherwise
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # the backbone's number format (scosparc_core.precision)
    micro_batch: int | None = None  # backbone images per forward; None: 128 on CUDA (64 in float64), 32 on CPU
    chunk_size: int = 32  # images per row after stage 1
    compile: bool = False
    gpu_actors: int | None = None  # None: one per GPU the cluster has or can have
    gpus_per_actor: float | None = None  # None: 1
    gpu_wait: float = 600.0  # seconds to wait for an autoscaling cluster's first GPU
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_decode: bool = False
    row_images: int = 32  # larger groups are read by the stage-1 actor
    one_pass_images: int | None = None  # larger groups run stage 1 in passes; None: per device (stage1.one_pass_limit)
    token_dir: str = ""  # where groups in passes keep views and tokens on each node: "" its temp folder, "none" nowhere
    extensions: tuple[str, ...] = ()  # --input's image files (lowercase, no dot); (): every file is an input
    mask_format: str = "png"  # png | parquet | webdataset
    rows_per_shard: int = 10_000
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False
    accept_transient_errors: bool = False
    dry_run: bool = False
    progress_interval: float = 30.0
    # seconds with no row out of the dataset before Ray Data stops it (-1: never); None: 30 min plus the time
    # stage 1 may take on the largest group, which gives no row before its whole stage 1 is done
    stall_timeout: float | None = None
    lease_ttl: float = 120.0
    fault: dict | None = None  # fault injection for tests (see Stage1Actor); not on the command line

    def __post_init__(self):
        if self.extensions:  # as the listing reads them, once ("JPG,.png" -> ("jpg", "png"))
            object.__setattr__(self, "extensions", normal_extensions(self.extensions))

    def spec(self) -> InputSpec:
        return InputSpec(input=self.input, manifest=self.manifest, layout=self.layout,
                         storage_options=self.storage_options, extensions=self.extensions)

    def replace(self, **changes) -> "InferConfig":
        return dataclasses.replace(self, **changes)


def validate(cfg: InferConfig) -> None:
    """Settings that cannot work fail here, before anything is read or written."""
    crf_params(cfg.crf)
    for name, value, choices in (("crf_backend", cfg.crf_backend, CRF_BACKEND_CHOICES),
                                 ("device", cfg.device, DEVICES), ("dtype", cfg.dtype, PRECISIONS),
                                 ("mask_format", cfg.mask_format, MASK_FORMATS), ("layout", cfg.layout, LAYOUTS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    positive = {"micro_batch": cfg.micro_batch, "chunk_size": cfg.chunk_size, "row_images": cfg.row_images,
                "one_pass_images": cfg.one_pass_images, "rows_per_shard": cfg.rows_per_shard,
                "max_pixels": cfg.max_pixels, "gpu_actors": cfg.gpu_actors, "gpus_per_actor": cfg.gpus_per_actor,
                "progress_interval": cfg.progress_interval, "lease_ttl": cfg.lease_ttl}
    for name, value in positive.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, not {value!r}")
    if cfg.gpus_per_actor is not None and cfg.gpus_per_actor > 1 and not float(cfg.gpus_per_actor).is_integer():
        raise ValueError(f"gpus_per_actor must be a whole number above 1 (Ray's rule), not {cfg.gpus_per_actor!r}")
    if cfg.gpu_wait < 0:
        raise ValueError(f"gpu_wait must be 0 or more seconds, not {cfg.gpu_wait!r}")
    if cfg.stall_timeout is not None and not (cfg.stall_timeout > 0 or cfg.stall_timeout == -1):
        raise ValueError(f"stall_timeout must be positive seconds or -1 (never), not {cfg.stall_timeout!r}")
    if cfg.extensions and cfg.manifest:
        raise ValueError("--extensions filters the files of --input folders; a manifest lists its images itself")
    if cfg.head is None and not cfg.random_init:
        raise ValueError("no stage-1 head: pass --head model_combined.pt (README, 'Weights'), or --random-init "
                         "for a demo with random weights")


def check_weights(cfg: InferConfig) -> dict:
    """Both checkpoints read and checked on the driver before any work; their digests for the run's settings."""
    return check_checkpoints(cfg.backbone, cfg.head, cfg.backbone_name, cfg.backbone_kwargs,
                             URLOptions(cfg.storage_options), pretrained=not cfg.random_init)


def fingerprint(cfg: InferConfig, digests: dict, precision: str, crf_backend: str) -> dict:
    """The settings that change what is written: a re-run into the same output must share them."""
    return redact({
        "input": canonical_location(cfg.input), "manifest": canonical_location(cfg.manifest), "layout": cfg.layout,
        "backbone": digests.get("backbone") or (None if cfg.random_init else "timm-pretrained"),
        "head": digests.get("head"), "random_init": cfg.random_init, "backbone_name": cfg.backbone_name,
        "backbone_kwargs": cfg.backbone_kwargs, "crf": cfg.crf, "crf_backend": crf_backend,
        "precision": precision, "max_pixels": cfg.max_pixels, "fast_decode": cfg.fast_decode,
        "mask_format": cfg.mask_format,
        # only when given: runs recorded before the option resume as they were
        **({"extensions": list(cfg.extensions)} if cfg.extensions else {}),
    })


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


def _log(text: str) -> None:
    print(f"[infer] {text}", file=sys.stderr, flush=True)


GROUPS_PER_BLOCK = 8  # groups per block of the to-do list (see run_inference)


def run_inference(cfg: InferConfig) -> dict:
    """Runs the job on the Ray cluster this process is connected to (or starts a local one). Returns the
    manifest (for ``dry_run``: the plan)."""
    import ray

    started, t0 = _now(), time.monotonic()
    refusals = Refusals()
    with contextlib.ExitStack() as stack:
        stack.push(refusals)
        validate(cfg)
        check_input(cfg.spec())
        digests = check_weights(cfg)
        out = Storage(cfg.output, cfg.storage_options)
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
            stack.callback(ray.shutdown)
        view = cluster_view()
        if cfg.dry_run:  # asks the autoscaler for nothing, so it withdraws nothing (another job's request stays)
            return _dry_run(cfg, view)
        stack.callback(release_requests)
        # a lost lease interrupts the driver (a signal to this thread), which stops the dataset: LeaseLost
        lease = stack.enter_context(Lease(out, ttl=cfg.lease_ttl, holder={"job": "infer"},
                                          stop_main=True))
        listed: list = []  # while GPU nodes start, if they must: a bad input is refused before the wait
        device, view = choose_device(cfg.device, view, cfg.gpu_wait, cfg.gpu_actors or 1,
                                     meanwhile=lambda: listed.append(_list_input(cfg)))
        listing, summary = listed[0] if listed else _list_input(cfg)
        precision = resolve(cfg.dtype, device)
        plan, micro_batch = _plan(cfg, view, device, precision, summary)
        crf_backend = {"torch": "torch", "defer": "pydensecrf", "none": "none"}[plan.crf_backend]
        settings = fingerprint(cfg, digests, precision, crf_backend)
        if cfg.overwrite:
            clear_output(out)
        run = check_settings(out, settings, redact_url(cfg.output))
        refusals.working = True
        out.remove("_SUCCESS")  # a run in progress is not a success, whatever was there before
        out.write_json(RUN_FILE, {"settings": settings, "run": run, "started": started})
        listed = set(listing.map_batches(groups_with_images, batch_format="pyarrow", batch_size=None)
                     .to_pandas()["group_key"])  # one short string a group
        state = _settle(out, listed)
        # small blocks: a decode task and a stage-1 output per block, so rows stream on to refine and the sink
        # (Ray Data joins a task's outputs into one block up to 128 MiB: thousands of groups' URIs)
        todo = listing.map_batches(groups_to_do, fn_kwargs={"plans_ref": ray.put(state.plans())},
                                   batch_format="pyarrow", batch_size=None) \
            .repartition(target_num_rows_per_block=GROUPS_PER_BLOCK).materialize()
        todo_groups, todo_rows = todo.count(), (todo.sum("group_rows") or 0) if todo.count() else 0
        _log(f"{summary['groups']} groups, {summary['images']} images in "
             f"{redact_url(cfg.manifest or cfg.input)}; to do: {todo_groups} groups, {todo_rows} images "
             f"(the rest is done in {redact_url(cfg.output)}); stage 1 on {device} ({precision}), CRF "
             f"{cfg.crf} ({crf_backend}); {'; '.join(plan.notes)}")
        t_data = time.monotonic()
        largest = (summary.get("largest_group") or {}).get("images", 0)
        history = _run_dataset(cfg, plan, todo, todo_groups, todo_rows, run, device, precision, micro_batch,
                               largest) \
            if todo_groups else []
        data_seconds = time.monotonic() - t_data
        lease.check()
        state = _settle(out, listed)
        counts = state.counts()
        manifest = {
            "config": redact(asdict(cfg)),
            "settings": settings,
            "run": run,
            "plan": {"device": plan.device, "stage1_actors": plan.stage1_actors, "stage1": plan.stage1_args,
                     "refine_actors": plan.refine_actors, "refine": plan.refine_args, "crf_backend": crf_backend,
                     "groups_per_batch": plan.groups_per_batch},
            "versions": versions(),
            "started": started,
            "finished": _now(),
            "seconds": time.monotonic() - t0,
            "input": summary,
            "processed": {"groups": todo_groups, "images": todo_rows},
            "output": counts,
            "images_per_s": todo_rows / max(data_seconds, 1e-9),
            "dataset_seconds": data_seconds,  # the Ray Data execution alone (no listing, start-up, counting)
            "progress": history,  # [seconds, images done] during the execution: its rate over time
        }
        out.write_json("_manifest.json", manifest)
        missing = summary["images"] - counts["rows"]
        if missing:
            raise RuntimeError(f"{counts['rows']} rows written for {summary['images']} input images; "
                               "_SUCCESS not written (run again to finish)")
        if counts["transient_errors"] and not cfg.accept_transient_errors:
            _log(f"{counts['transient_errors']} transient errors (read/write failures, out-of-memory ...): "
                 "_SUCCESS not written; run the same command again to redo exactly those images, or pass "
                 "--accept-transient-errors")
        else:
            out.write_bytes("_SUCCESS", b"")
        _log(f"done: {counts['rows']} rows ({counts['ok']} ok, {counts['permanent_errors']} permanent and "
             f"{counts['transient_errors']} transient errors) -> {redact_url(out.url())}")
        return manifest


def _settle(out: Storage, listed: set[str]) -> OutputState:
    """The output's records, after removing half-written shards and the records of shards that are gone, and
    compacting superseded rows and the rows of groups no longer in the input (``listed``; their mask files
    stay)."""
    out.fs.invalidate_cache()
    state, removed, lost = remove_orphans(out, OutputState.load(out))
    if lost:
        _log(f"{lost} commit records whose shard is gone were dropped: their groups are done again")
    doomed = state.superseded(listed)
    if doomed:
        gone = len(set(state.groups) - listed)
        dropped = state.compact(out, doomed)
        _log(f"compacted {dropped} superseded rows" + (f", of them the rows of {gone} groups no longer in the "
                                                       "input" if gone else ""))
        out.fs.invalidate_cache()
        state = OutputState.load(out)
    if removed:
        _log(f"removed {removed} files of interrupted writes (shards and tars without a record, temp files)")
    return state


def _plan(cfg: InferConfig, view, device: str, precision: str, summary: dict) -> tuple[Plan, int]:
    """The resource plan for the listed input, and the backbone's micro-batch."""
    micro_batch = cfg.micro_batch or default_micro_batch(device, precision)
    mean_group = summary["images"] / max(summary["groups"] - summary["empty_groups"]["count"], 1)
    plan = plan_resources(view, device, gpu_actors=cfg.gpu_actors, gpus_per_actor=cfg.gpus_per_actor, crf=cfg.crf,
                          crf_backend=cfg.crf_backend, micro_batch=micro_batch, mean_group=mean_group,
                          precision=precision)
    problem = unplaceable(plan.stage1_args, view)
    if problem:  # before any work: Ray would keep the actor pending until the stall timeout
        raise ValueError(problem)
    return plan, micro_batch


def _list_input(cfg: InferConfig):
    """(the listing's dataset, materialised; its summary). A filter no file passes is a typo, not a run of
    nothing."""
    listing = group_dataset(cfg.spec()).materialize()
    summary = summarize(listing)
    if cfg.extensions and not summary["images"]:
        raise ValueError(f"no file in {redact_url(cfg.input)} has one of the extensions "
                         f"{', '.join(cfg.extensions)} (--extensions)")
    return listing, summary


def _dry_run(cfg: InferConfig, view) -> dict:
    """Lists the input and prints the plan; starts nothing, writes nothing, waits for no GPU."""
    summary = _list_input(cfg)[1]
    device, _ = choose_device(cfg.device, view, cfg.gpu_wait, wait=False)
    precision = resolve(cfg.dtype, device)
    plan, micro_batch = _plan(cfg, view, device, precision, summary)
    report = {"input": summary, "device": device, "precision": precision, "micro_batch": micro_batch,
              "plan": asdict(plan), "cluster": view.resources}
    _log(f"dry run: {summary['groups']} groups, {summary['images']} images "
         f"(largest group {summary['largest_group']}); stage 1 on {device} "
         f"({report['precision']}), actors {plan.stage1_actors} x {plan.stage1_args}; decode tasks "
         f"{plan.decode_args}; refine actors {plan.refine_actors} x {plan.refine_args}; CRF {cfg.crf} "
         f"({plan.crf_backend}); "
         + "; ".join(plan.notes))
    return report


SECONDS_PER_IMAGE = {"cpu": 4.0, "cuda": 0.1}  # stage 1's passes without a token file, and the CRF, generously


def stall_timeout(cfg: InferConfig, device: str, largest_group: int) -> float:
    """Ray Data's no-progress timeout for the job (its default, 30 min, stopped a 10,000-image group on CPUs)."""
    if cfg.stall_timeout is not None:
        return cfg.stall_timeout
    return 1800.0 + SECONDS_PER_IMAGE.get(device, 4.0) * largest_group


def _run_dataset(cfg: InferConfig, plan: Plan, todo, groups: int, images: int, run: int, device: str,
                 precision: str, micro_batch: int, largest_group: int) -> list:
    import ray

    model = ModelSettings(backbone=cfg.backbone, head=cfg.head, random_init=cfg.random_init,
                          backbone_name=cfg.backbone_name, backbone_kwargs=dict(cfg.backbone_kwargs),
                          storage_options=dict(cfg.storage_options))
    decode = DecodeSettings(storage_options=dict(cfg.storage_options), max_pixels=cfg.max_pixels,
                            fast_decode=cfg.fast_decode, row_images=cfg.row_images)
    stage1 = Stage1Settings(model=model, decode=decode, device=device, precision=precision, micro_batch=micro_batch,
                            compile=cfg.compile, cpu_threads=plan.cpu_threads, crf=cfg.crf,
                            crf_backend=plan.crf_backend if plan.crf_backend != "none" else "defer",
                            chunk_size=cfg.chunk_size, one_pass_images=cfg.one_pass_images,
                            token_dir=cfg.token_dir, fault=cfg.fault)
    refine = RefineSettings(output=cfg.output, storage_options=dict(cfg.storage_options), crf=cfg.crf,
                            mask_format=cfg.mask_format)
    state = JobState.remote(groups, images)
    sink = PredictionsSink(cfg.output, dict(cfg.storage_options), run, cfg.rows_per_shard, cfg.mask_format)
    ds = todo.map(decode_group, fn_kwargs={"settings": decode}, **plan.decode_args)
    lo, hi = plan.stage1_actors
    ds = ds.map_batches(
        Stage1Actor,
        fn_constructor_kwargs={"settings": stage1, "state": state},
        batch_size=plan.groups_per_batch,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=4,
                                           max_concurrent_calls_per_actor=plan.stage1_calls,
                                           enable_true_multi_threading=plan.stage1_calls > 1),
        **plan.stage1_args,
    )
    lo, hi = plan.refine_actors
    ds = ds.map_batches(RefineActor, fn_constructor_kwargs={"settings": refine, "state": state}, batch_size=4,
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), **plan.refine_args)
    ds.context.execution_no_progress_timeout_s = stall_timeout(cfg, device, largest_group)
    with warnings.catch_warnings(), Printer(state, cfg.progress_interval) as printer:
        warnings.simplefilter("ignore", UserWarning)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})  # writing waits on storage, not a core
    return printer.history
