"""The experiment models: shapes, parameter counts, initialisation, saddles, training."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from experiments import data
from experiments import models
from jaxsaddle import _random

NUM_CLASSES = 10
INPUT_SHAPES = {  # as the loaders return them
  "mnist": (28, 28, 1),
  "digits": (8, 8, 1),
  "mnist1d": (40, 1),
  "cifar10": (32, 32, 3),
}
WIDTH = 8
DEPTH = 4
CONFIGS = {
  "logistic": {},
  "mlp": {"width": WIDTH},
  "deep_mlp": {"width": WIDTH, "depth": DEPTH},
  "deep_linear": {"width": WIDTH, "depth": DEPTH},
  "cnn": {"width": WIDTH},
}


def parameter_count(name: str, input_shape: tuple[int, ...]) -> int:
  """Closed forms: a dense layer has fan_in * fan_out weights plus fan_out biases."""
  inputs, w, k = math.prod(input_shape), WIDTH, NUM_CLASSES
  if name == "logistic":
    return inputs * k + k
  if name == "mlp":
    return (inputs * w + w) + (w * k + k)
  if name == "deep_mlp":
    return (inputs * w + w) + (DEPTH - 2) * (w * w + w) + (w * k + k)
  if name == "deep_linear":
    return inputs * w + (DEPTH - 2) * w * w + w * k
  *spatial, channels = input_shape
  pooled = math.prod(size // 4 for size in spatial)
  kernel = 3 ** len(spatial)
  return (kernel * channels * w + w) + (kernel * w * w + w) + (pooled * w * k + k)


# Building a model compiles the random initialisation of every weight shape. With the default
# threefry keys that costs seconds of CPU per shape, with "rbg" keys a few times less, so the tests
# build with rbg keys (but for vmapping seeds); the models do not depend on the key implementation.
KEY_IMPL = "rbg"


def build(name: str, key: jax.Array | None = None, input_shape=INPUT_SHAPES["digits"], **kwargs):
  """``make_model`` with the test's config; ``name`` may be a key of ``DIGITS_MODELS``."""
  name, config = DIGITS_MODELS.get(name, (name, CONFIGS.get(name, {})))
  key = jax.random.key(0, impl=KEY_IMPL) if key is None else key
  return models.make_model(
    name,
    input_shape=input_shape,
    num_classes=NUM_CLASSES,
    rngs=nnx.Rngs(key),
    **(config | kwargs),
  )


def params_of(model) -> list[jax.Array]:
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def loss_of_params(model, x, y):
  """``(loss_fn, params)``: the loss as a function of the model's parameters, and those."""
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(params):
    return models.cross_entropy_loss(nnx.merge(graphdef, params), x, y)

  return loss_fn, params


@pytest.fixture(scope="module")
def digits():
  return data.load_digits()


DIGITS_MODELS = {name: (name, config) for name, config in CONFIGS.items()}
DIGITS_MODELS |= {f"deep_linear_{d}": ("deep_linear", {"width": 3, "depth": d}) for d in (2, 3)}
INITS = {"standard": (0, 1.0), "small": (0, 1e-3), "zero": (0, 0.0)}


@pytest.fixture(scope="module")
def digits_models():
  """``digits_models[init][name]``: every model of ``DIGITS_MODELS`` at every one of ``INITS``.

  One jitted function builds them all, so the initialisation compiles once.
  """

  @jax.jit
  def init_all(seed, init_scale):
    key = jax.random.key(seed, impl=KEY_IMPL)
    return {name: nnx.split(build(name, key, init_scale=init_scale)) for name in DIGITS_MODELS}

  built = {init: init_all(seed, scale) for init, (seed, scale) in INITS.items()}
  return {
    init: {name: nnx.merge(*split) for name, split in splits.items()}
    for init, splits in built.items()
  }


@pytest.fixture(scope="module")
def standard_models(digits_models):
  return digits_models["standard"]


@pytest.mark.parametrize("dataset", INPUT_SHAPES)
@pytest.mark.parametrize("name", models.MODELS)
def test_output_shape_and_parameter_count(name, dataset):
  input_shape = INPUT_SHAPES[dataset]
  model = nnx.eval_shape(lambda: build(name, input_shape=input_shape))
  batch = jax.ShapeDtypeStruct((5, *input_shape), jnp.float32)
  logits = nnx.eval_shape(lambda model, x: model(x), model, batch)
  assert logits.shape == (5, NUM_CLASSES) and logits.dtype == jnp.float32
  assert _random.tree_size(nnx.state(model, nnx.Param)) == parameter_count(name, input_shape)


def test_forward_passes_equal_their_definitions(digits):
  # Written out independently: dense layers with tanh between them (relu when asked), and the
  # CNN's two SAME 3x3 convolutions, each followed by the activation and a 2x2 average pool.
  x = np.asarray(digits.x_test[:4], np.float64)
  flat = x.reshape(4, -1)
  for activation, function in (("tanh", np.tanh), ("relu", lambda z: np.maximum(z, 0))):
    mlp = build("mlp", activation=activation)
    expected = flat
    for i, layer in enumerate(mlp.layers):
      expected = expected @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
      if i < len(mlp.layers) - 1:
        expected = function(expected)
    np.testing.assert_allclose(mlp(jnp.asarray(x, jnp.float32)), expected, rtol=1e-4, atol=1e-5)

  cnn = build("cnn")
  hidden = x
  for conv in (cnn.conv1, cnn.conv2):
    hidden = jax.lax.conv_general_dilated(
      jnp.asarray(hidden, jnp.float32),
      conv.kernel[...],
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision="highest",
    )
    hidden = np.tanh(np.asarray(hidden, np.float64) + np.asarray(conv.bias[...]))
    n, height, width, channels = hidden.shape
    hidden = hidden[:, : height // 2 * 2, : width // 2 * 2]
    hidden = hidden.reshape(n, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
  expected = hidden.reshape(4, -1) @ np.asarray(cnn.dense.kernel[...]) + np.asarray(
    cnn.dense.bias[...]
  )
  np.testing.assert_allclose(cnn(jnp.asarray(x, jnp.float32)), expected, rtol=1e-4, atol=1e-5)


def test_models_take_extra_batch_axes(standard_models, digits):
  x = jnp.asarray(digits.x_test[:6])
  for name in ("mlp", "cnn"):  # the two forward passes
    logits, nested = jax.jit(lambda model, x: (model(x), model(x.reshape(2, 3, 8, 8, 1))))(
      standard_models[name], x
    )
    assert logits.shape == (6, NUM_CLASSES), name
    np.testing.assert_allclose(nested, logits.reshape(2, 3, NUM_CLASSES), rtol=1e-5, atol=1e-6)


def test_deep_linear_network_is_linear_without_biases(standard_models, digits):
  model = standard_models["deep_linear"]
  x = jnp.asarray(digits.x_test[:4])
  end_to_end = functools.reduce(jnp.matmul, params_of(model))  # 64 x 10
  np.testing.assert_allclose(model(x), x.reshape(4, -1) @ end_to_end, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["small", "zero"])
def test_init_scale_multiplies_every_parameter(digits_models, init):
  _, init_scale = INITS[init]
  for name in DIGITS_MODELS:
    standard, scaled = (
      params_of(digits_models["standard"][name]),
      params_of(digits_models[init][name]),
    )
    assert len(standard) == len(scaled)
    for reference, leaf in zip(standard, scaled, strict=True):
      np.testing.assert_allclose(
        leaf, np.float32(init_scale) * np.asarray(reference), rtol=1e-6, atol=0
      )


def test_standard_initialisation_is_lecun_normal(standard_models):
  # The standard initialisation is flax's LeCun normal: kernel variance 1 / fan-in, biases zero.
  first_kernel = standard_models["mlp"].layers[0].kernel[...]
  assert abs(float(jnp.std(first_kernel)) * math.sqrt(64) - 1) < 0.15
  np.testing.assert_array_equal(standard_models["mlp"].layers[0].bias[...], 0.0)


def test_seeds_and_init_scales_vmap():
  # With the default threefry keys, as in the experiments: each seed in a vmapped batch draws
  # what it draws alone (with rbg keys it would not), so seeds 0 and 0 * 1e-3 are proportional.
  def init(seed, init_scale):
    model = build("logistic", jax.random.key(seed), init_scale=init_scale)
    return nnx.state(model, nnx.Param)

  params = jax.jit(jax.vmap(init))(jnp.array([0, 1, 0]), jnp.array([1.0, 1.0, 1e-3]))
  kernels = params["layers"][0]["kernel"][...]
  assert kernels.shape == (3, 64, NUM_CLASSES)
  assert not np.allclose(kernels[0], kernels[1])
  np.testing.assert_allclose(kernels[2], np.float32(1e-3) * kernels[0], rtol=1e-6)
  assert abs(float(jnp.std(kernels[:2])) * math.sqrt(64) - 1) < 0.1


@pytest.mark.parametrize(
  "name, kwargs, message",
  [
    ("resnet", {}, "unknown model 'resnet'"),
    ("mlp", {"width": None}, "mlp needs width"),
    ("mlp", {"depth": 3}, "mlp has no depth"),
    ("logistic", {"width": 8}, "logistic has no width"),
    ("deep_linear", {"activation": "relu"}, "deep_linear has no activation"),
    ("deep_mlp", {"depth": 2}, "deep_mlp needs depth >= 3, got 2"),
    ("deep_linear", {"depth": 1}, "deep_linear needs depth >= 2"),
    ("deep_linear", {"depth": None}, "deep_linear needs depth"),
    ("deep_mlp", {"depth": 3.5}, "depth must be an integer"),
    ("mlp", {"input_shape": (8, 0)}, "input_shape must be positive integers"),
    ("mlp", {"width": 0}, "width must be an integer"),
    ("mlp", {"activation": "sigmoid"}, "unknown activation 'sigmoid'"),
    ("mlp", {"init_scale": -1.0}, "init_scale must be non-negative"),
    ("cnn", {"input_shape": (784,)}, r"got input_shape \(784,\)"),
    ("cnn", {"input_shape": (2, 2, 1)}, "spatial axes of at least 4"),
    ("cnn", {"batch_norm": True}, "cnn has no batch_norm"),
    ("deep_linear", {"batch_norm": True}, "deep_linear has no batch_norm"),
  ],
)
def test_make_model_rejects_bad_arguments(name, kwargs, message):
  config = {"input_shape": INPUT_SHAPES["digits"], "num_classes": NUM_CLASSES}
  config |= CONFIGS.get(name, {}) | kwargs
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(lambda: models.make_model(name, rngs=nnx.Rngs(0), **config))


@pytest.mark.parametrize("name", ["mlp", "deep_mlp"])
def test_batch_norm_normalises_every_hidden_layer_by_the_batch_statistics(name, digits):
  model = build(name, batch_norm=True)
  params = nnx.state(model, nnx.Param)
  widths = [WIDTH] * (1 if name == "mlp" else DEPTH - 1)
  assert [norm.scale.shape[0] for norm in model.norms] == widths
  # Two parameters per hidden unit on top of the plain model's.
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == parameter_count(
    name, INPUT_SHAPES["digits"]
  ) + 2 * sum(widths)
  x = jnp.asarray(digits.x_train[:64])
  # By hand: each hidden layer's pre-activations standardised over the batch (flax's epsilon),
  # then scaled by 1 and shifted by 0 as initialised.
  hidden = x.reshape(64, -1)
  for layer in model.layers[:-1]:
    pre = layer(hidden)
    standardised = (pre - pre.mean(0)) / jnp.sqrt(pre.var(0) + 1e-5)
    hidden = jnp.tanh(standardised)
  np.testing.assert_allclose(model(x), model.layers[-1](hidden), rtol=1e-5, atol=1e-5)
  # The statistics are the batch's, never running averages: scaling the first layer's
  # pre-activations leaves the logits unchanged, and a sub-batch is normalised by its own.
  first = model.layers[0]
  first.kernel[...], first.bias[...] = 3 * first.kernel[...], 3 * first.bias[...]
  np.testing.assert_allclose(model(x), model.layers[-1](hidden), rtol=1e-3, atol=1e-3)
  assert not np.allclose(model(x[:8]), model(x)[:8], atol=1e-3)


def test_model_rejects_wrong_input_shape(standard_models):
  with pytest.raises(ValueError, match=r"examples of shape \(8, 8, 1\), got shape \(2, 8, 8\)"):
    standard_models["cnn"](jnp.zeros((2, 8, 8)))
  with pytest.raises(ValueError, match=r"got shape \(8, 8, 1\)"):  # one example, no batch axis
    standard_models["mlp"](jnp.zeros((8, 8, 1)))


def test_loss_and_accuracy_closed_forms(standard_models, digits):
  x, y = digits.x_test, digits.y_test

  @jax.jit
  def evaluate(model):
    return model(x), models.cross_entropy_loss(model, x, y), models.accuracy(model, x, y)

  logits, loss, accuracy = evaluate(standard_models["mlp"])
  logits = np.asarray(logits, np.float64)
  log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  np.testing.assert_allclose(loss, -log_probabilities[np.arange(len(y)), y].mean(), rtol=1e-5)
  np.testing.assert_allclose(accuracy, np.mean(logits.argmax(axis=1) == y))
  assert 0 < accuracy < 1


@pytest.mark.parametrize("name", ["mlp", "deep_mlp", "cnn"])
def test_origin_gradient_is_the_class_imbalance(digits_models, digits, name):
  """At zero weights the only gradient is the output bias's: 1 / num_classes - class frequency."""
  model = digits_models["zero"][name]
  np.testing.assert_array_equal(ravel_pytree(params_of(model))[0], 0.0)
  loss_fn, params = loss_of_params(model, digits.x_train, digits.y_train)
  grads = nnx.to_flat_state(jax.jit(jax.grad(loss_fn))(params))
  output_bias_path = (
    ("dense", "bias") if name == "cnn" else ("layers", len(model.layers) - 1, "bias")
  )
  output_bias = None
  for path, leaf in grads:
    if path == output_bias_path:
      output_bias = leaf[...]
    else:
      np.testing.assert_array_equal(leaf[...], 0.0, err_msg=str(path))
  frequencies = np.bincount(digits.y_train) / len(digits.y_train)
  np.testing.assert_allclose(output_bias, 1 / NUM_CLASSES - frequencies, atol=1e-6)
  assert np.abs(output_bias).max() > 1e-3


def end_to_end_gradient(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """G = d loss / d M at M = 0 for logits x M: mean of x_n (softmax(0) - e_{y_n})^T."""
  residuals = np.full((len(y), NUM_CLASSES), 1 / NUM_CLASSES) - np.eye(NUM_CLASSES)[y]
  return x.reshape(len(x), -1).T.astype(np.float64) @ residuals / len(y)


@pytest.mark.parametrize("depth", [2, 3])
def test_deep_linear_origin_is_a_saddle(digits_models, digits, depth):
  model = digits_models["zero"][f"deep_linear_{depth}"]
  width = DIGITS_MODELS[f"deep_linear_{depth}"][1]["width"]
  x, y = digits.x_train[:200], digits.y_train[:200]
  graphdef, params = nnx.split(model, nnx.Param)
  flat, unravel = ravel_pytree(params)
  np.testing.assert_array_equal(flat, 0.0)

  def flat_loss(flat_params):
    return models.cross_entropy_loss(nnx.merge(graphdef, unravel(flat_params)), x, y)

  # Not a minimum either way: along W_1 ... W_D = -t^D u v^T, with (u, v) the top singular pair
  # of G, the loss falls by t^D sigma_1 to first order.
  g = end_to_end_gradient(x, y)
  u, singular_values, vt = np.linalg.svd(g)
  e1 = np.eye(width)[:, :1]
  t = 0.5
  kernels = [-t * u[:, :1] @ e1.T] + [t * e1 @ e1.T] * (depth - 2) + [t * e1 @ vt[:1]]
  end_to_end = functools.reduce(np.matmul, kernels)
  np.testing.assert_allclose(end_to_end, -(t**depth) * u[:, :1] @ vt[:1], atol=1e-12)
  descent_point = ravel_pytree(jax.tree.unflatten(jax.tree.structure(params), kernels))[0]

  @jax.jit
  def evaluate(flat_params):
    value, gradient = jax.value_and_grad(flat_loss)(flat_params)
    return value, gradient, jax.hessian(flat_loss)(flat_params), flat_loss(descent_point)

  loss, gradient, hessian, lower = evaluate(flat)
  np.testing.assert_allclose(loss, math.log(NUM_CLASSES), rtol=1e-6)
  np.testing.assert_array_equal(gradient, 0.0)
  eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
  assert singular_values[0] > 1e-2  # the loss is not flat to first order in the product
  if depth == 2:
    # Per hidden unit h the quadratic term is w2_h^T G^T w1_h: eigenvalues +-sigma_i(G), rest 0.
    per_unit = np.concatenate([singular_values, -singular_values])
    per_unit = np.concatenate([per_unit, np.zeros(x[0].size + NUM_CLASSES - len(per_unit))])
    expected = np.sort(np.tile(per_unit, width))
    np.testing.assert_allclose(eigenvalues, expected, atol=1e-5)
    assert eigenvalues[0] < -1e-2  # strict saddle
  else:
    np.testing.assert_allclose(eigenvalues, 0.0, atol=1e-6)  # degenerate
  assert lower < loss - 0.8 * t**depth * singular_values[0]


@pytest.mark.parametrize("name", models.MODELS)
def test_sgd_on_digits_reduces_the_loss(standard_models, digits, name):
  x, y = jnp.asarray(digits.x_train[:512]), jnp.asarray(digits.y_train[:512])
  loss_fn, params = loss_of_params(standard_models[name], x, y)
  tx = optax.sgd(0.2, momentum=0.9)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), length=15)
    return losses, loss_fn(params)

  losses, final_loss = train(params)
  assert np.all(np.isfinite(losses))
  assert final_loss < losses[0] - 0.1, (losses, final_loss)
