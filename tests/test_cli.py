"""The CLI: help for every command, one clear line and a non-zero exit for each error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fruitdask import cli


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in _subcommands():
        assert name in out


@pytest.mark.parametrize("command", _subcommands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_run_help_explains_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--input", "--output", "--weights", "--image-size", "--batch-size", "--pooling", "--components",
                 "--variance", "--cluster", "--backend", "--quiet", "--debug", "--overwrite"):
        assert flag in out
    assert "default: 224" in out and "default: 32" in out and "default: avg" in out and "default: 0.95" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().out


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_missing_input(tmp_path, capsys):
    code = cli.main(["run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    line = _err(capsys)
    assert line.startswith("fruitdask: error: input") and "does not exist" in line and "--input" in line


def test_no_images_found(tmp_path, capsys):
    (tmp_path / "in" / "Apple").mkdir(parents=True)
    (tmp_path / "in" / "Apple" / "notes.txt").write_text("not an image")
    code = cli.main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    assert "no images found" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_unreadable_weights_file(tmp_path, capsys, tiny_images):
    bad = tmp_path / "broken.weights.h5"
    bad.write_bytes(b"this is not hdf5")
    code = cli.main(["run", "--input", str(tiny_images), "--output", str(tmp_path / "o"), "--weights", str(bad), "--quiet"])
    assert code == 1
    assert "could not be loaded into VGG16" in _err(capsys)
    code = cli.main(["run", "--input", str(tiny_images), "--output", str(tmp_path / "o"), "--weights", "model.bin", "--quiet"])
    assert code == 1 and "is not a weights file" in _err(capsys)


def test_bad_flag_value_exits_2(tmp_path, capsys):
    code = cli.main(["run", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--image-size", "8", "--quiet"])
    assert code == 2
    assert "--image-size 8 is too small for VGG16" in _err(capsys)


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys, tiny_images):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code = cli.main(["run", "--input", str(tiny_images), "--output", str(out), "--quiet"])
    assert code == 1 and "--overwrite" in _err(capsys)
    assert (out / "keep.txt").read_text() == "old"


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fruitdask", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("fruitdask ")


def _cancelled():
    from distributed.client import CancelledFuturesGroup, FutureCancelledError, FuturesCancelledError

    return FuturesCancelledError([CancelledFuturesGroup([FutureCancelledError("k", "already forgotten")], "already forgotten")])


@pytest.mark.parametrize("error", [_cancelled(), RuntimeError("boom\nsecond line")], ids=["futures-cancelled", "runtime"])
def test_any_error_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch, error):
    """Not only fruitdask's own errors: anything reaching the CLI (a Dask FuturesCancelledError
    from a lost worker, a bug) is one line on stderr and exit 1; the traceback needs --debug."""
    from fruitdask import pipeline

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "run", fail)
    argv = ["run", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fruitdask: error: {type(error).__name__}: ")
    assert "Traceback" not in err and "--debug" in err
    assert cli.main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("fruitdask: error: ")
