"""Weight import: converted models reproduce PyTorch logits and masks; unsafe or bad files fail clearly.

The PyTorch side is in tests/fixtures/torch (state_dicts, inputs, logits and hard masks of
small PyTorch models with the torchvision / LAUDNet / LASNet layouts), made by
tests/fixtures/make_torch_fixtures.py; torch is not needed here.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from laud_jax import convert, torch_pickle
from laud_jax.models import build_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torch")
MANIFEST = json.load(open(os.path.join(FIXTURES, "manifest.json")))["fixtures"]
INPUTS = np.load(os.path.join(FIXTURES, "inputs.npy")).astype(np.float32)
FIXTURE_NAMES = sorted(MANIFEST)


def fixture_path(name: str, fmt: str | None = None) -> str:
    files = MANIFEST[name]["files"]
    return os.path.join(FIXTURES, files[fmt or next(iter(files))])


@functools.cache
def _forward(cfg_json: str):
    model = build_model(json.loads(cfg_json))
    return jax.jit(lambda variables, images: model.apply(variables, images))


def forward(cfg, variables, images=INPUTS):
    return _forward(json.dumps(cfg, sort_keys=True))(variables, images)


def convert_fixture(name: str, fmt: str | None = None, **overrides):
    """convert_checkpoint of a fixture; released RegNets pool squeeze-excitation densely."""
    fx = MANIFEST[name]
    result = convert.convert_checkpoint(
        fixture_path(name, fmt), image_size=fx["image_size"], **{**fx["user"], **overrides}
    )
    cfg = result[0]
    if "regnet" in cfg["arch"] and result[2].layout.source != "torchvision":
        assert cfg["se_pool"] == fx["user"].get("se_pool", "dense")
    return result


def assert_matches_torch(name, logits, aux):
    reference = np.load(os.path.join(FIXTURES, MANIFEST[name]["arrays"]))
    np.testing.assert_allclose(np.asarray(logits), reference["logits"], rtol=1e-4, atol=1e-4)
    checked = 0
    for k, block in enumerate(aux["blocks"]):
        for kind, field in (("spatial", "spatial_mask"), ("channel", "channel_mask"), ("layer", "layer_gate")):
            key = f"block{k}_{kind}"
            if key in reference:
                np.testing.assert_array_equal(np.asarray(block[field]), reference[key], err_msg=key)
                checked += 1
    return checked


def normalized(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_converted_model_matches_torch(name):
    """Inferred config as built; logits and every hard mask equal the PyTorch model's."""
    cfg, variables, checkpoint = convert_fixture(name)
    expect = MANIFEST[name]["expect"]
    assert {k: normalized(cfg).get(k) for k in expect} == expect
    logits, aux = forward(cfg, variables)
    checked = assert_matches_torch(name, logits, aux)
    reference = np.load(os.path.join(FIXTURES, MANIFEST[name]["arrays"]))
    masks = [k for k in reference.files if k.startswith("block")]
    assert checked == len(masks)
    if checkpoint.layout.source != "torchvision":  # every block gated, every mask mixed
        assert checked >= len(aux["blocks"])
        assert all(0 < reference[k].mean() < 1 for k in masks)


def test_legacy_and_zip_formats_read_alike():
    zip_file = torch_pickle.load(fixture_path("tv_resnet50", "zip"))
    legacy = torch_pickle.load(fixture_path("tv_resnet50", "legacy"))
    assert list(zip_file) == list(legacy) and len(zip_file) > 50
    for key in zip_file:
        np.testing.assert_array_equal(zip_file[key], legacy[key], err_msg=key)
    assert zip_file["bn1.num_batches_tracked"].dtype == np.int64
    half = torch_pickle.load(fixture_path("tv_resnet18"))
    assert half["conv1.weight"].dtype == np.float16 and half["conv1.weight"].shape == (8, 3, 7, 7)


def test_wrapped_checkpoint_records_settings_and_prefix_is_stripped():
    raw = torch_pickle.load(fixture_path("lasnet_resnet50"))
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert raw["optimizer"]["param_groups"][0]["nesterov"] is True
    checkpoint = convert.read_torch_checkpoint(fixture_path("lasnet_resnet50"))
    assert not any(k.startswith("module.") for k in checkpoint.state_dict)
    assert checkpoint.recorded["mask_spatial_granularity"] == ["4", "2", "2", "2", "1"]
    assert checkpoint.recorded["image_size"] == 64


def test_legacy_tensor_views_of_shared_storage():
    """RegNet fixture weights are strided views of small pools: shapes and values survive."""
    state = convert.read_torch_checkpoint(fixture_path("tv_regnety400")).state_dict
    weight = state["trunk_output.block4.block4-0.f.c.0.weight"]
    assert weight.shape == (440, 440, 1, 1)
    # row o starts 5 elements after row o-1 in its pool (stride (5, 1, 1, 1))
    np.testing.assert_array_equal(weight[1, :-5, 0, 0], weight[0, 5:, 0, 0])


def _write_zip_with_pickle(path, payload: bytes, template: str):
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("data.pkl") else src.read(info)
            dst.writestr(info.filename, data)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"conv1.weight": _Exploit(marker)}, protocol=2)
    path = tmp_path / f"evil.{fmt}.pth"
    if fmt == "zip":
        _write_zip_with_pickle(path, payload, fixture_path("tv_resnet18"))
    else:
        header = b"".join(
            pickle.dumps(v, protocol=2) for v in (torch_pickle.LEGACY_MAGIC, 1001, {"little_endian": True})
        )
        path.write_bytes(header + payload + pickle.dumps([], protocol=2))
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"asks for '(posix|os|nt)\.system'"):
        torch_pickle.load(path)
    with pytest.raises(torch_pickle.UnsafeCheckpointError):
        convert.read_torch_checkpoint(path)
    assert not marker.exists()


def test_pickled_module_gets_a_resave_hint(tmp_path):
    payload = b"\x80\x02ctorch.nn.modules.conv\nConv2d\nq\x00)\x81q\x01."
    path = tmp_path / "model.pth"
    _write_zip_with_pickle(path, payload, fixture_path("tv_resnet18"))
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"state_dict\(\)"):
        torch_pickle.load(path)


def test_corrupt_files_give_clear_errors(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(fixture_path("tv_resnet50", "legacy"), "rb").read()[:-100])
    with pytest.raises(torch_pickle.CheckpointFormatError, match="truncated"):
        torch_pickle.load(truncated)
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(fixture_path("tv_resnet18")) as src, zipfile.ZipFile(short, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename and len(data) > 64:
                data = data[:-8]
            dst.writestr(info.filename, data)
    with pytest.raises(torch_pickle.CheckpointFormatError, match="the pickle expects"):
        torch_pickle.load(short)
    text = tmp_path / "notes.pth"
    text.write_bytes(b"not a checkpoint at all")
    with pytest.raises(torch_pickle.CheckpointFormatError, match="not a PyTorch checkpoint|neither"):
        torch_pickle.load(text)


def test_missing_unexpected_and_misshaped_keys_are_all_listed():
    checkpoint = convert.read_torch_checkpoint(fixture_path("tv_resnet50"))
    cfg = convert.infer_model_config(checkpoint)
    state = dict(checkpoint.state_dict)
    del state["layer2.1.bn2.running_var"]
    state["layer9.0.conv1.weight"] = np.ones((2, 2, 1, 1), np.float32)
    state["layer3.0.conv2.weight"] = state["layer3.0.conv2.weight"][:, :4]
    with pytest.raises(convert.ConversionError) as info:
        convert.convert_state_dict(state, cfg, checkpoint.layout, 64)
    message = str(info.value)
    assert "missing from the checkpoint (1)" in message and "layer2.1.bn2.running_var" in message
    assert "unexpected in the checkpoint (1)" in message and "layer9.0.conv1.weight" in message
    assert (
        "mis-shaped (1)" in message
        and "layer3.0.conv2.weight: checkpoint (8, 4, 3, 3), model needs (8, 8, 3, 3)" in message
    )


def test_wrong_user_settings_show_as_key_errors():
    """Asking for a static model from a LASNet file: every masker tensor is unexpected."""
    with pytest.raises(convert.ConversionError, match=r"unexpected in the checkpoint \(10\)"):
        convert_fixture("lasnet_resnet50", mode="static")


def test_settings_the_weights_do_not_reveal_must_be_given():
    checkpoint = convert.read_torch_checkpoint(fixture_path("laud_resnet50"))
    checkpoint.recorded.clear()
    with pytest.raises(convert.ConversionError, match="spatial and its layer mode"):
        convert.infer_model_config(checkpoint)
    with pytest.raises(convert.ConversionError, match="records no mask granularity"):
        convert.infer_model_config(checkpoint, mode=("channel", "spatial", "spatial+channel", "layer"))
    cfg = convert.infer_model_config(checkpoint, mode="channel,spatial,spatial+channel,layer", granularity=(1, 2, 2, 1))
    assert (
        cfg["mode"] == ("channel", "spatial", "spatial+channel", "layer") and cfg["channel_mask_position"] == "pre_bn"
    )
    lasnet = convert.read_torch_checkpoint(fixture_path("lasnet_regnety400"))
    with pytest.raises(convert.ConversionError, match="--granularity"):
        convert.infer_model_config(lasnet)


def test_cli_writes_a_directory_that_load_pretrained_reads(tmp_path, capsys):
    out = tmp_path / "converted"
    assert convert.main([fixture_path("laud_resnet50"), str(out)]) == 0
    assert "laudnet resnet" in capsys.readouterr().out
    saved = json.load(open(out / "config.json"))
    assert saved["model"]["channel_mask_position"] == "pre_bn"
    assert convert.main([fixture_path("laud_resnet50"), str(out)]) == 2  # refuses to overwrite
    model, variables = convert.load_pretrained(out)
    assert_matches_torch("laud_resnet50", *forward(saved["model"], variables))
    assert isinstance(model, type(build_model(saved["model"])))
    with pytest.raises(convert.ConversionError, match="num_classes: saved 7, asked 10"):
        convert.load_pretrained(out, num_classes=10)
    _, direct = convert.load_pretrained(fixture_path("laud_resnet50"), image_size=64)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_cli_reports_errors_and_help(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    _write_zip_with_pickle(evil, pickle.dumps(_Exploit(tmp_path / "x"), protocol=2), fixture_path("tv_resnet18"))
    assert convert.main([str(evil), str(tmp_path / "out")]) == 1
    assert "refusing to load" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--help"])
    assert exit_info.value.code == 0
    assert "LAUDNet" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_handles_dtypes_views_and_plain_python_values(fmt):
    misc = json.load(open(os.path.join(FIXTURES, "manifest.json")))["misc"]
    loaded = torch_pickle.load(os.path.join(FIXTURES, misc["files"][fmt]))
    expected = np.load(os.path.join(FIXTURES, misc["arrays"]))
    for key in expected.files:
        np.testing.assert_array_equal(np.asarray(loaded[key], expected[key].dtype), expected[key], err_msg=key)
    assert str(loaded["bf16"].dtype) == "bfloat16" and loaded["int32"].dtype == np.int32
    assert loaded["empty"].shape == (0, 3) and loaded["scalar"].shape == ()
    assert loaded["numpy_scalar"] == 3.5 and loaded["numpy_array"].shape == (2, 3)
    assert vars(loaded["args"]) == {"lr": 0.1, "dyn_mode": "spatial"}
