"""Resource planning: which device stage 1 runs on, how many actors and tasks of each kind, what each asks Ray for.

A plan is made from what the cluster *can* have, not only what it has at submit time: on an autoscaling cluster
started from cluster.yaml (its head advertises ``scosparc_head``) the GPU workers start at zero, so the job asks
the autoscaler for them (``ray.autoscaler.sdk.request_resources``), waits a bounded time, and fails with a clear
message when none comes; ``--device cpu`` runs on CPUs on purpose.

Per-image costs measured on this project's machines (README, "Resources") size the CPU work: decode and the PNG
writes take one core per task for a few milliseconds per image; the CPU CRF (pydensecrf) takes ~0.1 s per image
per core, so a GPU's output needs hundreds of cores for it - on GPUs the CRF runs beside stage 1 (torch backend).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CLUSTER_MARKER = "scosparc_head"  # a resource cluster.yaml gives its head node
STAGE_RESOURCES = {"stage1": "scosparc_stage1", "refine": "scosparc_stage2"}
# Seconds per image on one core (README "Resources"): what one GPU's output costs on CPUs.
DECODE_S = 0.003  # 0.1-0.2 MP JPEG, read + both views
WRITE_S = 0.002  # resize to the original size + PNG
CRF_CPU_S = 0.11  # pydensecrf, 224 x 224, 10 iterations
# ViT-B/8's backbone img/s on one H100 per format (README "Speed"): what a GPU actor asks of the CPUs around it
GPU_BACKBONE_RATE = {"float32": 270.0, "tf32": 750.0, "float16": 2000.0, "bfloat16": 2000.0, "float64": 135.0}
GIB = 1024**3
CPU_STAGE1_MEMORY = 3 * GIB  # what a CPU stage-1 actor asks Ray for (README "Resources")
# float64's backbone peaks higher: ViT-B/8 at micro-batch 32, RSS 3.0 GiB against float32's 1.9 (README "Resources");
# its actor asks for that much more, which leaves groups the same room
CPU_FLOAT64_EXTRA = int(1.3 * GIB)


class NoGPUError(RuntimeError):
    """Stage 1 was planned on GPUs and none appeared within the wait (nothing was started)."""


class PlacementError(RuntimeError):
    """The cluster cannot place what the job asks for (within the bounded wait)."""


@dataclass(frozen=True)
class ClusterView:
    """What the cluster has now (``ray.cluster_resources()``) and, on an autoscaling cluster, the node types
    its config declares (name -> {"resources": {...}, "max_workers": n})."""

    resources: dict
    node_types: dict = field(default_factory=dict)
    nodes: tuple = ()  # the alive nodes' resources (ray.nodes()), each a dict

    def gpu_node_cpus(self) -> float:
        """CPUs of the smallest alive node with a GPU (0 when none)."""
        return min((float(n.get("CPU", 0)) for n in self.nodes if n.get("GPU", 0) >= 1), default=0.0)

    @property
    def ours(self) -> bool:
        return CLUSTER_MARKER in self.resources

    def declared(self, resource: str) -> float:
        return sum(float(t.get("resources", {}).get(resource, 0)) * int(t.get("max_workers", 0))
                   for t in self.node_types.values())

    def has(self, resource: str) -> bool:
        """Whether some node has, or may come with, ``resource``."""
        return resource in self.resources or self.declared(resource) > 0

    def node_cpus(self, marker: str) -> float:
        """CPUs of one node of the declared type that advertises ``marker`` (0 when unknown)."""
        return max((float(t.get("resources", {}).get("CPU", 0)) for t in self.node_types.values()
                    if marker in t.get("resources", {})), default=0.0)


def cluster_view() -> ClusterView:
    """The connected cluster, with the node types of its autoscaler config when this process can read it (the
    job driver runs on the head, where ``ray up`` leaves ``~/ray_bootstrap_config.yaml``)."""
    import ray

    path = os.path.expanduser(os.environ.get("SCOSPARC_CLUSTER_CONFIG", "~/ray_bootstrap_config.yaml"))
    node_types = {}
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            node_types = (yaml.safe_load(f) or {}).get("available_node_types", {}) or {}
    return ClusterView(dict(ray.cluster_resources()), node_types, _alive_nodes())


def _alive_nodes() -> tuple:
    import ray

    return tuple(dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive"))


@dataclass(frozen=True)
class Plan:
    """device: where stage 1 runs; *_actors: (min, max) of an actor pool; *_args: Ray resource requests;
    stage1_calls: batches one actor works on at once (two on a GPU: one's CPU steps overlap the other's GPU work);
    crf_backend: ``torch`` (beside stage 1), ``defer`` (pydensecrf in the refine actors) or ``none``;
    cpu_threads: torch threads of a CPU stage-1 actor; groups_per_batch: groups per stage-1 call."""

    device: str
    stage1_actors: tuple[int, int]
    stage1_args: dict
    stage1_calls: int
    decode_args: dict
    refine_actors: tuple[int, int]
    refine_args: dict
    crf_backend: str
    cpu_threads: int
    groups_per_batch: int
    notes: tuple[str, ...] = ()


def choose_device(requested: str, view: ClusterView, wait_s: float, want_gpus: int = 1,
                  wait: bool = True, meanwhile: Callable[[], None] | None = None) -> tuple[str, ClusterView]:
    """``auto``: CUDA when the cluster has GPUs or is one of ours (then they are asked for and waited for);
    ``cuda``: GPUs or an error; ``cpu``: CPUs on purpose. Returns the device and the view after any wait
    (``wait=False``, a plan only: no request, no wait). ``meanwhile`` runs after GPUs are asked for and before
    the wait for them (the job lists its input while nodes start, so a bad input is refused without waiting)."""
    if requested == "cpu":
        return "cpu", view
    if view.resources.get("GPU", 0) >= 1:
        return "cuda", view
    if requested == "auto" and not view.ours:
        return "cpu", view
    if wait:
        if not cluster_can_grow():  # nothing could add a GPU: waiting --gpu-wait would only delay the error
            raise NoGPUError("no GPU in this Ray cluster, and it has no autoscaler that could add one: run on a "
                             "machine or cluster with GPUs, or pass --device cpu to run stage 1 on CPUs on purpose.")
        view = wait_for_gpus(view, max(1, want_gpus), wait_s, meanwhile=meanwhile)
    return "cuda", view


def cluster_can_grow() -> bool:
    """Whether an autoscaler could add nodes (Ray Train asks the same of the cluster config)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() is not None
    except Exception:  # noqa: BLE001 - unknown: assume it can, and wait the bounded time
        return True


def wait_for_gpus(view: ClusterView, want: int, wait_s: float, poll_s: float = 2.0,
                  meanwhile: Callable[[], None] | None = None) -> ClusterView:
    """Asks the autoscaler for ``want`` GPU bundles, runs ``meanwhile``, and waits until ``wait_s`` after the
    request for the first GPU (looking at least once)."""
    import ray
    from ray.autoscaler.sdk import request_resources

    bundle = {"GPU": 1}
    if view.ours:
        bundle[STAGE_RESOURCES["stage1"]] = 1
    request_resources(bundles=[bundle] * want)
    start = last = time.monotonic()
    print(f"[infer] no GPU in the cluster yet; asked the autoscaler for {want} GPU node(s), waiting up to "
          f"{wait_s:.0f}s", file=sys.stderr, flush=True)
    if meanwhile is not None:
        meanwhile()
    while True:
        resources = dict(ray.cluster_resources())
        if resources.get("GPU", 0) >= 1:
            return ClusterView(resources, view.node_types, _alive_nodes())
        if time.monotonic() - start >= wait_s:
            break
        if time.monotonic() - last >= 30:
            last = time.monotonic()
            print(f"[infer] still waiting for a GPU ({last - start:.0f}s)", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    request_resources(bundles=[])
    declared = view.declared("GPU")
    raise NoGPUError(
        f"no GPU appeared within {wait_s:.0f}s"
        + (f" (the cluster config declares up to {declared:.0f})" if declared else "")
        + ". Check the GPU node type's quota, instance type and image in cluster.yaml and `ray status`; "
        "raise --gpu-wait, or pass --device cpu to run stage 1 on CPUs on purpose."
    )


def release_requests() -> None:
    """Withdraws this job's standing request for GPU nodes, so an idle cluster can scale down."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception:  # noqa: BLE001 - a cluster without an autoscaler has nothing to withdraw
        pass


def plan_resources(view: ClusterView, device: str, *, gpu_actors: int | None = None,
                   gpus_per_actor: float | None = None, crf: str = "coca", crf_backend: str = "auto",
                   micro_batch: int = 128, mean_group: float = 10.0, precision: str = "float32") -> Plan:
    """The plan for ``device`` on ``view`` (see Plan), ``precision`` resolved. Pure: tests call it on made-up
    clusters."""
    res = view.resources
    cpus = float(res.get("CPU", 1))
    notes = []
    if crf == "none":
        backend = "none"
    elif crf_backend == "pydensecrf" or (device == "cpu" and crf_backend == "auto"):
        backend = "defer"  # auto on CPUs: pydensecrf in the refine actors (the torch CRF, asked for, runs in stage 1)
    else:
        backend = "torch"
    refine_args: dict = {"num_cpus": 1}
    decode_args: dict = {"num_cpus": 1, "memory": GIB}  # Ray measured ~790 MiB peak per decode worker on an H200 node
    if device == "cuda":
        per_actor = gpus_per_actor or 1.0
        gpus = max(float(res.get("GPU", 0)), view.declared("GPU"))
        most = gpu_actors or max(1, int(gpus // per_actor))
        node_cpus = view.node_cpus(STAGE_RESOURCES["stage1"]) or view.gpu_node_cpus() or cpus
        stage1_args = {"num_gpus": per_actor, "num_cpus": max(1.0, min(4.0, node_cpus / 4)), "memory": 4 * GIB}
        if view.ours and view.has(STAGE_RESOURCES["stage1"]):
            stage1_args["resources"] = {STAGE_RESOURCES["stage1"]: per_actor}
        if backend == "defer" and view.ours and view.has(STAGE_RESOURCES["refine"]):
            refine_args["resources"] = {STAGE_RESOURCES["refine"]: 1}
        per_gpu_rate = GPU_BACKBONE_RATE.get(precision, 270.0)
        notes.append(f"stage 1 on up to {most} GPU actor(s); keeping one GPU busy takes ~"
                     f"{per_gpu_rate * (DECODE_S + WRITE_S):.0f} cores for decode and writes"
                     + (f" and ~{per_gpu_rate * CRF_CPU_S:.0f} for the CPU CRF" if backend == "defer" else ""))
        batch = max(1, round(2 * micro_batch / max(mean_group, 1.0)))
        refiners = _refine_pool(view, cpus, backend, stage1_args["num_cpus"] * most)
        return Plan("cuda", (1, most), stage1_args, 2, decode_args, refiners, refine_args, backend, 0, batch,
                    tuple(notes))
    # CPU: one stage-1 actor whose torch uses the node's cores; fractional requests let a laptop run every
    # stage at once (the backbone dominates: ~1 s per image and core for ViT-B/8).
    stage1_args = {"num_gpus": 0, "num_cpus": 0.25}
    if "memory" in res:  # ViT-B/8 at micro-batch 32 peaks at ~2.1 GiB; at most half the cluster's, so a laptop fits
        want = CPU_STAGE1_MEMORY + (CPU_FLOAT64_EXTRA if precision == "float64" else 0)
        stage1_args["memory"] = int(min(want, float(res["memory"]) / 2))
    decode_args = {"num_cpus": 0.25}
    refine_args = {"num_cpus": 0.25}
    threads = cpus
    if view.ours and view.has(STAGE_RESOURCES["refine"]):  # on cluster.yaml's CPU nodes, not its GPU nodes
        stage1_args["resources"] = refine_args["resources"] = {STAGE_RESOURCES["refine"]: 1}
        threads = view.node_cpus(STAGE_RESOURCES["refine"]) or cpus
    notes.append("stage 1 on CPUs: one actor using every core of its node")
    if gpu_actors or gpus_per_actor:
        notes.append("--gpu-actors and --gpus-per-actor do not apply: stage 1 runs on CPUs")
    refiners = (1, max(1, int(cpus))) if "resources" not in refine_args else _refine_pool(view, cpus, backend, 0)
    return Plan("cpu", (1, 1), stage1_args, 1, decode_args, refiners, refine_args, backend, int(threads), 1,
                tuple(notes))


def unplaceable(args: dict, view: ClusterView) -> str | None:
    """Why no node, alive or of a declared node type, can hold one actor asking for ``args`` (Ray's resource
    arguments), or None. Ray would otherwise keep the actor pending until the job's stall timeout. Unknown
    (None) where the cluster may grow into node types this process cannot read."""
    bundle = {"CPU": args.get("num_cpus", 1), "GPU": args.get("num_gpus", 0), "memory": args.get("memory", 0),
              **args.get("resources", {})}
    bundle = {k: float(v) for k, v in bundle.items() if v}

    def fits(res: dict, keys) -> bool:
        return all(float(res.get(k, 0)) >= bundle[k] for k in keys)

    if any(fits(n, bundle) for n in view.nodes):
        return None
    declared = [k for k in bundle if k != "memory"]  # node types do not declare memory: Ray measures it
    if any(fits(t.get("resources", {}), declared) for t in view.node_types.values()):
        return None
    if not view.node_types and cluster_can_grow():
        return None
    largest = max(view.nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    have = {k: largest.get(k, 0) for k in bundle}
    return (f"no node can hold one stage-1 actor asking for {bundle} (the largest node has {have}"
            + (", and no declared node type has it either" if view.node_types else "")
            + "): lower --gpus-per-actor, or run on nodes that have that much.")


def _refine_pool(view: ClusterView, cpus: float, backend: str, stage1_cpus: float) -> tuple[int, int]:
    """Refine actors: one per core they may use - the CPU nodes' cores (now or declared) when the CRF runs there,
    else what stage 1 leaves of the cluster's cores (the pool grows only while there is work)."""
    if backend == "defer" and view.has(STAGE_RESOURCES["refine"]):
        slots = max(float(view.resources.get(STAGE_RESOURCES["refine"], 0)), view.declared(STAGE_RESOURCES["refine"]))
        return 1, max(1, int(slots))
    total = max(cpus, view.declared("CPU"))
    return 1, max(1, int(total - stage1_cpus))


# ---------------------------------------------------------------------------------------- placement
def check_placement(bundle: dict, count: int, timeout: float, what: str) -> None:
    """Waits at most ``timeout`` s for the cluster to place ``count`` bundles (a placement group, PACK, as Ray
    Train reserves its workers), then gives them back. Raises PlacementError naming what is missing. A resource
    no node has, on a cluster that cannot grow (no autoscaler), fails at once."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {k: v for k, v in bundle.items() if v}
    total = ray.cluster_resources()
    if any(not total.get(k) for k in bundle) and not cluster_can_grow():
        raise PlacementError(placement_message(bundle, count, None, what))
    pg = placement_group([bundle] * count, strategy="PACK")
    try:
        if pg.wait(timeout_seconds=max(1, int(timeout))):
            return
    finally:
        remove_placement_group(pg)
    raise PlacementError(placement_message(bundle, count, timeout, what))


def placement_message(bundle: dict, count: int, waited: float | None, what: str) -> str:
    """What is missing for ``count`` x ``bundle``; ``waited``: the bounded wait that ran out (None: not waited,
    the cluster cannot grow)."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = _alive_nodes()
    problems = []
    for k, v in bundle.items():
        need = v * count
        if not total.get(k):
            hint = " (drop --gpu, or run on a machine or cluster with GPUs)" if k == "GPU" else ""
            problems.append(f"{k}: {need:g} needed, the cluster has none{hint}")
        elif total[k] < need:
            problems.append(f"{k}: {need:g} needed, the cluster has {total[k]:g} in all")
        elif free.get(k, 0) < need:
            problems.append(f"{k}: {need:g} needed, {free.get(k, 0):g} of {total[k]:g} free now (held by others)")
    if not problems and not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
        problems.append(f"no single node has {bundle} for one of them")
    actors = live_actors()
    when = (f"within {waited:g} s (--placement-timeout)" if waited is not None
            else "(not waiting: the cluster lacks it and has no autoscaler to add nodes)")
    return (f"cannot place {what}: {count} x {bundle} {when}. "
            f"{'; '.join(problems) or 'resources look sufficient but were not granted in time'}. "
            f"Cluster: {_resources(total)}; free: {_resources(free)}; live actors: {actors}")


def _resources(r: dict) -> str:
    skip = ("node:", "memory", "object_store")
    return ", ".join(f"{k} {v:g}" for k, v in sorted(r.items()) if not k.startswith(skip))


def live_actors() -> list[str]:
    """Class names of the cluster's live actors with what they hold (state API; names alone without it)."""
    import ray

    try:
        from ray.util.state import list_actors

        rows = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                           detail=True, limit=200, raise_on_missing_output=False, timeout=10)
        return [f"{a.class_name} {a.required_resources or {}}" for a in rows]
    except Exception:  # noqa: BLE001 - no dashboard here: the GCS's actor table has the names
        try:
            from ray._private import state

            return [a["ActorClassName"] for a in state.actors().values() if a["State"] == "ALIVE"]
        except Exception as exc:  # noqa: BLE001
            return [f"(unavailable: {type(exc).__name__})"]
