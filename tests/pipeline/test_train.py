"""Training with Ray Train on CPU: tiny golden ViT, generated groups.

The Ray Train runs are few and shared (each costs ~30-80 s on 2 cores): ``trained`` makes one uninterrupted run and
one run that is killed mid-way and resumed, with the same seed, and several tests read them.
"""
import hashlib
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_VIT, make_bucket
from pipeline.sample import write_sample
from pipeline.storage import storage_options
from pipeline.train import (PlacementError, RunMismatchError, TrainConfig, _params_identical, epoch_assignment,
                            run_training, sample_rows)
from scosparc_core import Stage1Head, load_head_checkpoint


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
    with pytest.raises(Exception):  # noqa: B017 - the worker's death surfaces as Ray's own error type
        run_training(interrupted)
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
    assert "--dtype {auto,float32,tf32,float16,bfloat16}" in text


@pytest.mark.parametrize("setting", [("--val-every", "0"), ("--epochs", "0"), ("--max-images", "0")])
def test_settings_that_cannot_train_are_refused_with_usage(setting, capsys):
    from jobs.train import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--data", "d", "--storage", "s", "--name", "n", *setting])
    name = setting[0].removeprefix("--").replace("-", "_")
    assert done.value.code == 2 and f"error: {name} must be >= 1" in capsys.readouterr().err


def test_data_whose_every_image_fails_is_refused_not_trained_on(ray_local, tiny_weights, tmp_path):
    """Every image unreadable (say, workers without access): the job says so instead of writing an untrained
    head after epochs of zero steps."""
    from pipeline.train import NoUsableGroupsError

    write_sample(str(tmp_path / "data"), {"horse": 2})
    for image in (tmp_path / "data" / "image" / "horse").iterdir():
        image.write_bytes(b"not an image")
    cfg = replace(config(tiny_weights, tmp_path, tmp_path / "runs", "broken"), val=None, epochs=1)
    with pytest.raises(NoUsableGroupsError, match="no training group has an image that decoded"):
        run_training(cfg)
    assert not (tmp_path / "runs" / "broken" / "head_last.pt").exists()


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
    assert code == 2 and err.startswith("error: no images found") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


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

    free = ray.available_resources().get("CPU", 0)
    holder = Holder.options(num_cpus=free).remote()
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
    tokens, attention = cache.read("horse", rows)
    uris = [cache.index("horse")["image_uris"][r] for r in rows]
    backbone = DinoBackbone.create("vit_base_patch8_224", checkpoint=tiny_weights[0], **TINY_VIT)
    pixels = np.stack([decode_image(open(u.removeprefix("file://"), "rb").read())[0] for u in uris])
    ref_tokens, raw = backbone.extract(backbone.preprocess(torch.from_numpy(pixels)))
    ref_attention = cls_attention_maps(raw)[1]
    for got, ref in ((tokens, ref_tokens), (attention, ref_attention)):
        assert got.shape == ref.shape and got.dtype == torch.float32
        # float16 rounding: at most one float16 step (2^-10 relative) from float32, and mostly the rounded value
        assert torch.all((got - ref).abs() <= ref.abs() * 2**-10 + 2**-24)
        assert (got == ref.half().float()).float().mean() > 0.99


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
