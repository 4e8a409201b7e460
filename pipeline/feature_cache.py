"""The feature cache: the frozen backbone's tokens and CLS attention, computed once per image and kept in storage.

Training samples up to 24 images of a group per step for many epochs, and the backbone never changes, so its
output can be stored once (float16) and read back instead of recomputed (the paper code runs the backbone twice
per image at every step). Per group: ``<key>.<version>.tokens.npy`` (N, P, C), ``<key>.<version>.attention.npy``
(N, h, w) (the resampled CLS attention map training uses) and ``<key>.json``, the index (image names, URIs and
sizes, in row order, and the arrays' version; written last, so a group whose index exists is complete). Rows are
read with ranged reads, so a step fetches only the images it samples. A group is computed again when its listing
(URIs or file sizes) no longer matches its index. The version is a hash of the listing and the rows: a group
computed again gets new array files, so a run that holds the old index (the cache is shared by every run on a
storage) goes on reading the rows it names, never another image's. Arrays no index names any more stay.

The pass that fills the cache is a Ray Data job: group rows -> decode (CPU tasks: ``decode.decode_for_cache``)
-> ``FeatureActor`` (one per GPU, or one using the cores on a CPU cluster).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from scosparc_core import DinoBackbone
from scosparc_core.engine import DeviceQueue, thread_stream
from scosparc_core.modeling import DEFAULT_BACKBONE, cls_attention_maps
from scosparc_core.precision import resolve

from .decode import decode_for_cache
from .listing import GroupSpec
from .resources import PlacementError, check_placement
from .storage import Storage, URLOptions, safe_component

FEATURE_DTYPE = torch.float16  # converted where the features are (on the GPU: half the bytes to the host)


@dataclass(frozen=True)
class BackboneSettings:
    """The frozen backbone a cache actor or a training worker builds (travels to Ray workers).

    ``checkpoint``: a DINO state_dict path or URL; None = timm's pretrained weights (network), or random weights
    with ``random_init``. ``precision``: a name from ``scosparc_core.precision.PRECISIONS``, resolved per device.
    ``cpu_threads``: torch threads on a CPU (0: leave torch's setting).
    """

    checkpoint: str | None = None
    name: str = DEFAULT_BACKBONE
    kwargs: dict = field(default_factory=dict)
    random_init: bool = False
    precision: str = "auto"
    micro_batch: int = 32
    gpu: bool = False
    cpu_threads: int = 0
    storage_options: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    @property
    def resolved_precision(self) -> str:
        """``precision`` resolved, the same in the driver and on every worker."""
        return resolve(self.precision, self.device)


def check_cuda(where: str) -> None:
    """Ray gave this process a GPU: torch must see it, or the work would silently run on the CPU."""
    if not torch.cuda.is_available():
        import ray

        raise RuntimeError(
            f"{where} was given GPU ids {ray.get_gpu_ids()} by Ray, but torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}) sees no CUDA device in this process; check the driver and CUDA_VISIBLE_DEVICES")


def build_backbone(settings: BackboneSettings) -> tuple[DinoBackbone, str, str]:
    """(backbone on its device, device, the resolved precision name)."""
    if settings.gpu:
        check_cuda("the backbone's process")
    elif settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    device = settings.device
    backbone = DinoBackbone.create(
        settings.name,
        checkpoint=settings.checkpoint,
        random_init=settings.random_init and settings.checkpoint is None,
        storage_options=URLOptions(settings.storage_options),
        **settings.kwargs,
    )
    precision = settings.resolved_precision
    return backbone.to_precision(device, precision), device, precision


def features(backbone: DinoBackbone, pixels: np.ndarray, device: str, dtype: str, micro_batch: int = 32,
             queue: DeviceQueue | None = None):
    """(N, 224, 224, 3) uint8 network pixels -> tokens (N, P, C) and resampled CLS attention (N, h, w), float32,
    on ``device``. With ``queue`` (callers at once), the backbone runs in the caller's turn."""
    inputs = backbone.preprocess(torch.from_numpy(np.array(pixels)).to(device))
    with queue.turn() if queue is not None else contextlib.nullcontext():
        tokens, raw = backbone.extract(inputs, micro_batch=micro_batch, dtype=dtype)
    return tokens, cls_attention_maps(raw)[1]


def cache_folder(cache_root: str, data_root: str, backbone_id: str) -> str:
    """Where one dataset's features live for one backbone: <cache_root>/<backbone id>/<dataset>-<hash>."""
    data_root = data_root.rstrip("/")  # s3://b/x/ and s3://b/x are one dataset
    name = safe_component(posixpath.basename(data_root) or "data")
    digest = hashlib.sha1(data_root.encode()).hexdigest()[:8]
    return posixpath.join(cache_root.rstrip("/"), backbone_id, f"{name}-{digest}")


def backbone_id(settings: BackboneSettings, weights_digest: str | None) -> str:
    """Names the features a backbone gives: its weights (by content), architecture and resolved precision."""
    ident = {"weights": weights_digest or ("random-init" if settings.random_init else "timm-pretrained"),
             "name": settings.name, "kwargs": settings.kwargs,
             "precision": settings.resolved_precision}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


class FeatureCache:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.store = Storage(url, storage_options or {})
        self._headers: dict[str, tuple] = {}  # array path -> (shape, dtype, data offset): one read per array

    def current(self, key: str, image_uris: list[str], sizes: list[int] | None = None) -> dict | None:
        """The group's index if its features here were computed from this listing (URIs and sizes), else None
        (an index without a version predates versioned arrays: stale too)."""
        if not self.store.exists(f"{key}.json"):
            return None
        index = self.index(key)
        fits = index.get("listed_uris") == list(image_uris) and (sizes is None or index.get("sizes") == list(sizes))
        return index if fits and index.get("version") else None

    def index(self, key: str) -> dict:
        return self.store.read_json(f"{key}.json")

    def write(self, key: str, names: list[str], uris: list[str], tokens: torch.Tensor, attention: torch.Tensor,
              listed_uris: list[str] | None = None, sizes: list[int] | None = None) -> dict:
        """``names``/``uris``: the rows written (images that decoded); ``listed_uris``/``sizes``: the group as
        listed, which decides whether the cache is still valid for it. Returns the index written."""
        listed_uris = list(listed_uris or uris)
        version = hashlib.sha1(json.dumps([listed_uris, sizes, uris]).encode()).hexdigest()[:12]
        for suffix, array in (("tokens", tokens), ("attention", attention)):
            buf = io.BytesIO()
            np.save(buf, array.detach().to(FEATURE_DTYPE).cpu().numpy())  # as numpy's astype rounds
            self.store.write_bytes(f"{key}.{version}.{suffix}.npy", buf.getvalue())
        index = {"names": names, "image_uris": uris, "count": len(names), "listed_uris": listed_uris,
                 "sizes": sizes, "version": version}
        self.store.write_json(f"{key}.json", index)  # last: it publishes the arrays
        return index

    def read(self, key: str, version: str, rows, device: str | torch.device = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (sorted or not) of a group's arrays of ``version`` (its index's) -> tokens (k, P, C) and
        attention (k, h, w), float32 on ``device`` (moved as float16, converted there: half the bytes through
        the bus)."""
        rows = [int(r) for r in rows]
        return tuple(torch.from_numpy(self._rows(f"{key}.{version}.{s}.npy", rows)).to(device).float()
                     for s in ("tokens", "attention"))

    def _rows(self, name: str, rows: list[int]) -> np.ndarray:
        """The rows of one stored array, fetched as byte ranges in one ``cat_ranges`` batch. Hand-written over
        NumPy's own header reader: ``np.load(mmap_mode=...)`` needs a local file, and a chunked-array library
        (zarr) would add a dependency and one object per chunk in the bucket, where a ``.npy`` has each row at
        an offset known from its header."""
        fs, path = self.store.fs, self.store.path(name)
        if path not in self._headers:
            self._headers[path] = _npy_header(fs, path)
        shape, dtype, offset = self._headers[path]
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        starts = [offset + r * row_bytes for r in rows]
        blobs = fs.cat_ranges([path] * len(rows), starts, [s + row_bytes for s in starts])
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        for i, blob in enumerate(blobs):
            if len(blob) != row_bytes:
                raise ValueError(f"{path}: row {rows[i]} is truncated ({len(blob)} of {row_bytes} bytes)")
            out[i] = np.frombuffer(blob, dtype=dtype).reshape(shape[1:])
        return out


def _npy_header(fs, path: str, guess: int = 4096) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, offset of the data) of a stored ``.npy``, from a ranged read of its header only (opening
    the file would read ahead a whole block: s3fs's is 50 MiB, more than a group's tokens)."""
    fmt = np.lib.format
    head = fs.cat_file(path, start=0, end=guess)  # by name: s3fs takes version_id second
    f = io.BytesIO(head)
    version = fmt.read_magic(f)
    size_bytes = 2 if version == (1, 0) else 4
    end = f.tell() + size_bytes + int.from_bytes(head[f.tell():f.tell() + size_bytes], "little")
    if end > len(head):  # a header longer than the guess: read it whole, from just after the magic
        magic = f.tell()
        f = io.BytesIO(fs.cat_file(path, start=0, end=end))
        f.seek(magic)
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran:
        raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
    return shape, dtype, f.tell()


# ------------------------------------------------------------------------------------------ the cache pass
@dataclass(frozen=True)
class CachePlan:
    """The cache pass's actors: one per GPU (``num_gpus=1``), or one on a CPU cluster whose torch uses the
    cores while asking Ray for part of one, so that the decode tasks run beside it."""

    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int = 1  # groups per actor call; an integer, as Ray Data needs for GPU actors
    cpu_threads: int = 0
    calls: int = 1  # calls one actor works on at once: two on a GPU, so one's copy and write overlap the other's backbone

    @property
    def ray_args(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def plan_cache(gpu: bool, cluster: dict) -> CachePlan:
    """From ``ray.cluster_resources()``: GPU => one actor per GPU; CPU => one actor using all cores."""
    cpus = float(cluster.get("CPU", 1))
    if gpu:
        gpus = float(cluster.get("GPU", 0))
        return CachePlan(actors=max(1, int(gpus)), num_cpus=1.0 if cpus >= 2 * max(1, int(gpus)) else 0.5,
                         num_gpus=1.0 if gpus >= 1 else gpus, calls=2)
    return CachePlan(actors=1, num_cpus=min(1.0, cpus / 2), num_gpus=0.0, cpu_threads=max(1, int(cpus)))


class FeatureActor:
    """Ray Data actor: decoded group rows -> their features written to the cache; returns a summary row each."""

    def __init__(self, settings: BackboneSettings):
        self.backbone, self.device, self.dtype = build_backbone(settings)
        self.storage_options = settings.storage_options
        self.caches: dict[str, FeatureCache] = {}  # by folder: one pass fills the training and validation caches
        self._caches_lock = threading.Lock()  # calls run at once on a GPU (CachePlan.calls)
        self._backbone = DeviceQueue(self.device)  # two calls at once on a GPU: their backbones in turns
        self._local = threading.local()  # each call's CUDA stream: one call's copy waits for its own work only
        self.micro_batch = settings.micro_batch

    def __call__(self, batch: dict) -> dict:
        """Per group: the index written (JSON), images and errors, and its timing: wall-clock ``started`` and
        ``ended`` (two calls overlap on a GPU: ``busy_seconds`` takes the union), ``backbone_seconds`` (its
        wait for the device included) and ``write_seconds`` (copy back, float16, storage)."""
        out = {"cache": [], "key": [], "index": [], "images": [], "errors": [], "started": [], "ended": [],
               "backbone_seconds": [], "write_seconds": []}
        for i in range(len(batch["key"])):
            started, start = time.time(), time.perf_counter()
            backbone_seconds = write_seconds = 0.0
            row = {k: v[i] for k, v in batch.items()}
            ok = [bool(x) for x in row["ok"]]
            names = [str(n) for n, flag in zip(row["names"], ok) if flag]
            uris = [str(u) for u, flag in zip(row["image_uris"], ok) if flag]
            folder = str(row["cache"])
            index = None
            if names:
                with self._caches_lock:
                    if folder not in self.caches:
                        self.caches[folder] = FeatureCache(folder, self.storage_options)
                    cache = self.caches[folder]
                with thread_stream(torch.device(self.device), self._local):
                    tokens, attention = features(self.backbone, row["net"], self.device, self.dtype,
                                                 self.micro_batch, self._backbone)
                    if self.device == "cuda":  # its own stream only: the other call's backbone runs on
                        torch.cuda.current_stream().synchronize()
                    mid = time.perf_counter()
                    index = cache.write(str(row["key"]), names, uris, tokens, attention,
                                        listed_uris=[str(u) for u in row["image_uris"]],
                                        sizes=[int(s) for s in row["sizes"]])
                    backbone_seconds, write_seconds = mid - start, time.perf_counter() - mid
            out["cache"].append(folder)
            out["key"].append(str(row["key"]))
            out["index"].append(json.dumps(index))  # text: one column type whatever the index holds
            out["images"].append(len(names))
            out["errors"].append(len(ok) - len(names))
            out["started"].append(started)
            out["ended"].append(started + time.perf_counter() - start)
            out["backbone_seconds"].append(backbone_seconds)
            out["write_seconds"].append(write_seconds)
        return out


def busy_seconds(intervals) -> float:
    """Seconds covered by at least one of the (start, end) intervals: the time some actor call was running."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def build_cache(folders: dict[str, list[GroupSpec]], settings: BackboneSettings, plan: CachePlan,
                start_timeout: float = 180.0) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
    """Computes the features of every group not yet (validly) in its cache folder (``folders``: cache URL -> the
    groups it holds, e.g. the training data's and the validation data's), in one Ray Data job: one actor pool
    start for all of them. Returns, per folder, a summary: counts; the seconds its groups' calls spent in the
    backbone and in writing (calls may overlap); and, shared by the folders of the pass, its wall-clock
    ``seconds`` and ``images_per_s`` (start-up included), ``startup_seconds`` (until the first call began) and
    ``busy_seconds`` and ``busy_images_per_s`` (while at least one call ran: a GPU's rate without the pass's
    start-up and stalls). And, by key, the
    index of each group whose features it now holds (a group none of whose images decoded has none): what
    training reads, so it reads no index itself, and the arrays of that version whatever is written later. The
    file sizes the listing gives make a cached group stale when they change.

    The pool's actors must be placeable within ``start_timeout`` seconds (a placement group, then Ray Data's
    ``wait_for_min_actors_s`` for the pool itself), else this raises PlacementError instead of waiting for
    resources that may never come. When the pass ends, every reference to the dataset is dropped and collected,
    so Ray ends the pool's actors and their GPUs are free for training (Ray Data releases actors by reference
    counting, not ``ray.kill``).
    """
    import ray

    rows, summaries, present = [], {}, {}
    for url, groups in folders.items():
        cache = FeatureCache(url, settings.storage_options)
        listed = [(g, [im.image_uri for im in g.images], [int(im.size) for im in g.images]) for g in groups
                  if g.images]
        with ThreadPoolExecutor(32) as pool:  # one or two requests a group: in parallel, not one after another
            cached = list(pool.map(lambda item: cache.current(item[0].key, *item[1:]), listed))
        todo = [item for item, index in zip(listed, cached) if index is None]
        present[url] = {item[0].key: index for item, index in zip(listed, cached) if index is not None}
        summaries[url] = {"groups": len(groups), "cached_before": len(listed) - len(todo), "computed": len(todo),
                          "images": 0, "errors": 0, "seconds": 0.0, "images_per_s": None,
                          "backbone_seconds": 0.0, "write_seconds": 0.0}
        rows += [{"cache": url, "key": g.key, "names": [im.name for im in g.images], "image_uris": uris,
                  "sizes": sizes} for g, uris, sizes in todo]
    if not rows:
        return summaries, present
    start, began = time.perf_counter(), time.time()
    calls = []  # (started, ended) of each group's work in an actor: node clocks, assumed in step with this one
    # Checked first with a placement group that is given back: a pool whose actors Ray Data cannot start in time
    # leaves a pending actor behind that starts later and holds its CPUs or GPU while this process lives.
    check_placement({"CPU": plan.num_cpus, "GPU": plan.num_gpus}, plan.actors, start_timeout,
                    f"the feature cache's {plan.actors} actor(s)")
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 10_000))
    ds.context.wait_for_min_actors_s = max(1, int(start_timeout))
    ds = ds.map(decode_for_cache, fn_kwargs={"storage_options": settings.storage_options}, num_cpus=0.25)
    ds = ds.map_batches(FeatureActor,
                        fn_constructor_kwargs={"settings": dataclasses.replace(settings, cpu_threads=plan.cpu_threads)},
                        batch_size=plan.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=plan.actors, max_concurrent_calls_per_actor=plan.calls,
                                                           enable_true_multi_threading=plan.calls > 1),
                        **plan.ray_args)
    try:
        for row in ds.iter_rows():
            summary = summaries[str(row["cache"])]
            summary["images"] += int(row["images"])
            summary["errors"] += int(row["errors"])
            summary["backbone_seconds"] += float(row["backbone_seconds"])
            summary["write_seconds"] += float(row["write_seconds"])
            calls.append((float(row["started"]), float(row["ended"])))
            if int(row["images"]):
                present[str(row["cache"])][str(row["key"])] = json.loads(row["index"])
    except ray.exceptions.GetTimeoutError as exc:
        raise PlacementError(
            f"cannot place the feature cache's {plan.actors} actor(s) of {plan.ray_args} within "
            f"{start_timeout:g} s (--placement-timeout): the cluster has {ray.cluster_resources()} in total, "
            f"{ray.available_resources()} free") from exc
    finally:
        del ds
        gc.collect()
    seconds = time.perf_counter() - start
    images = sum(s["images"] for s in summaries.values())
    busy = busy_seconds(calls)
    shared = {"seconds": seconds, "images_per_s": images / seconds if seconds else None,
              "startup_seconds": max(0.0, min(s for s, _ in calls) - began) if calls else None,
              "busy_seconds": busy, "busy_images_per_s": images / busy if busy else None}
    for summary in summaries.values():
        if summary["computed"]:
            summary.update(shared)
    return summaries, present
