"""Train a (dynamic) model: python -m laud_jax.train --exp configs/X.py --workdir DIR.

Overrides: --exp.field=value (e.g. --exp.batch_size=128 --exp.model.mode=static).
A run resumes automatically from the newest readable checkpoint in DIR (a damaged newer one
is moved to DIR/checkpoints_unreadable). With `teacher.source=train`
(the quickstart) a static teacher is trained first in DIR/teacher, then the dynamic model
in DIR with knowledge distillation from it. At the end DIR/summary.json holds top1,
mac_ratio, per-stage density, steps and teacher_top1.

`model.mode=auto` and/or `model.granularity=auto`: before any model is built, the latency
search (`laud_jax.latency`, on `latency.hardware`) chooses them at `loss.target_rate`; the
choice and its predicted latency ratio go to DIR/search.json (a resumed run reuses it) and
to summary.json (`latency_search`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laud_jax import checkpointing, config_utils, data
from laud_jax.config_utils import ConfigError
from laud_jax.training import distributed
from laud_jax.training import steps as steps_lib
from laud_jax.training.metrics_log import MetricsLog

SUMMARY_FILE = "summary.json"
SEARCH_FILE = "search.json"  # the latency search's choice for the 'auto' model fields


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


@dataclasses.dataclass
class PhaseResult:
    """What a finished training phase hands on: its model, weights and evaluation."""

    model: Any
    variables: dict[str, Any]
    summary: dict[str, Any]


def resolve_model_config(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> dict[str, Any]:
    """The model config with num_classes from the data; validated with the network spec."""
    from laud_jax import models

    cfg = config_utils.model_dict(config, info.num_classes)
    try:
        models.network_spec(models.model_config(cfg), info.image_shape)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    return cfg


def resolve_auto_fields(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, workdir: str
) -> tuple[ml_collections.ConfigDict, dict[str, Any] | None]:
    """The config with model.mode / model.granularity 'auto' replaced by the latency search's
    choice, and the search record (None without 'auto'). The choice is written to
    WORKDIR/search.json; when that file exists (a resumed run) it is reused, not searched again."""
    from laud_jax.latency.search import auto_fields

    fields = auto_fields(config.model)
    if not fields:
        return config, None
    path = os.path.join(workdir, SEARCH_FILE)
    record = _read_json(path)
    if record is not None and sorted(record.get("model_update", {})) == sorted(fields):
        if jax.process_index() == 0:
            print(f"[latency search] reusing the choice recorded in {path}", flush=True)
    else:
        record = _search_record(config, info, fields)
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            checkpointing.write_json(path, record)
        if jax.process_count() > 1:  # every process takes process 0's choice (shared workdir)
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("laud_jax.train: latency search recorded")
            record = _read_json(path) or record
    return config_utils.with_model_update(config, record["model_update"]), record


def _search_record(config: ml_collections.ConfigDict, info: data.DatasetInfo, fields: tuple[str, ...]) -> dict:
    """Runs the latency search for the 'auto' model `fields`; prints and returns its record."""
    from laud_jax.latency.search import model_update, resolve_hardware, search_config

    where = f"latency search for model.{'/'.join(fields)}='auto'"
    latency = config.latency
    _calibrate_if_missing(latency, where)
    try:
        hardware = resolve_hardware(latency.hardware, latency.engine, latency.fallback_hardware)
        result = search_config(config, info.image_shape, info.num_classes, hardware)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from None
    is_main = jax.process_index() == 0
    if hardware.note and is_main:
        print(f"warning: latency.hardware={latency.hardware!r}: {hardware.note}", file=sys.stderr, flush=True)
    update = model_update(result, fields)
    record = {
        **result.to_dict(),
        "requested_hardware": latency.hardware,
        "hardware_note": hardware.note,
        "model_update": update,
    }
    if is_main:
        chosen = ", ".join(f"model.{k}={v if isinstance(v, str) else ','.join(map(str, v))}" for k, v in update.items())
        print(
            f"[latency search] {hardware.name} ({hardware.engine} engine), batch {result.batch}, target MAC rate "
            f"{result.target_rate:g}: {chosen}; predicted latency ratio {result.latency_ratio:.3f} "
            f"(search call {result.seconds:.1f} s)",
            flush=True,
        )
    return record


def _calibrate_if_missing(latency: ml_collections.ConfigDict, where: str) -> None:
    """Fit the local latency profile first when the search needs it, it is missing and
    ``latency.calibrate_configs`` asks for it (a bounded number of timed block configurations)."""
    from laud_jax.latency.calibrate import DEFAULT_REPEATS, calibrate_local
    from laud_jax.latency.profiles import local_profile_path

    path = local_profile_path()
    if latency.hardware.lower() != "local" or not latency.calibrate_configs or os.path.exists(path):
        return
    if jax.process_count() > 1:
        raise ConfigError(
            f"{where}: no fitted local profile at {path}; fit it once on one host "
            "(python -m laud_jax.latency calibrate) before a multi-process run."
        )
    print(
        f"[latency search] no fitted local profile at {path}: timing {latency.calibrate_configs} block "
        f"configurations of the sparse engine first (~{4 * latency.calibrate_configs // 60 + 1} min on 2 CPU cores; "
        "python -m laud_jax.latency calibrate does the same)",
        flush=True,
    )
    calibrate_local(
        out=path, measurements=None, configs=latency.calibrate_configs, repeats=DEFAULT_REPEATS, holdout=0.3, seed=0
    )


def search_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The latency search's fields of summary.json: what was chosen, for which hardware, and
    its predicted static / dynamic latency."""
    keys = ("hardware", "engine", "batch", "target_rate", "latency_ratio", "static_ms", "dynamic_ms")
    return {
        **{k: record[k] for k in keys},
        "mode": [s["mode"] for s in record["stages"]],
        "granularity": [s["granularity"] for s in record["stages"]],
        "model_update": record["model_update"],
        "file": SEARCH_FILE,
    }


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Config of the static teacher phase derived from a run config."""
    teacher = copy.deepcopy(config)
    with teacher.unlocked():
        teacher.model.mode = "static"
        teacher.optimizer = config.teacher.optimizer
        teacher.num_epochs = config.teacher.num_epochs
        teacher.num_steps = 0
        teacher.loss.kd_alpha = 0.0
        teacher.loss.sparsity_weight = 0.0
        teacher.teacher.source = ""
        teacher.init_from = ""
    return teacher


def merge_variables(fresh: dict[str, Any], pretrained: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """`fresh` with every leaf that `pretrained` also has replaced; returns the new-leaf names."""
    flat_pre = {checkpointing.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    used, new, problems = set(), [], []

    def pick(path, value):
        name = checkpointing.path_name(path)
        if name not in flat_pre:
            new.append(name)
            return value
        used.add(name)
        if tuple(flat_pre[name].shape) != tuple(value.shape):
            problems.append(f"{name}: pretrained {tuple(flat_pre[name].shape)}, model {tuple(value.shape)}")
            return value
        return jnp.asarray(flat_pre[name], value.dtype)

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    unused = sorted(set(flat_pre) - used)
    if problems or unused:
        detail = problems + [f"{n}: not in the model" for n in unused[:8]]
        raise ConfigError(f"Weights from {source} do not fit the model:\n  " + "\n  ".join(detail[:12]))
    return merged, new


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, model_cfg: dict[str, Any]) -> None:
    """Refuses a workdir written by a run with a different model or data; records the config."""
    path = os.path.join(workdir, checkpointing.CONFIG_FILE)
    record = json.loads(config_utils.to_json(config))
    record["model"] = json.loads(json.dumps(model_cfg, default=list))
    if os.path.exists(path):
        saved = checkpointing.read_config(
            workdir,
            fix="move it aside and rerun the same command (it is written again from --exp; "
            "the checkpoints are still checked against the model)",
        )
        for section in ("model", "data"):
            if saved.get(section) != record[section]:
                diff = {
                    k: (saved.get(section, {}).get(k), record[section].get(k))
                    for k in set(saved.get(section, {})) | set(record[section])
                    if saved.get(section, {}).get(k) != record[section].get(k)
                }
                raise checkpointing.CheckpointError(
                    f"the run in this work directory has a different {section} config "
                    f"(field: (saved, now) = {diff}), so its checkpoints cannot be resumed",
                    path,
                    "use a new --workdir or the original config",
                )
    if jax.process_count() > 1:  # every process has read the old file before it is replaced
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("laud_jax.train: workdir config checked")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        checkpointing.write_json(path, record)


def eval_split_metrics(
    block_stages: list[int],
    variables: dict[str, Any],
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    eval_step: Any,
) -> dict[str, Any]:
    """top1, mac_ratio and per-stage density (blocks' dynamic / dense MACs) on the eval split."""
    totals = None
    for local in data.eval_batches(config.data, config.eval_batch_size, jax.process_index(), jax.process_count()):
        out = jax.device_get(eval_step(variables, distributed.global_batch(local, mesh)))
        totals = steps_lib.add_eval_sums(totals, out)
    count = float(totals["count"])
    density = {}
    for stage in sorted(set(block_stages)):
        idx = [i for i, s in enumerate(block_stages) if s == stage]
        dynamic = float(np.sum(totals["block_macs"][idx])) / count
        density[f"stage{stage}"] = dynamic / float(np.sum(totals["block_dense_macs"][idx]))
    return {
        "top1": float(totals["top1"]) / count,
        "mac_ratio": float(totals["macs"]) / count / float(totals["dense_macs"]),
        "macs": float(totals["macs"]) / count,
        "dense_macs": float(totals["dense_macs"]),
        "density": density,
        "eval_examples": int(count),
    }


def train_phase(
    config: ml_collections.ConfigDict,
    workdir: str,
    model_cfg: dict[str, Any],
    info: data.DatasetInfo,
    mesh: jax.sharding.Mesh,
    label: str,
    teacher: PhaseResult | None = None,
    pretrained: tuple[dict[str, Any], str] | None = None,
    summary_fields: dict[str, Any] | None = None,
) -> PhaseResult:
    """Trains one model to the end (resuming from WORKDIR's checkpoints) and evaluates it;
    `summary_fields` are added to its summary.json."""
    from tqdm import tqdm

    from laud_jax import models

    is_main = jax.process_index() == 0
    check_workdir_config(workdir, config, model_cfg)
    model = models.build_model(model_cfg)
    dynamic = any(m != "static" for m in models.model_config(model_cfg).mode)
    block_stages = [b.stage for b in models.network_spec(model_cfg, info.image_shape).blocks]
    total_steps = config_utils.num_train_steps(config, info.num_train)
    tx, schedule = steps_lib.make_optimizer(config.optimizer, config.batch_size, total_steps)
    repl = distributed.replicated(mesh)
    batch_sh = distributed.batch_sharded(mesh)

    seed = np.int32(config.seed)
    if pretrained is None:
        state = jax.jit(lambda s: steps_lib.init_state(model, tx, s, info.image_shape), out_shardings=repl)(seed)
    else:
        fresh = jax.jit(
            lambda s: model.init(
                {"params": jax.random.key(s, impl="rbg")}, jnp.zeros((1, *info.image_shape)), train=False
            ),
            out_shardings=repl,
        )(seed)
        variables, new_leaves = merge_variables(fresh, pretrained[0], pretrained[1])
        if is_main:
            print(
                f"[{label}] initialized from {pretrained[1]}; {len(new_leaves)} new tensors "
                "(maskers/gates) keep their fresh initialization.",
                flush=True,
            )
        state = jax.jit(lambda s, v: steps_lib.init_state(model, tx, s, info.image_shape, v), out_shardings=repl)(
            seed, variables
        )

    checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint.keep)
    if is_main:
        for path in checkpointer.remove_temporary():
            print(f"[{label}] removed {path}, left by a save that did not finish", flush=True)
    iterator = data.train_iterator(
        config.data, config.batch_size, config.seed, jax.process_index(), jax.process_count()
    )
    start, state, data_state = checkpointer.restore_latest(state)
    if start:
        iterator.set_state(data_state)
        if is_main:
            print(f"[{label}] resumed from {checkpointer.step_dir(start)}", flush=True)

    summary_path = os.path.join(workdir, SUMMARY_FILE)
    teacher_model = teacher.model if teacher else None
    teacher_vars = teacher.variables if teacher else None
    eval_step = _eval_fn(model, mesh)
    train_step = jax.jit(
        steps_lib.make_train_step(model, tx, config.loss, dynamic, teacher_model, gumbel_noise=config.gumbel.noise),
        in_shardings=(repl, batch_sh, repl, repl, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    log = MetricsLog(workdir, enabled=is_main, resume_step=start)  # drops records past `start`
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=label,
        unit="step",
        dynamic_ncols=True,
        disable=not (is_main and config.progress_bar),
        file=sys.stdout,
    )
    pending: list[dict[str, jax.Array]] = []
    last_good = start
    window_start, window_steps = time.perf_counter(), 0
    train_seconds = 0.0

    def flush(step: int) -> dict[str, float]:
        """Fetches pending metrics; stops on a non-finite loss before anything is saved."""
        nonlocal pending
        fetched = jax.device_get(pending)
        pending = []
        for offset, m in enumerate(fetched):
            if not np.isfinite(m["loss"]):
                bad = step - len(fetched) + offset + 1
                where = checkpointer.step_dir(last_good) if last_good else "none written yet"
                raise NonFiniteLossError(
                    f"[{label}] loss is {float(m['loss'])} at step {bad}; training stopped. The last good "
                    f"checkpoint ({where}) was kept. Lower optimizer.learning_rate or enable "
                    "optimizer.grad_clip_norm, then rerun the same command to resume from it."
                )
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]} if fetched else {}

    try:
        for step in range(start, total_steps):
            local = next(iterator)
            tau = steps_lib.temperature(step, total_steps, config.gumbel.tau_start, config.gumbel.tau_end)
            progress = step / total_steps
            state, metrics = train_step(
                state, distributed.global_batch(local, mesh), np.float32(tau), np.float32(progress), teacher_vars
            )
            pending.append(metrics)
            window_steps += 1
            done = step + 1
            bar.update(1)
            if done % config.log_every_steps == 0 or done == total_steps:
                means = flush(done)
                elapsed = time.perf_counter() - window_start
                train_seconds += elapsed
                means.update(
                    lr=float(schedule(step)), images_per_sec=window_steps * config.batch_size / max(elapsed, 1e-9)
                )
                shown = {"loss": f"{means['loss']:.3f}", "acc": f"{means['accuracy']:.3f}"}
                if dynamic:  # the temperature and density mean nothing for a static model
                    means["tau"] = tau
                    shown.update(density=f"{means['mac_ratio']:.2f}", tau=f"{tau:.2f}")
                log.write(done, "train", means)
                bar.set_postfix(**shown, lr=f"{means['lr']:.2g}", img_s=f"{means['images_per_sec']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if done % config.checkpoint.every_steps == 0 or done == total_steps:
                if pending:
                    flush(done)
                checkpointer.save(done, state, iterator.get_state())
                last_good = done
            if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total_steps:
                variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
                result = eval_split_metrics(block_stages, variables, config, mesh, eval_step)
                log.write(done, "eval", {"top1": result["top1"], "mac_ratio": result["mac_ratio"]})
    except BaseException:
        log.close()
        raise
    finally:
        bar.close()
        checkpointer.close()
        if hasattr(iterator, "close"):
            iterator.close()

    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    previous = _read_json(summary_path)
    if previous and previous.get("steps") == total_steps and start == total_steps:
        summary = previous  # finished before: reuse its evaluation
    else:
        summary = eval_split_metrics(block_stages, variables, config, mesh, eval_step)
        summary.update(
            steps=total_steps,
            train_seconds=train_seconds,
            checkpoint=checkpointer.step_dir(total_steps),
            label=label,
            target_rate=config.loss.target_rate if dynamic else 1.0,
            eval_split=config.data.eval_split,
        )
        if teacher is not None:
            summary["teacher_top1"] = teacher.summary["top1"]
        summary.update(summary_fields or {})
        log.write(total_steps, "eval", {"top1": summary["top1"], "mac_ratio": summary["mac_ratio"]})
        if is_main:
            checkpointing.write_json(summary_path, summary)
    log.close()
    return PhaseResult(model, variables, summary)


def _eval_fn(model: Any, mesh: jax.sharding.Mesh) -> Any:
    repl = distributed.replicated(mesh)
    return jax.jit(
        steps_lib.make_eval_step(model), in_shardings=(repl, distributed.batch_sharded(mesh)), out_shardings=repl
    )


def _read_json(path: str) -> dict[str, Any] | None:
    """A JSON record this trainer wrote (summary.json, search.json); None if absent or damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_teacher(path: str, mesh: jax.sharding.Mesh) -> PhaseResult:
    """A trained static model from a workdir, as a KD teacher."""
    from laud_jax import models

    variables, run_config = checkpointing.load_variables(path)
    summary = _read_json(os.path.join(path, SUMMARY_FILE)) or {"top1": float("nan")}
    return PhaseResult(models.build_model(run_config["model"]), distributed.replicate(variables, mesh), summary)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Validates, runs the teacher phase (if configured) and the main phase; returns the summary."""
    config_utils.validate(config, jax.device_count(), jax.process_count())
    info = data.dataset_info(config.data)
    config, search_record = resolve_auto_fields(config, info, workdir)
    model_cfg = resolve_model_config(config, info)
    mesh = distributed.data_mesh()
    teacher = None
    pretrained = None
    source = config.teacher.source
    if source == config_utils.TEACHER_TRAIN:
        t_config = teacher_config(config)
        t_model_cfg = resolve_model_config(t_config, info)
        teacher = train_phase(t_config, os.path.join(workdir, "teacher"), t_model_cfg, info, mesh, "teacher (static)")
    elif source:
        teacher = load_teacher(source, mesh)
    if teacher is not None and config.teacher.init_student:
        pretrained = (jax.device_get(teacher.variables), f"the teacher ({source})")
    if config.init_from:
        variables, _ = checkpointing.load_variables(config.init_from)
        pretrained = (variables, config.init_from)
    label = "dynamic" if any(m != "static" for m in _modes(model_cfg)) else "static"
    fields = {"latency_search": search_summary(search_record)} if search_record else None
    result = train_phase(config, workdir, model_cfg, info, mesh, label, teacher, pretrained, fields)
    return result.summary


def _modes(model_cfg: dict[str, Any]) -> tuple[str, ...]:
    from laud_jax import models

    return models.model_config(model_cfg).mode


def format_table(summary: dict[str, Any], summary_path: str) -> str:
    """The end-of-run table: teacher and model top-1 on the eval split, MAC ratio."""
    rows = []
    if "teacher_top1" in summary:
        rows.append(("static (teacher)", summary["teacher_top1"], 1.0))
    name = summary.get("label", "model")
    if summary.get("target_rate", 1.0) < 1.0:
        name += f" (t={summary['target_rate']:g})"
    rows.append((name, summary["top1"], summary["mac_ratio"]))
    header = f"top-1 ({summary.get('eval_split', 'eval')})"
    lines = [f"{'model':<20} {header:>16} {'MAC ratio':>10}"]
    lines += [f"{name:<20} {100 * top1:>15.2f}% {ratio:>10.3f}" for name, top1, ratio in rows]
    density = ", ".join(f"{k} {v:.2f}" for k, v in summary.get("density", {}).items())
    lines.append(f"per-stage density: {density}")
    search = summary.get("latency_search")
    if search:
        lines.append(
            f"latency search ({search['hardware']}): modes {','.join(search['mode'])}, S "
            f"{','.join(map(str, search['granularity']))}, predicted latency ratio {search['latency_ratio']:.3f}"
        )
    lines.append(f"summary: {summary_path}")
    return "\n".join(lines)


def workdir_problem(workdir: str) -> str | None:
    """Why a run could not write its work directory (one line: what, the path, what to do), or
    None. Checked before anything is written: a missing directory is checked through the
    directory that would hold it."""
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (
            f"--workdir is a file, not a directory ({existing}): pass the path of a directory "
            "(it is created if missing)"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return (
            f"cannot write to the work directory: {e.strerror} ({existing}): make it writable or pass another --workdir"
        )
    return None


def enable_compilation_cache() -> None:
    """Persists compiled programs (resumed and repeated runs skip XLA compilation).

    Uses $JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/laud_jax/xla.
    """
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update(
            "jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "laud_jax", "xla")
        )


def build_parser() -> config_utils.ArgumentParser:
    """The flags of `python -m laud_jax.train`."""
    parser = config_utils.ArgumentParser("train", __doc__)
    config_utils.add_config_argument(parser, "Experiment config file (configs/*.py).")
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="Run directory: checkpoints, metrics.jsonl, TensorBoard files, "
        "summary.json. An existing run there is resumed.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; `argv` without the program name (None = sys.argv[1:])."""
    try:
        args = config_utils.parse_command_line(build_parser(), argv)
    except config_utils.CommandLineExit as e:
        return e.code
    config, workdir = args.exp, args.workdir
    if config is None or workdir is None:
        print(
            "error: --exp CONFIG.py and --workdir DIR are required.\n"
            "example: python -m laud_jax.train --exp configs/quickstart.py --workdir runs/quickstart",
            file=sys.stderr,
        )
        return 2
    problem = workdir_problem(workdir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    try:
        distributed.initialize(config.distributed)
        summary = train_and_evaluate(config, workdir)
    except (ConfigError, checkpointing.CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(format_table(summary, os.path.abspath(os.path.join(workdir, SUMMARY_FILE))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
