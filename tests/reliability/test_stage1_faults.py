"""Stage 1 under an injected CUDA out-of-memory, on the actor's own entry point (no cluster needed): the group is
retried with smaller micro-batches, and when even those fail its rows are transient errors, never ok rows."""
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
    out = {"ok": [], "kind": [], "class": [], "error": [], "final": [], "index": []}
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
    once = run_actor(tiny_weights, disc_batch, 1, {"oom": {"disc": 1}})
    # no smaller micro-batch to try: the rows must say out-of-memory (transient), so that a re-run redoes them
    assert not any(once["ok"]), [f.max() for f in once["final"]]
    assert set(once["kind"]) == {"Stage1:OutOfMemoryError"} and set(once["class"]) == {TRANSIENT}
