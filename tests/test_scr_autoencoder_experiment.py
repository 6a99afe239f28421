"""``python -m experiments scr-autoencoder --quick`` end to end, and the autoencoder's saddle."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _experiment_runs import assert_is_figure
from _experiment_runs import assert_resume_recomputes_only
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import shared_quick_run
from flax import nnx
from jax.flatten_util import ravel_pytree

from experiments import _runner
from experiments import _training
from experiments import data
from experiments import models
from experiments import scr_autoencoder


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("scr-autoencoder", tmp_path_factory)


@pytest.fixture(scope="session", name="run")
def _run(quick_run) -> tuple[scr_autoencoder.Config, dict[str, dict], list[dict]]:
  saved = json.loads((quick_run / "config.json").read_text())["config"]
  config = _runner.config_from_dict(scr_autoencoder.Config, saved)
  records = [r for r in read_metrics(quick_run) if "seed" in r]
  return config, closing_records(read_metrics(quick_run)), records


def _pixel_variance(images: np.ndarray) -> float:
  return float(np.sum(np.var(images.reshape(len(images), -1).astype(np.float64), axis=0)))


def test_every_unit_value_and_seed_logs_the_same_budgets(run):
  config, units, records = run
  assert sorted(units) == sorted(scr_autoencoder.unit_names(config))
  num_logs = config.steps // config.log_every + 1
  budgets = np.arange(num_logs) * config.log_every
  for unit, closing in units.items():
    method = closing["method"]
    rows = [r for r in records if r["unit"] == unit]
    values = [scr_autoencoder.json_value(v) for v in scr_autoencoder.grid(config, method)]
    assert sorted((r["hyperparameter"], r["seed"]) for r in rows) == sorted(
      (value, seed) for value in values for seed in range(config.seeds)
    )
    for r in rows:
      assert len(r["loss"]) == len(r["oracle_calls"]) == num_logs
      # On digits the gradient never reaches SCR's Cauchy threshold l^2 / rho = 90, so every SCR
      # step takes the subsolver's 9 products besides its gradient, and every scr-cauchy step
      # one product (its Cauchy step or one subsolver step): the budget is spent exactly.
      np.testing.assert_array_equal(r["oracle_calls"], budgets)
    assert closing["seconds_per_call"] > 0


def test_the_saddle_start_reconstructs_the_mean_image_and_the_standard_one_does_not(run):
  config, _, records = run
  variance = _pixel_variance(scr_autoencoder.load_dataset(config).x_train)
  for r in records:
    if r["unit"].startswith("saddle/"):
      assert r["loss"][0] == pytest.approx(variance, rel=1e-5)
      assert r["gradient_norm"][0] < 1e-5
    else:
      assert r["loss"][0] > 1.2 * variance


def _tuned(records, unit):
  best = scr_autoencoder.best_hyperparameter([r for r in records if r["unit"] == unit])
  return [r for r in records if r["unit"] == unit and r["hyperparameter"] == best]


def test_adagrad_and_sgd_leave_the_saddle_within_the_quick_budget(run):
  config, _, records = run
  first_level = scr_autoencoder.levels(config)[0]
  for method in ("sgd", "adagrad"):
    tuned = _tuned(records, scr_autoencoder.unit_name("saddle", method))
    assert scr_autoencoder.median_calls(tuned, first_level) <= config.steps


@pytest.mark.parametrize("method", scr_autoencoder.SCR_METHODS)
def test_tuned_scr_stays_finite_and_descends_from_the_standard_start(run, method):
  config, _, records = run
  variance = _pixel_variance(scr_autoencoder.load_dataset(config).x_train)
  for start in config.starts:
    for r in _tuned(records, scr_autoencoder.unit_name(start, method)):
      assert np.all(np.isfinite(r["loss"]))
      if start == "standard":
        # From about 3 times the variance down to the mean image's plateau.
        assert r["loss"][-1] < min(r["loss"][0] / 2, 1.05 * variance)


def test_scr_cauchy_passes_below_the_mean_image_from_the_standard_start(run):
  # Its Cauchy steps, an exact line search along positive curvature, stay stable where the
  # gradient-descent subsolver at the grid's eta_s is too short to leave the plateau.
  config, _, records = run
  first_level = scr_autoencoder.levels(config)[0]
  tuned = _tuned(records, scr_autoencoder.unit_name("standard", "scr-cauchy"))
  assert scr_autoencoder.median_calls(tuned, first_level) <= config.steps


def test_summary_and_figure(quick_run, run):
  config, _, _ = run
  text = (quick_run / "summary.md").read_text()
  for unit in scr_autoencoder.unit_names(config):
    assert f"| {unit} |" in text
  for pair in ("sgd / scr:", "adagrad / scr:", "sgd / scr-cauchy:", "adagrad / scr-cauchy:"):
    assert pair in text
  (timing,) = [line for line in text.splitlines() if line.startswith(scr_autoencoder.TIMING_LINE)]
  assert all(unit in timing for unit in scr_autoencoder.unit_names(config))
  assert_is_figure(quick_run / "figures" / "loss.png", taller_than=200, wider_than=400)


def test_resume_recomputes_only_the_missing_unit(quick_run, tmp_path):
  assert_resume_recomputes_only(
    "scr-autoencoder", quick_run, tmp_path, "standard/scr", scr_autoencoder.TIMING_LINE
  )


def test_pca_levels_match_the_closed_form_and_truncated_svd():
  # Centred columns along the axes with variances 1/2 and 2 (over 4 images).
  images = np.asarray([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]) + 0.3
  assert scr_autoencoder.pca_levels(images, (0, 1, 2)) == pytest.approx([2.5, 0.5, 0.0], abs=1e-12)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(50, 12)) @ rng.normal(size=(12, 12))
  mean = images.mean(axis=0)
  _, _, vt = np.linalg.svd(images - mean, full_matrices=False)
  for k in (1, 3, 6):
    reconstruction = mean + (images - mean) @ vt[:k].T @ vt[:k]
    best_loss = np.mean(np.sum((images - reconstruction) ** 2, axis=1))
    assert scr_autoencoder.pca_levels(images, (k,))[0] == pytest.approx(best_loss, rel=1e-10)


def _small_saddle(images):
  """The flat params of a 6-4-2-4-6 autoencoder (in the images' dtype) at the mean-image saddle,
  its loss, and the unravelling of the flat params."""
  model = models.make_autoencoder(input_shape=(6,), hidden_sizes=(4, 2), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = jax.tree.map(lambda leaf: leaf.astype(images.dtype), params)
  model = models.mean_image_saddle(nnx.merge(graphdef, params), images)
  graphdef, params = nnx.split(model)
  flat, unravel = ravel_pytree(params)

  def loss(v):
    return models.reconstruction_loss(nnx.merge(graphdef, unravel(v)), images, images)

  return flat, loss, unravel


def test_the_mean_image_saddle_is_a_critical_point_with_curvature_of_both_signs():
  images = jax.random.uniform(jax.random.key(0), (40, 6), minval=0.05, maxval=0.95)
  with jax.enable_x64():
    images = images.astype(jnp.float64)
    flat, loss, _ = _small_saddle(images)
    flat = flat.astype(jnp.float64)
    assert float(loss(flat)) == pytest.approx(_pixel_variance(np.asarray(images)), rel=1e-12)
    assert float(jnp.linalg.norm(jax.grad(loss)(flat))) < 1e-12
    eigenvalues = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat)))
  assert eigenvalues[0] < -1e-3 * eigenvalues[-1] < 0


def test_pixels_whose_mean_has_no_logit_leave_only_the_clipped_gradient():
  images = np.asarray(jax.random.uniform(jax.random.key(1), (40, 6)), np.float64)
  images[:, 0] = 0.0
  images[:, 1] = 1.0
  with jax.enable_x64():
    flat, loss, unravel = _small_saddle(jnp.asarray(images))
    gradient = unravel(jax.grad(loss)(flat.astype(jnp.float64)))
  # Each clipped pixel's output sits c = MEAN_IMAGE_CLIP from its target, with slope c (1 - c).
  clip = models.MEAN_IMAGE_CLIP
  output_bias = np.asarray(gradient["layers"][3]["bias"])
  expected = 2 * clip**2 * (1 - clip)
  np.testing.assert_allclose(output_bias[:2], [expected, -expected], rtol=1e-6)
  assert np.max(np.abs(output_bias[2:])) < 1e-15
  # The last kernel's gradient is the constant last hidden activation times the bias's.
  last_kernel = np.asarray(gradient["layers"][3]["kernel"])
  assert np.max(np.abs(last_kernel[:, 2:])) < 1e-15 and np.all(last_kernel[:, 0] > 0)
  others = [
    leaf
    for leaf in jax.tree.leaves(gradient["layers"][0])
    + jax.tree.leaves({i: gradient["layers"][i] for i in (1, 2)})
  ]
  assert max(float(np.max(np.abs(np.asarray(leaf)))) for leaf in others) < 1e-15


def test_the_autoencoder_mirrors_its_encoder_and_outputs_images():
  model = models.make_autoencoder(
    input_shape=(28, 28, 1), hidden_sizes=(512, 256, 128, 32), rngs=nnx.Rngs(0)
  )
  sizes = [784, 512, 256, 128, 32, 128, 256, 512, 784]
  expected = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
  _, params = nnx.split(model)
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == expected == 1_141_296
  x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
  output = model(x)
  assert output.shape == x.shape and bool(jnp.all((output > 0) & (output < 1)))


@pytest.mark.parametrize(
  ("hidden_sizes", "message"), [((), "at least the code layer"), ((8, 0), "hidden_sizes")]
)
def test_bad_autoencoder_sizes_are_refused(hidden_sizes, message):
  with pytest.raises(ValueError, match=message):
    models.make_autoencoder(input_shape=(6,), hidden_sizes=hidden_sizes, rngs=nnx.Rngs(0))


def test_calls_to_reach_and_the_tuned_value():
  reaches = {"loss": [5.0, 4.0, 2.0, 1.0], "oracle_calls": [0, 10, 20, 30]}
  stays = {"loss": [5.0, 5.0, 5.0, 5.0], "oracle_calls": [0, 10, 20, 30]}
  assert scr_autoencoder.calls_to_reach(reaches, 3.0) == 20
  assert scr_autoencoder.calls_to_reach(stays, 3.0) == math.inf
  assert scr_autoencoder.median_calls([reaches, stays, stays], 3.0) == math.inf
  assert scr_autoencoder.median_calls([reaches, reaches, stays], 3.0) == 20
  diverged = {"hyperparameter": 1.0, "loss": [5.0, float("nan")]}
  slow = {"hyperparameter": 0.1, "loss": [5.0, 4.5]}
  fast = {"hyperparameter": 0.3, "loss": [5.0, 2.0]}
  assert scr_autoencoder.best_hyperparameter([diverged, slow, fast, diverged]) == 0.3
  assert scr_autoencoder.best_hyperparameter([diverged, slow]) == 0.1
  pairs = [{"hyperparameter": [1e-3, rho], "loss": [5.0, 5.0 - rho / 100]} for rho in (10, 100)]
  assert scr_autoencoder.best_hyperparameter(pairs) == [1e-3, 100]


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("starts", ("origin",), "unknown starts"),
    ("methods", ("adam",), "unknown methods"),
    ("dataset", "cifar10", "unknown dataset"),
    ("sgd_learning_rates", (0.1, 0.0), "sgd's learning rate grid must be positive"),
    ("scr_grid", (), r"scr's \(subsolver learning rate, rho\) grid"),
    ("scr_grid", ((1e-3, 0.0),), "grid must be positive"),
    ("scr_grid", ((1e-3,),), "pairs"),
    ("log_every", 25, "multiple of scr's 10 oracle calls"),
    ("scr_cauchy_rhos", (10.0, -1.0), "scr-cauchy's rho grid must be positive"),
    ("scr_cauchy_smoothness", 0.0, "scr_cauchy_smoothness must be positive"),
    ("steps", 4010, "multiple of log_every"),
    ("hidden_sizes", (), "hidden_sizes"),
    ("scr_smoothness", 0.0, "scr_smoothness must be positive"),
    ("pca_components", (0, 1), r"pca_components must lie in \[1, 32\)"),
    ("pca_components", (1, 32), r"pca_components must lie in \[1, 32\)"),
    ("steps", 50, "at least twice log_every"),
  ],
)
def test_bad_configs_are_refused_before_any_unit(field, value, message):
  config = scr_autoencoder.Config(**{field: value})
  with pytest.raises(ValueError, match=message):
    scr_autoencoder.check_config(config)


def test_training_with_a_custom_loss_follows_a_hand_written_loop():
  """Full-batch SGD on the reconstruction loss through ``_training.train`` equals the plain loop,
  at every log, with ``metric`` applied to the test set and the steps timed apart."""
  images = np.asarray(jax.random.uniform(jax.random.key(2), (12, 6)), np.float32)
  dataset = data.Dataset("tiny", images, images, images[:4], images[:4], num_classes=0)

  def build(key):
    return models.make_autoencoder(input_shape=(6,), hidden_sizes=(4, 2), rngs=nnx.Rngs(key))

  result = _training.train(
    dataset,
    build,
    lambda rate, key: optax.sgd(rate),
    loss=models.reconstruction_loss,
    metric=lambda model, x, y: jnp.max(jnp.abs(model(x) - y)),
    learning_rates=[0.5],
    seeds=1,
    steps=6,
    log_every=2,
    batch_size=None,
  )
  model_key = jax.random.split(jax.random.key(0), 3)[0]
  graphdef, params = nnx.split(build(model_key))

  def loss(p, x):
    return models.reconstruction_loss(nnx.merge(graphdef, p), x, x)

  expected = []
  for step in range(7):
    if step % 2 == 0:
      expected.append(float(loss(params, images)))
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, jax.grad(loss)(params, images))
  np.testing.assert_allclose(result.loss[0, 0], expected, rtol=1e-5)
  model = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[0, 0], result.params))
  assert float(result.test_loss[0, 0]) == pytest.approx(
    float(models.reconstruction_loss(model, images[:4], images[:4])), rel=1e-5
  )
  assert float(result.test_metric[0, 0]) == pytest.approx(
    float(jnp.max(jnp.abs(model(images[:4]) - images[:4]))), rel=1e-5
  )
  assert 0 < result.training_seconds < result.wall[-1]


def test_the_config_with_its_pairs_survives_a_json_round_trip():
  config = scr_autoencoder.default_config()
  saved = json.loads(json.dumps(dataclasses.asdict(config)))
  assert _runner.config_from_dict(scr_autoencoder.Config, saved) == config
