"""Experiment configs: the schema every config starts from, and validation before compute.

An experiment file `configs/X.py` defines `get_config()` returning `base_config()` with
fields changed; `--exp.a.b=value` overrides any field (`parse_command_line`, for argparse).
Unknown keys and impossible values are rejected here with a message naming the field, before
any data or model is touched.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import ml_collections

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
TEACHER_TRAIN = "train"  # teacher.source value: train a static teacher first, in WORKDIR/teacher


class ConfigError(ValueError):
    """A config field has an unknown name or an impossible value."""


def optimizer_config() -> ml_collections.ConfigDict:
    """Optimizer fields (also used for the teacher phase)."""
    return ml_collections.ConfigDict(
        dict(
            name="sgd",  # sgd | adamw
            learning_rate=0.02,  # peak lr for a batch of lr_reference_batch images
            lr_reference_batch=256,  # lr scales with batch_size / this; 0 = no scaling
            schedule="cosine",  # cosine (per step, to zero) | constant
            warmup_steps=0,
            momentum=0.9,  # sgd
            nesterov=True,  # sgd
            b1=0.9,
            b2=0.999,  # adamw
            weight_decay=5e-5,  # on all parameters (decoupled for adamw)
            masker_lr_multiplier=1.0,  # lr factor for mask/gate parameters
            grad_clip_norm=0.0,  # 0 = off
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """Every field a training config may set, with its default."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        dict(  # laud_jax.models.model_config keys
            arch="resnet50",
            num_classes=0,  # 0 = take it from the dataset
            mode="spatial",  # one mode, comma-separated per stage, or 'auto' (the latency search)
            # S per stage (a tuple), one S for every stage, or 'auto' (the latency search)
            granularity=ml_collections.FieldReference(None, field_type=object),
            mask_groups=1,
            channel_granularity=2,
            channel_mask_position="post_act",
            se_pool="dense",  # RegNetY SE under spatial masks: 'dense' (released code) | 'masked'
            masker_input="pooled",  # spatial masker input: 'pooled' (published) | 'standardized'
            dtype="float32",
            zero_init_residual=False,
            stage_widths=ml_collections.config_dict.placeholder(tuple),  # None = the arch's
            stage_depths=ml_collections.config_dict.placeholder(tuple),
            stem_width=ml_collections.config_dict.placeholder(int),
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            name="cluttered_mnist",  # 'cluttered_mnist' (embedded) or any tfds image dataset
            data_dir="",  # tfds data_dir ('' = tfds default)
            train_split="train",
            eval_split="test",
            image_size=64,
            num_clutter=4,  # embedded only: clutter fragments per canvas
            fragment_size=8,  # embedded only: fragment side in pixels
            test_copies=2,  # embedded only: canvases per held-out digit
            num_workers=0,  # grain worker processes (0 = in the training process)
            num_threads=1,  # grain reader threads per process
            prefetch=2,
            mean=ml_collections.config_dict.placeholder(tuple),
            std=ml_collections.config_dict.placeholder(tuple),
        )
    )
    config.batch_size = 256  # global, over all devices and processes
    config.eval_batch_size = 256
    config.num_epochs = 100.0
    config.num_steps = 0  # > 0 overrides num_epochs
    config.optimizer = optimizer_config()
    config.loss = ml_collections.ConfigDict(
        dict(
            target_rate=0.5,  # t: target dynamic/dense MAC ratio
            sparsity_weight=10.0,  # lambda
            kd_temperature=4.0,  # T
            kd_alpha=0.5,  # alpha (0 = no distillation)
            bound_relax_fraction=0.33,  # per-block MAC bounds relax from [t, t] to [0, 1] over this
            # fraction of training (> 1: never fully)
        )
    )
    config.gumbel = ml_collections.ConfigDict(
        dict(
            tau_start=5.0,
            tau_end=0.1,
            noise=True,  # False: deterministic hard gates with the same straight-through
            # gradient (tests, debugging)
        )
    )
    config.teacher = ml_collections.ConfigDict(
        dict(
            source="",  # '' none | 'train' (static teacher first) | path to a workdir
            num_epochs=10.0,  # teacher phase ('train' only)
            optimizer=optimizer_config(),
            init_student=True,  # initialize the student from the teacher's weights
        )
    )
    config.latency = ml_collections.ConfigDict(
        dict(  # the latency search that resolves model.mode / model.granularity = 'auto'
            hardware="local",  # preset (v100, a100, ...), 'local' (fitted: latency calibrate) or profile .json
            fallback_hardware="v100",  # preset used, with a warning, when 'local' has no fitted profile
            # 'local' without a fitted profile: fit one first (latency calibrate with this many block
            # configurations, ~4 s each on 2 CPU cores with compilation) instead of fallback_hardware; 0 = don't
            calibrate_configs=0,
            engine="",  # engine model: '' = the hardware's (xla for local, pallas for GPU presets)
            batch=0,  # images per call the search assumes (0 = eval_batch_size)
            modes=("spatial", "channel", "layer"),  # candidate modes for model.mode='auto'
            granularities=(1, 2, 4, 7, 8, 14),  # candidate S for model.granularity='auto'
        )
    )
    config.init_from = ""  # workdir of a trained model to initialize from
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0 = evaluate at the end only
    config.progress_bar = True
    config.distributed = ml_collections.ConfigDict(
        dict(
            coordinator_address="",  # host:port; '' = $LAUD_COORDINATOR or single process
            num_processes=0,  # 0 = $LAUD_NUM_PROCESSES or 1
            process_id=-1,  # -1 = $LAUD_PROCESS_ID or 0
        )
    )
    return config


def imagenet_config(
    arch: str, mode: str = "spatial", granularity: tuple[int, ...] = (4, 4, 2, 1)
) -> ml_collections.ConfigDict:
    """ImageNet (tfds imagenet2012), 100 epochs, SGD Nesterov, KD from a static teacher."""
    config = base_config()
    config.model.arch = arch
    config.model.mode = mode
    config.model.granularity = granularity
    config.data.name = "imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 224
    config.data.num_workers = 8
    config.data.num_threads = 4
    config.batch_size = 1024
    config.eval_batch_size = 1000
    config.num_epochs = 100.0
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.02  # x batch / 256
    config.optimizer.lr_reference_batch = 256
    config.optimizer.schedule = "cosine"
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-5
    # Maskers learn at the backbone's rate: the released trainer's per-group lr_mult only
    # applies to architectures whose name contains 'dyn', which uni_resnet50/101 and the
    # LAUDNet RegNets do not, so every parameter gets the scheduled lr.
    config.optimizer.masker_lr_multiplier = 1.0
    config.loss.target_rate = 0.5
    config.loss.sparsity_weight = 10.0
    config.loss.kd_temperature = 4.0
    config.loss.kd_alpha = 0.5
    config.gumbel.tau_start = 5.0
    config.gumbel.tau_end = 0.1
    # The frozen static model is the teacher and the student's initialization. Point
    # teacher.source at a trained static workdir to skip training it here.
    config.teacher.source = "train"
    config.teacher.num_epochs = 90.0
    config.teacher.optimizer.name = "sgd"
    config.teacher.optimizer.learning_rate = 0.1
    config.teacher.optimizer.lr_reference_batch = 256
    config.teacher.optimizer.warmup_steps = 5 * 1251
    config.teacher.optimizer.weight_decay = 1e-4
    config.checkpoint.every_steps = 2000
    config.checkpoint.keep = 3
    config.log_every_steps = 100
    config.eval_every_steps = 12510
    return config


AUTO = "auto"  # model.mode / model.granularity: chosen by the latency search before training
AUTO_FIELDS = ("mode", "granularity")


def model_dict(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """``config.model`` as a dict: unset fields dropped, ``num_classes`` from the data when 0."""
    model = {k: v for k, v in config.model.to_dict().items() if v is not None}
    model["num_classes"] = model.get("num_classes") or num_classes
    return model


def with_model_update(config: ml_collections.ConfigDict, update: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the model fields of ``update`` set (JSON lists as tuples),
    e.g. the latency search's choice for the 'auto' fields."""
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        for field, value in update.items():
            resolved.model[field] = tuple(value) if isinstance(value, list) else value
    return resolved


def _mentions_auto(value: Any) -> bool:
    if isinstance(value, str):
        return AUTO in (part.strip() for part in value.split(","))
    return isinstance(value, (tuple, list)) and AUTO in value


def _check_auto(config: ml_collections.ConfigDict) -> None:
    """'auto' only as the whole value of model.mode / model.granularity; latency fields sane."""
    for key, value in config.model.items():
        if key not in AUTO_FIELDS and _mentions_auto(value):
            raise ConfigError(
                f"model.{key}={value!r}: only model.mode and model.granularity can be 'auto' "
                "(chosen by the latency search before training); set a value."
            )
        if key in AUTO_FIELDS and value != AUTO and _mentions_auto(value):
            raise ConfigError(
                f"model.{key}={value!r}: 'auto' stands for the whole field (every stage); "
                f"set model.{key}='auto' or give every stage a value."
            )
    latency = config.latency
    _require(bool(latency.hardware), "latency.hardware is empty; name a preset, 'local' or a profile .json.")
    _require(latency.batch >= 0, f"latency.batch={latency.batch} must be >= 0 (0 = eval_batch_size).")
    _require(
        latency.calibrate_configs == 0 or latency.calibrate_configs >= 20,
        f"latency.calibrate_configs={latency.calibrate_configs} must be 0 (use fallback_hardware) or >= 20 "
        "(the fit has 11 free parameters).",
    )
    _require(
        len(latency.modes) > 0 and all(isinstance(m, str) for m in latency.modes),
        f"latency.modes={latency.modes!r} must be a non-empty list of modes, e.g. spatial,channel,layer.",
    )
    _require(
        len(latency.granularities) > 0 and all(isinstance(s, int) and s > 0 for s in latency.granularities),
        f"latency.granularities={latency.granularities!r} must be a non-empty list of positive ints, e.g. 1,2,4,7.",
    )


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Raises ConfigError for any key of `config` that `schema` does not define."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema.keys()))
            raise ConfigError(f"Unknown config key {name!r}. Known keys here: {known}.")
        if key == "model":  # model keys are validated by the model registry
            continue
        if isinstance(value, ml_collections.ConfigDict):
            if not isinstance(schema[key], ml_collections.ConfigDict):
                raise ConfigError(f"Config key {name!r} must be a value, not a group.")
            check_keys(value, schema[key], name + ".")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_optimizer(opt: ml_collections.ConfigDict, where: str) -> None:
    _require(opt.name in OPTIMIZERS, f"{where}.name={opt.name!r}; choose one of {OPTIMIZERS}.")
    _require(opt.schedule in SCHEDULES, f"{where}.schedule={opt.schedule!r}; choose one of {SCHEDULES}.")
    _require(opt.learning_rate > 0, f"{where}.learning_rate={opt.learning_rate} must be > 0.")
    _require(opt.weight_decay >= 0, f"{where}.weight_decay={opt.weight_decay} must be >= 0.")
    _require(opt.warmup_steps >= 0, f"{where}.warmup_steps={opt.warmup_steps} must be >= 0.")
    _require(0 <= opt.momentum < 1, f"{where}.momentum={opt.momentum} must be in [0, 1).")
    _require(opt.masker_lr_multiplier >= 0, f"{where}.masker_lr_multiplier={opt.masker_lr_multiplier} must be >= 0.")
    _require(opt.lr_reference_batch >= 0, f"{where}.lr_reference_batch={opt.lr_reference_batch} must be >= 0.")


def validate(config: ml_collections.ConfigDict, num_devices: int = 1, num_processes: int = 1) -> None:
    """Checks keys and values that need neither data nor model; raises ConfigError."""
    check_keys(config, base_config())
    _require(config.batch_size > 0, f"batch_size={config.batch_size} must be > 0.")
    _require(
        config.batch_size % num_devices == 0,
        f"batch_size={config.batch_size} is not divisible by the {num_devices} devices "
        f"the data-parallel mesh spans; use a multiple of {num_devices}.",
    )
    _require(
        config.batch_size % num_processes == 0,
        f"batch_size={config.batch_size} is not divisible by the {num_processes} processes.",
    )
    _require(
        config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
        f"eval_batch_size={config.eval_batch_size} must be a positive multiple of the {num_devices} devices.",
    )
    _require(config.num_steps > 0 or config.num_epochs > 0, "Set num_epochs > 0 or num_steps > 0.")
    rate = config.loss.target_rate
    _require(0 < rate <= 1, f"loss.target_rate={rate} must be in (0, 1].")
    _require(config.loss.sparsity_weight >= 0, "loss.sparsity_weight must be >= 0.")
    _require(config.loss.kd_alpha >= 0, "loss.kd_alpha must be >= 0.")
    _require(config.loss.kd_temperature > 0, "loss.kd_temperature must be > 0.")
    _require(config.loss.bound_relax_fraction > 0, "loss.bound_relax_fraction must be > 0.")
    _require(
        config.gumbel.tau_start > 0 and config.gumbel.tau_end > 0, "gumbel.tau_start and gumbel.tau_end must be > 0."
    )
    _require(config.checkpoint.every_steps > 0, "checkpoint.every_steps must be > 0.")
    _require(config.checkpoint.keep > 0, "checkpoint.keep must be > 0.")
    _require(config.log_every_steps > 0, "log_every_steps must be > 0.")
    _check_optimizer(config.optimizer, "optimizer")
    _check_optimizer(config.teacher.optimizer, "teacher.optimizer")
    source = config.teacher.source
    if source == TEACHER_TRAIN:
        _require(config.teacher.num_epochs > 0, "teacher.num_epochs must be > 0.")
    if config.loss.kd_alpha > 0 and not source:
        raise ConfigError(
            "loss.kd_alpha > 0 needs a teacher: set teacher.source to "
            f"'{TEACHER_TRAIN}' or a trained workdir, or set loss.kd_alpha=0."
        )
    _require(config.model.num_classes >= 0, "model.num_classes must be >= 0 (0 = from data).")
    _check_auto(config)


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int, num_epochs: float | None = None) -> int:
    """Total optimizer steps: num_steps, or epochs x examples / batch (at least 1)."""
    if config.num_steps > 0 and num_epochs is None:
        return int(config.num_steps)
    epochs = config.num_epochs if num_epochs is None else num_epochs
    return max(1, math.ceil(epochs * num_train_examples / config.batch_size))


def to_json(config: ml_collections.ConfigDict) -> str:
    """Stable JSON text of a config (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """get_config() of an experiment file (what --exp PATH loads)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("laud_jax_experiment_config", path)
    if spec is None or not path.endswith(".py"):
        raise ConfigError(f"{path} is not a Python config file (expected configs/NAME.py).")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config().")
    return module.get_config()


class CommandLineExit(Exception):
    """A command line was handled without running the tool: help printed (code 0) or a usage
    error reported in one line (code 2). `main` returns `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the `laud_jax` tools: the module docstring as the help text, one-line
    usage errors, and CommandLineExit instead of SystemExit (so `main` returns the code)."""

    def __init__(self, tool: str, doc: str | None, **kwargs: Any) -> None:
        super().__init__(
            prog=f"python -m laud_jax.{tool}",
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise CommandLineExit(status)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; {self.prog} --help lists the flags\n")


@dataclasses.dataclass(frozen=True)
class Override:
    """One `--exp.a.b=value` on the command line: the flag as written, the key `a.b` and the
    value text (None for a bare `--exp.a.b`, which sets a bool field to True)."""

    flag: str
    key: str
    text: str | None


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
FIELD_LIST_HINT = "every field is listed in laud_jax/config_utils.py, base_config"


def split_overrides(argv: Sequence[str], name: str = "exp") -> tuple[list[str], list[Override]]:
    """Takes `--NAME.a.b=value` and `--NAME.a.b value` out of `argv`: (the other arguments,
    the overrides in order). A value that starts with `--` must be given with `=`."""
    rest: list[str] = []
    overrides: list[Override] = []
    prefix = f"--{name}."
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if not arg.startswith(prefix):
            rest.append(arg)
            i += 1
            continue
        flag, equals, text = arg.partition("=")
        value: str | None = text if equals else None
        if not equals and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        overrides.append(Override(flag, flag[len(prefix) :], value))
        i += 1
    return rest, overrides


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"expected true/false, 1/0 or yes/no, got {text!r}")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return int(text, 0)  # 0x10, 0o17, 0b101


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_sequence(text: str) -> tuple[Any, ...]:
    """`4,4,2,1`, `(4, 4, 2, 1)`, `[4, 4]`, `7` (one element), `a,b` (strings), `` or `()`."""
    text = text.strip()
    if not text:
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = tuple(_parse_literal(part.strip()) for part in text.strip("()[]").split(","))
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def parse_field_value(text: str | None, field_type: type, optional: bool = False) -> Any:
    """The value of a config field of type `field_type` given as `text` on the command line.

    bool: true/false, 1/0, yes/no (any case; None = a bare flag = True); int; float (an int
    too); str (as written); tuple and list: Python literals or comma-separated elements.
    `optional` (placeholder fields) also accepts `None`. Raises ValueError.
    """
    if text is None:
        if field_type is bool:
            return True
        raise ValueError("a value is needed (--exp.key=value)")
    if optional and text == "None":
        return None
    if field_type is bool:
        return _parse_bool(text)
    if field_type is int:
        return _parse_int(text)
    if field_type is float:
        return float(text)
    if field_type is str:
        return text
    if field_type in (tuple, list):
        return field_type(_parse_sequence(text))
    return _parse_literal(text)


def _unknown_key(part: str, override: Override, group: ml_collections.ConfigDict, source: str) -> ConfigError:
    known = sorted(group.keys())
    close = difflib.get_close_matches(part, known, n=1)
    hint = f'did you mean "{close[0]}"?' if close else f"known keys here: {', '.join(known)}"
    return ConfigError(f"unknown config key {part!r} in {override.flag} ({source}): {hint} ({FIELD_LIST_HINT})")


def apply_override(config: ml_collections.ConfigDict, override: Override, source: str = "--exp") -> None:
    """Sets the field `override.key` of `config` from the override's text, parsed with the
    type of the field as the config file left it. Raises ConfigError in one line naming the
    flag and `source` (the config file): an unknown key (with the closest key), a group, a
    value the field's type cannot take."""
    *path, last = override.key.split(".")
    group = config
    for part in path:
        if part not in group:
            raise _unknown_key(part, override, group, source)
        group = group[part]
        if not isinstance(group, ml_collections.ConfigDict):
            raise ConfigError(
                f"{override.flag} ({source}): {part!r} is a value, not a group of fields ({FIELD_LIST_HINT})"
            )
    if last not in group:
        raise _unknown_key(last, override, group, source)
    if isinstance(group[last], ml_collections.ConfigDict):
        raise ConfigError(
            f"{override.flag} ({source}): {last!r} is a group; set one of its "
            f"fields: {', '.join(sorted(group[last].keys()))}"
        )
    field_type = group.get_type(last)
    placeholder = isinstance(dict(group.items(preserve_field_references=True))[last], ml_collections.FieldReference)
    try:
        value = parse_field_value(override.text, field_type, optional=placeholder)
        group[last] = value
    except (ValueError, TypeError) as e:
        written = override.flag if override.text is None else f"{override.flag}={override.text}"
        detail = " ".join(str(e).split())
        raise ConfigError(
            f"bad value in {written} ({source}): {last} is a {field_type.__name__} field; {detail}"
        ) from None


def config_file_error(error: BaseException, path: str) -> str:
    """One line for a config file that could not be loaded: what, the file, the fix."""
    if isinstance(error, ConfigError):
        return f"{error} ({os.path.abspath(path)})"
    if not os.path.isfile(path):
        return (
            f"config file not found ({os.path.abspath(path)}): pass --exp the path of an "
            "experiment file, e.g. configs/quickstart.py"
        )
    detail = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, SyntaxError) and error.lineno:
        detail = [f"{error.msg} (line {error.lineno})"]
    reason = detail[-1] if detail else type(error).__name__
    return f"config file could not be loaded: {reason} ({os.path.abspath(path)}): fix the file"


def add_config_argument(parser: argparse.ArgumentParser, help_text: str, name: str = "exp") -> None:
    """Adds `--NAME CONFIG.py`; `parse_command_line` loads it and applies `--NAME.a.b=value`."""
    parser.add_argument(
        f"--{name}",
        metavar="CONFIG.py",
        help=f"{help_text} Override any field with --{name}.FIELD=VALUE "
        f"(every field: laud_jax/config_utils.py, base_config).",
    )


def parse_command_line(parser: ArgumentParser, argv: Sequence[str] | None, name: str = "exp") -> argparse.Namespace:
    """Parses `argv` (without the program name; None = sys.argv[1:]) with `parser`; `--NAME`
    (see add_config_argument) becomes the loaded config with the `--NAME.a.b=value`
    overrides applied, locked (None without --NAME). Raises CommandLineExit after printing
    the help (code 0) or a one-line error (code 2)."""
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv, name)
    args = parser.parse_args(rest)
    path = getattr(args, name, None)  # None too for a subcommand without --NAME
    if path is None:
        if overrides:
            parser.error(f"{overrides[0].flag} overrides a field of the config file: give --{name} CONFIG.py too")
        return args
    try:
        config = load_config_file(path)
    except (OSError, SyntaxError, ConfigError) as e:
        parser.exit(2, f"error: {config_file_error(e, path)}\n")
    config.lock()
    try:
        for override in overrides:
            apply_override(config, override, path)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    setattr(args, name, config)
    return args
