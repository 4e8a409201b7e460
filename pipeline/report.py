"""The evaluation report: one self-contained HTML file (tables, curves as inline SVG, thumbnails inline)."""
from __future__ import annotations

import base64
import html
import io
import posixpath

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from fsspec.implementations.tar import TarFileSystem  # noqa: E402
from PIL import Image  # noqa: E402

from scosparc_core.image import to_rgb  # noqa: E402

from .decode import read_gt, read_many  # noqa: E402
from .evaluate import PAPER, SUMMARY, read_map  # noqa: E402
from .storage import open_url  # noqa: E402

HEADERS = {"max_fm": "max F", "mean_fm": "mean F", "adp_fm": "adp F", "sm": "S&alpha;", "max_em": "max E",
           "mean_em": "mean E", "adp_em": "adp E", "mae": "MAE", "wfm": "F<sup>w</sup>"}
THUMB = 150
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde}
h3{font-size:15px;margin:18px 0 6px} p.note{color:#556;font-size:13px;margin:4px 0 12px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px} th,td{padding:4px 10px;border-bottom:1px solid #e5e8ee;
text-align:right} th:first-child,td:first-child{text-align:left} thead th{background:#f3f5f9}
tr.paper td{color:#6a4;font-style:italic} .plots{display:flex;flex-wrap:wrap;gap:12px} .plots svg{max-width:460px;height:auto}
.gallery{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;font-size:11px;color:#445;width:auto}
figure img{display:block;height:110px;border:1px solid #ccd} .trio{display:flex;gap:2px}
tr.sep td{background:#f7f8fb;color:#556;font-style:italic;text-align:left}
"""


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def curves_svg(dataset_rows: pd.DataFrame) -> str:
    """Precision-recall and F-threshold curves, one line per run. Labels are drawn as given: no mathtext (a "$"
    in a label would be parsed, and a bad formula fails the report), and those starting with "_" are shown
    (matplotlib leaves those out of a legend it collects itself)."""
    with matplotlib.rc_context({"text.parse_math": False}):
        fig_pr, ax_pr = plt.subplots(figsize=(4.6, 3.6))
        fig_f, ax_f = plt.subplots(figsize=(4.6, 3.6))
        lines_pr, lines_f, labels = [], [], []
        for _, r in dataset_rows.iterrows():
            if r["images"] == 0:
                continue
            p, rec, f = np.asarray(r["precision"]), np.asarray(r["recall"]), np.asarray(r["fm_curve"])
            lines_pr += ax_pr.plot(rec, p, lw=1.6)
            lines_f += ax_f.plot(np.arange(len(f))[::-1], f, lw=1.6)  # pysodmetrics curves run 255 -> 0
            labels.append(str(r["label"]))
        axes = ((ax_pr, lines_pr, ("recall", "precision", "Precision-recall")),
                (ax_f, lines_f, ("threshold", "F-measure (β²=0.3)", "F-measure vs threshold")))
        for ax, lines, (x, y, title) in axes:
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            if lines:
                ax.legend(lines, labels, fontsize=8)
        return _svg(fig_pr) + _svg(fig_f)


def _data_uri(rgb: np.ndarray) -> str:
    h, w = rgb.shape[:2]
    scale = THUMB / max(h, w)
    small = cv2.resize(rgb, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _overlay(rgb: np.ndarray | None, mask: np.ndarray, colour) -> np.ndarray:
    if rgb is None:
        return np.repeat(mask[:, :, None], 3, axis=2)
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None] * 0.55
    return (rgb * (1 - alpha) + np.array(colour, np.float32) * alpha).astype(np.uint8)


def read_mask(mask_uri: str, options: dict) -> bytes:
    """A mask's PNG bytes from its URL, or from a tar shard member written as ``<tar URL>#<member>``."""
    url, sep, member = mask_uri.rpartition("#")
    if sep and ".tar" in posixpath.basename(url):
        fs, path = open_url(url, options)
        with fs.open(path, "rb") as f:
            return TarFileSystem(fo=f, skip_instance_cache=True).cat_file(member)
    fs, path = open_url(mask_uri, options)
    return fs.cat_file(path)


def _blobs(row: dict, options: dict) -> dict:
    """image / gt / pred bytes (or an exception, or None) for one gallery row; the mask from ``mask_png`` when
    the run stored it in Parquet."""
    uris = {k: row.get(f"{k}_uri") for k in ("image", "gt")}
    wanted = [k for k, u in uris.items() if u]
    found = dict(zip(wanted, read_many([uris[k] for k in wanted], options)))
    if row.get("mask_png"):
        found["pred"] = row["mask_png"]
    elif row.get("mask_uri"):
        try:
            found["pred"] = read_mask(row["mask_uri"], options)
        except Exception as exc:  # noqa: BLE001 - that thumbnail is left out
            found["pred"] = exc
    return found


def gallery(picks: dict[str, list[dict]], options: dict) -> str:
    """Best and worst images by S-measure: image, ground truth overlay (green), prediction overlay (red)."""
    parts = []
    for title in ("worst", "best"):
        figures = []
        for r in picks.get(title, []):
            data = _blobs(r, options)
            try:
                rgb = to_rgb(Image.open(io.BytesIO(data["image"]))) if isinstance(data.get("image"), bytes) else None
                gt, pred = read_gt(data["gt"]), read_map(data["pred"])  # as they were scored
            except Exception:  # noqa: BLE001 - a thumbnail that cannot be made is left out
                continue
            tiles = [rgb] if rgb is not None else []
            tiles += [_overlay(rgb, gt, (40, 200, 60)), _overlay(rgb, pred, (230, 40, 40))]
            imgs = "".join(f'<img src="{_data_uri(t)}" alt="">' for t in tiles)
            figures.append(f'<figure><div class="trio">{imgs}</div><figcaption>{html.escape(str(r["group"]))}/'
                           f'{html.escape(str(r["name"]))} &middot; S {r["sm"]:.3f} &middot; MAE {r["mae"]:.3f}'
                           f'</figcaption></figure>')
        parts.append(f'<h3>{title.capitalize()} {len(figures)} (image, ground truth in green, prediction in red)</h3>'
                     f'<div class="gallery">{"".join(figures) or "<p class=note>no images</p>"}</div>')
    return "".join(parts)


def _table(frame: pd.DataFrame, paper: dict | None) -> str:
    head = "".join(f"<th>{HEADERS[k]}</th>" for k in SUMMARY)
    body = []
    for _, r in frame.iterrows():
        cells = "".join(f"<td>{r[k]:.4f}</td>" if pd.notna(r[k]) else "<td>&ndash;</td>" for k in SUMMARY)
        notes = [f"{int(r[k])} {word}" for k, word in (("errors", "errors"), ("missing_predictions", "missing"))
                 if pd.notna(r.get(k)) and r.get(k)]
        extra = f" ({', '.join(notes)})" if notes else ""
        body.append(f"<tr><td>{html.escape(r['label'])}</td>{cells}<td>{int(r['images'])}{extra}</td></tr>")
    if paper:
        cells = "".join(f"<td>{paper[k]:.3f}</td>" if k in paper else "<td>&ndash;</td>" for k in SUMMARY)
        body.append(f'<tr class="paper"><td>SCoSPARC (paper)</td>{cells}<td></td></tr>')
    return f"<table><thead><tr><th>run</th>{head}<th>images</th></tr></thead><tbody>{''.join(body)}</tbody></table>"


def _group_table(groups: pd.DataFrame, labels: list[str], top: int) -> str:
    """Max F per group and run: the ``top`` best and ``top`` worst groups by the first run (all of them in
    metrics.parquet)."""
    # dropna=False: groups (and runs) without a scored image keep their NaN, so they are counted
    wide = groups.pivot_table(index="group", columns="label", values="max_fm", dropna=False)
    wide = wide.reindex(columns=[lb for lb in labels if lb in wide.columns])
    total = len(wide)
    wide = wide[wide.iloc[:, 0].notna()].sort_values(wide.columns[0], ascending=False, kind="stable")
    unranked = total - len(wide)
    shown = [("", wide)] if len(wide) <= 2 * top else [(f"best {top}", wide.head(top)),
                                                        (f"worst {top}", wide.tail(top))]
    head = "".join(f"<th>{html.escape(c)} max F</th>" for c in wide.columns)
    body = []
    for caption, part in shown:
        if caption:
            body.append(f'<tr class="sep"><td colspan="{len(wide.columns) + 1}">{caption}</td></tr>')
        body += [f"<tr><td>{html.escape(str(g))}</td>"
                 + "".join(f"<td>{v:.4f}</td>" if pd.notna(v) else "<td>&ndash;</td>" for v in row) + "</tr>"
                 for g, row in part.iterrows()]
    note = (f"<p class=note>{total} groups, ranked by {html.escape(str(wide.columns[0]))}"
            + ("" if len(wide) <= 2 * top else f"; the {top} best and {top} worst shown")
            + (f"; {unranked} not ranked (no scored image for it)" if unranked else "")
            + "; every group's figures and counts are in metrics.parquet.</p>")
    return f"{note}<table><thead><tr><th>group</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(metrics: pd.DataFrame, details: dict, title: str = "SCoSPARC evaluation", top_groups: int = 20) -> str:
    """The report for ``evaluate``'s (metrics, details): per dataset the table, curves, top and bottom
    ``top_groups`` groups and the gallery."""
    labels = list(dict.fromkeys(metrics["label"]))
    sections = []
    for dataset in dict.fromkeys(metrics["dataset"]):
        rows = metrics[(metrics["dataset"] == dataset) & (metrics["scope"] == "dataset")]
        groups = metrics[(metrics["dataset"] == dataset) & (metrics["scope"] == "group")]
        paper = PAPER.get(str(dataset).lower())
        note = ("Paper figures: SCoSPARC trained on COCO-9213 + DUTS-Class (ECCV 2024)." if paper else
                "No published SCoSPARC figures for this dataset.")
        galleries = "".join(
            f"<h3>{html.escape(lb)}</h3>" + gallery(details[lb]["gallery"], details[lb]["source"].options)
            for lb in rows["label"])
        sections.append(
            f"<h2>{html.escape(str(dataset))}</h2><p class=note>{note} F: &beta;&sup2;=0.3, 256 thresholds; "
            f"S: &alpha;=0.5; averaged over images (pysodmetrics).</p>{_table(rows, paper)}"
            f'<div class="plots">{curves_svg(rows)}</div>'
            f"<h3>Per-group max F</h3>{_group_table(groups, labels, top_groups) if len(groups) else ''}"
            f"<h2>Gallery: {html.escape(str(dataset))}</h2>{galleries}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=note>Runs: {html.escape(', '.join(labels))}</p>{''.join(sections)}</body></html>")
