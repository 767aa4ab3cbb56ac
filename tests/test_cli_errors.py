"""Errors the command-line tools report as one line (what, the file, the fix) with a non-zero
exit instead of a traceback: damaged checkpoints read by every loader, bad training flags and
work directories, the GPU build report without triton."""

from __future__ import annotations

import errno
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, run_python
from fixtures.damage import truncate, truncate_array_file
from fixtures.tiny_checkpoint import make_tiny_checkpoint

import laud_jax
from laud_jax import benchmark, checkpointing, evaluate, train

TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")
DAMAGES = ["array", "metadata", "config"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A converted checkpoint and a work directory in laud_jax.train's layout (config.json
    without 'converted_from'; checkpoint step 3 with the state and the data iterator's items)."""
    root = tmp_path_factory.mktemp("pristine")
    converted, trained = str(root / "converted"), str(root / "trained")
    _, variables = make_tiny_checkpoint(converted)
    checkpointer = checkpointing.Checkpointer(trained)
    checkpointer.save(3, {"step": np.int32(3), **variables}, {"next_index": 96})
    checkpointer.close()
    config = checkpointing.read_config(converted)
    del config["converted_from"]
    checkpointing.write_json(os.path.join(trained, checkpointing.CONFIG_FILE), config)
    return {"converted": converted, "trained": trained}


def damaged_copy(pristine, kind, damage, tmp_path):
    """A copy of the `kind` checkpoint with one file cut in half; (directory, that file)."""
    directory = str(tmp_path / kind)
    shutil.copytree(pristine[kind], directory)
    step = max(int(d) for d in os.listdir(os.path.join(directory, "checkpoints")) if d.isdigit())
    state = os.path.join(directory, "checkpoints", str(step), "state")
    if damage == "array":
        return directory, truncate_array_file(directory, step)
    if damage == "config":
        victim = os.path.join(directory, "config.json")
    elif damage == "metadata":
        victim = os.path.join(state, "_METADATA")
    else:  # "index": the database's own node file (keys, array metadata)
        [victim] = [os.path.join(state, "d", name) for name in os.listdir(os.path.join(state, "d"))]
    truncate(victim)
    return directory, victim


def assert_one_line(message, victim):
    lines = message.strip().splitlines()
    assert len(lines) == 1, message
    assert lines[0].startswith("error: ") and f"({victim})" in lines[0], lines[0]
    assert "Traceback" not in message


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", ["converted", "trained"])
def test_evaluate_reports_a_damaged_checkpoint_in_one_line(pristine, tmp_path, capsys, kind, damage):
    directory, victim = damaged_copy(pristine, kind, damage, tmp_path)
    assert evaluate.main([f"--checkpoint={directory}", "--no-latency", "--hardware=", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert_one_line(err, victim)
    fix = "python -m laud_jax.convert" if kind == "converted" or damage == "config" else "aside"
    assert fix in err


@pytest.mark.parametrize("damage", DAMAGES)
def test_load_pretrained_raises_checkpoint_error_naming_the_file(pristine, tmp_path, damage):
    directory, victim = damaged_copy(pristine, "converted", damage, tmp_path)
    with pytest.raises(laud_jax.CheckpointError) as info:
        laud_jax.load_pretrained(directory)
    assert_one_line(f"error: {info.value}", victim)
    assert "python -m laud_jax.convert" in str(info.value)


@pytest.mark.parametrize("damage", DAMAGES)
def test_benchmark_reports_a_damaged_checkpoint_in_one_line(pristine, tmp_path, damage):
    directory, victim = damaged_copy(pristine, "trained", damage, tmp_path)
    with pytest.raises(SystemExit) as info:
        benchmark.main(["--checkpoint", directory, "--no-progress"])
    assert_one_line(str(info.value.code), victim)


@pytest.mark.parametrize("damage", DAMAGES)
def test_train_reports_a_damaged_checkpoint_to_start_from_in_one_line(pristine, tmp_path, capsys, damage):
    directory, victim = damaged_copy(pristine, "converted", damage, tmp_path)
    assert train.main([f"--exp={TINY}", f"--exp.init_from={directory}", f"--workdir={tmp_path / 'run'}"]) == 1
    assert_one_line(capsys.readouterr().err, victim)


def test_train_reports_its_own_damaged_config_in_one_line(pristine, tmp_path, capsys):
    directory, victim = damaged_copy(pristine, "trained", "config", tmp_path)
    assert train.main([f"--exp={TINY}", "--exp.num_steps=3", f"--workdir={directory}"]) == 1
    err = capsys.readouterr().err
    assert_one_line(err, victim)
    assert "move it aside and rerun" in err


@pytest.mark.parametrize("damage", ["array", "index"])
@pytest.mark.parametrize(
    "tool",
    [
        ["-m", "laud_jax.evaluate", "--no-latency", "--hardware=", "--checkpoint"],
        ["-m", "laud_jax.benchmark", "--checkpoint"],
    ],
)
def test_command_line_tools_exit_non_zero_with_one_line(pristine, tmp_path, tool, damage):
    """As users run them: orbax's reads still pending after the failure print nothing more
    (they report 'Event loop is closed', often dozens of lines with a damaged index)."""
    directory, victim = damaged_copy(pristine, "trained", damage, tmp_path)
    result = run_python(tool + [directory], timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert_one_line(result.stderr, victim)


PENDING_READ_REPORTS = r"""
import asyncio, logging, os, sys
from laud_jax import checkpointing
checkpointing.Checkpointer(sys.argv[1], read_only=True).close()   # installs the filters
# An orbax read coroutine dropped while its read fails (what a failed restore leaves behind):
source = ("async def read():\n    try:\n        await asyncio.sleep(0)\n"
          "    finally:\n        raise ValueError('OCDBT read failed')\n")
namespace = {"asyncio": asyncio}
exec(compile(source, os.path.join("site-packages", "orbax", "serialization.py"), "exec"), namespace)
pending = namespace["read"]()
pending.send(None)
del pending                                          # -> sys.unraisablehook
class Callback:
    def __del__(self):
        raise RuntimeError("Event loop is closed")   # -> sys.unraisablehook
Callback()
class Other:
    def __del__(self):
        raise RuntimeError("not a read")             # reported as usual
Other()
error = ValueError('Error reading "params.w/0" in OCDBT database at local file "x"')
logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task>",
                                   exc_info=(ValueError, error, None))
logging.getLogger("asyncio").error("Future exception was never retrieved",
                                   exc_info=(KeyError, KeyError("not a read"), None))
"""


def test_reports_of_reads_left_pending_by_a_failed_restore_are_dropped(pristine):
    """They come through sys.unraisablehook and the asyncio logger, at random times after the
    error line (often dozens of traceback lines): dropped, and only they."""
    result = run_python(["-c", PENDING_READ_REPORTS, pristine["trained"]], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not a read" in result.stderr and result.stderr.count("not a read") == 2
    assert "OCDBT" not in result.stderr and "Event loop is closed" not in result.stderr


def test_missing_experiment_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.py")
    assert train.main([f"--exp={missing}", f"--workdir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert_one_line(err, missing)
    assert "config file not found" in err and "configs/quickstart.py" in err


def test_workdir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("not a directory")
    assert train.main([f"--exp={TINY}", f"--workdir={path}"]) == 2
    err = capsys.readouterr().err
    assert_one_line(err, path)
    assert "is a file, not a directory" in err


def test_read_only_workdir(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "readonly"
    workdir.mkdir()
    workdir.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: deny writes there as a read-only mount does
        real_open = os.open

        def read_only_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(workdir)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
    try:
        assert train.main([f"--exp={TINY}", f"--workdir={workdir}"]) == 2
    finally:
        workdir.chmod(0o755)
    err = capsys.readouterr().err
    assert_one_line(err, workdir)
    assert "cannot write to the work directory: Permission denied" in err and "--workdir" in err


def test_misspelt_config_key(tmp_path, capsys):
    assert train.main([f"--exp={TINY}", "--exp.optimzer.learning_rate=0.1", f"--workdir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert_one_line(err, TINY)
    assert "\\n" not in err and "\\'" not in err
    assert "unknown config key 'optimzer' in --exp.optimzer.learning_rate" in err and 'did you mean "optimizer"' in err


def test_gpu_build_report_without_triton_names_the_extra(monkeypatch, capsys):
    from laud_jax.gpu_check import report

    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is missing
    assert report.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: the triton package is not installed") and "pip install -e '.[dev]'" in err
    dev_extra = open(os.path.join(REPO_ROOT, "pyproject.toml")).read().split("\ndev = ")[1].splitlines()[0]
    assert '"triton==' in dev_extra


@pytest.mark.parametrize("tool", ["train", "evaluate", "visualize"])
def test_help_and_unknown_flags_as_users_run_them(tool):
    """--help prints the module's usage and its flags (exit 0); an unknown flag, such as the
    absl spellings --nolatency/--noprogress, is a one-line error (exit 2)."""
    result = run_python(["-m", f"laud_jax.{tool}", "--help"], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: python -m laud_jax.{tool}")
    assert "--exp CONFIG.py" in result.stdout and "--exp.FIELD=VALUE" in result.stdout
    result = run_python(["-m", f"laud_jax.{tool}", "--noprogress"], timeout=240)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: unrecognized arguments: --noprogress; python -m laud_jax.{tool} --help lists the flags"
    )
