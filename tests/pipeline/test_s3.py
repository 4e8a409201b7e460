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
from pipeline.storage import storage_options

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
