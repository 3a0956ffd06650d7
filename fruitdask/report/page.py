"""The run report: one self-contained HTML page per run, for people who judge a run by looking.

Built only from ``run.json`` and the files beside it (``features/``, ``errors.parquet``,
``scree.png``) plus a few input images for thumbnails, all read through
:mod:`fruitdask.storage`; no number is typed here. Every chart and thumbnail is embedded as a
``data:`` URI, so the page needs no network; the only outside links are the sibling
``dask-report.html`` and the dashboard URL the cluster had while the run was going.

Each number shown from ``run.json`` carries ``data-ptr``, the JSON pointer of its source, so
tests (and curious readers) can check the page against the record.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fruitdask import __version__, output, storage
from fruitdask.config import StorageSettings
from fruitdask.errors import InputError
from fruitdask.features import frames
from fruitdask.features.featurize import DecodeError, decode_image
from fruitdask.report import svg as report_svg

logger = logging.getLogger(__name__)

THUMBS_PER_LABEL = 4
THUMB_SIZE = 96
#: Stages in the order they run; run.json stores them sorted by name.
STAGE_ORDER = ("table", "listing", "diff", "weights", "startup", "broadcast", "featurize", "pca", "write", "commit", "publish")
#: Points drawn on the PCA scatter; larger outputs are sampled (seeded, so rebuilds agree).
MAX_POINTS = 6000
#: Paths remembered per label to pick thumbnails from, spread over the label.
THUMB_POOL = 256
MAX_SKIPPED_ROWS = 200
#: Labels shown with thumbnails (the page stays small for a lake of thousands of labels).
MAX_THUMB_LABELS = 300
#: Table files read for the PCA scatter and the thumbnails: a seeded sample past this many.
MAX_SCATTER_FILES = 64


@dataclass
class OutputData:
    """What the page shows besides ``run.json``: read from the output and the input."""

    pcs: np.ndarray  # (n, 2) or (n, 1): a sample of the first principal components
    pc_labels: list[str]
    thumbs: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)  # label -> [(path, data URI)]
    errors: pd.DataFrame | None = None  # None when errors.parquet is absent
    scree_png: bytes | None = None


# ----------------------------------------------------------------------------- reading


def _points_and_paths(run: output.CommittedRun, rows: int) -> tuple[np.ndarray, list[str], dict]:
    """Stream ``features/`` part by part, keeping a seeded sample of the first two components
    and up to :data:`THUMB_POOL` paths per label; only ``path, label, pca`` are read."""
    rng = np.random.default_rng(0)
    parts = run.feature_parts()
    if len(parts) > MAX_SCATTER_FILES:  # bounded: a seeded sample of the table's files
        parts = sorted(rng.choice(parts, MAX_SCATTER_FILES, replace=False).tolist())
        rows = int(rows * MAX_SCATTER_FILES / len(run.feature_parts()))
    keep = min(1.0, MAX_POINTS / max(rows, 1))
    pcs: list = []
    labels: list = []
    pool: dict = {}
    for part in parts:
        df = storage.read_parquet(part, run.storage_options, columns=["path", "label", "pca"])
        if df.empty:
            continue
        mask = rng.random(len(df)) < keep
        pcs.append(frames.matrix(df["pca"][mask])[:, :2] if mask.any() else np.zeros((0, 2), np.float32))
        labels.extend(df["label"][mask].astype(str))
        for label, paths in df.groupby(df["label"].astype(str), sort=False)["path"]:
            have = pool.setdefault(label, [])
            have.extend(paths.astype(str).iloc[: THUMB_POOL - len(have)])
    width = min((p.shape[1] for p in pcs if len(p)), default=2)
    stacked = np.concatenate([p[:, :width] for p in pcs]) if pcs else np.zeros((0, 2), np.float32)
    return stacked, labels, pool


def _thumbnail(path: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """A small JPEG ``data:`` URI of one input image, or None when it cannot be read now."""
    from PIL import Image

    try:
        pixels = decode_image(storage.read_bytes(path, storage_options), THUMB_SIZE)
    except (OSError, DecodeError) as e:
        logger.debug("no thumbnail for %s: %s", path, e)
        return None
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def pick_thumbnails(pool: Mapping[str, list[str]], per_label: int = THUMBS_PER_LABEL) -> dict[str, list[str]]:
    """``per_label`` paths per label spread evenly over its images (different views of the
    fruit in Fruits-360, rather than the first few frames of one rotation)."""
    out = {}
    for label in sorted(pool):
        paths = sorted(pool[label])
        idx = np.unique(np.linspace(0, len(paths) - 1, min(per_label, len(paths))).round().astype(int))
        out[label] = [paths[i] for i in idx]
    return out


def read_outputs(
    doc: Mapping[str, Any], root: str, storage_options: Mapping[str, Any] | None,
    guard: Callable[[list[str]], None] | None = None,
) -> OutputData:
    """Read what the page needs from the output at ``root`` (the staging prefix during a run,
    the output itself when rebuilding) and thumbnails from the input images.

    ``guard`` is called with the thumbnail paths before any is read: they come from the
    Parquet files, so when rebuilding they are data, checked like any location given by flag.
    """
    run = output.CommittedRun(root, dict(doc), storage_options)
    pcs, pc_labels, pool = _points_and_paths(run, int((doc.get("table") or {}).get("rows") or doc["counts"]["rows_written"]))
    chosen = pick_thumbnails(pool)
    flat = [p for paths in chosen.values() for p in paths]
    if guard is not None:
        guard(flat)
    # Threads: on S3 each read is a round trip; 200 of them one by one take seconds.
    with ThreadPoolExecutor(max_workers=8) as ex:
        uris = dict(zip(flat, ex.map(lambda p: _thumbnail(p, storage_options), flat), strict=True))
    missing = sum(u is None for u in uris.values())
    if missing:
        logger.warning("%d of %d thumbnails could not be read from the input (moved or deleted?)", missing, len(uris))
    data = OutputData(pcs=pcs, pc_labels=pc_labels, thumbs={k: [(p, uris[p]) for p in v] for k, v in chosen.items()})
    try:
        data.errors = run.errors()
    except InputError:
        logger.warning("no errors.parquet under %s: the skipped-files section will be empty", root)
    try:
        data.scree_png = run.scree()
    except InputError:
        logger.warning("no scree.png under %s", root)
    return data


# ----------------------------------------------------------------------------- rendering


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _ptr(*keys: str) -> str:
    """RFC 6901 JSON pointer: labels may hold ``/`` or ``~`` in theory."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


def _num(value: Any, *keys: str, kind: str = "int") -> str:
    """One number from ``run.json``, formatted, tagged with its pointer."""
    if value is None:
        text = "n/a"
    elif kind == "int":
        text = f"{int(value):,}"
    elif kind == "pct":
        text = f"{100 * float(value):.2f}%"
    elif kind == "s":
        text = f"{float(value):.3f} s"
    else:
        text = f"{float(value):,.3f}"
    return f'<span class="num" data-ptr="{_e(_ptr(*keys))}">{_e(text)}</span>'


def _txt(value: Any, *keys: str) -> str:
    return f'<span data-ptr="{_e(_ptr(*keys))}">{_e(value)}</span>'


def _img(png: bytes, alt: str, mime: str = "image/png", cls: str = "chart") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:{mime};base64,{base64.b64encode(png).decode("ascii")}">'


def _svg(svg: str, alt: str) -> str:
    return _img(svg.encode("utf-8"), alt, mime="image/svg+xml")


def _table(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _gib(n: Any) -> str:
    return f"{int(n) / 2**30:.1f} GiB" if isinstance(n, int | float) and n else "n/a"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#23395d;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header .sub{opacity:.85}nav{padding:6px 32px;background:#e8ecf2;position:sticky;top:0}
nav a{margin-right:16px;color:#23395d;text-decoration:none;font-weight:600}
main{padding:8px 32px 40px;max-width:1200px}section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 20px;margin:16px 0}
h2{margin:4px 0 10px;font-size:18px;color:#23395d}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
table.kv th{color:#555;font-weight:600;white-space:nowrap}td .num,td.num{font-variant-numeric:tabular-nums}
table.grid th{background:#f1f3f6}.banner{background:#c62828;color:#fff;padding:14px 32px;font-weight:700;font-size:16px}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px;margin:8px 0}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#f4f6fa;border-radius:6px;padding:8px 14px;min-width:120px}
.card .num{font-size:22px;font-weight:700;display:block}.card small{color:#555}
img.chart{max-width:100%;height:auto;display:block;margin:6px 0}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(235px,1fr));gap:10px}
.label{border:1px solid #eee;border-radius:4px;padding:6px}.label b{display:block;font-size:12px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.label img{width:52px;height:52px;margin:1px}.missing{display:inline-block;width:52px;height:52px;background:#eee;margin:1px}
code{font-size:12px;word-break:break-all}footer{color:#777;font-size:12px;padding:0 32px 24px}
"""


def _run_section(doc: Mapping[str, Any]) -> str:
    cfg, w, files = doc.get("config", {}), doc.get("weights", {}), doc.get("files", {})
    links = []
    if files.get("performance_report"):
        links.append(f'<a href="{_e(files["performance_report"])}">Dask performance report</a> (beside this page)')
    dash = (doc.get("cluster") or {}).get("dashboard")
    if isinstance(dash, str) and dash.startswith(("http://", "https://")):
        links.append(f'<a class="dashboard" href="{_e(dash)}">{_e(dash)}</a> (dashboard, live only while the run was going)')
    rows = [
        ("run id", _txt(doc.get("run_id"), "run_id")),
        ("input", f'<code>{_txt(doc.get("input"), "input")}</code>'),
        ("output", f'<code>{_txt(doc.get("output"), "output")}</code>'),
        ("backend", _txt(doc.get("backend"), "backend")),
        ("weights", f'{_txt(w.get("kind"), "weights", "kind")}: {_txt(w.get("source"), "weights", "source")}'
                    f' (requested {_txt(w.get("requested"), "weights", "requested")})'),
        ("weights sha256", f'<code>{_txt(w.get("sha256"), "weights", "sha256")}</code>'),
        ("image size", _num(cfg.get("image_size"), "config", "image_size") + " px"),
        ("pooling", _txt(cfg.get("pooling"), "config", "pooling")),
        ("precision", _txt(cfg.get("precision", "float32"), "config", "precision")
         + (f' ({_e((doc.get("precision") or {}).get("reason"))})' if (doc.get("precision") or {}).get("reason") else "")),
        ("batch / partition size", f'{_num(cfg.get("batch_size"), "config", "batch_size")} / '
                                   f'{_num(cfg.get("partition_size"), "config", "partition_size")} images'),
        ("started", _txt(doc.get("started_at"), "started_at")),
        ("duration", _num(doc.get("duration_s"), "duration_s", kind="s")),
        ("links", "<br>".join(links) or "none"),
    ]
    return f'<section id="run"><h2>The run</h2>{_table(rows)}</section>'


def _data_section(doc: Mapping[str, Any], data: OutputData) -> str:
    c, per_label = doc["counts"], doc.get("per_label", {})
    cards = "".join(
        f'<div class="card">{_num(c.get(k), "counts", k)}<small>{_e(name)}</small></div>'
        for k, name in (("images_listed", "images listed"), ("labels", "labels"), ("added", "added"),
                        ("updated", "updated"), ("removed", "removed"), ("unchanged", "unchanged"),
                        ("featurized", "featurized"), ("errors", "files skipped"))
        if k in c
    )
    chart = _svg(report_svg.labels_bar_svg(per_label), "images per label") if per_label else ""
    cells = []
    for label in sorted(per_label)[:MAX_THUMB_LABELS]:
        imgs = "".join(
            f'<img class="thumb" alt="{_e(label)}" title="{_e(p)}" src="{uri}">' if uri
            else f'<span class="missing" title="{_e(p)}: not readable now"></span>'
            for p, uri in data.thumbs.get(label, [])
        )
        cells.append(f'<div class="label"><b title="{_e(label)}">{_e(label)} · {_num(per_label[label], "per_label", label)}'
                     f'</b>{imgs or "<small>no image written</small>"}</div>')
    thumbs = f'<div id="thumbnails"><h3>A few images per label</h3><div class="thumbs">{"".join(cells)}</div></div>'
    return (f'<section id="data"><h2>The data</h2><div class="cards">{cards}</div>'
            f'<div id="labels"><h3>Images per label</h3>{chart}</div>{thumbs}{_skipped(doc, data)}</section>')


def _skipped(doc: Mapping[str, Any], data: OutputData) -> str:
    n = int(doc["counts"].get("errors", 0))
    head = f'<div id="skipped"><h3>Skipped files: {_num(n, "counts", "errors")}</h3>'
    if not n:
        return head + "<p>No file was skipped.</p></div>"
    by_stage = ", ".join(f"{_e(s)}: {_num(v, 'errors_by_stage', s)}" for s, v in doc.get("errors_by_stage", {}).items())
    if data.errors is None:
        return head + f"<p>By stage: {by_stage}. errors.parquet was not found.</p></div>"
    shown = data.errors.head(MAX_SKIPPED_ROWS)
    rows = "".join(
        f"<tr><td><code>{_e(r.path)}</code></td><td>{_e(r.label)}</td><td>{_e(r.stage)}</td><td>{_e(r.reason)}</td></tr>"
        for r in shown.itertuples(index=False)
    )
    more = f"<p>{len(data.errors) - len(shown):,} more in errors.parquet.</p>" if len(data.errors) > len(shown) else ""
    return (head + f"<p>By stage: {by_stage}.</p><table class=\"grid skipped\"><tr><th>path</th><th>label</th>"
            f"<th>stage</th><th>reason</th></tr>{rows}</table>{more}</div>")


def _reduction_section(doc: Mapping[str, Any], data: OutputData) -> str:
    r = doc["reduction"]
    rows = [
        ("components kept (K)", _num(r.get("k"), "reduction", "k")),
        ("variance target", _num(r.get("variance_target"), "reduction", "variance_target", kind="pct")
         if r.get("variance_target") is not None else "none (K given with --components)"),
        ("variance reached", _num(r.get("variance_reached"), "reduction", "variance_reached", kind="pct")),
        ("features per image", _num(r.get("n_features"), "reduction", "n_features")),
        ("components fitted", _num(r.get("n_fit_components"), "reduction", "n_fit_components")),
        ("images fitted", _num(r.get("n_samples"), "reduction", "n_samples")),
        ("method", _txt(r.get("method"), "reduction", "method")),
    ]
    scree = _img(data.scree_png, f"scree plot, K = {r.get('k')}") if data.scree_png else "<p>scree.png not found.</p>"
    if len(data.pcs):
        svg = report_svg.pca_scatter_svg(data.pcs, data.pc_labels, shown_of=int((doc.get("table") or {}).get("rows") or doc["counts"]["rows_written"]),
                                         ratios=r.get("explained_variance_ratio", [])[:2])
        scatter = _svg(svg, "first two principal components by label")
    else:
        scatter = "<p>No rows to plot.</p>"
    return (f'<section id="reduction"><h2>The reduction</h2>{_table(rows)}'
            f'<div id="scree"><h3>Scree plot (K marked)</h3>{scree}</div>'
            f'<div id="scatter"><h3>PC 1 vs PC 2, by label</h3>{scatter}</div></section>')


def _cost_section(doc: Mapping[str, Any]) -> str:
    raw, rate, total = doc.get("timings_s", {}), doc.get("images_per_second", {}), doc.get("duration_s") or 0
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    timings = {k: raw[k] for k in sorted(raw, key=lambda k: (rank.get(k, len(rank)), k))}
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="num">{_num(v, "timings_s", k, kind="s")}</td>'
        f'<td class="num">{100 * v / total if total else 0:.1f}%</td></tr>'
        for k, v in timings.items()
    )
    table = (f'<table class="grid cost"><tr><th>stage</th><th>time</th><th>share of run</th></tr>{rows}'
             f'<tr><th>whole run</th><td class="num">{_num(total, "duration_s", kind="s")}</td><td></td></tr></table>')
    rates = _table([
        ("images/s featurizing", _num(rate.get("featurize"), "images_per_second", "featurize", kind="float")),
        ("images/s overall", _num(rate.get("overall"), "images_per_second", "overall", kind="float")),
    ])
    chart = _svg(report_svg.timings_bar_svg(timings), "time per stage") if timings else ""
    return f'<section id="cost"><h2>The cost</h2>{table}{rates}{chart}</section>'


def _environment_section(doc: Mapping[str, Any]) -> str:
    cluster = doc.get("cluster") or {}
    rows = [(k.removesuffix("_bytes"), _gib(v) if k.endswith("_bytes") else (_num(v, "cluster", k) if isinstance(v, int) else _txt(v, "cluster", k)))
            for k, v in cluster.items()]
    versions = [(k, _txt(v, "versions", k)) for k, v in sorted((doc.get("versions") or {}).items())]
    return (f'<section id="environment"><h2>Cluster and versions</h2><h3>Cluster</h3>{_table(rows)}'
            f'<h3>Package versions</h3>{_table(versions)}</section>')


def render(doc: Mapping[str, Any], data: OutputData) -> str:
    """The whole page as a string: pure, so tests can render variants of a record."""
    w = doc.get("weights", {})
    banner = ""
    if w.get("random"):
        say = w.get("warning") or "VGG16 weights are random: the features are not ImageNet features."
        banner = f'<div class="banner" id="random-weights">RANDOM WEIGHTS. {_e(say)}</div>'
    warnings = "".join(f'<div class="warn">{_e(x)}</div>' for x in doc.get("warnings", []) if x != w.get("warning"))
    nav = "".join(f'<a href="#{s}">{t}</a>' for s, t in
                  (("run", "Run"), ("data", "Data"), ("reduction", "Reduction"), ("cost", "Cost"), ("environment", "Environment")))
    built = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    title = f"fruitdask run {doc.get('run_id', '')}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
        f'<header><h1>{_e(title)}</h1><div class="sub">{_e(doc.get("backend"))} backend · '
        f'{_e(doc.get("input"))} → {_e(doc.get("output"))}</div></header>{banner}<nav>{nav}</nav><main>{warnings}'
        f"{_run_section(doc)}{_data_section(doc, data)}{_reduction_section(doc, data)}{_cost_section(doc)}"
        f"{_environment_section(doc)}</main>"
        f"<footer>Built {_e(built)} by fruitdask {_e(__version__)} from run.json and the files beside it.</footer>"
        f"</body></html>"
    )


# ----------------------------------------------------------------------------- entry points


def build_report(
    doc: Mapping[str, Any], root: str, storage_options: Mapping[str, Any] | None = None,
    guard: Callable[[list[str]], None] | None = None,
) -> bytes:
    """The report of the run recorded by ``doc``, reading its files under ``root``.

    Parameters
    ----------
    doc
        The ``run.json`` document.
    root
        Where the run's files are: the staging prefix while the run commits, or the output.
    storage_options
        fsspec options for ``s3://`` outputs and inputs.
    guard
        Called with the input paths before thumbnails are read (see :func:`read_outputs`).
    """
    return render(doc, read_outputs(doc, root, storage_options, guard)).encode("utf-8")


def rebuild(location: str, storage_options: Mapping[str, Any] | None = None, settings: StorageSettings | None = None) -> str:
    """Rebuild ``OUTPUT/report.html`` of a finished run from its files; return its URL.

    With ``settings``, the run's input and every thumbnail path read from the Parquet files
    must pass the region guard; without, only local paths and ``s3://`` are read.
    """
    run = output.read_run(location, storage_options, committed=False)
    url, doc = run.url, run.record
    guard: Callable[[list[str]], None] = storage.check_protocols  # what, fix: their defaults
    if settings is not None:
        storage.guard_regions([doc.get("input")], settings)

        def guard(paths: list[str]) -> None:
            storage.guard_regions(paths, settings)

    page = build_report(doc, url, storage_options, guard)
    return storage.write_file(storage.join(url, output.REPORT), page, storage_options)


def report_location(location: str) -> str:
    """Where a run's report is, as a person would open it (an absolute path when local)."""
    if storage.is_remote(location):
        return storage.join(location, output.REPORT)
    return str(Path(location.removeprefix("file://")).resolve() / output.REPORT)
