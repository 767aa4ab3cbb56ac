"""The latency search of an experiment config (CLI `search --exp`) and `auto` in the trainer."""

import importlib
import json
import os

import numpy as np
import pytest
from conftest import REPO_ROOT

from laud_jax import checkpointing, config_utils, data, train
from laud_jax.latency import PRESETS, predict, resolve_hardware, search_config
from laud_jax.latency.cli import main as cli
from laud_jax.latency.profiles import profile_to_json
from laud_jax.models import network_spec

QUICKSTART = os.path.join(REPO_ROOT, "configs", "quickstart.py")  # model.mode / granularity 'auto'
QUICKSTART_SPATIAL = os.path.join(REPO_ROOT, "configs", "quickstart_spatial.py")  # neither 'auto'
TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")
V100 = resolve_hardware("v100")
search_lib = importlib.import_module("laud_jax.latency.search")  # the module (the package exports the function)


def quickstart(**model):
    config = config_utils.load_config_file(QUICKSTART)
    config.latency.batch = 0  # the search's batch: the config's eval batch (500)
    for key, value in model.items():
        config.model[key] = value
    return config


def static_reference(config, info, batch):
    """Static latency per stage and of the network from the predictor on the config's own
    network_spec (overrides, dataset classes and image shape): the searched shapes."""
    model = {k: v for k, v in config.model.to_dict().items() if v is not None}
    model.update(mode="static", granularity=1, num_classes=model["num_classes"] or info.num_classes)
    spec = network_spec(model, info.image_shape)
    prediction = predict(spec, PRESETS["v100"], "pallas", rho=1.0, batch=batch)
    stages = [sum(b["static_ms"] for b in prediction.blocks if b["stage"] == s + 1) for s in range(4)]
    return spec, stages, prediction.static_ms


def test_search_from_config_sees_its_overrides():
    info = data.dataset_info(quickstart().data)
    assert info.image_shape == (64, 64, 1) and info.num_classes == 10
    results = {}
    for widths in ((8, 16, 32, 64), (16, 32, 64, 128)):
        config = quickstart(stage_widths=widths)
        result = search_config(config, info.image_shape, info.num_classes, V100)
        spec, stages, static_ms = static_reference(config, info, batch=500)
        assert (result.image_shape, result.batch, result.target_rate) == ((64, 64, 1), 500, 0.5)
        assert result.static_ms == pytest.approx(static_ms, rel=1e-4)
        assert [s["static_ms"] for s in result.stages] == pytest.approx(stages, rel=1e-4)
        # A spatial S is a candidate exactly where it divides the stage's feature maps.
        sizes = result.candidates["granularities"]
        spatial = result.candidates["modes"].index("spatial")
        for stage, table in enumerate(result.candidates["latency_ratio"]):
            grids = {(b.h_out, b.w_out) for b in spec.stage_blocks(stage)}
            divides = [all(h % s == 0 and w % s == 0 for h, w in grids) for s in sizes]
            assert [not np.isnan(row[spatial]) for row in table] == divides
        results[widths] = result
    narrow, wide = results.values()
    assert wide.static_ms > 1.2 * narrow.static_ms


def test_fixed_fields_restrict_the_candidates_of_their_stages():
    info = data.dataset_info(quickstart().data)
    free = search_config(quickstart(), info.image_shape, info.num_classes, V100)
    table = np.asarray(free.candidates["latency_ratio"])  # (stage, S, mode)
    sizes, modes = free.candidates["granularities"], free.candidates["modes"]
    # mode fixed per stage, S searched: each spatial stage takes its best S of the free search.
    fixed_mode = search_config(quickstart(mode="spatial,spatial,layer,layer"), info.image_shape, info.num_classes, V100)
    assert fixed_mode.modes == ("spatial", "spatial", "layer", "layer")
    for stage in range(2):
        column = table[stage, :, modes.index("spatial")]
        assert fixed_mode.stages[stage]["granularity"] == sizes[int(np.nanargmin(column))]
        assert fixed_mode.stages[stage]["latency_ratio"] == pytest.approx(np.nanmin(column), rel=1e-4)
    assert fixed_mode.stages[2]["latency_ratio"] == pytest.approx(table[2, 0, modes.index("layer")], rel=1e-4)
    assert search_lib.model_update(fixed_mode, ("granularity",)) == {"granularity": fixed_mode.granularity}
    # S fixed, mode searched: spatial stages keep the config's S.
    fixed_s = search_config(quickstart(granularity=(2, 2, 1, 1)), info.image_shape, info.num_classes, V100)
    for stage, size in enumerate((2, 2, 1, 1)):
        chosen = fixed_s.stages[stage]
        if chosen["mode"] == "spatial":
            assert chosen["granularity"] == size
        others = [table[stage, 0, modes.index(mode)] for mode in ("channel", "layer")]
        best = np.nanmin([table[stage, sizes.index(size), modes.index("spatial")], *others])
        assert chosen["latency_ratio"] == pytest.approx(best, rel=1e-4)


def test_cli_search_from_config_and_its_errors(tmp_path, capsys):
    out = tmp_path / "search.json"
    record = cli(
        [
            "search",
            "--exp",
            QUICKSTART_SPATIAL,
            "--exp.model.stage_widths=16,32,64,128",
            "--hardware",
            "v100",
            "--batch",
            "8",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "searching both" in printed and "--exp.model.mode=" in printed and "--exp.model.granularity=" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    config = quickstart(stage_widths=(16, 32, 64, 128))
    info = data.dataset_info(config.data)
    _, stages, static_ms = static_reference(config, info, batch=8)
    assert record["batch"] == 8 and record["static_ms"] == pytest.approx(static_ms, rel=1e-4)
    assert record["model_update"] == {
        "mode": record["config"]["model"]["mode"],
        "granularity": record["config"]["model"]["granularity"],
    }
    with pytest.raises(SystemExit, match="--arch is set by the --exp config: use --exp.model.arch="):
        cli(["search", "--exp", QUICKSTART, "--arch", "resnet50"])
    with pytest.raises(SystemExit, match="only model.mode and model.granularity can be 'auto'"):
        cli(["search", "--exp", QUICKSTART, "--exp.model.masker_input=auto"])
    with pytest.raises(SystemExit):
        cli(["search", "--exp", QUICKSTART, "--exp.model.stem_width=auto"])
    assert "stem_width is a int field" in capsys.readouterr().err


def test_local_hardware_without_a_profile_falls_back_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUD_JAX_LOCAL_PROFILE", str(tmp_path / "missing.json"))
    hardware = resolve_hardware("local", fallback="a100")
    assert (hardware.name, hardware.engine, hardware.profile) == ("a100", "pallas", PRESETS["a100"])
    assert "missing.json" in hardware.note and "calibrate" in hardware.note
    with pytest.raises(FileNotFoundError, match="calibrate"):
        resolve_hardware("local")
    assert resolve_hardware("v100", "xla").engine == "xla" and not resolve_hardware("v100").note


def tiny_auto_config(**overrides):
    config = config_utils.load_config_file(TINY)
    config.num_steps = 2
    config.log_every_steps = 2
    config.checkpoint.every_steps = 2
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        group = config
        for parent in parents:
            group = group[parent]
        group[leaf] = value
    return config


def test_trainer_resolves_auto_records_it_and_reuses_it_on_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAUD_JAX_LOCAL_PROFILE", str(tmp_path / "missing.json"))
    workdir = str(tmp_path / "run")
    flags = ["--exp.num_steps=2", "--exp.log_every_steps=2", "--exp.checkpoint.every_steps=2"]
    assert train.main(["--exp", TINY, "--workdir", workdir, "--exp.model.granularity=auto", *flags]) == 0
    out, err = capsys.readouterr()
    assert "no fitted local profile" in err and "'v100' preset instead" in err and "[latency search] v100" in out
    # The same search, run here: the tiny config on the v100 fallback.
    config = tiny_auto_config(**{"model.granularity": "auto"})
    info = data.dataset_info(config.data)
    expected = search_config(config, info.image_shape, info.num_classes, V100)
    with open(os.path.join(workdir, train.SEARCH_FILE)) as f:
        recorded = json.load(f)
    assert recorded["model_update"] == {"granularity": list(expected.granularity)}
    assert recorded["requested_hardware"] == "local" and recorded["hardware"] == "v100"
    assert recorded["latency_ratio"] == pytest.approx(expected.latency_ratio, rel=1e-5)
    with open(os.path.join(workdir, train.SUMMARY_FILE)) as f:
        summary = json.load(f)
    search = summary["latency_search"]
    assert search["granularity"] == list(expected.granularity) and search["mode"] == ["spatial"] * 4
    assert search["latency_ratio"] == pytest.approx(expected.latency_ratio, rel=1e-5)
    assert checkpointing.read_config(workdir)["model"]["granularity"] == list(expected.granularity)

    # Resumed with another hardware: the recorded choice is reused, nothing is searched.
    def no_search(*args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr(search_lib, "search_config", no_search)
    config = tiny_auto_config(**{"model.granularity": "auto", "num_steps": 3, "latency.hardware": "a100"})
    resumed = train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "reusing the choice recorded" in out and "resumed from " + os.path.join(workdir, "checkpoints", "2") in out
    assert resumed["steps"] == 3 and resumed["latency_search"] == search


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (["--exp.model.channel_granularity=auto"], 2, "channel_granularity is a int field"),
        (["--exp.model.masker_input=auto"], 1, "model.masker_input='auto': only model.mode and model.granularity"),
        (["--exp.model.granularity=auto,2,1,1"], 1, "'auto' stands for the whole field"),
        (["--exp.model.mode=layer", "--exp.model.granularity=auto"], 1, "has no spatial stage"),
        (["--exp.model.mode=auto", "--exp.latency.modes=spatial,fast"], 1, "latency.modes=('spatial', 'fast')"),
        (["--exp.model.mode=auto", "--exp.latency.hardware=tpu9000"], 1, "unknown hardware 'tpu9000'"),
    ],
)
def test_bad_auto_usage_is_a_one_line_error_before_anything_is_written(tmp_path, capsys, flags, code, message):
    workdir = str(tmp_path / "run")
    assert train.main(["--exp", TINY, "--workdir", workdir, *flags]) == code
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not os.path.exists(workdir)


def test_trainer_fits_a_missing_local_profile_first_when_asked(tmp_path, monkeypatch, capsys):
    """latency.calibrate_configs > 0: the missing local profile is fitted (announced up front),
    then searched on; nothing falls back to a preset."""
    path = tmp_path / "local.json"
    monkeypatch.setenv("LAUD_JAX_LOCAL_PROFILE", str(path))
    calls = []

    def fake_calibration(*, out, configs, **kwargs):  # the real one times ~1 s per configuration
        print("timing now")
        calls.append((out, configs))
        profile_to_json(PRESETS["a100"], out, name="local")

    monkeypatch.setattr("laud_jax.latency.calibrate.calibrate_local", fake_calibration)
    workdir = str(tmp_path / "run")
    flags = ["--exp.num_steps=2", "--exp.log_every_steps=2", "--exp.checkpoint.every_steps=2"]
    auto = ["--exp.model.granularity=auto", "--exp.latency.calibrate_configs=24"]
    assert train.main(["--exp", TINY, "--workdir", workdir, *auto, *flags]) == 0
    out, err = capsys.readouterr()
    assert calls == [(str(path), 24)]
    announced = out.index("timing 24 block configurations")
    assert "(~2 min on 2 CPU cores" in out and announced < out.index("timing now") < out.index("[latency search] local")
    assert "preset instead" not in err
    config = tiny_auto_config(**{"model.granularity": "auto"})
    info = data.dataset_info(config.data)
    expected = search_config(config, info.image_shape, info.num_classes, resolve_hardware(str(path)))
    with open(os.path.join(workdir, train.SEARCH_FILE)) as f:
        recorded = json.load(f)
    assert recorded["model_update"] == {"granularity": list(expected.granularity)}
    bad = ["--exp.latency.calibrate_configs=5"]
    assert train.main(["--exp", TINY, "--workdir", str(tmp_path / "other"), *auto[:1], *bad]) != 0
    assert "latency.calibrate_configs=5 must be 0" in capsys.readouterr().err
