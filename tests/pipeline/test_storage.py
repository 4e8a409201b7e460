"""Storage: S3 options with adaptive retries, writes retried through a fault proxy, throttling bursts survived,
credentials redacted from free text."""
import logging
import sys
import time
from pathlib import Path

import pytest
import s3fs

from pipeline import errors
from pipeline.errors import classify
from pipeline.storage import (DEFAULT_RETRIES, WRITE_ATTEMPTS, Storage, fs_options, open_url, recorded_url, redact,
                              redact_text, redact_url, storage_options)
from conftest import make_bucket

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
from s3_faults import Fault, FaultProxy  # noqa: E402

ADAPTIVE = {"mode": "adaptive", "max_attempts": DEFAULT_RETRIES}
CREDS = {"key": "testing", "secret": "testing"}


def test_s3_options_get_adaptive_retries_unless_set_other_filesystems_do_not_and_https_gets_none():
    assert storage_options()["config_kwargs"] == {"retries": ADAPTIVE}
    opts = storage_options("http://127.0.0.1:9", anonymous=True, extra={"key": "k"}, retries=3)
    assert opts == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": True, "key": "k",
                    "config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 3}}}
    own = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}, "read_timeout": 5}}
    assert storage_options(extra=own)["config_kwargs"] == own["config_kwargs"]
    assert fs_options("s3://b/k", own) == own
    assert fs_options("s3://b/k", {}) == {"config_kwargs": {"retries": ADAPTIVE}}
    assert fs_options("s3a://b/k", None)["config_kwargs"]["retries"] == ADAPTIVE
    for url in ("/tmp/x", "file:///tmp/x", "memory://x"):
        assert "config_kwargs" not in fs_options(url, opts), url
        assert fs_options(url, opts)["anon"] is True
    assert fs_options("https://h/x.jpg?X-Amz-Signature=s", opts) == {}  # aiohttp rejects the object store's keys
    assert fs_options("simplecache::s3://b/k", {"s3": {}}) == {"s3": {}}


def test_the_retry_config_reaches_the_s3_client(s3_server, tmp_path):
    make_bucket(s3_server, "storage-config")
    store = Storage("s3://storage-config/run", storage_options(s3_server, extra=CREDS, retries=4))
    assert store.fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 5}
    fs, _ = open_url("s3://storage-config/x", {"client_kwargs": {"endpoint_url": s3_server}, **CREDS})
    assert fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": DEFAULT_RETRIES + 1}
    local = Storage(str(tmp_path), storage_options())  # S3 options on a local path are harmless
    assert local.is_local and local.write_bytes("a/b.bin", b"x") == local.url("a/b.bin")


@pytest.fixture
def proxied(s3_server):
    """(proxy, storage through it with no client retries, storage straight to moto) on a fresh bucket."""
    name = f"storage-{time.monotonic_ns()}"
    make_bucket(s3_server, name)
    proxy = FaultProxy(s3_server)
    through = Storage(f"s3://{name}/run", storage_options(proxy.url, extra=CREDS, retries=0))
    direct = Storage(f"s3://{name}/run", storage_options(s3_server, extra=CREDS))
    yield proxy, through, direct
    proxy.stop()


def test_a_put_that_fails_twice_then_succeeds_is_written(proxied, monkeypatch, caplog):
    proxy, through, direct = proxied
    monkeypatch.setattr(errors, "sleep", lambda s: None)
    proxy.fail_puts("masks/g/a.png", times=2)
    with caplog.at_level(logging.WARNING, logger="pipeline.errors"):
        url = through.write_bytes("masks/g/a.png", b"png bytes")
    assert url == through.url("masks/g/a.png")
    assert direct.fs.cat_file(direct.path("masks/g/a.png")) == b"png bytes"
    assert proxy.injected["500:put:masks/g/a.png"] == 2 and proxy.hits["put:masks/g/a.png"] == 3
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2  # our retries, not the client's


def test_the_client_retries_a_failing_put_itself_in_adaptive_mode(proxied, monkeypatch):
    proxy, _, direct = proxied
    retried = []
    monkeypatch.setattr(errors, "sleep", retried.append)
    store = Storage(direct.root, storage_options(proxy.url, extra=CREDS))  # default retries
    proxy.fail_puts("predictions/", times=2)
    store.write_bytes("predictions/part-0.parquet", b"parquet")
    assert direct.fs.cat_file(direct.path("predictions/part-0.parquet")) == b"parquet"
    assert proxy.injected["500:put:predictions/"] == 2 and retried == []  # botocore did it inside one call


def test_a_put_that_always_fails_or_is_denied_raises_with_its_class(proxied, monkeypatch):
    proxy, through, direct = proxied
    monkeypatch.setattr(errors, "sleep", lambda s: None)
    proxy.fail_puts("always.png")
    with pytest.raises(OSError) as failed:
        through.write_bytes("masks/always.png", b"x")
    assert classify(failed.value).transient and proxy.hits["put:always.png"] == WRITE_ATTEMPTS
    proxy.fail_puts("denied.png", status=403)
    with pytest.raises(PermissionError) as denied:
        through.write_bytes("masks/denied.png", b"x")
    assert not classify(denied.value).transient and proxy.hits["put:denied.png"] == 1  # permanent: no retry
    assert not direct.exists("masks/always.png") and not direct.exists("masks/denied.png")


def test_reads_survive_a_slowdown_burst_on_many_keys(proxied):
    proxy, _, direct = proxied
    keys = [f"image/g{i % 4}/{i:03d}.jpg" for i in range(24)]
    for key in keys:
        direct.write_bytes(key, key.encode() * 10)
    store = Storage(direct.root, storage_options(proxy.url, extra=CREDS))  # default: adaptive, 10 retries
    proxy.burst("run/image/", seconds=2.0)
    got = store.fs.cat([store.path(k) for k in keys], on_error="raise")
    assert {p.split("/run/", 1)[1]: v for p, v in got.items()} == {k: k.encode() * 10 for k in keys}
    assert proxy.injected["503:burst:run/image/"] >= len(keys)  # every key was throttled at least once


def test_proxy_rules_api_latency_and_dropped_connections(proxied):
    proxy, through, direct = proxied
    direct.write_bytes("a.jpg", b"a")
    direct.write_bytes("slow.jpg", b"s")
    proxy.add(Fault("a.jpg", 500, 1))
    store = Storage(direct.root, storage_options(proxy.url, extra=CREDS, retries=2))
    assert store.fs.cat_file(store.path("a.jpg")) == b"a"
    assert proxy.rules["a.jpg"] == (500, 1) and proxy.injected["500:a.jpg"] == 1 and proxy.hits["a.jpg"] >= 2
    proxy.latency("slow.jpg", 0.3)
    start = time.perf_counter()
    assert store.fs.cat_file(store.path("slow.jpg")) == b"s"
    assert time.perf_counter() - start >= 0.3 and proxy.hits["latency:slow.jpg"] >= 1
    direct.write_bytes("reset.jpg", b"r")
    proxy.add(Fault("reset.jpg", 0, None, ("GET",)))
    once = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.url}, **CREDS, skip_instance_cache=True,
                             config_kwargs={"retries": {"mode": "standard", "total_max_attempts": 1}})
    once.retries = 1  # s3fs's own retry loops too: one try, so that the drop reaches us
    with pytest.raises(Exception) as dropped:
        once.cat_file(through.path("reset.jpg"))
    assert classify(dropped.value).transient and proxy.injected["0:reset.jpg"] >= 1, repr(dropped.value)


def test_redact_text_and_redact():
    signed = ("https://bucket.s3.amazonaws.com/img/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&"
              "X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1&X-Amz-Signature=deadbeef&X-Amz-Expires=60")
    text = (f"cannot read {signed}: 403, url='https://u:pw@h.example/p?sig=azuresig&sv=2020' and "
            f"bucket/key.jpg?X-Amz-Security-Token=tok123 (s3://bucket/my file.jpg)")
    out = redact_text(text)
    for secret in ("AKIAEXAMPLE", "deadbeef", "azuresig", "u:pw", "tok123"):
        assert secret not in out, out
    for kept in ("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Expires=60", "sv=2020", "s3://bucket/my file.jpg",
                 "https://h.example/p"):
        assert kept in out, out
    assert redact(signed) == redact_url(signed)  # a URL alone: as before
    assert redact({"input": text, "secret": "x", "n": 3}) == {"input": out, "secret": "REDACTED", "n": 3}
    assert redact_text("no urls, nothing to hide") == "no urls, nothing to hide"


@pytest.fixture
def http_folder(tmp_path):
    """tmp_path served over HTTP on loopback (as a checkpoint on a web server would be); yields its URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_checkpoints_over_https_are_read_with_the_job_s_s3_options(http_folder, tiny_weights):
    """The CLI's storage options carry botocore settings for S3 (retries), which an HTTP client refuses: a
    checkpoint URL on a web server (the README's DINO link) must still load, on the driver and in the actors."""
    import shutil

    import torch

    from conftest import TINY_VIT
    from pipeline.decode import DecodeSettings
    from pipeline.stage1 import ModelSettings, Stage1Settings, build_model
    from pipeline.storage import URLOptions, storage_options
    from scosparc_core.checkpoints import check_checkpoints

    folder, url = http_folder
    backbone, head = tiny_weights
    shutil.copy(backbone, folder / "backbone.pth")
    options = storage_options(endpoint="http://127.0.0.1:1")  # what jobs/ pass: S3 endpoint and retries
    assert "config_kwargs" in options
    digests = check_checkpoints(f"{url}/backbone.pth", head, "vit_base_patch8_224", dict(TINY_VIT),
                                URLOptions(options))
    assert digests == check_checkpoints(backbone, head, "vit_base_patch8_224", dict(TINY_VIT))
    model = build_model(Stage1Settings(model=ModelSettings(backbone=f"{url}/backbone.pth", head=head,
                                                           backbone_name="vit_base_patch8_224",
                                                           backbone_kwargs=dict(TINY_VIT), storage_options=options),
                                       decode=DecodeSettings(), crf="none"))
    loaded = model.engine.backbone.state_dict()
    local = torch.load(backbone, map_location="cpu", weights_only=True)
    assert torch.equal(loaded["vit.pos_embed"], local["pos_embed"])


def test_a_question_mark_is_part_of_a_key_except_in_http_urls():
    """For s3://, file:// and plain paths ``?`` and ``#`` belong to the object's key: the rows record such URLs as
    given (a rewritten one points at an object that does not exist). Only HTTP(S) URLs (signed ones) have a query,
    and there only the credential values change; messages redact any credential-like value, the rest byte for
    byte."""
    keys = ["s3://b/CoCA/image/Q&A?/a b.jpg", "file:///data/g?token=1/x.jpg", "/data/what?/x.jpg",
            "gs://b/what?sig=x#1/a.jpg", "relative/what?/x.jpg"]
    for key in keys:
        assert recorded_url(key) == key
    assert recorded_url("s3://AKIA:SECRET@bucket/what?/k") == "s3://bucket/what?/k"
    signed = ("https://u:pw@h.example/a%20b.jpg?response-content-disposition=attachment%3B%20filename%3Da.jpg&"
              "X-Amz-Credential=AKIA%2F2025&X-Amz-Signature=dead&flag#frag")
    redacted = ("https://h.example/a%20b.jpg?response-content-disposition=attachment%3B%20filename%3Da.jpg&"
                "X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&flag#frag")
    assert recorded_url(signed) == redact_url(signed) == redacted
    assert redact_url("s3://b/CoCA/image/Q&A?/a b.jpg") == "s3://b/CoCA/image/Q&A?/a b.jpg"  # not re-encoded
    assert redact_url("file:///data/g?token=1") == "file:///data/g?token=REDACTED"  # a message: better safe


def test_rows_keep_image_and_ground_truth_uris_with_a_question_mark_as_given():
    from pipeline.refine import RefineSettings, refine_image

    image, gt = "s3://b/CoCA/image/what?/a b.jpg", "file:///data/groundtruth/g?token=1/a b.png"
    chunk = {"group": "what?", "group_key": "what_~1", "index": [0], "names": ["a b.jpg"], "image_uris": [image],
             "image_bytes": [10], "gt_uris": [gt], "ok": [False], "error": ["CorruptImage: x"],
             "error_kind": ["CorruptImage"], "error_class": ["permanent"], "threshold": float("nan"),
             "confidence": float("nan"), "decode_s": 0.0, "mask_keys": ["masks/what_~1/a b.png"], "group_size": 1,
             "group_hash": "h"}
    row = refine_image(chunk, 0, None, RefineSettings(output="unused"), None)
    assert (row["image_uri"], row["gt_uri"]) == (image, gt)
