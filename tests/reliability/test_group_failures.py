"""Groups that fail as a whole in stage 1: every file of the group broken, a CUDA out-of-memory on every try (down
to micro-batch 1), a CUDA error that poisons the context and ends the actor every time (one small group: each try
costs an actor restart). Each becomes its group's error rows - permanent, transient, transient after
``max_attempts`` - and a re-run without the faults redoes exactly the transient ones. Beside a good group in the
same job, the same failures must not take the job down."""
from fsspec.implementations.local import LocalFileSystem

from audit import Rerun, by_key, output_rows
from conftest import TINY_VIT, record_fault, record_rows
from pipeline.infer import InferConfig, run_inference
from pipeline.sample import write_sample
from ray_session import session_logs

EVIDENCE = {"oom": b"out of memory on a batch", "cuda": b"stage-1 actor exits after a CUDA error"}


def logged() -> dict[str, int]:
    """How often the stage-1 actors logged each fault so far (their stderr lands in the session's logs)."""
    logs = [p.read_bytes() for p in session_logs() if p.suffix in (".err", ".out")]
    return {k: sum(text.count(needle) for text in logs) for k, needle in EVIDENCE.items()}


def config(tiny_weights, data, out, **kw) -> InferConfig:
    backbone, head = tiny_weights
    return InferConfig(input=str(data), output=str(out), backbone=backbone, head=head, crf="none", micro_batch=4,
                       backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT), progress_interval=5, **kw)


class JobFailed(Exception):
    """The job raised instead of writing rows (whatever Ray Data surfaced it as)."""


def broken_group(data, name: str = "allbad") -> None:
    (data / "image" / name).mkdir(parents=True)
    (data / "image" / name / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (data / "image" / name / "empty.jpg").write_bytes(b"")


class BlamedForAnotherBatch(Exception):
    """A batch's rows blame a GPU fault that another batch caused."""


def test_groups_failing_whole_in_stage1_become_rows_and_the_transient_ones_are_redone(ray_local, tiny_weights,
                                                                                     tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_sample(str(data), {"disc": 2, "horse2": 2})
    broken_group(data)
    cfg = config(tiny_weights, data, out)
    before = logged()
    first = run_inference(cfg.replace(fault={"oom": {"disc": 1000}, "cuda_error": "horse2"}))
    seen = {k: v - before[k] for k, v in logged().items()}
    rows = by_key(output_rows(LocalFileSystem(), str(out)))
    success_first = (out / "_SUCCESS").exists()
    second = run_inference(cfg)
    rerun = Rerun(rows.reset_index(), output_rows(LocalFileSystem(), str(out)), second["input"]["images"])
    record_rows(rerun.images_in, rerun.after["key"], rerun.after["error_kind"].dropna())
    group = {g: rows[rows["group"] == g] for g in ("allbad", "disc", "horse2")}
    first_ok = {
        "allbad": (group["allbad"]["error_class"] == "permanent").all() and len(group["allbad"]) == 2,
        "disc": (group["disc"]["error_kind"] == "Stage1:OutOfMemoryError").all()
        and group["disc"]["error"].str.contains("micro-batch 1").all(),
        "horse2": group["horse2"]["error"].str.contains("ended its stage-1 actor 3 times").all(),
    }
    redone = {f"{g}/{n}" for g in ("disc", "horse2") for n in group[g]["name"]}
    rerun_ok = (rerun.lost, rerun.duplicates) == (0, 0) and rerun.redone == redone and not rerun.transient_left
    record_fault("stage-1 out-of-memory always, job (transient rows, redone)", seen["oom"],
                 first_ok["disc"] and rerun_ok)
    record_fault("CUDA context error: actor exits, batch bounded (redone)", seen["cuda"],
                 first_ok["horse2"] and rerun_ok)
    errors = "\n".join(f"{k}: {e}" for k, e in zip(rows.index, rows["error"]))
    assert len(rows) == first["input"]["images"] == 6
    assert first_ok["allbad"] and first_ok["horse2"], errors
    assert set(rows.loc[list(redone), "error_class"]) == {"transient"}
    assert seen["cuda"] == 3 and seen["oom"] >= 1  # the actor really exited 3 times, then the batch became rows
    assert first["output"]["transient_errors"] == 4 and not success_first
    assert (rerun.lost, rerun.duplicates, rerun.ok_redone) == (0, 0, set())
    assert rerun.redone == redone and rerun.transient_left == set()
    assert second["processed"] == {"groups": 2, "images": 4}
    assert second["output"]["transient_errors"] == 0 and (out / "_SUCCESS").exists()
    if not first_ok["disc"]:  # last: everything above holds either way
        raise BlamedForAnotherBatch(errors)


def test_a_group_of_broken_files_beside_a_good_group(ray_local, tiny_weights, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_sample(str(data), {"horse": 2})
    broken_group(data)
    try:
        manifest = run_inference(config(tiny_weights, data, out))
    except Exception as exc:
        record_fault("whole group of broken files beside a good group", 1, False)
        raise JobFailed(f"{type(exc).__name__}: {str(exc)[-300:]}") from exc
    rows = by_key(output_rows(LocalFileSystem(), str(out)))
    survived = len(rows) == 4 and list(rows["status"]).count("ok") == 2
    record_fault("whole group of broken files beside a good group", 1, survived)
    assert manifest["output"]["rows"] == 4 and manifest["output"]["permanent_errors"] == 2
    assert (rows[rows["group"] == "horse"]["status"] == "ok").all()
