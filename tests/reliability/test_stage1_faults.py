"""Stage 1 under an injected CUDA out-of-memory, on the actor's own entry point (no cluster needed): the group is
retried in the engine's passes (when larger than a micro-batch) and with smaller micro-batches, and when even those
fail its rows are transient errors, never ok rows."""
import numpy as np
import pytest

from conftest import TINY_VIT, record_fault
from pipeline.decode import DecodeSettings, decode_group
from pipeline.errors import TRANSIENT
from pipeline.output_state import mark_todo
from pipeline.listing import group_row, list_layout
from pipeline.sample import write_sample
from pipeline.stage1 import ModelSettings, Stage1Actor, Stage1Settings
from pipeline.storage import Storage


@pytest.fixture(scope="module")
def disc_batch(tmp_path_factory):
    """A decoded group of three images, as the decode stage hands it to stage 1 (a batch of one group)."""
    root = tmp_path_factory.mktemp("oom")
    write_sample(str(root), {"disc": 3})
    (spec,) = list_layout(Storage(str(root)))
    row = decode_group(mark_todo(group_row(spec), None)[0], DecodeSettings())
    return {k: [v] for k, v in row.items()}


def run_actor(tiny_weights, batch, micro_batch: int, fault: dict | None) -> dict:
    """Every output row of one stage-1 call, per image: ok, error kind and class, the final 224 mask; and how many
    out-of-memory errors the actor injected."""
    backbone, head = tiny_weights
    model = ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                          backbone_kwargs=dict(TINY_VIT))
    actor = Stage1Actor(Stage1Settings(model=model, decode=DecodeSettings(), micro_batch=micro_batch, crf="none",
                                       fault=fault))
    out = {"ok": [], "kind": [], "class": [], "error": [], "final": [], "index": [], "passes": []}
    run_passes = actor.engine.run_passes

    def counted(n, *args, **kwargs):
        out["passes"].append((n, kwargs.get("micro_batch")))
        yield from run_passes(n, *args, **kwargs)

    actor.engine.run_passes = counted
    for chunk in actor(batch):
        for c in range(len(chunk["group"])):
            out["index"] += list(chunk["index"][c])
            out["ok"] += list(chunk["ok"][c])
            out["kind"] += list(chunk["error_kind"][c])
            out["class"] += list(chunk["error_class"][c])
            out["error"] += list(chunk["error"][c])
            out["final"] += list(chunk["final"][c])
    out["injected"] = actor.injected.get("disc", 0)
    return out


def test_an_out_of_memory_is_retried_smaller_then_becomes_transient_error_rows(tiny_weights, disc_batch):
    clean = run_actor(tiny_weights, disc_batch, 4, None)
    once = run_actor(tiny_weights, disc_batch, 4, {"oom": {"disc": 1}})
    always = run_actor(tiny_weights, disc_batch, 4, {"oom": {"disc": 99}})
    assert clean["index"] == once["index"] == always["index"] == [0, 1, 2] and all(clean["ok"])
    # once: the retry at micro-batch 2 gives the masks of a run without the fault
    retried = all(once["ok"]) and all(np.array_equal(a, b) for a, b in zip(clean["final"], once["final"]))
    # always: halved down to 1, then each row a transient error that says so
    failed = (not any(always["ok"]) and set(always["kind"]) == {"Stage1:OutOfMemoryError"}
              and set(always["class"]) == {TRANSIENT} and all("micro-batch 1" in e for e in always["error"]))
    record_fault("stage-1 out-of-memory once, actor (retried smaller)", once["injected"], retried)
    record_fault("stage-1 out-of-memory always, actor (transient rows)", always["injected"], failed)
    assert (once["injected"], always["injected"]) == (1, 3)  # micro-batches 4 (the batch), 2, 1
    assert retried, once
    assert failed, always["error"]


def test_an_out_of_memory_at_micro_batch_1_is_a_transient_error_not_an_empty_ok_mask(tiny_weights, disc_batch):
    twice = run_actor(tiny_weights, disc_batch, 1, {"oom": {"disc": 2}})
    # the one retry at micro-batch 1 is the passes (3 images); after it no smaller micro-batch is left to try: the
    # rows must say out-of-memory (transient), so that a re-run redoes them
    assert twice["injected"] == 2  # the batch, then the passes
    assert not any(twice["ok"]), [f.max() for f in twice["final"]]
    assert set(twice["kind"]) == {"Stage1:OutOfMemoryError"} and set(twice["class"]) == {TRANSIENT}


def test_an_out_of_memory_on_a_group_larger_than_a_micro_batch_runs_it_in_passes(tiny_weights, disc_batch):
    """What grows with a one-pass group (its tokens, maps, CRF) does not shrink with the micro-batch: a group of 3 at
    micro-batch 2 goes to the engine's passes over its decoded images, with the masks of a run without the fault;
    when those fail too, at micro-batches 2 then 1, its rows are transient errors."""
    clean = run_actor(tiny_weights, disc_batch, 2, None)
    once = run_actor(tiny_weights, disc_batch, 2, {"oom": {"disc": 1}})
    always = run_actor(tiny_weights, disc_batch, 2, {"oom": {"disc": 99}})
    assert clean["passes"] == [] and once["passes"] == [(3, 2)]
    assert once["index"] == clean["index"] == [0, 1, 2] and all(once["ok"]) and once["injected"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(clean["final"], once["final"]))
    assert always["injected"] == 3 and not any(always["ok"])  # the batch, passes at 2, passes at 1
    assert set(always["class"]) == {TRANSIENT} and all("micro-batch 1" in e for e in always["error"])


def test_the_retry_after_an_out_of_memory_does_not_hold_the_failed_calls_tokens(tiny_weights, disc_batch):
    """An out-of-memory raised after the backbone: the exception kept for the error rows must not keep its frames,
    whose locals hold the group's tokens, alive through the retry that needs that memory."""
    import weakref

    import torch

    backbone, head = tiny_weights
    model = ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                          backbone_kwargs=dict(TINY_VIT))
    actor = Stage1Actor(Stage1Settings(model=model, decode=DecodeSettings(), micro_batch=2, crf="none"))
    engine = actor.engine
    tokens, after_backbone, run_passes = engine._tokens, engine._after_backbone, engine.run_passes
    held, alive_at_retry = [], []

    def recorded(*args, **kwargs):
        out = tokens(*args, **kwargs)
        held.append(weakref.ref(out))
        return out

    def out_of_memory_once(*args, **kwargs):
        if len(held) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (raised after the backbone)")
        return after_backbone(*args, **kwargs)

    def retry(*args, **kwargs):
        alive_at_retry.append(held[0]() is not None)
        yield from run_passes(*args, **kwargs)

    engine._tokens, engine._after_backbone, engine.run_passes = recorded, out_of_memory_once, retry
    rows = [ok for chunk in actor(disc_batch) for oks in chunk["ok"] for ok in oks]
    assert rows == [True] * 3 and alive_at_retry == [False]


def test_a_group_that_fails_in_a_batch_of_groups_does_not_fail_its_batch_mates(tiny_weights, tmp_path):
    """A deterministic error (not an out-of-memory) on a batch of several groups: the batch is retried group by
    group, so only the group that fails alone gets error rows (permanent: it fails the same way again); its batch
    mates get the masks they get in a batch of their own."""
    write_sample(str(tmp_path), {"disc": 3, "horse": 2})
    rows = [decode_group(mark_todo(group_row(spec), None)[0], DecodeSettings())
            for spec in list_layout(Storage(str(tmp_path)))]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    horse_alone = run_actor(tiny_weights, {k: [v[1]] for k, v in batch.items()}, 4, None)

    backbone, head = tiny_weights
    model = ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                          backbone_kwargs=dict(TINY_VIT))
    actor = Stage1Actor(Stage1Settings(model=model, decode=DecodeSettings(), micro_batch=4, crf="none"))
    run, calls = actor.engine.run, []

    def fails_on_disc(pixels, *args, **kwargs):  # disc's three images: an input the engine cannot handle
        calls.append([len(p) for p in pixels])
        if any(len(p) == 3 for p in pixels):
            raise ValueError("cannot handle this group's images")
        return run(pixels, *args, **kwargs)

    actor.engine.run = fails_on_disc
    got: dict[str, dict] = {}
    for chunk in actor(batch):
        for c, group in enumerate(chunk["group"]):
            g = got.setdefault(group, {"ok": [], "kind": [], "class": [], "final": []})
            g["ok"] += list(chunk["ok"][c])
            g["kind"] += list(chunk["error_kind"][c])
            g["class"] += list(chunk["error_class"][c])
            g["final"] += list(chunk["final"][c])
    assert calls == [[3, 2], [3], [2]]
    assert not any(got["disc"]["ok"]) and set(got["disc"]["kind"]) == {"Stage1:ValueError"}
    assert set(got["disc"]["class"]) == {"permanent"}
    assert got["horse"]["ok"] == [True, True] and set(got["horse"]["kind"]) == {""}
    assert all(np.array_equal(a, b) for a, b in zip(got["horse"]["final"], horse_alone["final"]))
