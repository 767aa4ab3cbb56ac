"""End-to-end training: loss falls, checkpoints, resume, kill-and-resume, bad checkpoints, NaN stop."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, run_python, subprocess_env
from fixtures.damage import truncate, truncate_array_file

from laud_jax import checkpointing, config_utils, train
from laud_jax.data import cluttered_mnist
from laud_jax.training import metrics_log

TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")
STEPS = 24


def tiny_config(**overrides):
    config = config_utils.load_config_file(TINY)  # 24 steps, batch 32, checkpoints every 3
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def read_metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def checkpoint_steps(workdir):
    root = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def file_contents(directory):
    """{relative path: bytes} of every file under `directory`."""
    contents = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                contents[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return contents


def tensorboard_values(workdir):
    """{(tag, step): how many values} over every event file of the run."""
    from tensorboardX.proto.event_pb2 import Event

    directory = os.path.join(workdir, "tensorboard")
    counts = collections.Counter()
    for name in os.listdir(directory):
        for record in metrics_log.read_event_records(os.path.join(directory, name)):
            event = Event.FromString(record)
            counts.update((value.tag, event.step) for value in event.summary.value)
    return counts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of STEPS steps: (workdir, summary, final variables)."""
    workdir = str(tmp_path_factory.mktemp("tiny") / "run")
    summary = train.train_and_evaluate(tiny_config(), workdir)
    variables, _ = checkpointing.load_variables(workdir)
    return workdir, summary, variables


def copy_run(trained, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained[0], workdir)
    return workdir


def test_loss_falls_and_outputs_are_written(trained):
    workdir, summary, _ = trained
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(4, STEPS + 1, 4))
    first = np.mean([r["ce"] for r in records[:2]])
    last = np.mean([r["ce"] for r in records[-2:]])
    assert last < first - 0.05, (first, last)
    assert checkpoint_steps(workdir) == list(range(3, STEPS + 1, 3))
    with open(os.path.join(workdir, "summary.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(summary))
    assert saved["steps"] == STEPS and 0.0 <= saved["top1"] <= 1.0
    assert 0.05 < saved["mac_ratio"] <= 1.05
    assert sorted(saved["density"]) == ["stage0", "stage1", "stage2", "stage3"]
    assert saved["eval_examples"] == len(cluttered_mnist.split_digits("test")[1])
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_from_saved_step_gives_identical_state(trained, tmp_path, capsys):
    workdir = copy_run(trained, tmp_path)
    for step in range(15, STEPS + 1, 3):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    os.remove(os.path.join(workdir, "summary.json"))
    train.train_and_evaluate(tiny_config(), workdir)
    assert "resumed from " + os.path.join(workdir, "checkpoints", "12") in capsys.readouterr().out
    # Steps 16, 20, 24 were logged before and again after the resume: each is kept once.
    assert [r["step"] for r in read_metrics(workdir)] == list(range(4, STEPS + 1, 4))
    assert set(tensorboard_values(workdir).values()) == {1}
    variables, _ = checkpointing.load_variables(workdir)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(trained[2]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_finished_run_is_not_retrained(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    summary = train.train_and_evaluate(tiny_config(), workdir)
    assert summary["top1"] == trained[1]["top1"]
    assert len(read_metrics(workdir)) == STEPS // 4


@pytest.mark.parametrize("damage", ["metadata", "array", "uncommitted"])
def test_unreadable_newest_checkpoint_is_moved_aside_and_training_falls_back(trained, tmp_path, capsys, damage):
    workdir = copy_run(trained, tmp_path)
    os.remove(os.path.join(workdir, "summary.json"))
    newest = os.path.join(workdir, "checkpoints", str(STEPS))
    if damage == "array":
        victim = truncate_array_file(workdir, STEPS)
    elif damage == "metadata":
        victim = os.path.join(newest, "state", "_METADATA")
        truncate(victim)
    else:
        victim = os.path.join(newest, checkpointing.COMMIT_MARKER)
        os.remove(victim)
    before = file_contents(newest)
    summary = train.train_and_evaluate(tiny_config(), workdir)
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, (out, err)
    aside = os.path.join(workdir, checkpointing.UNREADABLE_DIR, str(STEPS))
    named = newest if damage == "uncommitted" else victim
    assert f"({named})" in warnings[0] and aside in warnings[0]
    assert file_contents(aside) == before  # moved, not deleted or changed
    assert checkpoint_steps(workdir) == list(range(3, STEPS + 1, 3))  # step 24 written again
    assert summary["steps"] == STEPS
    assert_same_parameters(workdir, trained[2])  # resumed from step 21: the same run


def test_leftover_temporary_directories_of_this_run_are_removed(trained, tmp_path, capsys):
    workdir = copy_run(trained, tmp_path)
    leftover = os.path.join(workdir, "checkpoints", f"{STEPS + 3}.orbax-checkpoint-tmp-1712")
    elsewhere = str(tmp_path / "other_run" / "checkpoints" / "6.orbax-checkpoint-tmp-1712")
    for directory in (leftover, elsewhere):
        os.makedirs(os.path.join(directory, "state"))
        with open(os.path.join(directory, "state", "_METADATA"), "w") as f:
            f.write("{")
    train.train_and_evaluate(tiny_config(), workdir)
    assert not os.path.exists(leftover) and os.path.isdir(elsewhere)
    assert f"removed {leftover}" in capsys.readouterr().out
    assert checkpoint_steps(workdir) == list(range(3, STEPS + 1, 3))


def test_incompatible_checkpoint_names_file_and_mismatch(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    with pytest.raises(checkpointing.CheckpointError, match="different model config.*config.json"):
        train.train_and_evaluate(tiny_config(**{"model.stage_widths": (4, 8, 8, 8)}), workdir)
    # The state itself checked against a different model: names the leaf and both shapes.
    checkpointer = checkpointing.Checkpointer(workdir)
    saved_vars = trained[2]
    target = {"step": np.zeros((), np.int32), "params": jax.tree.map(np.asarray, saved_vars["params"])}
    target["params"]["fc"]["kernel"] = np.zeros((5, 10), np.float32)
    with pytest.raises(checkpointing.CheckpointError) as info:
        checkpointer.restore(STEPS, target)
    message = str(info.value)
    assert os.path.join("checkpoints", str(STEPS)) in message
    assert "params/fc/kernel" in message and "(5, 10)" in message
    checkpointer.close()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    render = cluttered_mnist.render_batch
    bad_from = 5 * 32  # first example of step 6

    def poisoned(digit_ids, positions, *args, **kwargs):
        out = render(digit_ids, positions, *args, **kwargs)
        if positions.max() >= bad_from:
            out["image"][0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(cluttered_mnist, "render_batch", poisoned)
    workdir = str(tmp_path / "nan")
    config = tiny_config(**{"checkpoint.every_steps": 2})
    with pytest.raises(train.NonFiniteLossError, match=r"at step 6.*checkpoints/4"):
        train.train_and_evaluate(config, workdir)
    assert checkpoint_steps(workdir) == [2, 4]


# Runs in other processes, compared with the in-process run above (same config and seed).
TRAIN_CLI = ["-m", "laud_jax.train", "--exp", "configs/tiny.py"]


def assert_same_parameters(workdir, reference):
    variables, _ = checkpointing.load_variables(workdir)
    got = jax.tree_util.tree_flatten_with_path(variables)[0]
    want = jax.tree_util.tree_flatten_with_path(reference)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_killed_run_resumes_to_identical_parameters_and_logs_each_step_once(trained, tmp_path):
    """Killed (SIGKILL) after it logged steps past its last checkpoint: the resumed run logs
    those steps again, and the log and TensorBoard files end with one value per step."""
    workdir = str(tmp_path / "victim")
    args = TRAIN_CLI + ["--workdir", workdir, "--exp.checkpoint.every_steps=12"]
    victim = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while victim.poll() is None and time.time() < deadline:
        steps = checkpoint_steps(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
        try:
            logged = [r["step"] for r in read_metrics(workdir)] if steps else []
        except ValueError:  # a line being written
            logged = []
        if steps and max(logged, default=0) > max(steps):
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoint_steps(workdir) == [12]
    assert max(r["step"] for r in read_metrics(workdir)) > 12  # logged past the checkpoint
    resumed = run_python(args, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_parameters(workdir, trained[2])
    assert [r["step"] for r in read_metrics(workdir)] == list(range(4, STEPS + 1, 4))
    assert [r["step"] for r in read_metrics(workdir, "eval")] == [STEPS]
    values = tensorboard_values(workdir)
    assert {step for _, step in values} == set(range(4, STEPS + 1, 4))
    assert set(values.values()) == {1}, [k for k, n in values.items() if n > 1]
