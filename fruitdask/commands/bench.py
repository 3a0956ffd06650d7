"""``fruitdask bench``: its flags, their checks, and the files it writes.

The bench itself (children, statistics, Markdown) is :mod:`fruitdask.bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fruitdask.bench.engine import BENCH_IMAGES, ENGINES, copy_images, run_engines, run_unpooled_pca, write_configs
from fruitdask.bench.machine import machine, parse_precisions
from fruitdask.bench.markdown import fill_doc, markdown
from fruitdask.bench.quality import compare_precisions, parity
from fruitdask.bench.summary import summarize
from fruitdask.commands.options import add_run_options, config_from_args
from fruitdask.config import RunConfig
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
    g.add_argument("--runtimes", help="comma-separated inference runtimes to compare, e.g. tensorflow,openvino (default: "
                   "tensorflow); each precision runs on each runtime that has it, OpenVINO's labelled openvino-PRECISION")
    g.add_argument("--fill-doc", help="also write the Markdown between <!-- bench:SECTION --> markers of this file")
    g.add_argument("--doc-section", default=None, help="marker name for --fill-doc (default: the image size)")
    add_run_options(p)
    p.set_defaults(weights="random", partition_size=32)


@dataclass(frozen=True)
class BenchOptions:
    """The bench's own flags, typed and checked; the run options become a ``RunConfig``."""

    input: str
    images: int
    pick: str
    engines: tuple[str, ...]
    out: Path
    unpooled_pca: bool
    pca_timeout: float
    repeats: int
    precisions: str | None
    runtimes: str | None
    fill_doc: str | None
    doc_section: str | None

    def __post_init__(self) -> None:
        unknown = set(self.engines) - set(ENGINES)
        if unknown or not self.engines:
            raise ConfigError(f"--backends {','.join(self.engines)!r}: use a comma-separated subset of {','.join(ENGINES)}")
        if self.images < 2:
            raise ConfigError(f"--images {self.images}: the PCA needs at least 2 images")
        if self.repeats < 1:
            raise ConfigError(f"--repeats {self.repeats}: run each engine at least once (3 gives a median and a spread)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        return cls(
            input=args.input or str(BENCH_IMAGES), images=args.images, pick=args.pick,
            engines=tuple(e.strip() for e in args.backends.split(",") if e.strip()), out=Path(args.out).resolve(),
            unpooled_pca=bool(args.unpooled_pca), pca_timeout=args.pca_timeout, repeats=args.repeats,
            precisions=args.precisions, runtimes=args.runtimes, fill_doc=args.fill_doc, doc_section=args.doc_section,
        )


def command(args: argparse.Namespace) -> int:
    opts = BenchOptions.from_args(args)
    with tempfile.TemporaryDirectory(prefix="fruitdask-bench-") as tmp:
        work = Path(tmp)
        # The run options (image size, weights, precision, ...) as for `run`; the bench's own
        # copies of the images and its output folder replace --input and --output.
        cfg = config_from_args(args, input=str(work / "images"), output=str(work / "out"), overwrite=True, quiet=True)
        return bench(opts, cfg, work)


def bench(opts: BenchOptions, cfg: RunConfig, work: Path) -> int:
    """Copy the images into ``work``, time every engine and precision, write the results."""
    engines = list(opts.engines)
    precisions = parse_precisions(opts.precisions, cfg.precision, opts.runtimes)
    n_images = copy_images(opts.input, cfg, work, opts.images, opts.pick)
    write_configs(work, cfg, precisions, opts.unpooled_pca)
    runs = run_engines(work, engines, precisions, opts.repeats, n_images, cfg.image_size)
    pca = run_unpooled_pca(work, engines, precisions[0], opts.pca_timeout) if opts.unpooled_pca else {}
    same = {p: parity(work, engines, p) for p in precisions}
    comparison = compare_precisions(work, runs, precisions, cfg.seed) if len(precisions) > 1 else {}
    report = summarize(cfg, opts.input, opts.repeats, n_images, precisions, runs, pca, same, comparison, machine())
    _write_results(opts.out, report, opts.fill_doc, opts.doc_section or str(cfg.image_size))
    return 0


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
