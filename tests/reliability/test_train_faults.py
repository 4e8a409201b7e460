"""Training under faults: a worker killed mid-epoch resumes from its checkpoint.

The run goes without the feature cache (``feature_cache=False``), so the backbone runs in every step, before and
after the restart: that path needs a Ray Train run of its own otherwise. It has two DDP workers and two groups
whose every image is unreadable, so the same run covers steps where one worker, or both, have no image.
"""
import json

from conftest import TINY_VIT, count
from pipeline.sample import write_sample


def test_a_killed_training_worker_resumes_from_its_checkpoint(ray_local, tiny_weights, tmp_path):
    import pandas as pd
    import torch

    from pipeline.listing import list_layout
    from pipeline.storage import Storage
    from pipeline.train import TrainConfig, epoch_assignment, run_training

    write_sample(str(tmp_path / "data"), {"horse": 3, "disc": 3, "horse2": 3, "disc3": 3, "disc2": 2, "horse3": 2})
    broken = ("disc2", "horse3")
    for group in broken:
        for image in (tmp_path / "data" / "image" / group).iterdir():
            image.write_bytes(b"not an image")
    cfg = TrainConfig(data=[str(tmp_path / "data")], storage=str(tmp_path / "runs"), name="killed", epochs=3,
                      backbone=tiny_weights[0], backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                      cpus_per_worker=0.5, fail_at_epoch=1, max_failures=1, feature_cache=False, workers=2, seed=2)
    # the steps whose two groups both lack images, and those where one worker has images: the seed gives both
    keys = [spec.key for spec in list_layout(Storage(cfg.data[0]))]
    steps = [[keys[g] in broken for g in pair]
             for epoch in range(cfg.epochs)
             for pair in zip(*(epoch_assignment(len(keys), epoch, rank, 2, cfg.seed) for rank in (0, 1)))]
    assert any(all(s) for s in steps) and any(any(s) and not all(s) for s in steps)

    result = run_training(cfg)  # before the fix, the workers' all-reduces fell out of step here and hung
    run = tmp_path / "runs" / "killed"
    assert (run / "_injected_failure").exists()  # the worker died mid-way through epoch 2
    h = pd.read_parquet(run / "metrics.parquet")
    assert list(h["epoch"]) == [0, 1, 2]  # epoch 1 redone, nothing twice
    # Ray restarted the workers from the checkpoint of epoch 0: its row was written by the first attempt, the
    # later ones by the second (a restart from scratch would have rewritten epoch 0 too)
    assert h["attempt"].iloc[0] != h["attempt"].iloc[1] == h["attempt"].iloc[2]
    assert result.metrics["epoch"] == 2 and result.metrics["head_sha256"] == h["head_sha256"].iloc[-1]
    assert h["loss"].notna().all() and h["loss"].iloc[-1] < h["loss"].iloc[0]
    assert h["params_identical"].tolist() == [True] * 3 and h["workers"].tolist() == [2] * 3
    # an optimizer step where a worker had images, none where neither had (Adam's weight decay would move the
    # weights with no data)
    last = max((p for p in run.glob("checkpoint_*") if p.is_dir()),
               key=lambda p: json.loads((p / "state.json").read_text())["epoch"])
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {float(sum(not all(s) for s in steps))}
    # no cache pass ran and none was written: the features came from the backbone, step by step
    record = pd.read_json(run / "train_config.json", typ="series")
    assert "feature_cache" not in record and not (tmp_path / "runs" / "feature-cache").exists()
    count("faults injected", "training worker killed mid-epoch (SIGKILL)")
    count("faults survived", "training worker killed mid-epoch (SIGKILL)")
