"""``python tests/kill_at.py STAGE fruitdask-args...``: run the CLI and SIGKILL this process's
whole group (the client and its local cluster: a machine that dies) at one point of a run.

Stages, in the order a run reaches them: ``planned`` (after the diff), ``featurizing`` (once
the first partition is done), ``fitting`` (the PCA fit), ``projecting`` (writing the table's
files after a fit), ``committing`` (right before the table's commit), ``published`` (after the
commit, before the run's record is written). For ``fruitdask daily``, after the run:
``trained`` (a candidate trained, not registered), ``registered`` (registered, not gated),
``promoted`` (the champion alias moved, the decision and the day's record not written).
"""

from __future__ import annotations

import os
import signal
import sys


def die(*args, **kwargs):
    os.killpg(os.getpgid(0), signal.SIGKILL)


def main() -> int:
    stage, argv = sys.argv[1], sys.argv[2:]
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from fruitdask import cli, output, pca_moments
    from fruitdask.backends.dask import backend as dask_backend
    from fruitdask.lake import plan, update
    from fruitdask.lake import table as delta

    if stage == "planned":
        real_plan = plan.make_plan
        plan.make_plan = lambda *a, **k: (real_plan(*a, **k), die())[0]
    elif stage == "featurizing":
        def first_then_die(futures, counts, bar, marks=None):
            from distributed import as_completed

            next(iter(as_completed(futures))).result()
            die()

        dask_backend.track_images = first_then_die
    elif stage == "fitting":
        pca_moments.fit = die
    elif stage == "projecting":
        update._project = die
    elif stage == "committing":
        delta.commit = die
    elif stage == "published":
        output.publish = die
    elif stage in ("trained", "registered", "promoted"):
        _after_daily_step(stage)
    else:
        raise SystemExit(f"unknown stage {stage}")
    return cli.main(argv)


def _after_daily_step(stage: str) -> None:
    """Die right after the daily step ``stage`` has done its work."""
    from fruitdask.classifier import candidate
    from fruitdask.classifier.registry import Registry

    def then_die(real):
        def wrapped(*args, **kwargs):
            real(*args, **kwargs)
            die()
        return wrapped

    if stage == "trained":
        candidate.train_candidate = then_die(candidate.train_candidate)
    elif stage == "registered":
        Registry.register = then_die(Registry.register)
    else:
        Registry.move_champion = then_die(Registry.move_champion)


if __name__ == "__main__":
    sys.exit(main())
