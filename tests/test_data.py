"""Input pipelines: embedded cluttered MNIST and tfds (mock data) through grain."""

import os

import numpy as np
import pytest

from laud_jax import config_utils, data
from laud_jax.data import cluttered_mnist, tfds_source


def data_config(**overrides):
    config = config_utils.base_config().data
    config.update(overrides)
    return config


def locate(canvas, digit, exact=True):
    """Positions where `digit` lies in `canvas` (exactly, or under max-composited clutter)."""
    size = canvas.shape[0] - digit.shape[0] + 1
    mask = digit > 0
    hits = []
    for y in range(size):
        for x in range(size):
            window = canvas[y : y + digit.shape[0], x : x + digit.shape[1]]
            if np.all(window >= digit) and (not exact or np.array_equal(window[mask], digit[mask])):
                hits.append((y, x))
    return hits


def test_splits_are_fixed_stratified_and_disjoint():
    train_x, train_y = cluttered_mnist.split_digits("train")
    test_x, test_y = cluttered_mnist.split_digits("test")
    assert len(train_x) + len(test_x) == 5000
    assert np.bincount(test_y).tolist() == [100] * 10
    assert np.bincount(train_y).tolist() == [400] * 10
    train_rows = {row.tobytes() for row in train_x}
    assert not any(row.tobytes() in train_rows for row in test_x)


def test_canvas_holds_the_digit_plus_clutter():
    images, _ = cluttered_mnist.split_digits("train")
    spec = cluttered_mnist.CanvasSpec(size=64, num_clutter=0)
    rng = np.random.default_rng(3)
    canvas, digit_ink, clutter_ink = cluttered_mnist.render_canvas(images[7], images, spec, rng)
    canvas = canvas[..., 0]
    assert canvas.shape == (64, 64)
    hits = locate(np.round(canvas * 255).astype(np.uint8), images[7])
    assert len(hits) == 1
    y, x = hits[0]
    rest = canvas.copy()
    rest[y : y + 28, x : x + 28] = 0
    assert rest.max() == 0  # nothing but the digit without clutter
    np.testing.assert_array_equal(digit_ink, canvas > 0)  # the ink map is the digit, where drawn
    assert not clutter_ink.any()
    cluttered = cluttered_mnist.render_canvas(
        images[7], images, cluttered_mnist.CanvasSpec(), np.random.default_rng(3)
    )[0][..., 0]
    as_uint8 = np.round(cluttered * 255).astype(np.uint8)
    assert locate(as_uint8, images[7], exact=False)  # the digit is still there, under clutter
    assert (as_uint8 > 0).sum() > (images[7] > 0).sum()  # plus clutter pixels


def test_test_split_ink_maps_locate_the_digit_and_the_clutter():
    spec = cluttered_mnist.CanvasSpec(size=48, num_clutter=3, fragment_size=6)
    test = cluttered_mnist.test_set(spec, 1)
    images, _ = cluttered_mnist.split_digits("test")
    for i in (0, 17, 999):
        canvas = np.round(test["image"][i, ..., 0] * 255).astype(np.uint8)
        digit_ink, clutter_ink = test["digit_ink"][i], test["clutter_ink"][i]
        assert (canvas > 0).tolist() == (digit_ink | clutter_ink).tolist()  # every inked pixel is one of the two
        rows, cols = np.nonzero(digit_ink)
        y, x = rows.min(), cols.min()
        glyph = images[i][(images[i] > 0).any(1)][:, (images[i] > 0).any(0)]
        h, w = glyph.shape
        np.testing.assert_array_equal(digit_ink[y : y + h, x : x + w], glyph > 0)  # the digit's shape
        assert digit_ink.sum() == (images[i] > 0).sum()
        assert clutter_ink.sum() > 0 and clutter_ink.sum() <= 3 * 6 * 6
    batch = next(
        data.eval_batches(data_config(image_size=48, num_clutter=3, fragment_size=6, test_copies=1), 8, ink=True)
    )
    np.testing.assert_array_equal(batch["digit_ink"], test["digit_ink"][:8])
    assert "digit_ink" not in next(data.eval_batches(data_config(image_size=48), 8))


def test_training_canvases_are_redrawn_each_epoch_and_reproducible():
    config = data_config(image_size=48)
    batch = 100
    steps_per_epoch = 4000 // batch
    it = data.train_iterator(config, batch, seed=11)
    epoch = [next(it) for _ in range(steps_per_epoch)]
    labels = np.concatenate([b["label"] for b in epoch])
    assert np.bincount(labels).tolist() == [400] * 10  # each training digit once per epoch
    second = next(it)
    assert not any(np.array_equal(second["image"][0], b["image"][i]) for b in epoch for i in range(batch))
    again = data.train_iterator(config, batch, seed=11)
    np.testing.assert_array_equal(next(again)["image"], epoch[0]["image"])
    other_seed = next(data.train_iterator(config, batch, seed=12))
    assert not np.array_equal(other_seed["image"], epoch[0]["image"])
    assert epoch[0]["image"].dtype == np.float32 and epoch[0]["image"].shape == (batch, 48, 48, 1)
    assert 0.0 <= epoch[0]["image"].min() and epoch[0]["image"].max() <= 1.0


def test_iterator_state_resumes_and_processes_split_the_global_batch():
    config = data_config(image_size=32)
    it = data.train_iterator(config, 8, seed=0)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = data.train_iterator(config, 8, seed=0)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    halves = [data.train_iterator(config, 8, 0, process, 2) for process in range(2)]
    for _ in range(4):
        parts = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), expected[0]["image"])
    with pytest.raises(ValueError, match="not divisible"):
        data.train_iterator(config, 9, 0, 0, 2)


def test_test_split_is_fixed_and_eval_batches_pad():
    config = data_config(image_size=32, test_copies=1)
    info = data.dataset_info(config)
    assert info.num_eval == 1000 and info.image_shape == (32, 32, 1) and info.num_classes == 10
    first = list(data.eval_batches(config, 300))
    assert [len(b["label"]) for b in first] == [300] * 4
    assert sum(b["weight"].sum() for b in first) == 1000
    assert first[-1]["weight"][100:].sum() == 0
    second = list(data.eval_batches(config, 300))
    np.testing.assert_array_equal(first[1]["image"], second[1]["image"])
    _, test_y = cluttered_mnist.split_digits("test")
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in first])[:1000], test_y)
    halves = [list(data.eval_batches(config, 300, p, 2)) for p in range(2)]
    joined = np.concatenate([np.concatenate([a["image"], b["image"]]) for a, b in zip(*halves)])
    np.testing.assert_array_equal(joined, np.concatenate([b["image"] for b in first]))


def test_canvas_spec_rejects_impossible_values():
    with pytest.raises(ValueError, match="image_size"):
        data.dataset_info(data_config(image_size=20))
    with pytest.raises(ValueError, match="fragment_size"):
        data.dataset_info(data_config(fragment_size=40))


# --- tfds through grain, on mock data (nothing downloads) -------------------------------


def test_crop_boxes_and_resize_against_references():
    rng = np.random.default_rng(0)
    for _ in range(50):
        left, top, right, bottom = tfds_source.random_resized_crop_box(90, 120, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 90
        assert 0.08 * 90 * 120 * 0.9 <= w * h <= 90 * 120
    assert tfds_source.centre_crop_box(256, 512) == (144, 16, 368, 240)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    box = (5, 7, 21, 23)  # a 16 x 16 crop resized to 16: exactly the crop
    np.testing.assert_array_equal(tfds_source.crop_and_resize(image, box, 16), image[7:23, 5:21])
    gray = rng.integers(0, 256, (40, 30, 1), dtype=np.uint8)
    np.testing.assert_array_equal(tfds_source.crop_and_resize(gray, box, 16), gray[7:23, 5:21])


def test_tfds_pipeline_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    config = data_config(name="cifar10", image_size=24, eval_split="test", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=24):
        info = data.dataset_info(config)
        assert info.num_classes == 10 and info.image_shape == (24, 24, 3) and info.num_train == 24
        it = data.train_iterator(config, 8, seed=1)
        batch = next(it)
        assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
        state = it.get_state()
        want = next(it)
        resumed = data.train_iterator(config, 8, seed=1)
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["image"], want["image"])
        halves = [next(data.train_iterator(config, 8, 1, p, 2)) for p in range(2)]
        np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), batch["image"])
        # Eval: centre crop of the source image, normalized with the ImageNet statistics.
        source = tfds_source.open_source("cifar10", "test", str(tmp_path))
        raw = np.asarray(source[0]["image"])
        first = next(data.eval_batches(config, 8))
        box = tfds_source.centre_crop_box(*raw.shape[:2])
        expected = tfds_source.crop_and_resize(raw, box, 24).astype(np.float32) / 255.0
        expected = (expected - np.float32(tfds_source.IMAGENET_MEAN)) / np.float32(tfds_source.IMAGENET_STD)
        np.testing.assert_allclose(first["image"][0], expected, rtol=1e-6, atol=1e-6)
    assert os.listdir(tmp_path) == []  # mock data: nothing written, nothing downloaded


def test_missing_tfds_dataset_is_a_clear_error_without_download(tmp_path):
    config = data_config(name="mnist", data_dir=str(tmp_path), image_size=28)
    with pytest.raises(FileNotFoundError, match=r"(?s)'mnist'.*Prepare it first"):
        data.dataset_info(config)
    assert not any(files for _, _, files in os.walk(tmp_path))
