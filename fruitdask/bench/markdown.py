"""bench.md: the Markdown tables of a bench.json document, and filling them into a doc."""

from __future__ import annotations

from pathlib import Path

from fruitdask.bench.summary import STAGES
from fruitdask.errors import ConfigError


def _fmt(v, spec: str = ".2f") -> str:
    return "n/m" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _spread(st: dict | None, spec: str = ".2f") -> str:
    if not st:
        return "n/m"
    if st["n"] == 1:
        return _fmt(st["median"], spec)
    return f"{_fmt(st['median'], spec)} ({_fmt(st['min'], spec)}–{_fmt(st['max'], spec)})"


def markdown(rep: dict) -> str:
    """bench.md: the header, a table per precision, the precision comparison, the unpooled
    PCA, the feature parity and the definitions (sections without data are left out)."""
    lines = _header(rep)
    for prec, engines in rep["results"].items():
        lines += _engine_table(prec, engines)
    cmp = rep.get("precision_comparison") or {}
    if cmp:
        lines += _precision_comparison(cmp)
    if rep["pca_unpooled"]:
        lines += _unpooled_pca_table(rep["pca_unpooled"])
    same = [f"{k} vs raw ({p}) max |diff| {_fmt(v['max_abs_diff_vs_raw'], '.2e')} over {v['rows']} rows"
            for p, engines in rep["parity"].items() for k, v in engines.items()]
    if same:
        lines += ["", "Same features: " + "; ".join(same)]
    lines += ["", "Definitions:", ""] + [f"- **{k}**: {v}" for k, v in rep["definitions"].items()] + ["", "n/m: not measured."]
    return "\n".join(lines) + "\n"


def _header(rep: dict) -> list[str]:
    """The command, the machine and how quiet it was, the images and settings."""
    m = rep["machine"]
    flags = ", ".join(f for f, on in (m.get("cpu_flags") or {}).items() if on) or "none"
    busy = m["cpu_busy_pct_before_runs"]
    return [
        f"Command: `{rep['command']}`  ",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu')}; flags: {flags}), {m.get('memory_gb')} GB; CPU busy before the runs: "
        f"median {_fmt(busy['median'], '.0f')} %, max {_fmt(busy['max'], '.0f')} % "
        f"({'quiet' if m['quiet'] else 'NOT quiet: timings not trustworthy'}); {rep['date']}  ",
        f"{rep['images']} images at {rep['image_size']} px, pooling {rep['pooling']}, batch {rep['batch_size']}, "
        f"partition {rep['partition_size']}, weights {rep['weights']}; each engine run {rep['repeats']} times: "
        "median (min–max)",
    ]


def _engine_table(prec: str, engines: dict) -> list[str]:
    """One precision: a row per engine with its speeds, stages and memory."""
    lines = ["", f"**Precision {prec}**", "",
             "| engine | end to end s | images/s end to end | ratio to raw | steady images/s | ratio to raw (steady) "
             "| fixed cost s | start-up s | listing s | weights s | featurize s | PCA s | write s | driver MB | JVM MB | workers MB |",
             "|---|" + "---:|" * 15]
    for name, r in engines.items():
        if not r["ok_runs"]:
            lines.append(f"| {name} | {r['runs'][0].get('status') if r['runs'] else 'not run'} |" + " |" * 15)
            continue
        st, mem = r["stages_s"], r["memory"]
        lines.append("| " + " | ".join([
            name, _spread(r["wall_s"], ".1f"), _spread(r["images_per_s_e2e"]), _fmt(r["ratio_to_raw_e2e"], ".3f"),
            _spread(r["steady_images_per_s"]), _fmt(r["ratio_to_raw_steady"], ".3f"), _spread(r["fixed_cost_s"], ".1f"),
            *(_fmt(st.get(s)) for s in STAGES),
            _fmt(mem["driver_mb"], ".0f"), _fmt(mem["jvm_mb"] or None, ".0f"), _fmt(mem["workers_mb"] or None, ".0f"),
        ]) + " |")
    return lines


def _precision_comparison(cmp: dict) -> list[str]:
    """The speed ratios against the baseline precision, held-out accuracy, feature error."""
    base = cmp["baseline"]
    lines = ["", f"**Precision against {base}** (ratio of medians; accuracy: the classifier trained on 3/4 of the "
             "images of each label, tested on the rest, on the raw engine's features)", "",
             "| precision | engine | speed ratio end to end | speed ratio steady |", "|---|---|---:|---:|"]
    for prec, c in cmp["vs_baseline"].items():
        for engine, e in c["engines"].items():
            lines.append(f"| {prec} | {engine} | {_fmt(e['speed_ratio_e2e'], '.3f')} | {_fmt(e['speed_ratio_steady'], '.3f')} |")
    lines.append("")
    acc = "; ".join(f"{p} {_fmt(a.get('accuracy'), '.4f')} ({a.get('test', '?')} held out)" if "accuracy" in a
                    else f"{p} {a.get('status')}" for p, a in cmp["accuracy"].items())
    lines.append(f"Held-out accuracy: {acc}")
    for prec, c in cmp["vs_baseline"].items():
        if "features" in c:
            lines.append(f"Features {prec} vs {base}: relative error {c['features']['relative_error']:.2e}, correlation "
                         f"{c['features']['correlation']:.6f}; accuracy difference {_fmt(c.get('accuracy_points'), '+.2f')} points")
    return lines


def _unpooled_pca_table(pca: dict) -> list[str]:
    """The PCA-only runs on unpooled features: a row per engine."""
    lines = ["", "PCA on unpooled features (`--pooling none`, from the raw run's feature maps):", "",
             "| engine | features | status | K | fit s | wall s | driver MB | JVM MB | workers MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in pca.items():
        mem = r["memory"]
        lines.append(f"| {name} | {_fmt(r.get('d'), ',')} | {r.get('status')} | {_fmt(r.get('k'), 'd')} | {_fmt(r.get('fit_s'))} "
                     f"| {_fmt(r.get('wall_s'))} | {_fmt(mem['driver_mb'], '.0f')} | {_fmt(mem['jvm_mb'] or None, '.0f')} "
                     f"| {_fmt(mem['workers_mb'] or None, '.0f')} |")
    return lines


def fill_doc(path: Path, section: str, md: str) -> None:
    """Replace the text between ``<!-- bench:SECTION start -->`` and ``... end -->`` in ``path``."""
    start, end = f"<!-- bench:{section} start -->", f"<!-- bench:{section} end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise ConfigError(f"{path} has no {start} ... {end} markers: add them where the table goes, or drop --fill-doc")
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{md}{end}{rest.split(end, 1)[1]}")
