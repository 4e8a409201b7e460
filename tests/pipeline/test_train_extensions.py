"""--extensions for training: only files with them are images of --data and --val (sidecar files such as
img2dataset's .json and .txt are not), checked on the driver's listing, which the feature cache and the workers
use. No Ray Train run: the jobs stop at the GPU check (--gpu on a cluster without GPUs fails at once), after the
listing and the run's record and before any work."""
import json
import shutil

import pandas as pd
import pytest

from conftest import TINY_ARGS
from pipeline.listing import list_layout
from pipeline.sample import write_sample
from pipeline.storage import Storage
from pipeline.train import TrainConfig, listing_digest

GROUPS = {"horse": 4, "disc": 3}


def digest(root) -> str:
    return listing_digest(str(root), list_layout(Storage(str(root))))


def add_sidecars(folder) -> int:
    """x.json and x.TXT beside every x.jpg under folder; how many images there are."""
    images = sorted(folder.rglob("*.jpg"))
    for image in images:
        image.with_suffix(".json").write_text(json.dumps({"caption": image.stem}))
        image.with_suffix(".TXT").write_text(image.stem)
    return len(images)


@pytest.fixture
def roots(tmp_path):
    """--data in the groups layout (<group>/*, a notes.txt at the root), --val in the CoSOD layout: their listing
    digests before the sidecar files were added, and their images."""
    write_sample(str(tmp_path / "staging"), GROUPS)
    data = tmp_path / "data"
    data.mkdir()
    for group in GROUPS:
        shutil.move(tmp_path / "staging" / "image" / group, data / group)
    val = tmp_path / "val"
    write_sample(str(val), {"horse": 2, "disc": 2}, seed=5)
    clean = {"data": digest(data), "val": digest(val)}
    (data / "notes.txt").write_text("not an image")  # directly in the root: would be group ""
    images = {"data": add_sidecars(data), "val": add_sidecars(val / "image")}
    assert digest(data) != clean["data"] and digest(val) != clean["val"]  # unfiltered, the sidecars are listed
    return data, val, clean, images


def train(data, val, storage, *extra) -> list[str]:
    return ["--data", str(data), *(["--val", str(val)] if val else []), "--storage", str(storage), "--name", "r",
            "--gpu", "--random-init", "--cpus-per-worker", "0.5", *TINY_ARGS, *extra]


def test_extensions_are_parsed_normalised_and_bad_values_refused(capsys):
    from jobs.train import parse_args

    base = ["--data", "d", "--storage", "s", "--name", "n"]
    assert parse_args(base).extensions == ()
    assert parse_args([*base, "--extensions", "JPG,.png, webp"]).extensions == ("jpg", "png", "webp")
    for bad, why in ((",", "name no file extension"), (" . ", "name no file extension"),
                     ("tar.gz", "what follows its last dot")):
        with pytest.raises(SystemExit) as done:
            parse_args([*base, "--extensions", bad])
        err = capsys.readouterr().err
        assert done.value.code == 2 and "argument --extensions" in err and why in err
    assert TrainConfig(data="d", storage="s", name="n", extensions=("JPG", ".png")).extensions == ("jpg", "png")
    assert TrainConfig(data="d", storage="s", name="n", extensions="jpg,PNG").extensions == ("jpg", "png")
    with pytest.raises(ValueError, match="name no file extension"):
        TrainConfig(data="d", storage="s", name="n", extensions=(" ", "."))
    with pytest.raises(ValueError, match="what follows its last dot"):
        TrainConfig(data="d", storage="s", name="n", extensions=("tar.gz",))


def test_only_files_with_the_extensions_are_trained_on_and_validated_with(ray_local, roots, tmp_path, capsys):
    """The run lists exactly the images of both roots (its recorded listings equal the roots' before the sidecars
    came); the fingerprint holds the listings, not the option: the same listing resumes, another is refused."""
    from jobs.train import main

    data, val, clean, images = roots
    run = tmp_path / "runs" / "r"
    code = main(train(data, val, tmp_path / "runs", "--extensions", "JPG"))
    err = capsys.readouterr().err
    assert code == 2 and "GPU: 1 needed, the cluster has none" in err  # stopped before any work, as planned
    assert f"new run {run}: 2 training groups, {images['data']} images; validation: 2 groups" in err
    record = json.loads((run / "train_config.json").read_text())
    assert record["fingerprint"]["data"] == [clean["data"]] and record["fingerprint"]["val"] == clean["val"]
    assert record["settings"]["extensions"] == ["jpg"] and "extensions" not in record["fingerprint"]

    pd.DataFrame({"epoch": [0]}).to_parquet(run / "metrics.parquet")  # the run has trained: its data must stay
    code = main(train(data, val, tmp_path / "runs", "--extensions", "jpg,jpeg"))  # another filter, same files
    err = capsys.readouterr().err
    assert code == 2 and f"resuming {run}" in err and "GPU: 1 needed" in err
    code = main(train(data, val, tmp_path / "runs"))  # without it the sidecars are images: other data
    err = capsys.readouterr().err
    assert code == 2 and "not resumed" in err and "data: was" in err and "val: was" in err


def test_extensions_no_file_has_stop_the_job_before_any_work_naming_them(roots, tmp_path, capsys):
    from jobs.train import main

    data, val, _, _ = roots
    code = main(train(data, val, tmp_path / "runs", "--extensions", "jgp,JPE"))  # a typo: not a run of nothing
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: no images found under {data}: no file has one of the extensions jgp, jpe "
                          "(--extensions)")
    plain = tmp_path / "plain"  # --val without them, while --data has some: validation on nothing, refused too
    write_sample(str(plain), {"disc": 2})
    code = main(train(data, plain, tmp_path / "runs", "--extensions", "json"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: no images found under --val {plain}: no file has one of the "
                                        "extensions json (--extensions)")
    assert not (tmp_path / "runs").exists()
