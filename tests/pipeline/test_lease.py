"""One job per output: the lease on a local disk and on S3 (moto, which honours If-None-Match and If-Match)."""
import json
import os
import socket
import threading
import time

import pytest

from conftest import make_bucket
from pipeline.lease import Lease, LeaseHeld, LeaseLost
from pipeline.storage import Storage, storage_options

KEY = "_lease.json"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """A fresh output root, local or on S3 (moto)."""
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    endpoint = request.getfixturevalue("s3_server")
    bucket = "lease-tests"
    if not getattr(output, "made", False):
        make_bucket(endpoint, bucket)
        output.made = True
    return Storage(f"s3://{bucket}/{request.node.originalname}-{time.monotonic_ns()}",
                   storage_options(endpoint, extra={"key": "testing", "secret": "testing"}))


def on_storage(output: Storage) -> dict | None:
    output.fs.invalidate_cache()
    return output.read_json(KEY) if output.exists(KEY) else None


def stale_lease(output: Storage, job_id: str = "dead-job") -> dict:
    """What a job killed an hour ago leaves behind."""
    record = {"holder": "f" * 32, "host": "gone-host", "pid": 4242, "job_id": job_id, "started": "then",
              "renewed": "then", "expires": time.time() - 3600, "expires_at": "an hour ago", "ttl": 120.0}
    output.write_json(KEY, record)
    return record


def test_a_second_job_is_refused_with_the_holder_named(output):
    first = Lease(output, holder={"job_id": "job-a"}).acquire()
    with pytest.raises(LeaseHeld) as refused:
        Lease(output, holder={"job_id": "job-b"}).acquire()
    message = str(refused.value)
    record = on_storage(output)
    assert record["holder"] == first.id and record["job_id"] == "job-a"
    for part in ("job-a", socket.gethostname(), f"pid {os.getpid()}", first.id[:8], record["started"],
                 record["expires_at"], output.url(KEY)):
        assert part in message, (part, message)
    assert "job-b" not in message
    first.release()


def test_release_then_acquire(output):
    first = Lease(output, holder={"job_id": "job-a"}).acquire()
    first.release()
    assert on_storage(output) is None and not first.held
    second = Lease(output, holder={"job_id": "job-b"}).acquire()
    assert on_storage(output)["holder"] == second.id
    first.release()  # released already: must not touch the second job's lease
    assert on_storage(output)["holder"] == second.id
    second.release()
    assert on_storage(output) is None


def test_a_stale_lease_is_taken_over_and_its_old_holder_notices(output):
    stale_lease(output)
    taker = Lease(output, holder={"job_id": "job-b"}).acquire()
    assert on_storage(output)["holder"] == taker.id

    old = Lease(output, ttl=0.2, holder={"job_id": "job-slow"})
    taker.release()
    old.acquire()
    time.sleep(0.3)  # the slow job missed its renewals; its lease expired
    newer = Lease(output, holder={"job_id": "job-c"}).acquire()
    with pytest.raises(LeaseLost, match="job-c"):
        old.renew()
    assert old.lost and pytest.raises(LeaseLost, old.check)
    old.release()  # not ours any more: left alone
    assert on_storage(output)["holder"] == newer.id


def test_an_unreadable_lease_counts_as_stale(output):
    output.write_bytes(KEY, b"{not json")
    lease = Lease(output).acquire()
    assert on_storage(output)["holder"] == lease.id


def test_two_takeovers_of_the_same_stale_lease_exactly_one_wins(output):
    stale_lease(output)
    contenders = [Lease(output, holder={"job_id": f"job-{i}"}) for i in range(3)]
    all_read = threading.Barrier(len(contenders), timeout=30)
    for lease in contenders:  # every contender reads the stale lease before anyone writes
        read = lease._store.read

        def read_then_wait(read=read, first=[True]):
            got = read()
            if first[0]:
                first[0] = False
                all_read.wait()
            return got

        lease._store.read = read_then_wait
    outcomes = {}

    def take(lease):
        try:
            lease.acquire()
            outcomes[lease.info["job_id"]] = "won"
        except LeaseHeld as exc:
            outcomes[lease.info["job_id"]] = str(exc)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [job for job, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == 3 and len(winners) == 1, outcomes
    assert on_storage(output)["job_id"] == winners[0]
    assert all(winners[0] in outcome for outcome in outcomes.values() if outcome != "won")


def test_renewal_extends_the_expiry(output):
    lease = Lease(output, ttl=60).acquire()
    before = on_storage(output)
    time.sleep(0.01)
    lease.renew()
    after = on_storage(output)
    assert after["expires"] > before["expires"] and after["holder"] == before["holder"] == lease.id
    assert after["started"] == before["started"]
    lease.release()

    with Lease(output, ttl=0.6) as running:  # the background thread renews every ttl/3
        first = on_storage(output)["expires"]
        deadline = time.time() + 10
        while on_storage(output)["expires"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert on_storage(output)["expires"] > first and not running.lost
    assert on_storage(output) is None


def test_a_lease_deleted_by_someone_else_is_noticed_as_lost(output):
    with Lease(output, ttl=0.3) as lease:
        output.remove(KEY)
        deadline = time.time() + 10
        while not lease.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lease.lost
        with pytest.raises(LeaseLost):
            lease.check()
    assert on_storage(output) is None  # leaving did not recreate it


def test_our_own_create_whose_answer_was_lost_is_recognised(output):
    lease = Lease(output)
    create = lease._store.create

    def create_then_lose_the_answer(body):
        create(body)
        raise FileExistsError(KEY)  # what a retried conditional PUT sees after the first one landed

    lease._store.create = create_then_lose_the_answer
    lease.acquire()
    assert lease.held and on_storage(output)["holder"] == lease.id
    lease.renew()
    lease.release()
    assert on_storage(output) is None


def test_the_record_carries_no_credentials(output):
    lease = Lease(output, holder={"job_id": "j", "input": "s3://u:pw@b/x?X-Amz-Signature=s3cret", "token": "t0k"})
    lease.acquire()
    with pytest.raises(LeaseHeld) as refused:
        Lease(output).acquire()
    stored = json.dumps(on_storage(output))
    for secret in ("s3cret", "u:pw", "t0k"):
        assert secret not in stored and secret not in str(refused.value)
    lease.release()


def test_a_job_whose_lease_is_taken_stops_writing_at_once(ray_local, tiny_weights, tmp_path):
    """Another job takes the output over while ours runs (ours was paused past its expiry, say): ours must stop
    within a renewal period, not write and commit the rest of its dataset into an output it no longer owns."""
    from conftest import TINY_VIT
    from pipeline.infer import InferConfig, run_inference
    from pipeline.predictions import COMMITS
    from pipeline.sample import write_sample

    data, out = tmp_path / "data", tmp_path / "out"
    write_sample(str(data), {f"g{i}": 1 for i in range(6)})
    backbone, head = tiny_weights
    cfg = InferConfig(input=str(data), output=str(out), backbone=backbone, head=head, crf="none",
                      backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT), lease_ttl=3.0,
                      fault={"delay_s": 3.0})  # a stage-1 call per group: ~18 s of dataset
    taken = {}

    def take_over():
        deadline = time.time() + 120
        while not (out / "_run.json").exists() and time.time() < deadline:  # written just before the dataset
            time.sleep(0.05)
        taken["at"] = time.monotonic()
        (out / KEY).write_text(json.dumps({"holder": "other", "host": "elsewhere", "pid": 1, "job_id": "other",
                                           "started": "now", "expires": time.time() + 3600, "ttl": 3600.0}))

    thief = threading.Thread(target=take_over)
    thief.start()
    with pytest.raises(LeaseLost):
        run_inference(cfg)
    stopped = time.monotonic()
    thief.join()
    records = [json.loads(p.read_text()) for p in (out / COMMITS).glob("*.json")] if (out / COMMITS).exists() else []
    assert sum(r["rows"] for r in records) < 6 and not (out / "_SUCCESS").exists()
    assert stopped - taken["at"] < 12  # a renewal (1 s) and the dataset's shutdown, not the 18 s left to run
    assert json.loads((out / KEY).read_text())["holder"] == "other"  # the other job's lease is left alone
