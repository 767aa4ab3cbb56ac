"""Config files and validation: every bad input is a clear error before any compute."""

import glob
import os

import jax
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT

from laud_jax import config_utils, models, train
from laud_jax.config_utils import ConfigError
from laud_jax.training import steps

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))
TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_file_is_valid(path):
    config = config_utils.load_config_file(path)
    config_utils.validate(config)
    cfg = {k: v for k, v in config.model.to_dict().items() if v is not None and v != config_utils.AUTO}
    cfg["num_classes"] = 1000 if config.data.name != "cluttered_mnist" else 10
    spec = models.network_spec(models.model_config(cfg), (config.data.image_size, config.data.image_size, 3))
    assert spec.dense_macs > 0


def test_quickstart_and_imagenet_recipes_hold_the_documented_values():
    quick = config_utils.load_config_file(os.path.join(REPO_ROOT, "configs", "quickstart.py"))
    assert quick.data.name == "cluttered_mnist" and quick.model.arch == "resnet_small"
    assert quick.teacher.source == "train" and quick.loss.target_rate == 0.5
    r50 = config_utils.load_config_file(os.path.join(REPO_ROOT, "configs", "resnet50.py"))
    assert (r50.optimizer.name, r50.optimizer.nesterov, r50.optimizer.weight_decay) == ("sgd", True, 5e-5)
    assert steps.peak_learning_rate(r50.optimizer, r50.batch_size) == pytest.approx(0.02 * 1024 / 256)
    assert (r50.num_epochs, r50.loss.sparsity_weight, r50.loss.kd_temperature, r50.loss.kd_alpha) == (100, 10, 4, 0.5)
    assert (r50.gumbel.tau_start, r50.gumbel.tau_end) == (5.0, 0.1)


def run_main(tmp_path, *flags):
    workdir = str(tmp_path / "run")
    return train.main(["--exp", TINY, "--workdir", workdir, *flags]), workdir


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--exp.loss.target_rate=1.5"], "target_rate=1.5 must be in (0, 1]"),
        (["--exp.loss.target_rate=0"], "target_rate=0.0 must be in (0, 1]"),
        (["--exp.model.granularity=(3,4,2,1)"], "S=3 of stage 1 does not divide"),
        (["--exp.model.arch=resnet_huge"], "unknown arch 'resnet_huge'"),
        (["--exp.data.name=imagenet2012", "--exp.data.data_dir=/nonexistent/tfds"], "Dataset 'imagenet2012'"),
        (["--exp.loss.kd_alpha=0.5"], "needs a teacher"),
        (["--exp.optimizer.name=lion"], "optimizer.name='lion'"),
    ],
)
def test_bad_values_fail_before_compute(tmp_path, capsys, flags, message):
    code, workdir = run_main(tmp_path, *flags)
    assert code == 1
    assert message in capsys.readouterr().err
    assert not os.path.exists(workdir)  # nothing was written: the run never started


def test_unknown_override_key_is_rejected(tmp_path, capsys):
    code, workdir = run_main(tmp_path, "--exp.optimzer.learning_rate=0.1")
    assert code == 2
    assert "optimzer" in capsys.readouterr().err
    assert not os.path.exists(workdir)


def test_model_schema_matches_the_model_registry():
    assert set(config_utils.base_config().model) == set(models.MODEL_CONFIG_KEYS)


def test_unknown_key_in_config_file_is_rejected(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from laud_jax.config_utils import base_config\n"
        "def get_config():\n"
        "  c = base_config()\n"
        "  c.loss.sparsity_wieght = 3.0\n"
        "  return c\n"
    )
    with pytest.raises(ConfigError, match="Unknown config key 'loss.sparsity_wieght'"):
        config_utils.validate(config_utils.load_config_file(str(path)))


def test_batch_must_divide_over_devices_and_processes():
    config = config_utils.load_config_file(TINY)
    config.batch_size = 30
    with pytest.raises(ConfigError, match="batch_size=30 is not divisible by the 4 devices"):
        config_utils.validate(config, num_devices=4)
    config.batch_size = 32
    config_utils.validate(config, num_devices=4)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        config_utils.validate(config, num_devices=1, num_processes=3)


def test_help_and_missing_flags(capsys):
    assert train.main([]) == 2
    assert "--exp CONFIG.py and --workdir DIR are required" in capsys.readouterr().err
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--exp.field=value" in out and "--workdir" in out


def test_temperature_schedule_is_exponential():
    taus = [steps.temperature(k, 100, 5.0, 0.1) for k in (0, 50, 100)]
    assert taus[0] == pytest.approx(5.0) and taus[2] == pytest.approx(0.1)
    assert taus[1] == pytest.approx(np.sqrt(5.0 * 0.1))


def test_lr_schedule_warmup_cosine_and_batch_scaling():
    config = config_utils.base_config().optimizer
    config.warmup_steps = 10
    schedule = steps.lr_schedule(config, batch_size=512, total_steps=110)
    peak = 0.02 * 512 / 256
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(peak)
    assert float(schedule(60)) == pytest.approx(peak / 2, rel=1e-4)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)


def test_masker_lr_multiplier_scales_only_mask_parameters():
    config = config_utils.base_config().optimizer
    config.update(
        dict(
            momentum=0.0,
            weight_decay=0.0,
            schedule="constant",
            learning_rate=0.5,
            lr_reference_batch=0,
            masker_lr_multiplier=0.1,
        )
    )
    params = {
        "block": {
            "conv1": {"kernel": np.ones(3, np.float32)},
            "gates": {"masker_spatial": {"conv": {"bias": np.ones(2, np.float32)}}},
        }
    }
    grads = jax.tree.map(lambda x: np.full_like(x, 2.0), params)
    tx, _ = steps.make_optimizer(config, batch_size=32, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["block"]["conv1"]["kernel"], -1.0)
    np.testing.assert_allclose(updates["block"]["gates"]["masker_spatial"]["conv"]["bias"], -0.1)
    assert isinstance(tx, optax.GradientTransformation)


def test_pretrained_weights_must_fit():
    fresh = {"params": {"a": np.zeros((2, 3), np.float32), "gates": {"b": np.zeros(4, np.float32)}}}
    merged, new = train.merge_variables(fresh, {"params": {"a": np.ones((2, 3))}}, "teacher")
    np.testing.assert_array_equal(merged["params"]["a"], np.ones((2, 3)))
    assert new == ["params/gates/b"]
    with pytest.raises(ConfigError, match=r"params/a: pretrained \(3, 3\), model \(2, 3\)"):
        train.merge_variables(fresh, {"params": {"a": np.ones((3, 3))}}, "teacher")
    with pytest.raises(ConfigError, match="params/c: not in the model"):
        train.merge_variables(fresh, {"params": {"a": np.ones((2, 3)), "c": np.ones(1)}}, "x")


# --exp CONFIG.py and --exp.a.b=value overrides on an argparse command line


def parse(*argv):
    """The namespace of a tool with --exp and --workdir (raises CommandLineExit)."""
    parser = config_utils.ArgumentParser("test", "A test tool.")
    config_utils.add_config_argument(parser, "Config file.")
    parser.add_argument("--workdir")
    return config_utils.parse_command_line(parser, list(argv))


def test_overrides_take_the_type_of_each_field():
    config = parse(
        "--exp",
        TINY,
        "--workdir",
        "w",
        "--exp.model.granularity=2,2,1,1",  # placeholder(tuple), set by the file
        "--exp.data.mean",
        "(0.5, 0.5, 0.5)",  # placeholder(tuple), None in the file; space form
        "--exp.model.stem_width=16",  # placeholder(int)
        "--exp.progress_bar=False",  # bool, any case
        "--exp.gumbel.noise",
        "no",  # bool, space form
        "--exp.num_epochs=3",  # float field given an int
        "--exp.batch_size",
        "64",  # int
        "--exp.teacher.optimizer.learning_rate=1e-3",  # nested key, float
        "--exp.teacher.source=runs/teacher",  # str
        "--exp.model.mode=static",
    ).exp
    assert config.model.granularity == (2, 2, 1, 1)
    assert config.data.mean == (0.5, 0.5, 0.5)
    assert config.model.stem_width == 16 and isinstance(config.model.stem_width, int)
    assert config.progress_bar is False and config.gumbel.noise is False
    assert config.num_epochs == 3.0 and isinstance(config.num_epochs, float)
    assert config.batch_size == 64
    assert config.teacher.optimizer.learning_rate == pytest.approx(1e-3)
    assert config.teacher.source == "runs/teacher" and config.model.mode == "static"
    assert parse("--exp", TINY).exp.to_dict() == config_utils.load_config_file(TINY).to_dict()


def test_overridden_config_is_locked_and_without_exp_is_none():
    args = parse(f"--exp={TINY}", "--exp.model.stem_width=None", "--exp.model.granularity=None")
    assert args.exp.model.stem_width is None and args.exp.model.granularity is None
    with pytest.raises(AttributeError):
        args.exp.new_field = 1
    assert parse("--workdir", "w").exp is None


@pytest.mark.parametrize(
    "text, field_type, optional, expected",
    [
        ("true", bool, False, True),
        ("FALSE", bool, False, False),
        ("1", bool, False, True),
        ("0", bool, False, False),
        ("Yes", bool, False, True),
        ("no", bool, False, False),
        (None, bool, False, True),  # a bare --exp.flag
        ("12", int, False, 12),
        ("-1", int, False, -1),
        ("None", int, True, None),
        ("2", float, False, 2.0),
        ("0.25", float, False, 0.25),
        ("1e-4", float, False, 1e-4),
        ("a/b.txt", str, False, "a/b.txt"),
        ("", str, False, ""),
        ("None", str, False, "None"),
        ("None", str, True, None),
        ("4,4,2,1", tuple, True, (4, 4, 2, 1)),
        ("(4,4,2,1)", tuple, True, (4, 4, 2, 1)),
        ("[4, 2]", tuple, False, (4, 2)),
        ("7", tuple, False, (7,)),
        ("()", tuple, False, ()),
        ("spatial,channel", tuple, False, ("spatial", "channel")),
        ("None", tuple, True, None),
        ("1,2", list, False, [1, 2]),
    ],
)
def test_parse_field_value(text, field_type, optional, expected):
    value = config_utils.parse_field_value(text, field_type, optional)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text, field_type", [("maybe", bool), ("1.5", int), ("x", float), (None, int), ("None", int)])
def test_parse_field_value_rejects(text, field_type):
    with pytest.raises(ValueError):
        config_utils.parse_field_value(text, field_type)


def one_line_error(capsys, *argv):
    with pytest.raises(config_utils.CommandLineExit) as info:
        parse(*argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    return err


def test_misspelt_key_names_the_closest_key(capsys):
    err = one_line_error(capsys, "--exp", TINY, "--exp.teacher.optimzer.learning_rate=0.1")
    assert (
        f"unknown config key 'optimzer' in --exp.teacher.optimzer.learning_rate ({TINY}): did you mean \"optimizer\"?"
    ) in err
    err = one_line_error(capsys, "--exp", TINY, "--exp.batch_sise=3")
    assert 'did you mean "batch_size"?' in err
    err = one_line_error(capsys, "--exp", TINY, "--exp.zzz=3")
    assert "unknown config key 'zzz'" in err and "known keys here: batch_size, checkpoint" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--exp.batch_size=abc", "bad value in --exp.batch_size=abc"),
        ("--exp.progress_bar=maybe", "progress_bar is a bool field; expected true/false"),
        ("--exp.model=resnet", "'model' is a group; set one of its fields: arch"),
        ("--exp.seed.x=1", "'seed' is a value, not a group"),
        ("--exp.batch_size", "a value is needed"),
    ],
)
def test_bad_overrides_are_one_line_errors(capsys, override, message):
    assert message in one_line_error(capsys, "--exp", TINY, override)


def test_overrides_without_exp_and_bad_files_are_one_line_errors(capsys, tmp_path):
    err = one_line_error(capsys, "--exp.batch_size=3")
    assert "--exp.batch_size overrides a field of the config file: give --exp CONFIG.py too" in err
    err = one_line_error(capsys, "--exp", str(tmp_path / "nope.py"))
    assert "config file not found" in err
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert "config file could not be loaded: invalid syntax" in one_line_error(capsys, "--exp", str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert "defines no get_config()" in one_line_error(capsys, "--exp", str(empty))
    assert "unrecognized arguments: --bogus" in one_line_error(capsys, "--bogus")
