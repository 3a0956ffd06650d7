"""The progress bar counts images: its arithmetic on a fake stream and clock, the Dask
tracking by partition image counts, Spark's polled counter, and the CLI's order of output."""

from __future__ import annotations

import io

import dask
import dask.dataframe as dd
import pandas as pd
import pytest
from conftest import SMALL_SIZE

from fruitdask.backends.dask.backend import track_images
from fruitdask.progress import ImageProgressBar, Poller, Progress, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(Progress):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def start(self, total: int) -> None:
        self.events.append(("start", total))

    def advance(self, images: int) -> None:
        self.events.append(("advance", images))

    def close(self) -> None:
        self.events.append(("close", 0))


def test_bar_counts_images_with_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    bar = ImageProgressBar(out, width=10, interval=5.0, clock=clock)
    bar.start(120)
    assert out.getvalue().splitlines()[-1] == "[..........]   0/120 images  -- images/s  ETA --:--"
    clock.now += 10
    bar.advance(30)
    assert out.getvalue().splitlines()[-1] == "[##........]  30/120 images  3.0 images/s  ETA 0:30"
    clock.now += 1
    bar.advance(6)  # within the interval: no new line on a non-terminal stream
    assert len(out.getvalue().splitlines()) == 2
    clock.now += 29
    bar.advance(84)  # the last images always print
    assert out.getvalue().splitlines()[-1] == "[##########] 120/120 images  3.0 images/s  in 0:40"
    bar.advance(50)  # never past the total (a retried task counted twice)
    assert bar.done == 120
    bar.close()
    bar.close()
    assert out.getvalue().count("120/120") == 1  # neither the extra advance nor close repeat it


def test_bar_redraws_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock, out = FakeClock(), Tty()
    bar = ImageProgressBar(out, width=4, clock=clock)
    bar.start(8)
    clock.now += 2
    bar.advance(4)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "4/8 images  2.0 images/s  ETA 0:02" in text


def test_quiet_bar_is_a_silent_no_op(capsys):
    bar = progress_bar(quiet=True)
    bar.start(10)
    bar.advance(5)
    bar.close()
    assert capsys.readouterr() == ("", "")
    assert isinstance(progress_bar(quiet=False), ImageProgressBar)


def test_poller_advances_by_the_counter_growth():
    values = iter([0, 4, 4, 9, 12])
    rec = Recorder()
    poller = Poller(rec, lambda: next(values), period=3600)
    for _ in range(4):
        poller.poll()
    assert rec.events == [("advance", 4), ("advance", 5)]
    with poller:  # the exit polls once more
        pass
    assert rec.events[-1] == ("advance", 3) and poller.seen == 12


def test_dask_tracking_advances_by_partition_image_counts(local_cluster):
    counts = [3, 5, 2, 7]
    parts = [pd.DataFrame({"x": range(n)}) for n in counts]
    _, client = local_cluster(1, 2, processes=False)
    futures = client.compute(dd.from_delayed([dask.delayed(p) for p in parts], meta=parts[0].iloc[:0]).to_delayed())
    rec = Recorder()
    track_images(futures, counts, rec)
    assert rec.events[0] == ("start", 17) and rec.events[-1] == ("close", 0)
    steps = sorted(n for kind, n in rec.events if kind == "advance")
    assert steps == sorted(counts)


def test_steady_rate_leaves_the_warm_up_out():
    from fruitdask.backends.dask.backend import steady_after_warm_up

    # 5 s before the first 10 images (model build), then 10 images a second.
    marks = [(5.0, 10), (6.0, 20), (7.0, 30), (8.0, 40), (10.0, 60), (14.0, 100)]
    assert steady_after_warm_up(marks) == 10.0  # from the mark past 10 % (10 of 100 images) to the end: 90 in 9 s
    assert steady_after_warm_up(marks, share=0.0) == 10.0 and steady_after_warm_up(marks, share=0.5) == 10.0
    assert steady_after_warm_up(marks[:3]) is None  # too few partitions to tell


def test_one_steady_rate_for_the_run_record_and_the_bench():
    """Both starting rules measure with :func:`fruitdask.progress.steady_rate`: images per
    second from the chosen mark to the last (issue 33: two definitions before)."""
    from fruitdask.bench.summary import first_wave_rate
    from fruitdask.progress import steady_rate

    marks = [(5.0, 10), (6.0, 20), (7.0, 30), (8.0, 40), (10.0, 60), (14.0, 100)]
    assert steady_rate(marks, 1) == 80 / 8 and steady_rate(marks, 5) is None and steady_rate(marks, -1) is None
    assert steady_rate([(1.0, 5), (1.0, 9)], 0) is None  # no time passed
    ends = [10, 10, 12, 12, 14, 14]  # 6 partitions of 10 images on 2 slots
    assert first_wave_rate(ends, 60, 2) == steady_rate([(t, 10 * (i + 1)) for i, t in enumerate(ends)], 1) == 10.0


@pytest.mark.integration
@pytest.mark.slow
def test_cli_prints_the_dashboard_first_then_an_image_bar(tiny_images, weights_file, tmp_path, capsys):
    from fruitdask.cli import main

    code = main(["run", "--input", str(tiny_images), "--output", str(tmp_path / "out"), "--image-size", str(SMALL_SIZE),
                 "--weights", str(weights_file), "--workers", "1", "--partition-size", "4"])
    assert code == 0
    err = capsys.readouterr().err
    dashboard = err.index("dashboard: http")
    bar = err.index("/12 images")
    assert dashboard < bar
    assert "12/12 images" in err and "images/s" in err


