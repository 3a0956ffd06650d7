"""``fruitdask bench``: its flags, their checks, and the files it writes.

The bench itself (children, statistics, Markdown) is :mod:`fruitdask.bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from fruitdask.bench.engine import BENCH_IMAGES, ENGINES, copy_images, run_engines, run_unpooled_pca, write_configs
from fruitdask.bench.machine import machine, parse_precisions
from fruitdask.bench.markdown import fill_doc, markdown
from fruitdask.bench.quality import compare_precisions, parity
from fruitdask.bench.summary import summarize
from fruitdask.commands.options import add_run_options, config_from_args
from fruitdask.errors import ConfigError

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench")
    g.add_argument("--images", type=int, default=200, help="how many images of --input to use (default: 200)")
    g.add_argument("--pick", choices=("even", "first"), default="even",
                   help="even: evenly spaced over the sorted listing (every label); first: the first N (default: even)")
    g.add_argument("--backends", default="raw,dask,spark", help="engines to run, comma-separated (default: raw,dask,spark)")
    g.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md (default: ./bench-results)")
    g.add_argument("--no-unpooled-pca", dest="unpooled_pca", action="store_false",
                   help="skip the PCA timing on unpooled (--pooling none) features")
    g.add_argument("--pca-timeout", type=float, default=600.0, help="seconds before a PCA-only run is stopped (default: 600)")
    g.add_argument("--repeats", type=int, default=3, help="runs of each engine, interleaved; median and min/max reported (default: 3)")
    g.add_argument("--precisions", help="comma-separated precisions to compare in one invocation, e.g. float32,bfloat16 "
                   "(default: --precision); bench.json gets the speed ratio and held-out accuracy of each")
    g.add_argument("--fill-doc", help="also write the Markdown between <!-- bench:SECTION --> markers of this file")
    g.add_argument("--doc-section", default=None, help="marker name for --fill-doc (default: the image size)")
    add_run_options(p)
    p.set_defaults(weights="random", partition_size=32)


def command(args: argparse.Namespace) -> int:
    if args.input is None:
        args.input = str(BENCH_IMAGES)
    engines = _check_args(args)
    out_dir = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="fruitdask-bench-") as tmp:
        work = Path(tmp)
        cfg = config_from_args(args, input=str(work / "images"), output=str(work / "out"), overwrite=True, quiet=True)
        precisions = parse_precisions(args.precisions, cfg.precision)
        n_images = copy_images(args.input, cfg, work, args.images, args.pick)
        write_configs(work, cfg, precisions, args.unpooled_pca)
        runs = run_engines(work, engines, precisions, args.repeats, n_images, cfg.image_size)
        pca = run_unpooled_pca(work, engines, precisions[0], args.pca_timeout) if args.unpooled_pca else {}
        same = {p: parity(work, engines, p) for p in precisions}
        comparison = compare_precisions(work, runs, precisions, cfg.seed) if len(precisions) > 1 else {}
    report = summarize(cfg, args, n_images, precisions, runs, pca, same, comparison, machine())
    _write_results(out_dir, report, args.fill_doc, args.doc_section or str(cfg.image_size))
    return 0


def _check_args(args: argparse.Namespace) -> list[str]:
    """The engines of ``--backends``, once the bench flags are known to make sense."""
    engines = [e.strip() for e in args.backends.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        raise ConfigError(f"--backends {args.backends!r}: use a comma-separated subset of {','.join(ENGINES)}")
    if args.images < 2:
        raise ConfigError(f"--images {args.images}: the PCA needs at least 2 images")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: run each engine at least once (3 gives a median and a spread)")
    return engines


def _write_results(out_dir: Path, report: dict, fill_doc_path: str | None, section: str) -> None:
    """bench.json and bench.md in ``out_dir``, the tables into ``--fill-doc``, and on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    md = markdown(report)
    (out_dir / "bench.md").write_text(md)
    if fill_doc_path:
        fill_doc(Path(fill_doc_path), section, md)
    print(md)
    logger.info("wrote %s and %s", out_dir / "bench.json", out_dir / "bench.md")
