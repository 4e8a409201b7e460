r"""CoSOD evaluation report for inference runs and for any method's prediction maps.

    python jobs/evaluate.py --run scosparc=out/coca --output out/eval
    python jobs/evaluate.py --run ours=s3://b/runs/r1 --maps gicd=s3://b/maps/GICD/CoCA \
        --gt s3://b/CoCA/groundtruth --dataset CoCA --output s3://b/reports/coca \
        --storage-option key=... secret=...

Writes <output>/report.html (self-contained) and <output>/metrics.parquet (per dataset and per group). Runs are
read in a stream, so memory stays bounded however many images they hold.
"""
from __future__ import annotations

import argparse
import os
import posixpath
import sys
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.arguments import Formatter, add_storage_args, storage_from  # noqa: E402
from pipeline.evaluate import GALLERY, Source, evaluate, write_metrics, write_report  # noqa: E402
from pipeline.report import render  # noqa: E402


def labelled(text: str) -> tuple[str, str]:
    """LABEL=URL or URL (labelled by its last path component). The text before the first "=" is a label only
    when it has no "/" (so out/dt=2024-01-01 stays a path) and the whole text is not an existing local path."""
    label, sep, url = text.partition("=")
    if sep and label and "/" not in label and not os.path.exists(text):
        return label, url
    path = urlsplit(text).path if "://" in text else text  # no query or fragment in the label
    return posixpath.basename(path.rstrip("/")) or text, text


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--run", type=labelled, action="append", default=[], metavar="[LABEL=]URL",
                    help="output of jobs/infer.py with ground truth (repeatable)")
    ap.add_argument("--maps", type=labelled, action="append", default=[], metavar="[LABEL=]URL",
                    help="prediction maps <root>/<group>/<stem>.png of any method (repeatable; needs --gt)")
    ap.add_argument("--gt", help="ground-truth root <root>/<group>/<stem>.png for --maps")
    ap.add_argument("--images", help="photos for the gallery of --maps, <root>/<group>/<stem>.*; when not given, "
                                     "the CoSOD layout beside --gt: <gt>/../image")
    ap.add_argument("--dataset", help="dataset name; when not given, from the run's input or the --gt path")
    ap.add_argument("--output", required=True, help="where report.html and metrics.parquet go")
    ap.add_argument("--ray", action="store_true", help="score --maps on Ray Data (large sets)")
    ap.add_argument("--title", default="SCoSPARC evaluation", help="the report's title")
    ap.add_argument("--top-groups", type=int, default=20, metavar="N",
                    help="the report lists the N best and N worst groups (all are in metrics.parquet)")
    ap.add_argument("--gallery", type=int, default=GALLERY, metavar="K", help="best and worst images shown per run")
    add_storage_args(ap)
    a = ap.parse_args(argv)
    if not a.run and not a.maps:
        ap.error("give at least one --run or --maps")
    if a.maps and not a.gt:
        ap.error("--maps needs --gt")
    if a.top_groups < 1 or a.gallery < 0:  # head(-n) would list nearly every group as the "best"
        ap.error("--top-groups must be at least 1 and --gallery at least 0")
    a.options = storage_from(a)
    a.sources = [Source(label, run=url, dataset=a.dataset, options=a.options) for label, url in a.run]
    a.sources += [Source(label, maps=url, gt=a.gt, images=a.images, dataset=a.dataset, options=a.options)
                  for label, url in a.maps]
    if len({s.label for s in a.sources}) != len(a.sources):
        ap.error("labels must differ: use LABEL=URL")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    options, sources = a.options, a.sources
    base = a.output.rstrip("/")
    print(f"report:  {base}/report.html\nmetrics: {base}/metrics.parquet", flush=True)
    started_ray = False
    if a.ray:
        import ray

        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    try:
        metrics, details = evaluate(sources, use_ray=a.ray, gallery=a.gallery)
    finally:
        if started_ray:
            ray.shutdown()
    write_metrics(a.output, options, metrics)  # first: a report that fails to render keeps the evaluation
    write_report(a.output, options, render(metrics, details, a.title, a.top_groups))
    table = metrics[metrics["scope"] == "dataset"][["label", "dataset", "images", "max_fm", "sm", "max_em", "mae"]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
