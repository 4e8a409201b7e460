"""What a Ray worker imports to run the jobs' light tasks. Ray imports a task function's module in every worker
that runs it: a listing, to-do or decode task whose module pulled in torch, timm or scikit-learn would spend
seconds and hundreds of MB per worker before its first row (on 2 cores it made the first job ~5 s slower and the
feature-cache pass ~20 s slower)."""
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "torchvision", "sklearn", "py_sod_metrics")


def imported_by(statement: str, heavy: tuple = HEAVY) -> list[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_listing_to_do_and_decode_tasks_load_no_model_code():
    """The functions as the jobs name them; each one's module is what its workers import."""
    from pipeline.feature_cache import decode_for_cache
    from pipeline.infer import decode_group, groups_to_do
    from pipeline.listing import _list_groups_batch

    modules = {f.__module__ for f in (decode_for_cache, decode_group, groups_to_do, _list_groups_batch)}
    assert "pipeline.infer" not in modules and "pipeline.feature_cache" not in modules
    assert imported_by("\n".join(f"import {m}" for m in sorted(modules))) == []


def test_the_model_does_import_them():
    """The check above can fail: the stage-1 actor's engine brings torch, and building its ViT brings timm (only
    then: the job's driver plans and checks weights without it)."""
    assert imported_by("import scosparc_core.engine") == ["torch"]
    build = ("from scosparc_core import DinoBackbone\n"
             "DinoBackbone.create('vit_base_patch8_224', random_init=True, embed_dim=24, depth=1, num_heads=1)")
    assert {"torch", "timm"} <= set(imported_by(build))
    assert "timm" not in imported_by("import jobs.infer")


def test_the_cpu_refine_actor_loads_neither_torch_nor_triton():
    """The refine actors (pydensecrf, masks at original size, metrics) fill the CPU nodes, a dozen a node: Triton
    (~85 MB a process) and torch belong to the GPU CRF, whose kernels live apart (scosparc_core.crf_kernels)."""
    assert imported_by("import pipeline.refine", ("torch", "triton")) == []
    pytest.importorskip("triton")  # the check can fail: the torch CRF's lattice does bring Triton
    assert imported_by("import scosparc_core.permutohedral", ("triton",)) == ["triton"]
