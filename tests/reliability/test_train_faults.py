"""Training under faults: a worker killed mid-epoch resumes from its checkpoint.

The run goes without the feature cache (``feature_cache=False``), so the backbone runs in every step, before and
after the restart: that path needs a Ray Train run of its own otherwise.
"""
from conftest import TINY_VIT, count
from pipeline.sample import write_sample


def test_a_killed_training_worker_resumes_from_its_checkpoint(ray_local, tiny_weights, tmp_path):
    import pandas as pd

    from pipeline.train import TrainConfig, run_training

    write_sample(str(tmp_path / "data"), {"horse": 3, "disc": 3, "horse2": 3})
    cfg = TrainConfig(data=[str(tmp_path / "data")], storage=str(tmp_path / "runs"), name="killed", epochs=3,
                      backbone=tiny_weights[0], backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                      cpus_per_worker=0.5, fail_at_epoch=1, max_failures=1, feature_cache=False)
    result = run_training(cfg)
    assert (tmp_path / "runs" / "killed" / "_injected_failure").exists()  # the worker died mid-way through epoch 2
    h = pd.read_parquet(tmp_path / "runs" / "killed" / "metrics.parquet")
    assert list(h["epoch"]) == [0, 1, 2]  # epoch 1 redone, nothing twice
    # Ray restarted the workers from the checkpoint of epoch 0: its row was written by the first attempt, the
    # later ones by the second (a restart from scratch would have rewritten epoch 0 too)
    assert h["attempt"].iloc[0] != h["attempt"].iloc[1] == h["attempt"].iloc[2]
    assert result.metrics["epoch"] == 2 and result.metrics["head_sha256"] == h["head_sha256"].iloc[-1]
    assert h["loss"].notna().all() and h["loss"].iloc[-1] < h["loss"].iloc[0]
    # no cache pass ran and none was written: the features came from the backbone, step by step
    record = pd.read_json(tmp_path / "runs" / "killed" / "train_config.json", typ="series")
    assert "feature_cache" not in record and not (tmp_path / "runs" / "feature-cache").exists()
    count("faults injected", "training worker killed mid-epoch (SIGKILL)")
    count("faults survived", "training worker killed mid-epoch (SIGKILL)")
