import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Keep tests off the network and single-threaded enough to share 2 cores with Ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s, and a report (so each epoch's checkpoint) waits for a poll;
# the tests' epochs take 0.1 s. Polling faster changes no behaviour, only the waits (~10 s per training run).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
torch.set_num_threads(min(2, torch.get_num_threads()))

GOLDEN = Path(__file__).parent / "golden"
TINY_VIT = dict(embed_dim=96, depth=2, num_heads=3)  # the architecture of golden/tiny_dino_vit.pth


@pytest.fixture(scope="session")
def golden():
    return dict(np.load(GOLDEN / "golden_pipeline.npz"))


@pytest.fixture(scope="session")
def golden_backbone():
    return dict(np.load(GOLDEN / "golden_backbone.npz"))


def golden_head(golden):
    """The golden stage-1 head weights, stored under the official keys, in a Stage1Head."""
    from scosparc_core import Stage1Head

    head = Stage1Head(768)
    head.load_state_dict(
        {k.removeprefix("head.encoder_attn."): torch.from_numpy(v) for k, v in golden.items() if k.startswith("head.")}
    )
    return head


def tiny_model(seed: int = 0, **kwargs):
    """A SCoSPARC with the tiny golden ViT (loaded strictly from its DINO-format file) and a seeded head."""
    from scosparc_core import DinoBackbone, SCoSPARC, Stage1Head

    torch.manual_seed(seed)
    backbone = DinoBackbone.create("vit_base_patch8_224", checkpoint=GOLDEN / "tiny_dino_vit.pth", **TINY_VIT)
    return SCoSPARC(backbone, Stage1Head(backbone.embed_dim), **kwargs)


@pytest.fixture(scope="session")
def model():
    return tiny_model()


TINY_ARGS = ["--backbone-name", "vit_base_patch8_224"] + [
    a for k, v in TINY_VIT.items() for a in ("--backbone-arg", f"{k}={v}")
]


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """(backbone path, head path): the tiny golden DINO ViT and a seeded stage-1 head in the official format."""
    from scosparc_core import Stage1Head, save_head_checkpoint

    torch.manual_seed(7)
    head = tmp_path_factory.mktemp("weights") / "head.pt"
    save_head_checkpoint(Stage1Head(TINY_VIT["embed_dim"]), head)
    return str(GOLDEN / "tiny_dino_vit.pth"), str(head)


@pytest.fixture(scope="session")
def weights_model(tiny_weights):
    """``SCoSPARC`` loaded from ``tiny_weights``' files, in-process: what the jobs' masks are compared with."""
    from scosparc_core import SCoSPARC

    backbone, head = tiny_weights
    return SCoSPARC.from_checkpoints(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                                     micro_batch=8, **TINY_VIT)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (address='local': never an existing cluster); shut down only if started here."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on loopback, with dummy credentials; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_bucket(endpoint: str, name: str):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing")
    fs.mkdir(name)
    fs.invalidate_cache()
    return fs


# The reliability suite (tests/reliability) records what it tried and what happened; printed at the end of pytest.
# Every number comes from a job's output or from the fault injectors' own counters, never from a constant.
RELIABILITY = {"inputs tried": 0, "rows out": 0, "rows lost": 0, "duplicate rows": 0, "errors by kind": {},
               "faults injected": {}, "faults survived": {}}


def count(section: str, key: str, n: int = 1) -> None:
    RELIABILITY[section][key] = RELIABILITY[section].get(key, 0) + n


def record_fault(name: str, injected: int, survived: bool) -> None:
    """``injected``: how often the fault happened (0: the test did not manage to inject it); ``survived``: the
    checks of the output for this fault passed."""
    count("faults injected", name, int(injected))
    count("faults survived", name, int(injected) if survived else 0)


def record_rows(images_in: int, rows, error_kinds=()) -> None:
    """A finished job's rows: ``rows`` the image keys of its output, one per row."""
    rows = list(rows)
    RELIABILITY["inputs tried"] += images_in
    RELIABILITY["rows out"] += len(rows)
    RELIABILITY["rows lost"] += max(0, images_in - len(set(rows)))
    RELIABILITY["duplicate rows"] += len(rows) - len(set(rows))
    for kind in error_kinds:
        count("errors by kind", kind)


def pytest_terminal_summary(terminalreporter):
    r = RELIABILITY
    if not r["inputs tried"] and not r["faults injected"]:
        return
    terminalreporter.section("reliability summary")

    def listing(d):
        return f"{sum(d.values())} (" + ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) + ")"

    lost = {k: v - r["faults survived"].get(k, 0) for k, v in r["faults injected"].items()}
    missed = sorted(k for k, v in r["faults injected"].items() if not v)
    for line in (f"inputs tried:    {r['inputs tried']}", f"rows out:        {r['rows out']}",
                 f"rows lost:       {r['rows lost']}  (must be 0)", f"duplicate rows:  {r['duplicate rows']}",
                 f"errors by kind:  {listing(r['errors by kind'])}",
                 f"faults injected: {listing(r['faults injected'])}",
                 f"faults survived: {listing(r['faults survived'])}",
                 f"not survived:    {listing({k: v for k, v in lost.items() if v})}",
                 f"not injected:    {', '.join(missed) or 'none'}"):
        terminalreporter.write_line(line)
