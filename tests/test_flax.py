"""jaxsaddle under flax.nnx.Optimizer, and the README example."""

import pathlib
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsaddle
import jaxsaddle.flax

README = pathlib.Path(__file__).parents[1] / "README.md"


def _readme_example() -> str:
  text = README.read_text()
  block = re.search(
    r"<!-- readme-example:start -->\s*```python\n(.*?)```\s*<!-- readme-example:end -->",
    text,
    re.DOTALL,
  )
  assert block is not None, "README.md lost its marked example"
  return block.group(1)


def test_readme_example_runs_and_trains():
  namespace: dict = {}
  exec(compile(_readme_example(), "README.md", "exec"), namespace)
  assert float(namespace["loss"]) < 0.06
  assert int(optax.tree.get(namespace["state"], "count")) == 1000


def _regression_data():
  x = jax.random.normal(jax.random.key(0), (128, 3))
  return x, jnp.tanh(x @ jnp.array([[1.0], [-2.0], [0.5]]))


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(3, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


@pytest.mark.parametrize(
  "tx",
  [
    # A threshold the training passes: PGD perturbs (5 times) under nnx.Optimizer too.
    jaxsaddle.pgd(0.1, perturbation_radius=1e-2, gradient_threshold=3e-2, escape_steps=50, key=0),
    jaxsaddle.noisy_gd(0.1, noise_scale=1e-2, key=0),
    jaxsaddle.perturbed_sgd(0.1, noise_scale=1e-2, key=0),
    jaxsaddle.perturb_near_saddle(
      optax.adam(1e-2),
      perturbation_radius=1e-2,
      gradient_threshold=1e-2,
      escape_steps=50,
      escape_threshold=1e-4,
      key=0,
    ),
  ],
  ids=["pgd", "noisy_gd", "perturbed_sgd", "perturbed_adam"],
)
def test_nnx_optimizer_trains_an_mlp(tx):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _regression_data()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads, value=loss)
    return loss

  first = float(train_step(model, optimizer))
  for _ in range(400):
    last = float(train_step(model, optimizer))
  assert last < 0.05 * first
  # The optimizer's key lives in the nnx state and advanced with the noise draws: at every step
  # for the noisy methods, at each perturbation for the others.
  state = nnx.as_pure(optimizer.opt_state)
  ((_, key),) = optax.tree.get_all_with_path(state, "rng_key")
  ((_, initial),) = optax.tree.get_all_with_path(tx.init(nnx.state(model, nnx.Param)), "rng_key")
  drew_noise = int(optax.tree.get(state, "num_perturbations", default=1)) > 0
  advanced = not np.array_equal(jax.random.key_data(key), jax.random.key_data(initial))
  assert drew_noise and advanced


def _mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def test_make_value_fn_evaluates_the_loss_and_its_curvature_on_nnx_state():
  model = MLP(nnx.Rngs(1))
  x, y = _regression_data()
  value_fn = jaxsaddle.flax.make_value_fn(model, _mse, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(value_fn(params), _mse(model, x, y), rtol=1e-6)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  tangent = jax.random.normal(jax.random.key(2), flat.shape)
  dense = jax.hessian(lambda v: value_fn(unravel(v)))(flat) @ tangent
  _, product = jax.jvp(jax.grad(value_fn), (params,), (unravel(tangent),))
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(product)[0], dense, rtol=1e-4, atol=1e-5)
  # It is a function of the params it is given: at moved params it is the moved model's loss
  # (a value_fn that ignored its argument passed the checks above, whose Hessian was 0 = 0).
  moved = unravel(flat + 0.1 * jax.random.normal(jax.random.key(3), flat.shape))
  clone = nnx.clone(model)
  nnx.update(clone, moved)
  np.testing.assert_allclose(value_fn(moved), _mse(clone, x, y), rtol=1e-6)
  assert abs(float(value_fn(moved) - value_fn(params))) > 1e-3
  assert float(jnp.linalg.norm(dense)) > 1e-3


class NormalizedDropoutMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(3, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.dropout(self.norm(self.hidden(x)))))


def test_make_value_fn_leaves_batch_norm_and_dropout_state_alone():
  model = NormalizedDropoutMLP(nnx.Rngs(4))
  x, y = _regression_data()
  key_data = lambda leaf: (  # noqa: E731
    jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
  )
  before = jax.tree.map(key_data, nnx.as_pure(nnx.state(model)))
  value_fn = jaxsaddle.flax.make_value_fn(model, _mse, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  # One deterministic function of the params: the same dropout mask and batch statistics at
  # every evaluation, eagerly, under jit and inside a Hessian-vector product.
  value = float(value_fn(params))
  assert float(value_fn(params)) == value
  np.testing.assert_allclose(jax.jit(value_fn)(params), value, rtol=1e-6)
  # The product is the curvature of this function of the params: a central difference of its
  # gradients agrees (a value_fn that froze the params would give zero against nonzero).
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  tangent = jax.random.normal(jax.random.key(5), flat.shape) / np.sqrt(flat.size)
  product = jax.flatten_util.ravel_pytree(jaxsaddle.hvp(value_fn, params, unravel(tangent)))[0]
  gradient = jax.jit(lambda v: jax.flatten_util.ravel_pytree(jax.grad(value_fn)(unravel(v)))[0])
  step = 1e-2
  difference = (gradient(flat + step * tangent) - gradient(flat - step * tangent)) / (2 * step)
  assert float(jnp.linalg.norm(product)) > 1e-2
  np.testing.assert_allclose(product, difference, rtol=0, atol=2e-2 * float(jnp.abs(product).max()))
  # The model's running statistics and rng counts are those it had.
  after = jax.tree.map(key_data, nnx.as_pure(nnx.state(model)))
  jax.tree.map(np.testing.assert_array_equal, after, before)

  tx = jaxsaddle.negative_curvature_descent(
    0.1, hessian_lipschitz=1.0, epsilon=1e-2, num_lanczos_steps=3
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    value_fn = jaxsaddle.flax.make_value_fn(model, _mse, x, y)
    loss, grads = nnx.value_and_grad(_mse)(model, x, y)
    optimizer.update(model, grads, value_fn=value_fn)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(20)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize(
  "make_tx",
  [
    lambda: jaxsaddle.negative_curvature_descent(
      0.1, hessian_lipschitz=1.0, epsilon=1e-2, num_lanczos_steps=3
    ),
    lambda: jaxsaddle.saddle_free_newton(0.1, num_lanczos_steps=3, damping=1e-3),
    lambda: jaxsaddle.monitor_curvature(every=1, num_lanczos_steps=3, key=0),
  ],
  ids=["ncd", "sfn", "monitor"],
)
def test_nnx_optimizer_without_value_fn_says_how_to_pass_it_and_keeps_the_model(make_tx):
  model = MLP(nnx.Rngs(4))
  x, y = _regression_data()
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.grad(_mse)(model, x, y)
  message = re.escape("optimizer.update(model, grads, value_fn=jaxsaddle.flax.make_value_fn(")
  with pytest.raises(ValueError, match=message):
    optimizer.update(model, grads)
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(nnx.state(model, nnx.Param)), before)
  assert int(optimizer.step[...]) == 0


def test_value_fn_built_before_the_gradient_is_the_differentiated_loss():
  # nnx.value_and_grad advances dropout's rng counts: a value_fn built after it draws other
  # masks, so its loss and gradient are not those the optimizer was given.
  model = NormalizedDropoutMLP(nnx.Rngs(6))
  x, y = _regression_data()

  @nnx.jit(static_argnums=1)
  def losses_and_gradients(model, build_first):
    if build_first:
      value_fn = jaxsaddle.flax.make_value_fn(model, _mse, x, y)
    loss, grads = nnx.value_and_grad(_mse)(model, x, y)
    if not build_first:
      value_fn = jaxsaddle.flax.make_value_fn(model, _mse, x, y)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    value, gradient = jax.value_and_grad(value_fn)(params)
    return loss, nnx.as_pure(grads), value, gradient

  loss, grads, value, gradient = losses_and_gradients(model, True)
  np.testing.assert_allclose(value, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), gradient, grads)
  loss, _, value, _ = losses_and_gradients(model, False)
  assert abs(float(value) - float(loss)) > 1e-4


def test_make_value_fn_names_a_wrt_unlike_the_optimizer_s():
  model = MLP(nnx.Rngs(3))
  x, y = _regression_data()
  only_output = nnx.All(nnx.Param, nnx.PathContains("out"))
  params = nnx.as_pure(nnx.state(model, only_output))
  with pytest.raises(ValueError, match="pass make_value_fn the same wrt as nnx.Optimizer"):
    jaxsaddle.flax.make_value_fn(model, _mse, x, y)(params)
  value = jaxsaddle.flax.make_value_fn(model, _mse, x, y, wrt=only_output)(params)
  np.testing.assert_allclose(value, _mse(model, x, y), rtol=1e-6)

  # Two layers of the same shapes: the state of one merged into the other without error and gave
  # the loss of another model, eagerly.
  class Twin(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(3, 3, use_bias=False, rngs=rngs)
      self.b = nnx.Linear(3, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.b(self.a(x))

  twin = Twin(nnx.Rngs(4))
  inputs = jnp.ones((2, 3))
  first, second = (nnx.All(nnx.Param, nnx.PathContains(name)) for name in ("a", "b"))
  loss = lambda model, x: jnp.sum(model(x) ** 2)
  # Any tree of the selected variables' paths fits: a pure dict as well as a State.
  whole = jaxsaddle.flax.make_value_fn(twin, loss, inputs)
  np.testing.assert_allclose(
    whole(nnx.to_pure_dict(nnx.state(twin, nnx.Param))), loss(twin, inputs)
  )
  with pytest.raises(ValueError, match=r"not selected: \['a/kernel'\].*same wrt"):
    jaxsaddle.flax.make_value_fn(twin, loss, inputs, wrt=second)(
      nnx.as_pure(nnx.state(twin, first))
    )


def test_make_value_fn_refuses_an_nnx_rngs_in_the_batch_and_takes_a_key_drawn_from_it():
  # Its counts advanced at every evaluation (two calls gave different losses), and a transform's
  # trace failed mutating them.
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=1)
  inputs = jnp.ones((3, 2))

  def loss(model, x, randomness):
    key = randomness.dropout() if isinstance(randomness, nnx.Rngs) else randomness
    mask = jax.random.bernoulli(key, 0.5, x.shape)
    return jnp.mean(model(x * mask) ** 2)

  with pytest.raises(ValueError, match=r"a Rngs at batch\[1\].*rngs.dropout\(\)"):
    jaxsaddle.flax.make_value_fn(model, loss, inputs, {"rngs": rngs})
  value_fn = jaxsaddle.flax.make_value_fn(model, loss, inputs, rngs.dropout())
  params = nnx.state(model, nnx.Param)
  assert float(value_fn(params)) == float(value_fn(params))
  # nnx objects without rng state are read, not advanced: a frozen teacher, a Variable.
  teacher = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
  distill = lambda model, x, teacher, scale: jnp.mean((model(x) - teacher(x)) ** 2) * scale[...]
  value_fn = jaxsaddle.flax.make_value_fn(
    model, distill, inputs, teacher, nnx.Variable(jnp.asarray(2.0))
  )
  np.testing.assert_allclose(
    value_fn(params), 2 * jnp.mean((model(inputs) - teacher(inputs)) ** 2), rtol=1e-6
  )


def test_make_value_fn_drives_lbfgs_under_nnx_optimizer():
  model = MLP(nnx.Rngs(3))
  optimizer = nnx.Optimizer(model, optax.lbfgs(), wrt=nnx.Param)
  x, y = _regression_data()

  @nnx.jit
  def train_step(model, optimizer):
    value_fn = jaxsaddle.flax.make_value_fn(model, _mse, x, y)
    loss, grads = nnx.value_and_grad(_mse)(model, x, y)
    optimizer.update(model, grads, value=loss, grad=grads, value_fn=value_fn)
    return loss

  first = float(train_step(model, optimizer))
  for _ in range(30):
    last = float(train_step(model, optimizer))
  assert last < 1e-2 * first


def test_a_value_fn_of_the_model_is_refused_with_the_helper_to_use():
  # A loss of the model, handed the params' nnx.State, raised a bare "'State' object is not
  # callable" from inside the argument check.
  model = MLP(nnx.Rngs(3))
  x, y = _regression_data()
  loss_of_model = lambda m: _mse(m, x, y)  # noqa: E731
  optimizer = nnx.Optimizer(
    model,
    jaxsaddle.negative_curvature_descent(
      0.1, hessian_lipschitz=1.0, epsilon=1e-3, num_lanczos_steps=2
    ),
    wrt=nnx.Param,
  )
  grads = nnx.grad(loss_of_model)(model)
  message = "value_fn takes the params, not the model; build it with jaxsaddle.flax.make_value_fn"
  with pytest.raises(ValueError, match=message):
    optimizer.update(model, grads, value_fn=loss_of_model)
  with pytest.raises(ValueError, match=message):
    jaxsaddle.spectrum.hessian_trace(
      loss_of_model, nnx.state(model, nnx.Param), key=0, num_probes=2
    )


def test_a_model_passed_as_params_is_refused_with_the_state_to_pass():
  # The reverse slip: a module is a pytree too, so a loss of the model differentiated at the
  # model took batch-norm statistics into the Hessian and returned another spectrum; a value_fn
  # of the state, handed the model, failed inside nnx.merge ("Incorrect number of leaves").
  model = NormalizedDropoutMLP(nnx.Rngs(4))
  x, y = _regression_data()
  value_fn = jaxsaddle.flax.make_value_fn(model, _mse, x, y)
  message = r"params is an nnx.Module \(NormalizedDropoutMLP\).*nnx.state\(model, nnx.Param\)"
  calls = [
    lambda: jaxsaddle.spectrum.hessian_extreme_eigenvalues(
      lambda m: _mse(m, x, y), model, num_steps=4, key=0
    ),
    lambda: jaxsaddle.spectrum.hessian_trace(value_fn, model, key=0, num_probes=2),
    lambda: jaxsaddle.hvp(value_fn, model, model),
    lambda: value_fn(model),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=message):
      call()
  # The state itself is taken, and its Hessian is the dense one's.
  params = nnx.state(model, nnx.Param)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  dense = jnp.linalg.eigvalsh(jax.hessian(lambda v: value_fn(unravel(v)))(flat))
  top = jaxsaddle.spectrum.hessian_extreme_eigenvalues(value_fn, params, num_steps=40, key=0)
  np.testing.assert_allclose(top.eigenvalues[0], dense[-1], rtol=1e-4)


def test_an_nnx_rngs_passed_as_key_is_refused_saying_how_to_get_a_key():
  for rngs in (nnx.Rngs(0), nnx.Rngs(0).params):
    with pytest.raises(TypeError, match=r"key must be .* Call it for a key: rngs\(\)"):
      jaxsaddle.perturbed_sgd(0.1, noise_scale=0.1, key=rngs).init(jnp.zeros(3))
