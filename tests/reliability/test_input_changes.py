"""Input that changes between a run and its re-run (objects deleted after a run, as in a bucket being cleaned up):
the re-run must account for the input as it is now."""
import shutil

import pytest

from fsspec.implementations.local import LocalFileSystem

from audit import output_rows
from conftest import TINY_VIT, record_fault
from pipeline.infer import InferConfig, run_inference
from pipeline.sample import write_sample


@pytest.mark.parametrize("change", ["deleted", "emptied"])
def test_a_group_deleted_from_the_input_after_a_run(ray_local, tiny_weights, tmp_path, change):
    """``emptied``: the group's files go but its folder stays (a local folder, or an S3 folder marker): the
    group is listed with no images, and its old rows must go as a deleted group's do."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_sample(str(data), {"horse": 2, "disc": 1})
    backbone, head = tiny_weights
    cfg = InferConfig(input=str(data), output=str(out), backbone=backbone, head=head, crf="none",
                      backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT), progress_interval=5)
    run_inference(cfg)
    for folder in (data / "image" / "disc", data / "groundtruth" / "disc"):
        shutil.rmtree(folder)
        if change == "emptied":
            folder.mkdir()
    what = f"a whole group {change} in the input between runs"
    try:
        manifest = run_inference(cfg)
    except RuntimeError:
        record_fault(what, 1, False)
        raise
    rows = output_rows(LocalFileSystem(), str(out))
    survived = manifest["output"]["rows"] == manifest["input"]["images"] == 2 and (out / "_SUCCESS").exists()
    record_fault(what, 1, survived)
    assert manifest["processed"]["images"] == 0 and survived
    assert set(rows["group"]) == {"horse"}  # readers of predictions/ see only the input's images
