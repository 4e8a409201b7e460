"""Training with Ray Train on CPU: tiny golden ViT, generated groups."""
import pandas as pd
import pytest
import torch

from conftest import TINY_VIT, make_bucket
from pipeline.infer import InferConfig, run_inference
from pipeline.sample import write_sample
from pipeline.storage import storage_options
from pipeline.train import TrainConfig, epoch_assignment, run_training, sample_rows
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


def test_sampling_and_assignment():
    assert sample_rows(40, 24, 0, 3, 7) == sample_rows(40, 24, 0, 3, 7)
    rows = sample_rows(40, 24, 0, 3, 7)
    assert len(rows) == 24 == len(set(rows)) and rows == sorted(rows)
    assert sample_rows(5, 24, 0, 0, 0) == [0, 1, 2, 3, 4]
    a, b = epoch_assignment(5, 0, 0, 2, 0), epoch_assignment(5, 0, 1, 2, 0)
    assert len(a) == len(b) == 3 and set(a) | set(b) == set(range(5))


def test_loss_goes_down_and_the_head_serves_inference(ray_local, tiny_weights, data, tmp_path):
    cfg = config(tiny_weights, data, tmp_path, "down", epochs=5)
    run_training(cfg)
    h = history(cfg.run_url())
    assert list(h["epoch"]) == [0, 1, 2, 3, 4]
    assert h["loss"].iloc[-1] < h["loss"].iloc[0]
    assert "val_max_fm" in h and h["val_max_fm"].notna().all()
    head = Stage1Head(TINY_VIT["embed_dim"])
    load_head_checkpoint(head, f"{cfg.run_url()}/head_best.pt")  # official format, weights_only
    manifest = run_inference(InferConfig(input=str(data / "val"), output=str(tmp_path / "infer"),
                                         backbone=tiny_weights[0], head=f"{cfg.run_url()}/head_last.pt",
                                         backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT)))
    assert manifest["output"]["rows"] == 5 and manifest["output"]["ok"] == 5


def test_without_the_feature_cache_the_backbone_runs_every_step(ray_local, tiny_weights, data, tmp_path):
    cfg = config(tiny_weights, data, tmp_path, "nocache", epochs=2, feature_cache=False)
    cfg.val = None
    run_training(cfg)
    h = history(cfg.run_url())
    assert list(h["epoch"]) == [0, 1] and h["loss"].notna().all()


def test_two_gloo_workers_end_with_identical_parameters_on_s3(ray_local, tiny_weights, data, s3_server):
    fs = make_bucket(s3_server, "train")
    opts = storage_options(s3_server, extra={"key": "testing", "secret": "testing"})  # workers get no env creds
    write_sample("s3://train/data", {"horse": 4, "disc": 3, "horse2": 3}, storage_options=opts)
    cfg = TrainConfig(data=["s3://train/data"], storage="s3://train/runs", name="ddp", workers=2, epochs=2,
                      backbone=tiny_weights[0], backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                      cpus_per_worker=0.5, lr=1e-3, storage_options=opts)
    result = run_training(cfg)
    assert result.metrics["params_identical"] is True
    fs.invalidate_cache()
    assert fs.exists("train/runs/ddp/head_last.pt") and fs.exists("train/runs/ddp/metrics.parquet")
    assert fs.find("train/runs/feature-cache")  # the features went to the bucket too


def test_an_interrupted_run_resumes_from_its_checkpoint(ray_local, tiny_weights, data, tmp_path):
    cfg = config(tiny_weights, data, tmp_path, "resume", epochs=3, fail_at_epoch=1, max_failures=0)
    with pytest.raises(Exception):  # noqa: B017 - the worker's death surfaces as Ray's own error type
        run_training(cfg)
    assert list(history(cfg.run_url())["epoch"]) == [0]
    before = torch.load(f"{cfg.run_url()}/head_last.pt", weights_only=True)
    cfg.fail_at_epoch = None
    run_training(cfg)
    assert list(history(cfg.run_url())["epoch"]) == [0, 1, 2]
    after = torch.load(f"{cfg.run_url()}/head_last.pt", weights_only=True)
    assert not torch.equal(before["encoder_attn.conv.weight"], after["encoder_attn.conv.weight"])
