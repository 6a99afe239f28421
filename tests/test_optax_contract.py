"""optax's generic optimizer contract, run against every jaxsaddle alias.

A port of optax/contrib/_common_test.py (optax 0.2.8), the suite optax asks new
contrib optimizers to pass, plus the contract points of the README that it does
not cover (``jax.ShapeDtypeStruct`` init, ``optax.apply_if_finite``). To put a
new alias under contract, add one line to ``ALIASES``.
"""

import inspect
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import jaxsaddle


def _perturbed_adam(
  learning_rate: optax.ScalarOrSchedule,
  *,
  perturbation_radius: float | jax.Array,
  gradient_threshold: float | jax.Array,
  escape_steps: int | jax.Array,
  escape_threshold: float | jax.Array | None = None,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  """``perturb_near_saddle`` around adam, as a factory that inject_hyperparams can rebuild."""
  return jaxsaddle.perturb_near_saddle(
    optax.adam(learning_rate),
    perturbation_radius=perturbation_radius,
    gradient_threshold=gradient_threshold,
    escape_steps=escape_steps,
    escape_threshold=escape_threshold,
    key=key,
  )


def _monitored_sgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  every: int | jax.Array,
  num_lanczos_steps: int,
  key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  """sgd followed by ``monitor_curvature``, as a factory that inject_hyperparams can rebuild."""
  return optax.chain(
    optax.sgd(learning_rate),
    jaxsaddle.monitor_curvature(every=every, num_lanczos_steps=num_lanczos_steps, key=key),
  )


class Alias(NamedTuple):
  """One optimizer under contract."""

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  # Names of the extra arguments of ``update`` that the alias reads; the tests
  # pass them the values of the objective (see ``_extra_args``).
  extra_args: tuple[str, ...]
  # Hyperparameters that optax.inject_hyperparams must keep static: those that
  # set a shape or a loop length, or are callables (which it would wrap as schedules).
  static_args: tuple[str, ...] = ()


_ESCAPE = dict(
  perturbation_radius=1e-3, gradient_threshold=1e-3, escape_steps=10, escape_threshold=1e-4
)
# Plain gradient descent needs learning_rate < 2 / 1002, the largest curvature of
# Rosenbrock at its minimum, and still has to crawl along the valley in 30,000 steps.
ALIASES = [
  Alias("pgd", jaxsaddle.pgd, dict(learning_rate=1.5e-3, **_ESCAPE), ("value",)),
  Alias("noisy_gd", jaxsaddle.noisy_gd, dict(learning_rate=1.5e-3, noise_scale=1e-3), ()),
  Alias("perturbed_sgd", jaxsaddle.perturbed_sgd, dict(learning_rate=1.5e-3, noise_scale=1e-3), ()),
  Alias(
    "perturb_near_saddle_adam", _perturbed_adam, dict(learning_rate=1e-2, **_ESCAPE), ("value",)
  ),
  Alias("lsgd", jaxsaddle.lsgd, dict(learning_rate=1.5e-3, sigma=1.0, order=1), (), ("order",)),
  Alias(
    "negative_curvature_descent",
    jaxsaddle.negative_curvature_descent,
    dict(learning_rate=1.5e-3, hessian_lipschitz=1.0, epsilon=1e-3, num_lanczos_steps=3),
    ("value_fn",),
    ("num_lanczos_steps",),
  ),
  *(
    Alias(
      transform.__name__,
      transform,
      dict(
        learning_rate=1.5e-3,
        hessian_lipschitz=1.0,
        epsilon=1e-3,
        smoothness=1002.0,
        num_search_steps=3,
      ),
      ("value_fn",),
      ("num_search_steps",),
    )
    for transform in (jaxsaddle.neon, jaxsaddle.neon2)
  ),
  Alias(
    "pagd",
    jaxsaddle.pagd,
    dict(
      learning_rate=1e-3,
      momentum=0.5,
      exploitation_radius=1e-3,
      perturbation_radius=1e-3,
      gradient_threshold=1e-3,
      escape_steps=10,
    ),
    ("value_fn",),
  ),
  Alias(
    "saddle_free_newton",
    jaxsaddle.saddle_free_newton,
    dict(learning_rate=1.0, num_lanczos_steps=2, damping=1e-3),
    ("value_fn",),
    ("num_lanczos_steps",),
  ),
  Alias(
    "cubic_regularization",
    jaxsaddle.cubic_regularization,
    dict(
      learning_rate=1.0,
      hessian_lipschitz=1e3,
      smoothness=1e3,
      epsilon=1e-6,
      subsolver_steps=5,
      subsolver_learning_rate=1.5e-3,
    ),
    ("value_fn",),
    ("subsolver_steps",),
  ),
  Alias(
    "monitor_curvature_sgd",
    _monitored_sgd,
    dict(learning_rate=1.5e-3, every=100, num_lanczos_steps=3),
    ("value_fn",),
    ("num_lanczos_steps",),
  ),
]

# static_args are the hyperparameters that size something in Python: lsgd's ``order``
# picks the solver and sizes it (a traced ``sigma`` is fine: it switches to the FFT
# solver), and the Lanczos and subsolver step counts are loop lengths. In the others,
# escape_steps is only compared with int32 counters (never a shape or a loop
# length), the radii and thresholds only scale or compare numbers,
# ``distribution`` is a string and so static anyway, and ``key`` is read only by
# ``init``, where ``jax.random.key`` accepts a traced seed. Users may still make
# ``key`` static: an injected key sits in ``state.hyperparams``, where changing it
# has no effect after ``init``.

alias_parametrize = pytest.mark.parametrize("alias", ALIASES, ids=lambda alias: alias.name)


def _make(alias: Alias, **overrides) -> optax.GradientTransformation:
  return alias.factory(**(alias.kwargs | overrides))


def _sum_of_squares(params):
  return optax.tree.norm(params, squared=True)


def _extra_args(alias: Alias, value, value_fn=_sum_of_squares) -> dict[str, Any]:
  """The extra arguments the alias reads: the loss, and the loss as a function (``value_fn``)."""
  available = {"value": value, "value_fn": value_fn}
  return {name: available[name] for name in alias.extra_args}


def _jit_update(opt):
  """``jax.jit(opt.update)``; a ``value_fn`` is a function, so it must be a static argument."""
  return jax.jit(opt.update, static_argnames="value_fn")


def _unwrap(tree):
  """Typed PRNG keys as their uint32 data, which numpy can compare."""
  return optax.tree.unwrap_random_key_data(tree)


def _setup_parabola(dtype):
  initial_params = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
  final_params = jnp.array([1.0, -1.0, 1.0], dtype=dtype)

  def obj_fn(params):
    return jnp.sum(jnp.square(params - final_params))

  return initial_params, final_params, obj_fn


def _setup_rosenbrock(dtype):
  a, b = 1.0, 100.0
  initial_params = jnp.array([0.0, 0.0], dtype=dtype)
  final_params = jnp.array([a, a**2], dtype=dtype)

  def obj_fn(params):
    return jnp.square(a - params[0]) + b * jnp.square(params[1] - params[0] ** 2)

  return initial_params, final_params, obj_fn


def _setup_matrix_parabola(dtype):
  initial_params = jnp.zeros((2, 2), dtype=dtype)
  final_params = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype=dtype)

  def obj_fn(params):
    return jnp.sum(jnp.square(params - final_params))

  return initial_params, final_params, obj_fn


def _setup_mixed_tensor_target(dtype):
  final_params = (
    jnp.array([1.0, -1.0, 2.0], dtype=dtype),
    jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype=dtype),
  )
  initial_params = optax.tree.zeros_like(final_params)

  def obj_fn(params):
    return optax.tree.norm(optax.tree.sub(params, final_params), squared=True)

  return initial_params, final_params, obj_fn


TARGETS = [_setup_parabola, _setup_rosenbrock, _setup_matrix_parabola, _setup_mixed_tensor_target]


def _make_step(opt, obj_fn, alias: Alias, **update_kwargs):
  def step(params, state):
    value, grads = jax.value_and_grad(obj_fn)(params)
    extra_args = _extra_args(alias, value, obj_fn)
    updates, state = opt.update(grads, state, params, **extra_args, **update_kwargs)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


@alias_parametrize
def test_accepts_unknown_extra_args_without_recompiling(alias):
  opt = _make(alias)
  initial_params, _, obj_fn = _setup_rosenbrock(jnp.float32)
  step = _make_step(opt, obj_fn, alias, unexpected_extra_args_your_optimizer_doesnt_expect=1)

  params, state = initial_params, opt.init(initial_params)
  with test_utils.log_compilations() as first_call_logs:
    params, state = step(params, state)
  with test_utils.log_compilations() as second_call_logs:
    params, state = step(params, state)

  # The first call must be seen compiling, or an empty second log proves nothing.
  assert first_call_logs
  assert not second_call_logs, "the optimizer recompiles on the second call to update"
  test_utils.assert_tree_all_finite(params)


@alias_parametrize
@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.__name__[len("_setup_") :])
def test_converges(alias, target):
  opt = _make(alias)
  initial_params, final_params, obj_fn = target(jnp.float32)
  step = _make_step(opt, obj_fn, alias)
  state = opt.init(initial_params)

  # A no-op map must rebuild the state exactly (map_params inits on a placeholder).
  mapped_state = optax.tree.map_params(opt, lambda leaf: leaf, state)
  test_utils.assert_trees_all_equal(_unwrap(mapped_state), _unwrap(state))

  def body(carry, _):
    return step(*carry), None

  (params, _), _ = jax.lax.scan(body, (initial_params, mapped_state), length=30_000)
  test_utils.assert_trees_all_close(params, final_params, rtol=3e-2, atol=3e-2)


@alias_parametrize
def test_inject_hyperparams_matches_plain_transform(alias):
  opt = alias.factory(**alias.kwargs)
  inject = optax.inject_hyperparams(alias.factory, static_args=alias.static_args)
  opt_inject = inject(**alias.kwargs)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  descent_grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  extra_args = _extra_args(alias, jnp.array(1.0))
  state = opt.init(params)
  state_inject = jax.jit(opt_inject.init)(params)
  update, update_inject = _jit_update(opt), _jit_update(opt_inject)

  numeric_kwargs = {name for name, value in alias.kwargs.items() if not isinstance(value, bool)}
  assert numeric_kwargs - set(alias.static_args) <= set(state_inject.hyperparams)
  # Zero gradients make the perturbing aliases draw from the ball with a traced radius.
  for grads in [descent_grads, optax.tree.zeros_like(descent_grads)]:
    updates, new_state = update(grads, state, params, **extra_args)
    updates_inject, new_state_inject = update_inject(grads, state_inject, params, **extra_args)
    test_utils.assert_trees_all_close(updates_inject, updates, rtol=1e-5)
    test_utils.assert_trees_all_close(
      _unwrap(new_state_inject.inner_state), _unwrap(new_state), rtol=1e-5, atol=1e-5
    )


# A traced hyperparameter out of its range, per alias: (name, value). The adam that
# perturb_near_saddle_adam wraps checks nothing of its own: its learning rate is optax's.
OUT_OF_RANGE = [
  ("pgd", "gradient_threshold", float("nan")),
  ("perturbed_sgd", "learning_rate", -1.0),
  ("noisy_gd", "noise_scale", -1.0),
  ("perturb_near_saddle_adam", "escape_steps", 0),
  ("lsgd", "sigma", -1.0),
  ("negative_curvature_descent", "hessian_lipschitz", float("nan")),
  ("neon", "smoothness", -1.0),
  ("neon2", "epsilon", -1.0),
  ("pagd", "momentum", 1.5),
  ("saddle_free_newton", "damping", -1.0),
  ("cubic_regularization", "learning_rate", -1.0),
  ("monitor_curvature_sgd", "every", 0),
]


@pytest.mark.parametrize(("alias_name", "name", "value"), OUT_OF_RANGE)
def test_traced_hyperparameter_out_of_range_gives_nan_updates(alias_name, name, value):
  # The factory cannot see a value that inject_hyperparams passes traced under jit: a NaN
  # threshold never perturbed, a negative damping exploded, a NaN rho stalled. NaN updates say
  # so, and apply_if_finite would skip them.
  alias = {alias.name: alias for alias in ALIASES}[alias_name]
  inject = optax.inject_hyperparams(alias.factory, static_args=alias.static_args)(**alias.kwargs)
  # The one-element leaf is too short for lsgd's solvers, which passed it through unsmoothed.
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2)), jnp.ones(1)]
  grads = optax.tree.zeros_like(params)
  state = inject.init(params)
  state.hyperparams[name] = jnp.asarray(value, jnp.result_type(state.hyperparams[name]))
  updates, _ = _jit_update(inject)(grads, state, params, **_extra_args(alias, jnp.array(1.0)))
  assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(updates))


@alias_parametrize
def test_python_number_leaves_update_as_float32_arrays(alias):
  # As optax's own transforms do: a tree of Python floats is a tree of float32 scalars.
  opt = _make(alias)
  as_numbers = {"a": 0.5, "b": -1.5}
  as_arrays = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), as_numbers)
  grads = {"a": 1.0, "b": -3.0}
  expected, _ = opt.update(
    jax.tree.map(jnp.float32, grads),
    opt.init(as_arrays),
    as_arrays,
    **_extra_args(alias, _sum_of_squares(as_arrays)),
  )
  updates, _ = opt.update(
    grads, opt.init(as_numbers), as_numbers, **_extra_args(alias, _sum_of_squares(as_arrays))
  )
  jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6), updates, expected)
  assert all(isinstance(u, jax.Array) and u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


@alias_parametrize
@pytest.mark.parametrize("params", [{}, {"w": jnp.zeros((0, 3))}], ids=["empty", "zero_size"])
def test_params_without_elements_pass_through(alias, params):
  # As optax's optimizers do (a model whose filter selects nothing): there is nothing to update,
  # perturb or estimate; the state counts the update and records nothing else.
  opt = _make(alias)
  initial = opt.init(params)
  loss = lambda params: jnp.asarray(_sum_of_squares(params), jnp.float32)  # noqa: E731
  updates, state = jax.jit(opt.update, static_argnames="value_fn")(
    params, initial, params, **_extra_args(alias, loss(params), loss)
  )
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert [u.shape for u in jax.tree.leaves(updates)] == [p.shape for p in jax.tree.leaves(params)]
  assert jax.tree.structure(state) == jax.tree.structure(initial)
  for (path, leaf), before in zip(
    jax.tree.leaves_with_path(_unwrap(state)), jax.tree.leaves(_unwrap(initial)), strict=True
  ):
    name = jax.tree_util.keystr(path)
    assert jax.typeof(leaf) == jax.typeof(jnp.asarray(before)), name
    expected = before + 1 if name.endswith(".count") else before
    np.testing.assert_array_equal(leaf, expected, err_msg=name)


@alias_parametrize
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_updates_keep_params_dtype(alias, dtype):
  opt = _make(alias)
  obj_fn = lambda x: jnp.sum(x**2)
  update = _jit_update(opt)
  # At the minimum the gradient is zero, so pgd-like aliases return a perturbation.
  for params in [jnp.array([1.0, 2.0], dtype=dtype), jnp.zeros(2, dtype=dtype)]:
    value, grads = jax.value_and_grad(obj_fn)(params)
    updates, _ = update(grads, opt.init(params), params, **_extra_args(alias, value))
    assert updates.dtype == params.dtype


@alias_parametrize
def test_multi_steps_accumulates(alias):
  opt = optax.MultiSteps(_make(alias), every_k_schedule=4)
  obj_fn = lambda x: jnp.sum(x**2)
  # bfloat16 is where a silent promotion to float32 would break MultiSteps' cond.
  params = jnp.array([1.0, 2.0], dtype=jnp.bfloat16)
  value, grads = jax.value_and_grad(obj_fn)(params)
  update = _jit_update(opt)
  state = opt.init(params)

  def inner_counts(state):
    return [int(count) for _, count in optax.tree.get_all_with_path(state.inner_opt_state, "count")]

  # Different gradients at each call: the inner transform must see their mean, 2.5 grads.
  for k in range(3):
    updates, state = update((k + 1) * grads, state, params, **_extra_args(alias, value))
    test_utils.assert_trees_all_equal(updates, jnp.zeros_like(grads))
  # (lsgd with a constant learning rate keeps no count.)
  assert all(count == 0 for count in inner_counts(state))
  updates, state = update(4 * grads, state, params, **_extra_args(alias, value))
  assert updates.dtype == params.dtype
  assert np.all(np.asarray(updates, np.float32) != 0)
  # The inner transform ran once, on the fourth call, on the mean gradient (bfloat16 rounding).
  assert all(count == 1 for count in inner_counts(state))
  inner = _make(alias)
  expected, _ = _jit_update(inner)(
    2.5 * grads, inner.init(params), params, **_extra_args(alias, value)
  )
  np.testing.assert_allclose(
    np.asarray(updates, np.float32), np.asarray(expected, np.float32), rtol=2e-2, atol=1e-3
  )


@alias_parametrize
@pytest.mark.parametrize(
  "dtype",
  [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64],
  ids=lambda d: jnp.dtype(d).name,
)
def test_state_shape_dtype_stable_under_cond(alias, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    opt = _make(alias)
    initial_params, _, obj_fn = _setup_parabola(dtype)

    @jax.jit
    def step(params, state):
      value, grads = jax.value_and_grad(obj_fn)(params)
      # A loss in another float dtype than the params must not leak into the state.
      value = value.astype(jnp.float16 if dtype != jnp.float16 else jnp.bfloat16)
      # A condition the compiler cannot fold, so both branches must agree on types.
      take_update = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
        take_update,
        lambda: opt.update(grads, state, params, **_extra_args(alias, value, obj_fn)),
        lambda: (params, state),
      )
      return optax.apply_updates(params, updates), state

    # The cond already demands that update returns the state's exact types; the
    # checks below say which leaf drifted when it does not.
    state = opt.init(initial_params)
    params, new_state = step(initial_params, state)
    assert params.dtype == dtype
    test_utils.assert_trees_all_equal_shapes(new_state, state)
    test_utils.assert_trees_all_equal_dtypes(new_state, state)


@alias_parametrize
def test_constant_schedule_matches_constant_learning_rate(alias):
  learning_rate = inspect.signature(alias.factory).parameters["learning_rate"]
  assert learning_rate.annotation == optax.ScalarOrSchedule
  initial_params, _, obj_fn = _setup_parabola(jnp.float32)

  def run(learning_rate):
    opt = _make(alias, learning_rate=learning_rate)
    step = _make_step(opt, obj_fn, alias)
    params, state = initial_params, opt.init(initial_params)
    for _ in range(10):
      params, state = step(params, state)
    return params

  params_with_schedule = run(optax.constant_schedule(1e-3))
  params_with_float = run(1e-3)
  test_utils.assert_trees_all_close(params_with_schedule, params_with_float)
  assert not np.allclose(params_with_float, initial_params)


@alias_parametrize
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_init_on_shape_dtype_structs(alias, dtype):
  opt = _make(alias)
  params, _, _ = _setup_mixed_tensor_target(dtype)
  abstract_params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params)
  concrete_state = opt.init(params)

  for state in [jax.eval_shape(opt.init, abstract_params), opt.init(abstract_params)]:
    test_utils.assert_trees_all_equal_shapes(state, concrete_state)
    test_utils.assert_trees_all_equal_dtypes(state, concrete_state)


def _all_named(tree, name: str) -> list[np.ndarray]:
  return [np.asarray(leaf) for _, leaf in optax.tree.get_all_with_path(tree, name)]


@alias_parametrize
def test_apply_if_finite_skips_nan_gradients(alias):
  opt = optax.apply_if_finite(_make(alias), max_consecutive_errors=2)
  update = _jit_update(opt)
  # A finite gradient below the escape threshold: pgd-like aliases perturb, noisy ones move
  # by their noise and deterministic ones (lsgd) by their step; all of them move the params.
  params = jnp.zeros(3)
  initial_state = opt.init(params)

  nan_grads = jnp.array([jnp.nan, 0.0, 0.0])
  updates, state = update(nan_grads, initial_state, params, **_extra_args(alias, jnp.nan))
  skipped_params = optax.apply_updates(params, updates)
  test_utils.assert_trees_all_equal(skipped_params, params)
  assert int(state.notfinite_count) == 1
  test_utils.assert_trees_all_equal(_unwrap(state.inner_state), _unwrap(initial_state.inner_state))
  # Only the perturbing aliases count perturbations; for the others these are no-ops.
  assert all(count == 0 for count in _all_named(state, "num_perturbations"))

  finite_grads = jnp.full(3, 1e-4)
  updates, state = update(finite_grads, state, params, **_extra_args(alias, jnp.array(0.0)))
  stepped_params = optax.apply_updates(params, updates)
  test_utils.assert_tree_all_finite(stepped_params)
  assert np.any(np.asarray(stepped_params) != 0)
  assert int(state.notfinite_count) == 0
  assert int(state.total_notfinite) == 1
  assert all(count == 1 for count in _all_named(state, "num_perturbations"))


@pytest.mark.parametrize(
  "tx",
  [jaxsaddle.add_isotropic_noise(1e-2, key=0), jaxsaddle.laplacian_smoothing(1.0)],
  ids=["add_isotropic_noise", "laplacian_smoothing"],
)
def test_building_blocks_accept_and_ignore_extra_args(tx):
  # nnx.Optimizer.update(model, grads, **kwargs) passes kwargs to a lone transform too.
  params = {"w": jnp.linspace(-1.0, 1.0, 12)}
  grads = {"w": jnp.cos(jnp.arange(12.0))}
  state = tx.init(params)
  plain, _ = tx.update(grads, state, params)
  with_extra, _ = tx.update(grads, state, params, value=1.0, value_fn=lambda p: 0.0)
  # Equal up to float32 rounding: an eager call with a callable among its extra arguments runs
  # op by op, one without it jitted (see _checks.public_transform).
  np.testing.assert_allclose(with_extra["w"], plain["w"], rtol=2e-6, atol=0)
  assert not np.allclose(plain["w"], grads["w"])


@pytest.mark.parametrize(
  "alias", [a for a in ALIASES if "value_fn" in a.extra_args], ids=lambda alias: alias.name
)
@pytest.mark.parametrize(
  "value_fn",
  [lambda p: p**2, lambda p: (jnp.sum(p**2), p), lambda p: jnp.sum(p**2).astype(jnp.int32)],
  ids=["per-example", "with-aux", "integer"],
)
def test_a_value_fn_that_is_not_a_scalar_loss_is_named(alias, value_fn):
  opt = _make(alias, **({"every": 1} if "every" in alias.kwargs else {}))
  params = jnp.array([1.0, -2.0])
  with pytest.raises(ValueError, match="value_fn must return the scalar floating-point loss"):
    opt.update(2 * params, opt.init(params), params, value_fn=value_fn)
