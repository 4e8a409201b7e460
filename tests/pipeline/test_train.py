"""Training with Ray Train on CPU: tiny golden ViT, generated groups.

The Ray Train runs are few and shared (each costs ~30-80 s on 2 cores): ``trained`` makes one uninterrupted run and
one run that is killed mid-way and resumed, with the same seed, and several tests read them.
"""
import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from ray.train import WorkerGroupError

from conftest import TINY_ARGS, TINY_VIT, make_bucket
from pipeline.resources import PlacementError, live_actors
from pipeline.sample import write_sample
from pipeline.storage import Storage, storage_options
from pipeline.train import (NoUsableGroupsError, RunMismatchError, TrainConfig, _params_identical,
                            claim_run, epoch_assignment, fingerprint, run_training, sample_rows)
from scosparc_core import Stage1Head, load_head_checkpoint
from scosparc_core.precision import PRECISIONS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")  # root/cache: one feature cache shared by the local-storage runs
    write_sample(str(root / "data"), {"horse": 4, "disc": 3, "horse2": 3})
    write_sample(str(root / "val"), {"horse": 3, "disc": 2}, seed=5)
    return root


def config(tiny_weights, data, storage, name, **kw):
    return TrainConfig(data=[str(data / "data")], val=str(data / "val"), storage=str(storage), name=name,
                       backbone=tiny_weights[0], backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                       cpus_per_worker=0.5, lr=1e-3, cache_url=str(data / "cache"), **kw)


def history(run_url):
    return pd.read_parquet(f"{run_url}/metrics.parquet")


def digest(state: dict) -> str:
    """sha256 over the sorted keys, each followed by its tensor's float32 little-endian bytes (the format of the
    history's head_sha256 column)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def weights(path) -> dict:
    return torch.load(path, weights_only=True)


def cache_files(data) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in (data / "cache").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(ray_local, tiny_weights, data, tmp_path_factory):
    """An uninterrupted run, and the same run (same seed) killed mid-way through epoch 2 and run again."""
    root = tmp_path_factory.mktemp("runs")
    straight = config(tiny_weights, data, root, "straight", epochs=3)
    run_training(straight)
    cached = cache_files(data)
    interrupted = replace(straight, name="resumed", fail_at_epoch=1, max_failures=0)
    with pytest.raises(WorkerGroupError):
        run_training(interrupted)
    assert Path(interrupted.run_url(), "_injected_failure").exists()  # that death, not another failure
    before = history(interrupted.run_url())
    resumed = replace(interrupted, fail_at_epoch=None)
    run_training(resumed)
    return SimpleNamespace(straight=straight, resumed=resumed, before=before, cached=cached)


def test_sampling_and_assignment():
    rows = sample_rows(40, 24, 0, 3, 7)
    # another epoch, group or seed draws other images (a resume relies on the same arguments drawing the same)
    assert len({tuple(sample_rows(40, 24, *args)) for args in ((0, 3, 7), (0, 4, 7), (0, 3, 8), (1, 3, 7))}) == 4
    assert len(rows) == 24 == len(set(rows)) and rows == sorted(rows)
    assert sample_rows(5, 24, 0, 0, 0) == [0, 1, 2, 3, 4]
    a, b = epoch_assignment(5, 0, 0, 2, 0), epoch_assignment(5, 0, 1, 2, 0)
    assert len(a) == len(b) == 3 and set(a) | set(b) == set(range(5))


def test_a_data_root_names_one_cache_folder_with_or_without_its_trailing_slash():
    from pipeline.feature_cache import cache_folder

    assert cache_folder("s3://c", "s3://b/x/", "m") == cache_folder("s3://c/", "s3://b/x", "m") != cache_folder(
        "s3://c", "s3://b/y", "m")


def test_a_feature_actor_on_two_groups_at_once_writes_what_it_writes_one_at_a_time(tiny_weights, data, tmp_path):
    """On a GPU the cache actor takes two calls at once (its copy and write overlap the other's backbone): the
    arrays and indexes must be those of calls one after the other, rounded to float16 as numpy rounds."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.decode import decode_for_cache
    from pipeline.feature_cache import BackboneSettings, FeatureActor, FeatureCache, features, plan_cache

    assert plan_cache(True, {"GPU": 2.0, "CPU": 16.0}).calls == 2 and plan_cache(False, {"CPU": 2.0}).calls == 1
    settings = BackboneSettings(checkpoint=tiny_weights[0], kwargs=dict(TINY_VIT))
    actor = FeatureActor(settings)
    folders = sorted((data / "data" / "image").iterdir())

    def batch(cache, folder):
        files = sorted(folder.iterdir())
        row = decode_for_cache({"cache": str(cache), "key": folder.name, "names": [f.name for f in files],
                                "image_uris": [str(f) for f in files], "sizes": [f.stat().st_size for f in files]}, {})
        return {k: [v] for k, v in row.items()}

    alone = [actor(batch(tmp_path / "alone", f)) for f in folders]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda f: actor(batch(tmp_path / "together", f)), folders))
    assert [r["index"] for r in together] == [r["index"] for r in alone] and len(folders) == 3
    for folder, result in zip(folders, alone):
        index = json.loads(result["index"][0])
        one, two = FeatureCache(str(tmp_path / "alone")), FeatureCache(str(tmp_path / "together"))
        rows = range(index["count"])
        for a, b in zip(one.read(folder.name, index["version"], rows), two.read(folder.name, index["version"], rows)):
            assert torch.equal(a, b)
        tokens, attention = features(actor.backbone, batch(tmp_path, folder)["net"][0], "cpu", "float32")
        expected = tokens.numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(one.read(folder.name, index["version"], rows)[0].numpy(), expected)


def test_help_shows_the_defaults_and_they_are_train_config_s(capsys):
    from jobs.train import parse_args

    parsed = parse_args(["--data", "d", "--storage", "s", "--name", "n"])
    plain = TrainConfig(data=("d",), storage="s", name="n")
    assert replace(parsed, storage_options={}) == plain  # every default comes from TrainConfig
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in ("epochs", "max_images", "lr", "placement_timeout", "gpus_per_worker", "dtype", "cpus_per_worker"):
        option = "--" + field.replace("_", "-")
        entry = text[text.index(f"{option} {field.upper() if field != 'dtype' else '{'}", text.index("options:")):]
        assert entry[entry.index("(default:"):].startswith(f"(default: {getattr(plain, field)})"), entry[:200]
    assert "--dtype {" + ",".join(PRECISIONS) + "}" in text and "float64" in PRECISIONS


@pytest.mark.parametrize("flag, value, bound", [
    ("--val-every", "0", ">= 1"), ("--epochs", "0", ">= 1"), ("--max-images", "0", ">= 1"),
    ("--workers", "0", ">= 1"), ("--lr", "0", "> 0"), ("--lr", "-1", "> 0"), ("--cpus-per-worker", "0", "> 0"),
    ("--placement-timeout", "-5", "> 0"), ("--weight-decay", "-0.5", ">= 0"), ("--max-failures", "-1", ">= 0")])
def test_settings_that_cannot_train_are_refused_with_usage(flag, value, bound, capsys):
    from jobs.train import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--data", "d", "--storage", "s", "--name", "n", flag, value])
    err = capsys.readouterr().err
    name = flag.removeprefix("--").replace("-", "_")
    assert done.value.code == 2 and err.startswith("usage: ") and f"error: {name} must be {bound}, not " in err


def test_storage_option_values_are_text_unless_json_reads_them_back_as_written():
    """Text a number would change stays text (key=1e5, secret=0123); s3fs reads any string as true, so its flags
    must arrive as booleans, and its sizes as numbers; structured options come as JSON."""
    import s3fs

    from jobs.train import parse_args

    cfg = parse_args(["--data", "d", "--storage", "s", "--name", "n", "--storage-option", "key=1e5",
                      "secret=0123", "max_concurrency=4", "anon=false", "requester_pays=false", "token=null",
                      "--storage-option", 'client_kwargs={"region_name": "eu-west-1"}', "version_aware=true"])
    opts = cfg.storage_options
    assert (opts["key"], opts["secret"], opts["token"]) == ("1e5", "0123", None)
    assert opts["anon"] is False and opts["requester_pays"] is False and opts["version_aware"] is True
    assert opts["client_kwargs"] == {"region_name": "eu-west-1"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    assert (fs.key, fs.secret, fs.anon, fs.req_kw, fs.version_aware) == ("1e5", "0123", False, {}, True)
    assert fs.max_concurrency == 4
    with pytest.raises(SystemExit) as done:
        parse_args(["--data", "d", "--storage", "s", "--name", "n", "--storage-option", "client_kwargs={oops"])
    assert done.value.code == 2


@pytest.mark.parametrize("feature_cache", [True, False])
def test_data_whose_every_image_fails_is_refused_not_trained_on(feature_cache, ray_local, tiny_weights, tmp_path):
    """Every image unreadable (say, workers without access): the job says so instead of writing an untrained
    head after epochs of zero steps (a loss of 0.0 in the history, weights moved by weight decay alone)."""
    write_sample(str(tmp_path / "data"), {"horse": 2})
    for image in (tmp_path / "data" / "image" / "horse").iterdir():
        image.write_bytes(b"not an image")
    cfg = replace(config(tiny_weights, tmp_path, tmp_path / "runs", "broken"), val=None, epochs=1,
                  feature_cache=feature_cache, max_failures=0)
    if feature_cache:  # the cache pass found no image that decodes: refused on the driver
        with pytest.raises(NoUsableGroupsError, match="no training group has an image that decoded"):
            run_training(cfg)
    else:  # only the workers decode: they stop together after an epoch without a step, and report why
        with pytest.raises(NoUsableGroupsError, match="epoch 1: no training step had an image that decoded"):
            run_training(cfg)
    assert not (tmp_path / "runs" / "broken" / "head_last.pt").exists()
    assert not (tmp_path / "runs" / "broken" / "metrics.parquet").exists()
    assert not (tmp_path / "runs" / "broken" / "_no_training_step.json").exists()  # read and removed


def test_a_head_of_another_width_stops_training_before_anything_is_written(tiny_weights, data, tmp_path, capsys):
    from jobs.train import main
    from scosparc_core import save_head_checkpoint

    head = tmp_path / "wide.pt"
    save_head_checkpoint(Stage1Head(TINY_VIT["embed_dim"] * 2), head)
    code = main(["--data", str(data / "data"), "--storage", str(tmp_path / "runs"), "--name", "wide",
                 "--init-head", str(head), "--backbone", tiny_weights[0], "--backbone-name", "vit_base_patch8_224",
                 *[a for k, v in TINY_VIT.items() for a in ("--backbone-arg", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "wide.pt" in err
    assert not (tmp_path / "runs").exists()


def test_a_refusal_does_not_print_a_signed_url_s_secrets(data, tmp_path, capsys):
    from jobs.train import main

    code = main(["--data", str(data / "data"), "--storage", str(tmp_path / "runs"), "--name", "signed",
                 "--backbone", "http://127.0.0.1:1/b.pth?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=SECRET123",
                 "--backbone-name", "vit_base_patch8_224",
                 *[a for k, v in TINY_VIT.items() for a in ("--backbone-arg", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "b.pth" in err
    assert "SECRET123" not in err and "AKIAEXAMPLE" not in err


def test_an_input_without_images_is_a_refusal_not_a_traceback(tmp_path, capsys):
    from jobs.train import main

    (tmp_path / "empty" / "image" / "g").mkdir(parents=True)
    code = main(["--data", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs"), "--name", "empty",
                 "--random-init", "--backbone-name", "vit_base_patch8_224",
                 *[a for k, v in TINY_VIT.items() for a in ("--backbone-arg", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no images found") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_backbone_file_of_another_architecture_stops_training_before_anything_is_written(tiny_weights, data,
                                                                                           tmp_path, capsys):
    """The tiny file has 2 blocks; declared with 3, it was accepted on the driver, and every cache actor or
    worker then failed to load it, after the run's record was written."""
    from jobs.train import main
    from scosparc_core import CheckpointError
    from scosparc_core.checkpoints import check_checkpoints

    code = main(["--data", str(data / "data"), "--storage", str(tmp_path / "runs"), "--name", "deeper",
                 "--backbone", tiny_weights[0], *TINY_ARGS, "--backbone-arg", "depth=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "tiny_dino_vit.pth: does not fit the backbone (vit_base_patch8_224" in err and "'blocks.2." in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(CheckpointError, match=r"embed_dim=192.*shape mismatches.*attn\.proj\.bias: file \(96,\) vs "
                                              r"model \(192,\)"):
        check_checkpoints(tiny_weights[0], None, "vit_base_patch8_224", {**TINY_VIT, "embed_dim": 192})
    assert set(check_checkpoints(tiny_weights[0], None, "vit_base_patch8_224", dict(TINY_VIT))) == {"backbone"}


def test_storage_the_run_cannot_use_is_a_one_line_refusal(tiny_weights, data, tmp_path, capsys):
    """A folder that cannot be written, a URL of no known filesystem, a run record that cannot be read: each
    stops the job before any work, exit 2, one line naming it (a traceback before)."""
    from jobs.train import main

    (tmp_path / "file").write_text("")
    damaged = tmp_path / "runs" / "damaged" / "train_config.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"fingerprint": ')
    for storage, name, says in ((tmp_path / "file" / "runs", "x", "cannot write the run folder"),
                                ("nosuch://bucket/runs", "x", "nosuch"),
                                (tmp_path / "runs", "damaged", "damaged/train_config.json is damaged")):
        code = main(["--data", str(data / "data"), "--storage", str(storage), "--name", name,
                     "--backbone", tiny_weights[0], *TINY_ARGS])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err
    assert damaged.read_text() == '{"fingerprint": '  # left as it was


def wait_for_free_cpus(ray, seconds: float = 120.0) -> float:
    """Waits at most ``seconds`` for every CPU of the cluster to be free; returns the cluster's CPU count."""
    total, deadline = ray.cluster_resources()["CPU"], time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    return total


def test_cache_actors_that_cannot_be_placed_in_time_are_a_one_line_refusal(ray_local, tiny_weights, data, tmp_path,
                                                                             capsys):
    """The workers fit, the feature cache's actor does not: a bounded wait, then exit 2 naming it."""
    from jobs.train import main

    ray = ray_local

    @ray.remote
    class Holder:
        def ping(self):
            return True

    holder = Holder.options(num_cpus=ray.available_resources()["CPU"] - 0.5).remote()  # one worker's 0.5 left
    try:
        assert ray.get(holder.ping.remote(), timeout=120)
        code = main(["--data", str(data / "data"), "--storage", str(tmp_path), "--name", "cache-held",
                     "--cache-url", str(tmp_path / "cache"), "--cpus-per-worker", "0.5", "--placement-timeout", "3",
                     "--backbone", tiny_weights[0], *TINY_ARGS])
    finally:
        ray.kill(holder)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith("error: cannot place the feature cache's 1 actor(s)") and "within 3 s" in errors[0]
    assert not (tmp_path / "cache-held" / "metrics.parquet").exists()
    # nothing of the refused pass starts once the CPUs are free again (a pending pool actor once did, and held one)
    total = wait_for_free_cpus(ray)
    time.sleep(3)
    assert ray.available_resources().get("CPU", 0) == total, live_actors()


def test_settings_with_tuples_resume_their_own_run(tmp_path):
    """JSON gives tuples back as lists: the recorded fingerprint must still equal the same settings'."""
    import pandas as pd

    cfg = TrainConfig(data=("d",), storage=str(tmp_path), name="t", backbone_kwargs={"img_size": (224, 224)})
    run = Storage(cfg.run_url())
    claim_run(run, cfg, fingerprint(cfg, {"d": "listing"}, None, None))
    pd.DataFrame({"epoch": [0]}).to_parquet(tmp_path / "t" / "metrics.parquet")  # the run has begun
    assert claim_run(run, cfg, fingerprint(cfg, {"d": "listing"}, None, None))["resumed"] is True
    other = replace(cfg, backbone_kwargs={"img_size": (256, 256)})
    with pytest.raises(RunMismatchError, match=r"backbone_kwargs: was \{\"img_size\": \[224, 224\]\}, now"):
        claim_run(run, other, fingerprint(other, {"d": "listing"}, None, None))


def test_a_run_is_neither_shortened_nor_recorded_again_once_it_has_its_epochs(tmp_path):
    import pandas as pd

    cfg = TrainConfig(data=("d",), storage=str(tmp_path), name="t", epochs=2)
    run, fp = Storage(cfg.run_url()), fingerprint(cfg, {"d": "listing"}, None, None)
    claim_run(run, cfg, fp)
    pd.DataFrame({"epoch": [0, 1]}).to_parquet(tmp_path / "t" / "metrics.parquet")
    recorded = (tmp_path / "t" / "train_config.json").read_text()
    with pytest.raises(ValueError, match="has trained 2 epochs, more than --epochs 1: give --epochs 2 or more"):
        claim_run(run, replace(cfg, epochs=1), fp)
    assert claim_run(run, replace(cfg, cpus_per_worker=2.0), fp) is None  # complete: nothing to do
    assert (tmp_path / "t" / "train_config.json").read_text() == recorded  # the record still says how it ran
    assert claim_run(run, replace(cfg, epochs=3), fp)["settings"]["epochs"] == 3  # more epochs: it goes on


def test_a_second_job_on_a_run_in_use_is_refused_naming_the_holder(tiny_weights, data, tmp_path, capsys):
    """Two submits of the same --name would interleave checkpoints and histories: the run's lease refuses the
    second before it writes anything."""
    from jobs.train import main
    from pipeline.lease import Lease
    from pipeline.storage import Storage

    with Lease(Storage(str(tmp_path / "runs" / "busy")), holder={"job_id": "first-job"}):
        code = main(["--data", str(data / "data"), "--storage", str(tmp_path / "runs"), "--name", "busy",
                     "--backbone", tiny_weights[0], "--backbone-name", "vit_base_patch8_224",
                     *[a for k, v in TINY_VIT.items() for a in ("--backbone-arg", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert code == 2 and "first-job" in err
    assert not (tmp_path / "runs" / "busy" / "train_config.json").exists()


def test_gpu_on_a_cluster_without_gpus_fails_at_once_naming_the_gpu(ray_local, tiny_weights, data, tmp_path,
                                                                      capsys):
    """The hang of issue 13 on a CPU machine: the cache pass's GPU actors, then Ray Train's worker group, waited
    for GPUs that do not exist. Now the job stops before starting anything, and says why."""
    from jobs.train import main

    start = time.monotonic()
    code = main(["--data", str(data / "data"), "--storage", str(tmp_path), "--name", "gpu", "--gpu",
                 "--backbone", tiny_weights[0], "--backbone-name", "vit_base_patch8_224", "--cpus-per-worker", "0.5",
                 *[a for k, v in TINY_VIT.items() for a in ("--backbone-arg", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 60
    assert "GPU: 1 needed, the cluster has none" in err and "drop --gpu" in err
    assert not (tmp_path / "gpu" / "metrics.parquet").exists()


def test_workers_that_cannot_be_placed_in_time_fail_naming_what_holds_the_cpus(ray_local, tiny_weights, data,
                                                                               tmp_path):
    """Resources taken by someone else (as the cache pass's actors could keep a GPU): a bounded wait, then an
    error naming the resource and the actors alive."""
    ray = ray_local

    @ray.remote
    class Holder:
        def ping(self):
            return True

    total = wait_for_free_cpus(ray)  # an earlier test's actors may still be going away
    holder = Holder.options(num_cpus=total).remote()
    try:
        assert ray.get(holder.ping.remote(), timeout=120)
        cfg = replace(config(tiny_weights, data, tmp_path, "held", epochs=1), cpus_per_worker=1.0,
                      placement_timeout=3)
        start = time.monotonic()
        with pytest.raises(PlacementError) as err:
            run_training(cfg)
        assert 3 <= time.monotonic() - start < 60
        message = str(err.value)
        assert "within 3 s" in message and "CPU: 1 needed, 0 of 2 free now" in message and "Holder" in message
    finally:
        ray.kill(holder)


def test_loss_goes_down_and_the_head_serves_inference(trained, tiny_weights, data, tmp_path):
    from pipeline.infer import InferConfig, run_inference

    cfg = trained.straight
    h = history(cfg.run_url())
    assert list(h["epoch"]) == [0, 1, 2]
    assert h["loss"].iloc[-1] < h["loss"].iloc[0]
    assert "val_max_fm" in h and h["val_max_fm"].notna().all()
    head = Stage1Head(TINY_VIT["embed_dim"])
    load_head_checkpoint(head, f"{cfg.run_url()}/head_best.pt")  # official format, weights_only
    manifest = run_inference(InferConfig(input=str(data / "val"), output=str(tmp_path / "infer"),
                                         backbone=tiny_weights[0], head=f"{cfg.run_url()}/head_last.pt",
                                         backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT)))
    assert manifest["output"]["rows"] == 5 and manifest["output"]["ok"] == 5


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(trained):
    before, after = trained.before, history(trained.resumed.run_url())
    assert list(before["epoch"]) == [0]  # killed mid-way through epoch 2
    assert list(after["epoch"]) == [0, 1, 2]
    # epoch 0's row is the one written before the kill: a run that started afresh would have rewritten it
    pd.testing.assert_frame_equal(after.iloc[:1], before)
    assert (after["attempt"].iloc[1:] != before["attempt"].iloc[0]).all()
    straight = weights(f"{trained.straight.run_url()}/head_last.pt")
    resumed = weights(f"{trained.resumed.run_url()}/head_last.pt")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert list(after["head_sha256"]) == list(history(trained.straight.run_url())["head_sha256"])


@pytest.mark.parametrize("run", ["straight", "resumed"])
def test_head_best_is_the_head_of_the_best_validation_epoch(trained, run):
    url = getattr(trained, run).run_url()
    h = history(url)
    assert h["head_sha256"].nunique() == len(h)  # each epoch's weights are told apart
    # the column names real weights: Ray Train's kept checkpoints hold those heads
    checkpoints = sorted(p for p in Path(url).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    for folder in checkpoints:
        epoch = pd.read_json(folder / "state.json", typ="series")["epoch"] - 1
        assert digest(weights(folder / "head.pt")) == h["head_sha256"].iloc[epoch]
        # the best head so far travels with the checkpoint: a restart publishes its own best, never the head of
        # an attempt that died before its checkpoint was registered
        best_so_far = int(h["val_max_fm"].iloc[:epoch + 1].idxmax())
        assert digest(weights(folder / "head_best.pt")) == h["head_sha256"].iloc[best_so_far]
    best = int(h["val_max_fm"].idxmax())  # the first epoch with the highest max-F
    assert digest(weights(f"{url}/head_best.pt")) == h["head_sha256"].iloc[best]
    assert digest(weights(f"{url}/head_last.pt")) == h["head_sha256"].iloc[-1]


def test_feature_cache_reads_equal_the_backbone_and_a_second_run_reuses_them(trained, tiny_weights, data):
    from pipeline.decode import decode_image
    from pipeline.feature_cache import FeatureCache
    from scosparc_core import DinoBackbone
    from scosparc_core.modeling import cls_attention_maps

    # the interrupted and resumed runs computed nothing: no cache file was added or rewritten
    assert cache_files(data) == trained.cached
    record = pd.read_json(f"{trained.resumed.run_url()}/train_config.json", typ="series")
    assert all(s["computed"] == 0 and s["cached_before"] == s["groups"] for s in record["feature_cache"].values())

    (folder,) = (data / "cache").glob("*/data-*")
    cache = FeatureCache(str(folder))
    rows = [3, 0, 2]  # unsorted, with gaps
    index = cache.index("horse")
    tokens, attention = cache.read("horse", index["version"], rows)
    uris = [index["image_uris"][r] for r in rows]
    backbone = DinoBackbone.create("vit_base_patch8_224", checkpoint=tiny_weights[0], **TINY_VIT)
    pixels = np.stack([decode_image(open(u.removeprefix("file://"), "rb").read())[0] for u in uris])
    ref_tokens, raw = backbone.extract(backbone.preprocess(torch.from_numpy(pixels)))
    ref_attention = cls_attention_maps(raw)[1]
    for got, ref in ((tokens, ref_tokens), (attention, ref_attention)):
        assert got.shape == ref.shape and got.dtype == torch.float32
        # float16 rounding: at most one float16 step (2^-10 relative) from float32, and mostly the rounded value
        assert torch.all((got - ref).abs() <= ref.abs() * 2**-10 + 2**-24)
        assert (got == ref.half().float()).float().mean() > 0.99


def test_a_group_computed_again_leaves_the_rows_a_running_job_reads(tmp_path):
    """The cache is shared by every run on a storage: another job that lists a group anew computes it again,
    and a job already training on the old listing must go on reading the images it sampled, not their
    neighbours (its rows were rewritten in place before)."""
    from pipeline.feature_cache import BackboneSettings, FeatureCache
    from pipeline.train import GroupFeatures, LoopSettings, TrainGroup

    def features(ids):  # every value of an image's rows is its id
        rows = torch.tensor(ids, dtype=torch.float32)
        return rows[:, None, None].expand(-1, 4, 3), rows[:, None, None].expand(-1, 2, 2)

    url, uris = str(tmp_path / "cache"), {name: f"file:///d/{name}.jpg" for name in "abc"}
    listed = [uris["a"], uris["c"]]
    index = FeatureCache(url).write("g", ["a", "c"], listed, *features([1, 3]))
    group = TrainGroup("d", "g", tuple(index["image_uris"]), (None, None), index["version"])  # as the pass gave it
    loop = LoopSettings(backbone=BackboneSettings(), groups=(group,), val_groups=(), cache_folders={"d": url},
                        run_url=str(tmp_path / "run"), storage_options={}, dim=3, epochs=1, val_every=1,
                        max_images=24, lr=1e-3, weight_decay=0.0, seed=0, backend="gloo")
    source = GroupFeatures(loop, torch.device("cpu"))
    assert source.get(group, [1])[0].unique().tolist() == [3.0]
    again = FeatureCache(url).write("g", ["a", "b", "c"], list(uris.values()), *features([1, 2, 3]))
    assert again["version"] != index["version"] and FeatureCache(url).current("g", list(uris.values())) == again
    assert FeatureCache(url).current("g", listed) is None  # the old listing is stale for new runs
    tokens, attention, rows = source.get(group, [1])
    assert rows == [uris["c"]] and tokens.unique().tolist() == attention.unique().tolist() == [3.0]
    assert FeatureCache(url).read("g", again["version"], [1])[0].unique().tolist() == [2.0]
    # an index from before versioned arrays names none: stale, computed again
    (tmp_path / "cache" / "h.json").write_text(json.dumps({"listed_uris": listed, "sizes": None, "count": 2}))
    assert FeatureCache(url).current("h", listed) is None


def test_running_a_finished_run_again_says_so_and_fewer_epochs_are_refused(trained, tiny_weights, data, capsys):
    """The CLI on the 3-epoch run: as many epochs did nothing silently before and printed the old run's last
    metrics; fewer rewrote the record to say 1 epoch beside a 3-epoch history."""
    from jobs.train import main

    cfg = trained.straight
    record = Path(cfg.run_url(), "train_config.json").read_text()
    args = ["--data", str(data / "data"), "--val", str(data / "val"), "--storage", cfg.storage, "--name", cfg.name,
            "--backbone", tiny_weights[0], *TINY_ARGS, "--cpus-per-worker", "0.5", "--lr", str(cfg.lr),
            "--cache-url", cfg.cache_url]
    assert main([*args, "--epochs", "3"]) == 0
    out, err = capsys.readouterr()
    assert "is already complete: it has its 3 epochs" in err and "final metrics" not in out
    assert main([*args, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has trained 3 epochs, more than --epochs 2" in err
    assert Path(cfg.run_url(), "train_config.json").read_text() == record


def test_a_rerun_with_other_data_weights_or_settings_is_refused(trained, tiny_weights, data, tmp_path):
    cfg = trained.straight
    record = (tmp_path / "record.json")
    shutil.copy(f"{cfg.run_url()}/train_config.json", record)
    other_weights = tmp_path / "other.pth"
    state = torch.load(tiny_weights[0], weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    torch.save(state, other_weights)
    write_sample(str(tmp_path / "other"), {"horse": 4, "disc": 3, "horse2": 3}, seed=9)
    for change, named in ((dict(backbone=str(other_weights)), "backbone: was"),
                          (dict(data=(str(tmp_path / "other"),)), "data: was"),
                          (dict(seed=1, max_images=2), "max_images: was 24, now 2; seed: was 0, now 1")):
        with pytest.raises(RunMismatchError, match="not resumed") as err:
            run_training(replace(cfg, **change))
        assert named in str(err.value)
    assert open(record).read() == open(f"{cfg.run_url()}/train_config.json").read()  # the run's record is kept


def test_two_gloo_workers_end_with_identical_parameters_on_s3(ray_local, tiny_weights, data, s3_server):
    fs = make_bucket(s3_server, "train")
    opts = storage_options(s3_server, extra={"key": "testing", "secret": "testing"})  # workers get no env creds
    write_sample("s3://train/data", {"horse": 4, "disc": 3, "horse2": 3}, storage_options=opts)
    cfg = TrainConfig(data=["s3://train/data"], storage="s3://train/runs", name="ddp", workers=2, epochs=2,
                      backbone=tiny_weights[0], backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                      cpus_per_worker=0.5, lr=1e-3, storage_options=opts)
    result = run_training(cfg)
    assert result.metrics["params_identical"] is True and result.metrics["workers"] == 2
    fs.invalidate_cache()
    h = pd.read_parquet(fs.open("train/runs/ddp/metrics.parquet"))
    assert h["params_identical"].tolist() == [True, True]  # compared at every epoch, not assumed
    assert fs.exists("train/runs/ddp/head_last.pt")
    assert fs.find("train/runs/feature-cache")  # the features went to the bucket too


def _compare_in_group(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    results = [_params_identical(layer)]
    if rank == 1:  # one bit of one parameter
        with torch.no_grad():
            layer.bias[1] = torch.nextafter(layer.bias[1], torch.tensor(1.0))
    results.append(_params_identical(layer))
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(results))


def test_params_identical_compares_the_workers_for_real(tmp_path):
    import torch.multiprocessing as mp

    assert _params_identical(torch.nn.Linear(2, 2)) is None  # no process group: nothing compared, not True
    mp.spawn(_compare_in_group, args=(f"file://{tmp_path}/store", str(tmp_path / "out")), nprocs=2)
    # the same weights, then one bit apart on one worker: both workers see both answers
    assert [open(tmp_path / f"out.{rank}").read() for rank in (0, 1)] == ["[True, False]"] * 2


def test_pretrained_weights_the_driver_cannot_fetch_stop_the_job_before_anything_is_written(data, tmp_path, capsys,
                                                                                          monkeypatch):
    """No --backbone and no network: every worker would fail to fetch timm's weights, after the run's record was
    written; the driver fetches them first and stops with one line naming the flag."""
    from jobs.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["--data", str(data / "data"), "--storage", str(tmp_path / "runs"), "--name", "offline",
                 "--backbone-name", "vit_base_patch8_224.dino",
                 *[a for k, v in TINY_VIT.items() for a in ("--backbone-arg", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: could not fetch") and "--backbone" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_training_resolves_its_format_for_the_device_it_runs_on():
    """The run's fingerprint and the workers read the same resolved format (BackboneSettings.resolved_precision),
    for the device --gpu gives: auto is float32 on both, tf32 is itself on a GPU and plain float32 on CPUs, an
    explicit format stays itself."""
    gpu = TrainConfig(data="unused", storage="unused", name="unused", gpu=True)
    cpu = replace(gpu, gpu=False)
    assert [c.backbone_settings().resolved_precision for c in (gpu, cpu)] == ["float32", "float32"]
    assert [replace(c, dtype="tf32").backbone_settings().resolved_precision for c in (gpu, cpu)] == ["tf32", "float32"]
    assert replace(gpu, dtype="float64").backbone_settings().resolved_precision == "float64"
