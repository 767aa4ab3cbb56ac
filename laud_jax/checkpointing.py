"""Checkpoints of a training run (orbax): model, optimizer, step, rng and data-iterator state.

Layout of a work directory: ``config.json`` (the run's config) and ``checkpoints/<step>/``
with the items ``state`` (a pytree) and ``data`` (the input iterator's state, JSON).
Every problem with a checkpoint (damaged files, a save that never committed, a model that
does not match) raises :class:`CheckpointError`, whose message is one line naming the file
and what to do; the command-line tools print it and exit non-zero. Checkpoints are never
overwritten or deleted here: training moves a damaged one to ``checkpoints_unreadable/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
CONFIG_FILE = "config.json"
# orbax writes it into a step directory last, just before renaming the directory into place.
COMMIT_MARKER = "commit_success.txt"
_JSON_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "metadata")


class CheckpointError(ValueError):
    """A checkpoint (or its config.json) cannot be used.

    ``str(error)`` is one line, ``<what> (<path>): <fix>``.
    """

    def __init__(self, what: str, path: str, fix: str):
        super().__init__(f"{what} ({path}): {fix}")
        self.what, self.path, self.fix = what, path, fix


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint step's files are damaged (truncated, corrupt) or its save never committed."""


def path_name(path: tuple[Any, ...]) -> str:
    """'params/block/conv1/kernel' for a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves}


def describe_mismatch(saved: Any, expected: Any, limit: int = 8) -> str:
    """Differences between two pytrees of arrays/metadata on one line ('' if none)."""
    a, b = _leaf_shapes(saved), _leaf_shapes(expected)
    parts = []
    missing = sorted(set(b) - set(a))
    extra = sorted(set(a) - set(b))
    if missing:
        parts.append(
            f"missing from the checkpoint: {', '.join(missing[:limit])}"
            + (f" (+{len(missing) - limit} more)" if len(missing) > limit else "")
        )
    if extra:
        parts.append(
            f"in the checkpoint but not in the model: {', '.join(extra[:limit])}"
            + (f" (+{len(extra) - limit} more)" if len(extra) > limit else "")
        )
    for name in sorted(set(a) & set(b)):
        if a[name][0] != b[name][0]:
            parts.append(f"{name}: checkpoint shape {a[name][0]}, model shape {b[name][0]}")
    return "; ".join(parts[: limit + 2])


def read_config(directory: str, fix: str | None = None) -> dict[str, Any]:
    """The parsed config.json of a work directory or a converted checkpoint.

    `fix` replaces the default advice when the file is damaged.
    """
    path = os.path.join(os.path.abspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory} is not a checkpoint directory: it has no {CONFIG_FILE}",
            path,
            "pass a laud_jax.train work directory or a directory written by python -m laud_jax.convert",
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"{CONFIG_FILE} is truncated or not valid JSON ({e})",
            path,
            fix
            or "restore it from a copy, or write the directory again (python -m laud_jax.convert "
            "SOURCE DIR --force for a converted checkpoint, python -m laud_jax.train for a run)",
        ) from e


def write_json(path: str, record: Any) -> None:
    """Writes `record` as JSON to `path` atomically: a killed write leaves the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=list)
    os.replace(tmp, path)


def _error_chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _file_of_size(directory: str, size: re.Match | None) -> str | None:
    """The one file under `directory` of the size a read error reports (a truncated data file)."""
    if size is None:
        return None
    found = [
        os.path.join(root, name)
        for root, _, files in os.walk(directory)
        for name in files
        if os.path.getsize(os.path.join(root, name)) == int(size.group(1))
    ]
    return found[0] if len(found) == 1 else None


def _damage(step_dir: str, error: BaseException) -> tuple[str, str]:
    """(the damaged file, as precisely as known; what is wrong with it) for a failed read."""
    chain = _error_chain(error)
    if any(isinstance(e, json.JSONDecodeError) for e in chain):
        for root, dirs, files in os.walk(step_dir):
            dirs[:] = sorted(d for d in dirs if d != "d" and not d.startswith("ocdbt."))  # array data
            for name in sorted(files):
                if name in _JSON_FILES or name.endswith(".json"):
                    try:
                        with open(os.path.join(root, name), encoding="utf-8") as f:
                            json.load(f)
                    except ValueError:
                        return os.path.join(root, name), "truncated or not valid JSON"
    # TensorStore names the file it failed on ('... local file "PATH": reason [tensorstore_spec=...').
    for message in reversed([str(e) for e in chain]):
        files = list(re.finditer(r'local file "([^"]+)"', message))
        if files:
            path = files[-1].group(1)
            reason = message[files[-1].end() :].lstrip(": ").split(" [tensorstore_spec")[0].strip()
            array = re.search(r'Error reading "([^"/]+)[^"]*" in OCDBT', message)
            if array and path.endswith("/"):  # the database, not one of its files: name the array
                reason = f"array {array.group(1)}: {reason}"
                path = _file_of_size(path, re.search(r"value of size (\d+)", reason)) or path
            return path.rstrip("/"), reason.splitlines()[0][:300]
    first_line = (str(error).splitlines() or [""])[0][:300]
    return step_dir, f"{type(error).__name__}: {first_line}"


class _PendingReadFilter(logging.Filter):
    """Drops asyncio's '... exception was never retrieved' for TensorStore read errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]:
            return True
        chain = _error_chain(record.exc_info[1]) if record.exc_info else []
        return not any("tensorstore" in str(e).lower() or "OCDBT" in str(e) for e in chain)


def _ignore_pending_read_reports() -> None:
    """Silences what orbax's reads still pending when a restore failed report as they end.

    They report on stderr (often dozens of traceback lines around the one-line error):
    RuntimeError('Event loop is closed') from their callbacks and the read errors of orbax
    coroutines no longer awaited, through sys.unraisablehook; the read errors of tasks and
    futures nobody awaits, through the 'asyncio' logger. Anything else is still reported. Installed once per
    process.
    """
    previous = sys.unraisablehook
    if getattr(previous, "laud_jax_filter", False):
        return

    def hook(unraisable):
        error, source = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        code = getattr(source, "cr_code", None)  # a coroutine's
        orbax_read = f"{os.sep}orbax{os.sep}" in getattr(code, "co_filename", "")
        if not (closed_loop or orbax_read):
            previous(unraisable)

    hook.laud_jax_filter = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_PendingReadFilter())


def _check_committed(step_dir: str, step: int, fix: str) -> None:
    if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
        raise UnreadableCheckpointError(
            f"checkpoint step {step} was never committed ({COMMIT_MARKER} is missing)", step_dir, fix
        )


def _unreadable(step_dir: str, step: int, error: BaseException, fix: str) -> UnreadableCheckpointError:
    path, reason = _damage(step_dir, error)
    return UnreadableCheckpointError(f"checkpoint step {step} is damaged: {reason}", path, fix)


class Checkpointer:
    """Saves and restores a run's checkpoints under WORKDIR/checkpoints.

    `read_only` opens an existing directory to read it: nothing is created there.
    """

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        _ignore_pending_read_reports()  # before any read: they can come while one fails
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self.manager = ocp.CheckpointManager(
            self.directory,
            # (not orbax's read_only option, which logs warnings on every use)
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep, create=not read_only, enable_async_checkpointing=False
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        )

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def remove_temporary(self) -> list[str]:
        """Deletes what interrupted saves left in this run's checkpoint directory; returns them.

        Only orbax's temporary step directories (``<step>.orbax-checkpoint-tmp*``) directly under
        WORKDIR/checkpoints; call it from one process, before any save.
        """
        names = sorted(ocp.path.step.tmp_checkpoints(self.directory))
        for name in names:
            shutil.rmtree(os.path.join(self.directory, name))
        return [os.path.join(self.directory, name) for name in names]

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Writes checkpoint `step` (atomically: a killed save leaves no partial step)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """(state, data_state) of checkpoint `step`, laid out like `target` (arrays or structs)."""
        where = self.step_dir(step)
        fix = (
            f"move {where} aside to resume from the previous checkpoint "
            "(python -m laud_jax.train does that by itself), or use a new --workdir"
        )
        _check_committed(where, step, fix)
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception as e:  # orbax raises many types for unreadable files
            raise _unreadable(where, step, e, fix) from e
        if metadata is not None:
            mismatch = describe_mismatch(metadata, target)
            if mismatch:
                raise CheckpointError(
                    f"checkpoint step {step} does not match the model/optimizer of this run: {mismatch}",
                    where,
                    "it was left as it is; use a new --workdir, or the config that "
                    f"wrote it ({os.path.join(self.workdir, CONFIG_FILE)})",
                )
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
        )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise _unreadable(where, step, e, fix) from e
        return restored["state"], restored["data"]

    def move_aside(self, step: int) -> str:
        """Moves checkpoint `step` to WORKDIR/checkpoints_unreadable/ (never deletes); the new path."""
        aside = os.path.join(self.workdir, UNREADABLE_DIR, str(step))
        suffix = 1
        while os.path.exists(aside):
            aside = os.path.join(self.workdir, UNREADABLE_DIR, f"{step}.{suffix}")
            suffix += 1
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(self.step_dir(step), aside)
        return aside

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any] | None]:
        """(step, state, data_state) of the newest readable checkpoint; (0, target, None) if none.

        Newer checkpoints that cannot be read (damaged files, a save that never committed) are
        moved aside by process 0, each with one warning line on stderr. A checkpoint that does not
        match `target` stops with a CheckpointError, as in `restore`.
        """
        from jax.experimental import multihost_utils

        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, target)
                return step, state, data_state
            except UnreadableCheckpointError as e:
                if jax.process_count() > 1:  # every process has failed on it before it moves
                    multihost_utils.sync_global_devices(f"laud_jax: checkpoint {step} unreadable")
                if jax.process_index() == 0:
                    aside = self.move_aside(step)
                    print(
                        f"warning: {e.what} ({e.path}); moved it to {aside}, falling back to the previous checkpoint",
                        file=sys.stderr,
                        flush=True,
                    )
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices(f"laud_jax: checkpoint {step} moved aside")
                self.manager.reload()
        return 0, target, None

    def close(self) -> None:
        self.manager.close()


def save_variables(directory: str, config: dict[str, Any], variables: dict[str, Any]) -> None:
    """Writes `config` as config.json and `variables` as checkpoint step 0: what load_variables reads."""
    write_json(os.path.join(directory, CONFIG_FILE), config)
    checkpointer = Checkpointer(directory)
    try:
        checkpointer.manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(variables))), force=True)
        checkpointer.manager.wait_until_finished()
    finally:
        checkpointer.close()


def load_variables(directory: str, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model variables {'params', 'batch_stats'}, recorded config) of a work directory or a
    converted checkpoint; the latest checkpoint unless `step` is given; arrays on the host.

    Raises CheckpointError (one line: what, the file, what to do) for anything unreadable.
    """
    directory = os.path.abspath(directory)
    config = read_config(directory)
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(
            f"{CONFIG_FILE} has no model section",
            os.path.join(directory, CONFIG_FILE),
            "pass a laud_jax.train work directory or a directory written by python -m laud_jax.convert",
        )
    checkpoints = os.path.join(directory, CHECKPOINT_DIR)
    if not os.path.isdir(checkpoints):
        raise CheckpointError(
            "no checkpoint has been written", checkpoints, "train that run first, or convert into this directory again"
        )
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(
                "no checkpoint has been written",
                checkpoints,
                "train that run first, or convert into this directory again",
            )
        where = checkpointer.step_dir(step)
        if not os.path.isdir(where):
            raise CheckpointError(
                f"no checkpoint of step {step}",
                where,
                f"pass one of the steps it has: {list(checkpointer.manager.all_steps())}",
            )
        if "converted_from" in config:
            source = config["converted_from"].get("source") or "SOURCE"
            fix = f"convert it again: python -m laud_jax.convert {source} {directory} --force"
        else:
            fix = (
                f"move {where} aside to read the previous checkpoint (rerunning python -m "
                f"laud_jax.train --workdir {directory} does that by itself)"
            )
        _check_committed(where, step, fix)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            metadata = checkpointer.manager.item_metadata(step)["state"]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
            restored = checkpointer.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:  # orbax raises many types for unreadable files
            raise _unreadable(where, step, e, fix) from e
    finally:
        checkpointer.close()
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    return jax.tree.map(np.asarray, variables), config
