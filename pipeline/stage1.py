"""Stage 1 of the pipeline (GPU actors): the group engine on batches of decoded groups; chunks stream out.

One call takes a batch of whole groups (stage 1 compares every image with every other, so a group is never
split here). The engine runs the backbone over all their images in full micro-batches, then stage 1, the
threshold, the prototype and the region filter per group, and on a GPU the CRF too; what leaves the actor per
image is its uint8 mask at 224 (and, when the CRF runs on CPU workers, its colour input). Groups too large for
one row arrive undecoded: this actor reads them itself, in micro-batches, with the engine's passes when they do
not fit in memory (``one_pass_limit``: from the actor's memory request on CPUs, from the free GPU memory on
CUDA). Two calls run at once on a GPU actor, so one's CPU steps overlap the other's GPU work.

Faults: an out-of-memory on a batch is retried group by group (a group larger than a micro-batch in the engine's
passes over its decoded images), with halved micro-batches, and then becomes transient error rows; a CUDA error
that poisons the context ends the process (Ray starts a new actor and retries the batch); a batch that keeps
killing its actor becomes error rows after ``max_attempts``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .decode import VIEW, DecodeSettings, Decoded, decode_images
from .errors import TRANSIENT, classify, is_out_of_memory, poisons_cuda
from .memory import keep_large_blocks_out_of_the_heap
from .resources import CPU_STAGE1_MEMORY, GIB
from .storage import URLOptions

if TYPE_CHECKING:
    from scosparc_core.engine import SpillFile

log = logging.getLogger(__name__)

# A group in one pass holds, per image, its tokens (P x C float32: 2.4 MB for ViT-B/8) and ~1.25 MiB beside them
# (stage-1 map, region labels, both views, the host copy of its pixels): ~3.6 MiB measured on CPUs for ViT-B/8.
ONE_PASS_OVERHEAD_BYTES = int(1.25 * 2**20)
CPU_BACKBONE_PEAK = int(2.1 * GIB)  # ViT-B/8 at micro-batch 32 (README "Resources"), beside the group
# On CUDA a call's groups may take a quarter of the GPU memory free at actor start: two calls run at once, and each
# leaves as much again for the backbone's activations and the torch CRF.
CUDA_ONE_PASS_SHARE = 0.25
MAX_ONE_PASS_IMAGES = 2048
VIEWS_PER_THREAD = 16  # images each decode thread holds at a time while a group in passes spills its views


def one_pass_limit(device: str, num_patches: int, embed_dim: int, micro_batch: int,
                   free_bytes: int | None = None) -> int:
    """The most images one engine call holds at once (larger groups run in the engine's passes): what fits
    beside the backbone in the CPU actor's memory request (~250 for ViT-B/8), or in a share of ``free_bytes``
    (the GPU's free memory); at least one micro-batch, at most MAX_ONE_PASS_IMAGES."""
    per_image = num_patches * embed_dim * 4 + ONE_PASS_OVERHEAD_BYTES
    if device.startswith("cuda"):
        budget = CUDA_ONE_PASS_SHARE * (free_bytes or 0)
    else:  # Ray's memory request only places the actor: past it, a busy node's memory monitor kills the worker
        budget = CPU_STAGE1_MEMORY - CPU_BACKBONE_PEAK
    return int(max(micro_batch, min(MAX_ONE_PASS_IMAGES, budget // per_image)))


@dataclass(frozen=True)
class ModelSettings:
    """The weights stage 1 loads: checkpoints (paths or URLs; None = timm's pretrained backbone, or random with
    ``random_init``), the timm architecture, and fsspec options for URLs."""

    backbone: str | None = None
    head: str | None = None
    random_init: bool = False
    backbone_name: str = "vit_base_patch8_224.dino"
    backbone_kwargs: dict = field(default_factory=dict)
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage1Settings:
    """What a stage-1 actor needs: the model, where and how it runs, the CRF, and how large groups are read.

    precision: resolved name (``scosparc_core.precision``); crf_backend: ``torch`` (here) or ``defer``
    (pydensecrf on the refine actors; also what ``crf="none"`` is given, since then no CRF runs); chunk_size:
    images per output row; one_pass_images: larger groups run in passes (None: ``one_pass_limit`` for the
    actor's device, worked out when it starts); fault: test-only fault injection (see ``Stage1Actor._inject``)."""

    model: ModelSettings
    decode: DecodeSettings
    device: str = "cpu"
    precision: str = "float32"
    micro_batch: int = 32
    compile: bool = False
    cpu_threads: int = 0
    crf: str = "coca"
    crf_backend: str = "defer"
    chunk_size: int = 32
    one_pass_images: int | None = None
    token_dir: str = ""  # where groups in passes keep views and tokens: "" the node's temp folder, "none" nowhere
    decode_threads: int = 4
    max_attempts: int = 3
    fault: dict | None = None


def build_model(settings: Stage1Settings):
    """The SCoSPARC model (and its engine) an actor runs."""
    import torch

    from scosparc_core import SCoSPARC

    if settings.device == "cpu" and settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    m = settings.model
    return SCoSPARC.from_checkpoints(
        backbone=m.backbone, head=m.head, device=settings.device, backbone_name=m.backbone_name,
        random_init=m.random_init, dtype=settings.precision, micro_batch=settings.micro_batch,
        compile=settings.compile, storage_options=URLOptions(m.storage_options), **m.backbone_kwargs,
    )


def _by_images(rows: list[dict], limit: int) -> list[list[dict]]:
    """Consecutive rows cut into engine calls of at most ``limit`` images (a row alone may hold up to that many):
    a batch of many small groups keeps the device memory of one one-pass group, whatever their number."""
    parts: list[list[dict]] = []
    held = 0
    for row in rows:
        n = len(row["image_uris"])
        if not parts or held + n > limit:
            parts.append([])
            held = 0
        parts[-1].append(row)
        held += n
    return parts


class Stage1Actor:
    def __init__(self, settings: Stage1Settings, state=None):
        keep_large_blocks_out_of_the_heap()
        self.settings = settings
        self.engine = build_model(settings).engine
        self.one_pass_images = settings.one_pass_images or self._one_pass_limit()
        self.state = state
        self.calls = 0
        self.injected: dict[str, int] = {}
        self.actor_id = None
        if state is not None:
            import ray

            self.actor_id = ray.get_runtime_context().get_actor_id()
            ray.get(state.restarted.remote(self.actor_id))  # blames what this actor ran when it last died

    def _one_pass_limit(self) -> int:
        import torch

        e = self.engine
        free = torch.cuda.mem_get_info(e.device)[0] if e.cuda else None  # after the model is on the device
        limit = one_pass_limit(e.device.type, e.backbone.num_patches, e.backbone.embed_dim, e.micro_batch, free)
        log.info("stage 1 runs groups of up to %d images in one pass, larger ones in passes", limit)
        return limit

    # -- Ray Data entry point ---------------------------------------------------------------------------------
    def __call__(self, batch: dict) -> Iterator[dict]:
        self.calls += 1
        self._maybe_die()
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["group"]))]
        key = "|".join(str(r["group_key"]) for r in rows)
        deaths = self._begin(key)
        if deaths >= self.settings.max_attempts:
            exc = RuntimeError(f"this batch ended its stage-1 actor {deaths} times (a GPU fault?)")
            exc.error_class = TRANSIENT
            for row in rows:
                yield _columns(self._error_chunks(row, exc))
            self._end(key)
            return
        yield from self._run(rows)
        self._end(key)  # not reached when the process dies: then the batch is blamed

    def _run(self, rows: list[dict]) -> Iterator[dict]:
        small = [r for r in rows if r["decoded"]]
        chunks = []
        for part in _by_images(small, self.one_pass_images):
            start = time.perf_counter()
            results = self._run_small(part)
            done = sum(int(np.sum(r["ok"])) for r, res in zip(part, results) if not isinstance(res, BaseException))
            seconds = _per_image(time.perf_counter() - start, done)
            for row, result in zip(part, results):
                chunks += self._chunks(row, result, seconds)
        if chunks:
            yield _columns(chunks)
        for row in rows:
            if not row["decoded"]:
                for part in self._run_large(row):
                    yield _columns(part)

    # -- small groups (decoded rows) ------------------------------------------------------------------------
    def _run_small(self, rows: list[dict]) -> list:
        """Engine results (or the exception) per row, for the rows' decoded images. A batch of several groups that
        fails is retried group by group: smaller after an out-of-memory, as it is after any other error, so that
        only a group that fails alone gets error rows."""
        if not rows:
            return []
        pixels = [np.asarray(r["net"])[np.asarray(r["ok"], bool)] for r in rows]
        crf = [np.asarray(r["crf"])[np.asarray(r["ok"], bool)] for r in rows]
        try:
            return self._engine_run(rows, pixels, crf)
        except Exception as err:  # noqa: BLE001 - sorted below: exit, retry smaller, group by group, or error rows
            if poisons_cuda(err):
                self._exit(err)
            oom = is_out_of_memory(err)
            if not oom and len(rows) == 1:
                return [err]
            log.warning("%s on a batch of %d groups; retrying group by group",
                        "out of memory" if oom else classify(err).kind, len(rows))
            exc = err.with_traceback(None)  # its frames hold the failed call's tensors (the tokens): free them
        if not oom:  # one group's failure is not its batch mates': alone, only the group that fails gets error rows
            return [self._run_small([r])[0] for r in rows]
        return [self._retry_smaller(r, p, c, exc) for r, p, c in zip(rows, pixels, crf)]

    def _engine_run(self, rows: list[dict], pixels: list, crf: list, micro_batch: int | None = None) -> list:
        self._inject(rows, micro_batch)
        s = self.settings
        return self.engine.run(pixels, crf, crf=s.crf, crf_backend=s.crf_backend, micro_batch=micro_batch)

    def _retry_smaller(self, row: dict, pixels: np.ndarray, crf: np.ndarray, oom: BaseException):
        """One group after an out-of-memory, then the out-of-memory (transient). A group larger than a micro-batch
        goes to the engine's passes over the images at hand: its tokens, maps and CRF, which grow with the group
        and not with the micro-batch, are what a smaller micro-batch alone would not shrink. Then halved
        micro-batches down to 1 (in passes for such a group)."""
        import torch

        mb = self.engine.micro_batch
        passes = len(pixels) > mb
        sizes = [mb] if passes else []
        while mb > 1:
            mb //= 2
            sizes.append(mb)
        last: BaseException = oom
        for size in sizes:
            if self.engine.cuda:
                torch.cuda.empty_cache()
            try:
                if passes:
                    return self._engine_passes(row, pixels, crf, size)
                return self._engine_run([row], [pixels], [crf], micro_batch=size)[0]
            except Exception as exc:  # noqa: BLE001
                if poisons_cuda(exc):
                    self._exit(exc)
                if not is_out_of_memory(exc):
                    return exc
                last = exc.with_traceback(None)  # as in _run_small: not the failed try's tensors into the next
        return last

    def _engine_passes(self, row: dict, pixels: np.ndarray, crf: np.ndarray, micro_batch: int):
        """The engine's passes over one group's decoded images -> one GroupResult for the whole group."""
        self._inject([row], micro_batch)
        s = self.settings
        parts = list(self.engine.run_passes(len(pixels), lambda a, b: pixels[a:b],
                                            None if crf is None else lambda a, b: crf[a:b], crf=s.crf,
                                            crf_backend=s.crf_backend, chunk=micro_batch, micro_batch=micro_batch,
                                            spill=self._token_dir()))
        return _joined(parts)

    def _token_dir(self) -> str | None:
        """Where a group in passes keeps its tokens (``GroupEngine.run_passes``'s spill) and its decoded views,
        or None."""
        d = self.settings.token_dir
        return None if d == "none" else d or tempfile.gettempdir()

    def _spill(self, n: int, per_image: int, dtype) -> SpillFile | None:
        from scosparc_core.engine import SpillFile

        folder = self._token_dir()
        return SpillFile.open(folder, n, per_image, dtype=dtype) if folder else None

    # -- large groups (read here) ---------------------------------------------------------------------------
    def _run_large(self, row: dict) -> Iterator[list[dict]]:
        """A group that came undecoded: read in micro-batches; one pass when it fits, else the engine's passes."""
        uris = list(row["image_uris"])
        start = time.perf_counter()
        one_pass = len(uris) <= self.one_pass_images
        # A group in passes keeps its decoded views on the node's disk when there is room: each image is then read
        # and decoded once, by the probe, instead of once more in each pass that needs pixels or colours. One file
        # per view, so a pass reads only the view it needs; the colour view only for a CRF.
        with contextlib.ExitStack() as files:
            def view_file() -> SpillFile | None:
                file = self._spill(len(uris), int(np.prod(VIEW)), np.uint8)
                return files.enter_context(file) if file is not None else None

            net_file = None if one_pass else view_file()
            crf_file = None if one_pass or self.settings.crf == "none" else view_file()
            yield from self._run_probed(row, uris, one_pass, net_file, crf_file, start)

    def _run_probed(self, row: dict, uris: list[str], one_pass: bool, net_file: SpillFile | None,
                    crf_file: SpillFile | None, start: float) -> Iterator[list[dict]]:
        s, key = self.settings, str(row["group_key"])
        try:
            probe = (self._decode(uris, keep=one_pass) if net_file is None and crf_file is None
                     else self._decode_into(uris, net_file, crf_file))
        except Exception as exc:  # noqa: BLE001
            yield self._error_chunks(row, exc)
            return
        row = {**row, "decoded": True, "ok": probe.ok, "height": probe.height, "width": probe.width,
               **probe.error_columns(), "decode_s": time.perf_counter() - start}
        ok = np.flatnonzero(probe.ok)
        if one_pass:
            row = {**row, "net": probe.net, "crf": probe.crf}
            start = time.perf_counter()
            result = self._run_small([row])[0]
            yield from _batched(self._chunks(row, result, _per_image(time.perf_counter() - start, len(ok))), 8)
            return
        failed = self._chunks(row, None, 0.0, indices=np.flatnonzero(~probe.ok))
        if failed:
            yield failed
        ok_uris = [uris[i] for i in ok]

        def redecode(a: int, b: int) -> Decoded:
            d = self._decode(ok_uris[a:b], keep=True)
            if not d.ok.all():  # it decoded in the first pass: a read that failed now is transient
                bad = int(np.flatnonzero(~d.ok)[0])
                exc = RuntimeError(f"image {ok[a + bad]} of the group failed on a later pass: {d.errors[bad][2]}")
                exc.error_class = TRANSIENT
                raise exc
            return d

        def reader(file: SpillFile | None, view: str) -> Callable[[int, int], np.ndarray]:
            """One view ("net" or "crf") of the ok images a..b-1, in order: from its file, else decoded again."""
            def read(a: int, b: int) -> np.ndarray:
                kept = file.read(a, b) if file is not None else None
                return kept.reshape(b - a, *VIEW) if kept is not None else getattr(redecode(a, b), view)
            return read

        def tick(step: str, done: int) -> None:
            if self.state is not None:
                self.state.tick.remote(key, f"{step} {done}/{len(ok)} images")

        out = 0  # images of ``ok`` whose rows are out
        try:
            # tokens kept on the node's disk when it has room: each image through the backbone once
            start = time.perf_counter()
            for part in self.engine.run_passes(len(ok), reader(net_file, "net"), reader(crf_file, "crf"),
                                               crf=s.crf, crf_backend=s.crf_backend, chunk=s.chunk_size,
                                               progress=tick, spill=self._token_dir()):
                # the engine's time for this part (the first carries the passes before it), not the waits in yield
                seconds = _per_image(time.perf_counter() - start, len(part))
                part_idx = ok[part.start:part.start + len(part)]
                # a deferred CRF's colour views come with the part: memory per chunk, not per group
                yield self._chunks({**row, "crf": part.crf_rgb, "crf_indices": part_idx}, part, seconds,
                                   indices=part_idx)
                out = part.start + len(part)
                start = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - the rows not yet out become errors (one row per image)
            if poisons_cuda(exc):
                self._exit(exc)
            if out < len(ok):  # a failure after the last chunk went out leaves no row to write
                yield self._error_chunks(row, exc, indices=ok[out:])

    def _decode(self, uris: list[str], keep: bool) -> Decoded:
        """decode_images over ``decode_threads`` threads (PIL and OpenCV release the GIL)."""
        s = self.settings
        parts = np.array_split(np.arange(len(uris)), max(1, min(s.decode_threads, len(uris))))
        with ThreadPoolExecutor(len(parts)) as pool:
            return _joined_decoded(list(pool.map(lambda p: decode_images([uris[i] for i in p], s.decode, keep),
                                                 parts)), keep)

    def _decode_into(self, uris: list[str], net_file: SpillFile | None, crf_file: SpillFile | None) -> Decoded:
        """Like ``_decode(keep=False)``, but the network and colour views of the images that decode are appended
        in order to ``net_file`` and ``crf_file`` (each when not None), a few images per thread at a time: memory
        per chunk."""
        step = VIEWS_PER_THREAD * max(1, self.settings.decode_threads)
        done = []
        for a in range(0, len(uris), step):
            d = self._decode(uris[a:a + step], keep=True)
            for file, view in ((net_file, d.net), (crf_file, d.crf)):
                if file is not None:
                    file.append(view[d.ok])
            done.append(dataclasses.replace(d, net=None, crf=None))
        return _joined_decoded(done, keep=False)

    # -- output rows ----------------------------------------------------------------------------------------
    def _chunks(self, row: dict, result, seconds: float, indices=None) -> list[dict]:
        """Output rows (``chunk_size`` images each) for the emitted images of ``row``. ``result``: the engine's
        GroupResult over the ok images (in order), an exception (every ok image becomes an error), or None.
        ``seconds``: the engine's time per image of the work that gave ``result`` (its ``stage1_s``)."""
        n = len(row["image_uris"])
        ok = np.asarray(row["ok"], bool).copy()
        errors = [list(row["error"]), list(row["error_kind"]), list(row["error_class"])]
        ok_idx = np.flatnonzero(ok)
        if indices is None:
            indices = np.arange(n)
        per_ok = {}
        if isinstance(result, BaseException):
            info = classify(result, "Stage1")
            for i in ok_idx:
                ok[i] = False
                errors[0][i], errors[1][i], errors[2][i] = info.text, info.kind, info.error_class
        elif result is not None:
            targets = ok_idx[result.start:result.start + len(result)]
            per_ok = {int(i): j for j, i in enumerate(targets)}
        only = {int(i) for i in row.get("only", ())}
        emit = [int(i) for i in indices if not only or int(i) in only]
        if not emit:
            return []
        deferred = result is not None and not isinstance(result, BaseException) and not result.crf_applied
        views = row.get("crf")
        crf_views = np.asarray(views) if deferred and views is not None and len(views) else None
        # a passes group brings the colour views of its output images only: memory per chunk, not per group
        crf_at = {int(i): k for k, i in enumerate(row["crf_indices"])} if "crf_indices" in row else None
        out = []
        size = self.settings.chunk_size
        for c in range(0, len(emit), size):
            idx = emit[c:c + size]
            j = [per_ok.get(i) for i in idx]
            good = [jj is not None for jj in j]
            pick = lambda arr, dtype: np.array([arr[jj] if jj is not None else 0 for jj in j], dtype)  # noqa: E731
            crf_rows = [crf_at[i] for i in idx] if crf_at is not None else idx
            final = np.zeros((len(idx), 224, 224), np.uint8)
            for k, jj in enumerate(j):
                if jj is not None:
                    final[k] = result.final[jj]
            out.append({
                "group": row["group"], "group_key": row["group_key"], "group_size": n,
                "group_hash": row["group_hash"], "group_rows": int(row["group_rows"]), "index": idx,
                **{k: [row[k][i] for i in idx] for k in ("names", "image_uris", "image_bytes", "gt_uris", "mask_keys")},
                "ok": [bool(ok[i]) for i in idx],
                "error": [errors[0][i] for i in idx], "error_kind": [errors[1][i] for i in idx],
                "error_class": [errors[2][i] for i in idx],
                "height": [int(row["height"][i]) for i in idx], "width": [int(row["width"][i]) for i in idx],
                "image_confidence": pick(result.image_confidence, np.float32) if per_ok
                else np.zeros(len(idx), np.float32),
                "regions_found": pick(result.regions_found, np.int32) if per_ok else np.zeros(len(idx), np.int32),
                "regions_kept": pick(result.regions_kept, np.int32) if per_ok else np.zeros(len(idx), np.int32),
                "fallback": [bool(result.fallback[jj]) if jj is not None else False for jj in j] if per_ok
                else [False] * len(idx),
                "final": final,
                "crf": crf_views[crf_rows] if crf_views is not None else np.zeros((0, *VIEW), np.uint8),
                "crf_pending": deferred and any(good),
                "confidence": float(result.confidence) if per_ok else float("nan"),
                "threshold": float(result.threshold) if per_ok else float("nan"),
                "decode_s": float(row["decode_s"]) / max(n, 1),
                "stage1_s": seconds,
            })
        return out

    def _error_chunks(self, row: dict, exc: BaseException, indices=None) -> list[dict]:
        """Rows for a group that failed as a whole: images not yet read count as ok until ``exc``."""
        n = len(row["image_uris"])
        if not row.get("decoded"):
            row = {**row, "ok": np.ones(n, bool), "height": np.zeros(n, np.int32), "width": np.zeros(n, np.int32)}
        return self._chunks(row, exc, 0.0, indices)

    # -- faults ---------------------------------------------------------------------------------------------
    def _begin(self, key: str) -> int:
        if self.state is None:
            return 0
        import ray

        return ray.get(self.state.begin.remote(self.actor_id, key))

    def _end(self, key: str) -> None:
        if self.state is not None:
            self.state.end.remote(self.actor_id, key)

    def _exit(self, exc: BaseException) -> None:
        """A CUDA error that poisons the context: nothing more can run in this process. Ray restarts the actor
        and retries the batch (bounded by ``max_attempts``)."""
        log.error("stage-1 actor exits after a CUDA error: %s", classify(exc).text)
        os._exit(3)

    def _maybe_die(self) -> None:
        """Fault injection (tests): ``{"kill_after_groups": n, "marker": path}`` kills the process (SIGKILL) once,
        at the start of its n-th call; ``{"delay_s": s}`` makes every call s seconds slower."""
        fault = self.settings.fault or {}
        time.sleep(float(fault.get("delay_s", 0)))
        if "kill_after_groups" not in fault or self.calls < int(fault["kill_after_groups"]):
            return
        marker = fault["marker"]
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"stage-1 actor {os.getpid()} killed at call {self.calls}")
            os.kill(os.getpid(), signal.SIGKILL)

    def _inject(self, rows: list[dict], micro_batch: int | None) -> None:
        """Fault injection (tests): ``{"oom": {group_key: n}}`` raises a CUDA out-of-memory on the first n engine
        calls with that group; ``{"cuda_error": group_key}`` raises a context-poisoning CUDA error every time."""
        fault = self.settings.fault or {}
        for row in rows:
            key = str(row["group_key"])
            if fault.get("cuda_error") == key:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            budget = (fault.get("oom") or {}).get(key, 0)
            if self.injected.get(key, 0) < budget:
                self.injected[key] = self.injected.get(key, 0) + 1
                import torch

                raise torch.OutOfMemoryError(f"CUDA out of memory (injected, micro-batch {micro_batch})")


def _joined(parts: list):
    """One group's GroupResults from the engine's passes (consecutive chunks) -> one GroupResult."""
    per_image = ("image_confidence", "regions_found", "regions_kept", "fallback", "stage2", "final")
    return dataclasses.replace(parts[0], start=0, crf_rgb=None,
                               **{f: np.concatenate([getattr(p, f) for p in parts]) for f in per_image})


def _joined_decoded(parts: list[Decoded], keep: bool) -> Decoded:
    """Consecutive ranges of a group's decoded images -> one range (views only with ``keep``)."""
    cat = (lambda xs: np.concatenate(xs)) if len(parts) > 1 else (lambda xs: xs[0])
    return Decoded(ok=cat([d.ok for d in parts]), errors=[e for d in parts for e in d.errors],
                   height=cat([d.height for d in parts]), width=cat([d.width for d in parts]),
                   net=cat([d.net for d in parts]) if keep else None, crf=cat([d.crf for d in parts]) if keep else None)


def _columns(rows: list[dict]) -> dict:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _batched(chunks: list[dict], n: int) -> Iterator[list[dict]]:
    for i in range(0, len(chunks), n):
        yield chunks[i:i + n]


def _per_image(seconds: float, images: int) -> float:
    """Seconds of work shared by the images it gave masks: summed over the ok rows, ``stage1_s`` gives the
    engine's time (less on a resume that writes only some images of a group)."""
    return seconds / max(images, 1)
