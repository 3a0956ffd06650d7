"""The CLI: help for every command, one clear line and a non-zero exit for each error."""

from __future__ import annotations

import importlib
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


#: Options each command's --help must show: its own essentials, and the storage and output
#: flags every command shares.
HELP_MUST_SHOW = {
    "run": ("--input", "--output", "--backend", "--cluster", "exit codes:"),
    "train": ("--features", "--test-input", "--model-out", "--models", "--version"),
    "model": ("{list,show,promote,rollback}", "MODELS", "VERSION", "--json", "--force", "--margin"),
    "daily": ("--models", "--margin", "--max-unknown-rate", "--input", "--output", "exit codes:"),
    "predict": ("PHOTO", "--model", "--top", "--json"),
    "report": ("OUTPUT",),
    "table": ("{history,vacuum,compact,show}", "OUTPUT", "--limit", "--retain-hours", "--version"),
    "bench": ("--images", "--backends", "--repeats", "--input"),
    "serve": ("--model", "--port", "--probe-port", "--max-batch"),
}


def test_every_command_is_in_the_help_table():
    assert set(HELP_MUST_SHOW) == set(cli.COMMAND_MODULES) == set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_every_command_has_help(command, tmp_path):
    """``python -m fruitdask CMD --help`` as typed, from another folder: exit 0, the command's
    description, and its options."""
    proc = subprocess.run([sys.executable, "-m", "fruitdask", command, "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"usage: fruitdask {command} ") and not proc.stderr
    module_name, help_text = cli.COMMAND_MODULES[command]
    description = getattr(importlib.import_module(module_name), "PARSER_KWARGS", {}).get("description", help_text)
    assert " ".join(description.split()[:6]) in " ".join(out.split())
    for flag in (*HELP_MUST_SHOW[command], "--s3-endpoint", "--allowed-regions", "--quiet", "--debug", "--help"):
        assert flag in out, (command, flag)


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


def test_a_folder_fruitdask_did_not_write_is_refused_even_with_overwrite(tmp_path, capsys, tiny_images):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    for extra in ([], ["--overwrite"]):
        code = cli.main(["run", "--input", str(tiny_images), "--output", str(out), "--quiet", *extra])
        err = _err(capsys)
        assert code == 1 and "does not write (keep.txt)" in err and "choose another --output" in err
    assert (out / "keep.txt").read_text() == "old"


def test_an_output_from_before_the_table_is_replaced_only_with_overwrite(tmp_path, capsys, tiny_images, weights_file):
    out = tmp_path / "o"
    (out / "features").mkdir(parents=True)
    (out / "features" / "part-00000.parquet").write_bytes(b"old")
    (out / "_SUCCESS").write_bytes(b"")
    args = ["run", "--input", str(tiny_images), "--output", str(out), "--image-size", "32", "--weights", str(weights_file),
            "--workers", "1", "--quiet"]
    assert cli.main(args) == 1 and "--overwrite" in _err(capsys)
    assert (out / "features" / "part-00000.parquet").read_bytes() == b"old"
    assert cli.main([*args, "--overwrite"]) == 0
    assert not (out / "features" / "part-00000.parquet").exists() and (out / "features" / "_delta_log").is_dir()


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fruitdask", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("fruitdask ")


def test_python_dash_m_keeps_the_exit_code(tmp_path):
    """The entry point leaves without the final garbage collections (gc.freeze) but with
    the command's exit code and its one-line error."""
    proc = subprocess.run([sys.executable, "-m", "fruitdask", "run", "--input", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith("fruitdask: error: ")


def _fresh_python(code: str, **env: str) -> str:
    import os
    import textwrap

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_a_command_line_imports_only_its_own_command():
    """``fruitdask run ...`` builds the run parser alone: the other commands' modules (the
    bench's numpy, the service's settings) are not imported before the run starts."""
    out = _fresh_python("""
        import sys
        from fruitdask import cli
        args = cli.build_parser("run").parse_args(["run", "--workers", "1"])
        print(sorted(m for m in sys.modules if m.startswith("fruitdask.commands.")), args.n_workers)
    """)
    assert out == "['fruitdask.commands.options', 'fruitdask.commands.run'] 1"


def test_quiet_logging_quiets_distributed_without_importing_it():
    out = _fresh_python("""
        import logging, sys
        from fruitdask.logs import setup_logging
        setup_logging(quiet=True, debug=False)
        before = "distributed" in sys.modules
        import distributed
        print(before, logging.getLogger("distributed").level, logging.getLogger("distributed.client").level,
              logging.getLogger("distributed.scheduler").getEffectiveLevel())
    """)
    assert out == "False 40 40 40"


def test_quiet_logging_leaves_a_logging_file_of_the_user_alone(tmp_path):
    """A user's ``distributed.logging-file-config`` excludes a ``logging`` section (distributed
    raises at import if both are set): the quiet set-up must not add one."""
    ini = tmp_path / "logging.ini"
    ini.write_text("[loggers]\nkeys=root\n[handlers]\nkeys=h\n[formatters]\nkeys=f\n[logger_root]\nlevel=INFO\n"
                   "handlers=h\n[handler_h]\nclass=StreamHandler\nlevel=INFO\nformatter=f\nargs=(sys.stderr,)\n"
                   "[formatter_f]\nformat=%(message)s\n")
    out = _fresh_python("""
        from fruitdask.logs import setup_logging
        setup_logging(quiet=True, debug=False)
        import distributed
        print("imported")
    """, DASK_DISTRIBUTED__LOGGING_FILE_CONFIG=str(ini))
    assert out == "imported"


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
