"""The job against a real S3 API (moto's server on loopback): input, weights and output all in a bucket."""
import io
import json

import pyarrow.dataset as pads
import pyarrow.fs
import pytest
from PIL import Image

from conftest import TINY_VIT, make_bucket
from pipeline.infer import InferConfig, run_inference
from pipeline.sample import write_sample
from pipeline.storage import Storage, storage_options

KEY, SECRET = "AKIAIDLEAKCHECK0001", "s3cr3t-must-never-be-written-0001"


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_weights):
    fs = make_bucket(s3_server, "cosod")
    opts = storage_options(s3_server, extra={"key": KEY, "secret": SECRET})
    write_sample("s3://cosod/CoCA", {"horse": 3, "disc": 2}, storage_options=opts)
    fs.pipe_file("cosod/CoCA/image/disc/not_an_image.jpg", b"<!DOCTYPE html><html>403 Forbidden</html>")
    for name, path in zip(("backbone.pth", "head.pt"), tiny_weights):
        fs.put_file(path, f"cosod/weights/{name}")
    return fs, opts


def test_job_reads_and_writes_the_bucket_and_keeps_credentials_out(ray_local, bucket, capfd):
    fs, opts = bucket
    cfg = InferConfig(input="s3://cosod/CoCA", output="s3://cosod/runs/r1", backbone="s3://cosod/weights/backbone.pth",
                      head="s3://cosod/weights/head.pt", backbone_name="vit_base_patch8_224",
                      backbone_kwargs=dict(TINY_VIT), storage_options=opts, progress_interval=1)
    manifest = run_inference(cfg)
    fs.invalidate_cache()
    assert manifest["output"]["rows"] == 6 and manifest["output"]["errors_by_kind"] == {"NotAnImage(html)": 1}
    assert fs.exists("cosod/runs/r1/_SUCCESS")
    masks = sorted(fs.find("cosod/runs/r1/masks"))
    assert len(masks) == 5 and masks[0].endswith("masks/disc/disc_000.png")
    assert Image.open(io.BytesIO(fs.cat_file(masks[0]))).size == (320, 240)

    s3 = pyarrow.fs.S3FileSystem(endpoint_override=opts["client_kwargs"]["endpoint_url"], access_key=KEY,
                                 secret_key=SECRET, region="us-east-1")
    table = pads.dataset("cosod/runs/r1/predictions", format="parquet", filesystem=s3).to_table()
    assert table.num_rows == 6

    written = [fs.cat_file(p) for p in fs.find("cosod/runs/r1") if not p.endswith(".png")]
    logs = capfd.readouterr()
    for blob in written + [logs.out.encode(), logs.err.encode(), json.dumps(manifest).encode()]:
        assert KEY.encode() not in blob and SECRET.encode() not in blob
    assert json.loads(fs.cat_file("cosod/runs/r1/_manifest.json"))["config"]["storage_options"]["secret"] == "REDACTED"


def test_keys_with_glob_characters_delete_exactly_themselves(s3_server):
    """s3fs's rm reads ``[1]`` in a key as a character class: an output ``exp[1]`` would delete ``exp1``'s files
    (another output) and keep its own, or raise when nothing matches. Every delete of the job is exact."""
    import pyarrow as pa

    from pipeline.output_state import OutputState, clear_output, remove_orphans
    from pipeline.predictions import write_shard

    fs = make_bucket(s3_server, "globs")
    opts = storage_options(s3_server, extra={"key": "testing", "secret": "testing"})

    def finished(url: str, group: str) -> Storage:
        out = Storage(url, opts)
        table = pa.table({"group_key": [group] * 2, "index": pa.array([0, 1], pa.int32()), "status": ["ok"] * 2,
                          "error_kind": [None] * 2, "error_class": [None] * 2, "image_bytes": pa.array([9, 9]),
                          "group_size": pa.array([2, 2], pa.int32()), "group_hash": ["h"] * 2,
                          "mask_key": [f"masks/{group}/a.png", f"masks/{group}/b.png"]})
        write_shard(out, 1, table, "png")
        for key in (f"masks/{group}/a.png", f"masks/{group}/b.png", "_run.json", "_manifest.json", "_SUCCESS"):
            out.write_bytes(key, b"x")
        return out

    def keys(prefix: str) -> list[str]:
        fs.invalidate_cache()
        return sorted(p.removeprefix(f"globs/{prefix}/") for p in fs.find(f"globs/{prefix}"))

    ours, other = finished("s3://globs/exp[1]", "g[1]"), finished("s3://globs/exp1", "g1")
    theirs = keys("exp1")
    ours.remove("_SUCCESS")
    assert "_SUCCESS" not in keys("exp[1]") and keys("exp1") == theirs
    Storage("s3://globs/exp[lr]", opts).remove("_SUCCESS")  # nothing to match: no error either

    ours.write_bytes("predictions/part-r0002-0123456789abcdef.parquet", b"half a write")  # no record: an orphan
    state, removed, lost = remove_orphans(ours, OutputState.load(ours))
    assert (removed, lost) == (1, 0) and state.counts()["rows"] == 2 and keys("exp1") == theirs
    clear_output(ours)
    assert keys("exp[1]") == [] and keys("exp1") == theirs
    clear_output(other)
    assert keys("exp1") == []
