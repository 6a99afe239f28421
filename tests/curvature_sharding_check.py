"""jaxsaddle.curvature's Lanczos on parameters sharded over 8 CPU devices.

JAX fixes the number of CPU devices when its backend starts, so these checks need a process of
their own: ``tests/test_sharding.py`` runs them with

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python -m pytest tests/curvature_sharding_check.py

which is also the command to run them by hand. The module name does not match ``test_*.py``, so
the normal suite does not collect it in a process that sees one device.

What is checked, on 1-D and 2-D meshes with Explicit and Auto axis types, with full and partial
reorthogonalisation: a jitted Lanczos run on
Hessian-vector products of a function of sharded params keeps every leaf's sharding in the
stacked basis (a leaf sharded ``P('x', None)`` gives a basis leaf sharded ``P(None, 'x', None)``)
and in the Ritz vectors, and its coefficients, basis and Ritz values equal the single-device run.
On params sharded over a 2-D Explicit mesh, ``spectrum``'s trace (Hutchinson and Hutch++), extreme
eigenvalues, SLQ density and critical-point classification equal their single-device results.
With data parallelism (replicated params, each batch's examples split over the mesh and, across
processes, each process holding only its own examples), the trace, extreme eigenvalues, NC
descent and the curvature monitor on a ``dataset_value_fn`` loss equal the single-device run on
the whole dataset; a jitted update that closes over replicated params and split data alike,
under ``jax.set_mesh``, equals it too for each curvature transform. A flax model whose layers
are split over one mesh axis, trained on a batch split over the other through
``nnx.Optimizer`` (PGD, and NC descent with ``make_value_fn``), keeps its params' shardings
and takes the single-device steps.

``tests/test_sharding.py`` also runs these checks as two processes of four devices each that
share one mesh (see ``tests/_multihost.py``); results are gathered with ``tests/_host.py``.
"""

import _host
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsaddle
import jaxsaddle.flax
from jaxsaddle import curvature
from jaxsaddle import spectrum

NUM_DEVICES = 8
if jax.device_count() != NUM_DEVICES:
  raise RuntimeError(
    f"curvature_sharding_check needs {NUM_DEVICES} devices, JAX sees {jax.device_count()}: run "
    f"it with XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES} JAX_PLATFORMS=cpu, "
    "as tests/test_sharding.py does."
  )

NUM_STEPS = 12
# Sharded contractions sum in another order than one device; Lanczos amplifies that a little.
RTOL = 1e-4
ATOL = 1e-5
# Partial reorthogonalisation leaves the basis semi-orthogonal: the round-off that differs
# between the sharded and the single-device run is reorthogonalised away later than with full
# reorthogonalisation, so the two runs agree less closely (measured: about 5e-5).
TOLERANCES = {True: ATOL, "partial": 1e-4, False: 1e-4}
# Without reorthogonalisation the basis loses orthogonality once a Ritz value converges, which
# amplifies the two runs' different round-off (the last rows differ by 4% here): only the rows
# before that, and the extreme Ritz values, are compared.
COMPARED_ROWS = {True: NUM_STEPS, "partial": NUM_STEPS, False: 4}

MESHES = {
  "explicit_1d": ((8,), ("x",), AxisType.Explicit),
  "auto_1d": ((8,), ("x",), AxisType.Auto),
  "explicit_2d": ((2, 4), ("x", "y"), AxisType.Explicit),
  "auto_2d": ((2, 4), ("x", "y"), AxisType.Auto),
}
SPECS = {
  1: {"w": P("x", None), "b": P("x"), "c": P()},
  2: {"w": P("x", "y"), "b": P("y"), "c": P()},
}


def _params():
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal(8), jnp.float32),
    "c": jnp.asarray(rng.standard_normal(3), jnp.float32),
  }


def _value_fn(params):
  # Elementwise curvature plus a coupling of all three leaves, so the Hessian is not diagonal.
  coupling = jnp.sum(jnp.tanh(params["w"])) * jnp.sum(params["b"]) * jnp.sum(params["c"])
  return jnp.sum(jnp.cos(params["w"])) + jnp.sum(params["b"] ** 4) / 4 + 0.1 * coupling


def _run(params, start, reorthogonalize):
  result = curvature.lanczos(
    lambda v: curvature.hvp(_value_fn, params, v),
    start,
    NUM_STEPS,
    reorthogonalize=reorthogonalize,
  )
  return result, curvature.ritz_pairs(result)


REORTHOGONALIZATIONS = (True, "partial", False)


def _start(params):
  return jax.tree.map(
    lambda leaf: jnp.cos(jnp.arange(leaf.size, dtype=leaf.dtype)).reshape(leaf.shape), params
  )


@pytest.fixture(scope="module")
def single_device_runs():
  params = _params()
  return {
    mode: jax.jit(_run, static_argnums=2)(params, _start(params), mode)
    for mode in REORTHOGONALIZATIONS
  }


# Without reorthogonalisation on the most demanding mesh only, to keep the suite's time.
@pytest.mark.parametrize(
  "mesh_name, reorthogonalize",
  [(mesh, mode) for mesh in sorted(MESHES) for mode in (True, "partial")]
  + [("explicit_2d", False)],
)
def test_lanczos_basis_keeps_leaf_shardings_and_matches_one_device(
  mesh_name, reorthogonalize, single_device_runs
):
  shape, axis_names, axis_type = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, axis_names, axis_types=(axis_type,) * len(shape))
  specs = SPECS[len(shape)]
  params = _params()
  with jax.set_mesh(mesh):
    sharded_params = {
      name: jax.device_put(leaf, NamedSharding(mesh, specs[name])) for name, leaf in params.items()
    }
    sharded_start = jax.tree.map(
      lambda leaf, like: jax.device_put(leaf, like.sharding), _start(params), sharded_params
    )
    result, pairs = jax.jit(_run, static_argnums=2)(sharded_params, sharded_start, reorthogonalize)

  expected_result, expected_pairs = single_device_runs[reorthogonalize]
  assert int(result.num_valid) == int(expected_result.num_valid) == NUM_STEPS
  for name, spec in specs.items():
    stacked_spec = NamedSharding(mesh, P(None, *spec))
    leaf_ndim = params[name].ndim + 1
    for label, stacked in (
      ("basis", result.basis[name]),
      ("Ritz vectors", pairs.eigenvectors[name]),
    ):
      assert stacked.sharding.is_equivalent_to(stacked_spec, leaf_ndim), (
        f"{label} leaf {name!r}: {stacked.sharding} instead of {stacked_spec}"
      )
  result, pairs = _host.to_numpy((result, pairs))
  rows = COMPARED_ROWS[reorthogonalize]
  for name in specs:
    np.testing.assert_allclose(
      result.basis[name][:rows],
      expected_result.basis[name][:rows],
      rtol=RTOL,
      atol=TOLERANCES[reorthogonalize],
      err_msg=name,
    )
  coefficient_atol = TOLERANCES[reorthogonalize]
  np.testing.assert_allclose(
    result.alphas[:rows], expected_result.alphas[:rows], rtol=RTOL, atol=coefficient_atol
  )
  np.testing.assert_allclose(
    result.betas[:rows], expected_result.betas[:rows], rtol=RTOL, atol=coefficient_atol
  )
  compared = slice(None) if reorthogonalize else np.array([0, NUM_STEPS - 1])
  np.testing.assert_allclose(
    pairs.eigenvalues[compared], expected_pairs.eigenvalues[compared], rtol=RTOL, atol=ATOL
  )


SPECTRUM_FUNCTIONS = {
  "trace": lambda p: spectrum.hessian_trace(_value_fn, p, key=3, num_probes=6),
  "trace_hutch++": lambda p: spectrum.hessian_trace(
    _value_fn, p, key=3, num_probes=6, method="hutch++"
  ),
  "extreme_eigenvalues": lambda p: (
    spectrum.hessian_extreme_eigenvalues(
      _value_fn, p, num_steps=8, key=4, k=2, which="both"
    ).eigenvalues
  ),
  "density": lambda p: (
    spectrum.hessian_density(_value_fn, p, key=5, num_probes=3, num_steps=6).density
  ),
  # k = 1 without eigenvectors: Lanczos with no reorthogonalisation and no basis at all.
  "top_eigenvalue": lambda p: spectrum.hessian_extreme_eigenvalues(
    _value_fn, p, num_steps=8, key=4, eigenvectors=False
  ),
  "classify": lambda p: spectrum.classify_critical_point(
    _value_fn, p, gradient_tol=1e-3, eigenvalue_tol=1e-3, num_steps=8, key=6
  ),
  # As many steps as the 139 parameters: the dense eigendecomposition, which ravels the leaves.
  "classify_dense": lambda p: spectrum.classify_critical_point(
    _value_fn, p, gradient_tol=1e-3, eigenvalue_tol=1e-3, num_steps=139, key=6
  ),
}


def _one_update(tx, value_fn=_value_fn):
  """``params -> (updates, state)`` after one update of ``tx`` at ``params``, keys dropped."""

  def run(params):
    updates, state = tx.update(
      jax.grad(value_fn)(params), tx.init(params), params, value_fn=value_fn
    )
    return updates, optax.tree.unwrap_random_key_data(state)

  return run


CURVATURE_TRANSFORMS = {
  "negative_curvature_descent": lambda: jaxsaddle.negative_curvature_descent(
    0.1, hessian_lipschitz=1.0, epsilon=1e-2, num_lanczos_steps=6, gradient_threshold=1e3
  ),
  # Gradient differences carry the gradients' rounding divided by the radius, which the
  # sharded sums' order changes: a radius of 1, not the default 0.01, keeps it below RTOL.
  **{
    transform.__name__: lambda transform=transform: transform(
      0.1,
      hessian_lipschitz=1.0,
      epsilon=1e-2,
      smoothness=10.0,
      num_search_steps=6,
      difference_radius=1.0,
      gradient_threshold=1e3,
    )
    for transform in (jaxsaddle.neon, jaxsaddle.neon2)
  },
  "saddle_free_newton": lambda: jaxsaddle.saddle_free_newton(
    0.1, num_lanczos_steps=6, damping=1e-3
  ),
  "monitor_curvature": lambda: jaxsaddle.monitor_curvature(every=1, num_lanczos_steps=6, key=7),
  # Both draw noise and branch with lax.cond; thresholds this high make the first step perturb.
  "pagd": lambda: jaxsaddle.pagd(
    0.1,
    momentum=0.5,
    perturbation_radius=1e-2,
    gradient_threshold=1e3,
    escape_steps=3,
    exploitation_radius=1e-2,
    key=8,
  ),
  "cubic_regularization": lambda: jaxsaddle.cubic_regularization(
    0.1, hessian_lipschitz=1.0, smoothness=10.0, epsilon=1e3, subsolver_steps=4, key=9
  ),
}
TRANSFORM_UPDATES = {name: _one_update(make()) for name, make in CURVATURE_TRANSFORMS.items()}


def _assert_matches(result, expected):
  """Every leaf of ``result`` equals the finite single-device ``expected``, gathered first."""
  result = _host.to_numpy(result)
  if isinstance(expected, spectrum.CriticalPointReport):
    # A difference of two losses: it carries their rounding, not its own.
    np.testing.assert_allclose(
      result.probe_decrease, expected.probe_decrease, rtol=0, atol=RTOL * abs(expected.value)
    )
    result, expected = (report._replace(probe_decrease=0.0) for report in (result, expected))
  for got, want in zip(jax.tree.leaves(result), jax.tree.leaves(expected), strict=True):
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("function", sorted(SPECTRUM_FUNCTIONS | TRANSFORM_UPDATES))
def test_on_explicitly_sharded_params_matches_one_device(function):
  # Explicit axes are the demanding case: contractions over them need their output sharding
  # spelled out, and JAX cannot batch a lax.cond over them (SLQ's vmap over probes). The 2-D
  # mesh shards a matrix over both axes.
  mesh_name = "explicit_2d"
  fn = jax.jit((SPECTRUM_FUNCTIONS | TRANSFORM_UPDATES)[function])
  expected = fn(_params())
  shape, axis_names, axis_type = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, axis_names, axis_types=(axis_type,) * len(shape))
  specs = SPECS[len(shape)]
  with jax.set_mesh(mesh):
    sharded_params = {
      name: jax.device_put(leaf, NamedSharding(mesh, specs[name]))
      for name, leaf in _params().items()
    }
    result = fn(sharded_params)
  _assert_matches(result, expected)


# Data parallelism: the examples of every batch are split over the mesh, and in a run of several
# processes each process holds only its own devices' examples, as in multi-host training.
NUM_BATCHES, BATCH_SIZE, NUM_FEATURES, NUM_HIDDEN = 3, 16, 4, 8


def _regression_loss(params, batch):
  inputs, targets = batch
  hidden = jnp.tanh(inputs @ params["w"] + params["b"])
  return jnp.mean((hidden @ params["c"] - targets) ** 2)


def _regression_data():
  rng = np.random.default_rng(1)
  params = {
    "w": rng.standard_normal((NUM_FEATURES, NUM_HIDDEN)).astype(np.float32),
    "b": rng.standard_normal(NUM_HIDDEN).astype(np.float32),
    "c": rng.standard_normal(NUM_HIDDEN).astype(np.float32),
  }
  batches = (
    rng.standard_normal((NUM_BATCHES, BATCH_SIZE, NUM_FEATURES)).astype(np.float32),
    rng.standard_normal((NUM_BATCHES, BATCH_SIZE)).astype(np.float32),
  )
  return params, batches


def _split(leaf: np.ndarray, sharding: NamedSharding, axis: int) -> jax.Array:
  """``leaf`` as a global array split by ``sharding`` along ``axis``, each process giving only
  the part its own devices hold, as a multi-host input pipeline does."""
  index_map = sharding.addressable_devices_indices_map(leaf.shape)
  parts = [index[axis].indices(leaf.shape[axis]) for index in index_map.values()]
  start, stop = min(start for start, _, _ in parts), max(stop for _, stop, _ in parts)
  local = np.take(leaf, np.arange(start, stop), axis=axis)
  return jax.make_array_from_process_local_data(sharding, local, leaf.shape)


DATA_PARALLEL_FUNCTIONS = {
  "trace": lambda value_fn, p: spectrum.hessian_trace(value_fn, p, key=3, num_probes=6),
  "extreme_eigenvalues": lambda value_fn, p: (
    spectrum.hessian_extreme_eigenvalues(value_fn, p, num_steps=8, key=4, which="both").eigenvalues
  ),
} | {
  name: lambda value_fn, p, make=CURVATURE_TRANSFORMS[name]: _one_update(make(), value_fn)(p)
  for name in ("negative_curvature_descent", "monitor_curvature")
}


def _on_dataset(function):
  return jax.jit(
    lambda params, batches: function(spectrum.dataset_value_fn(_regression_loss, batches), params)
  )


def _data_parallel_inputs(mesh, params, batches):
  """``params`` replicated over ``mesh`` and each batch's examples split over it."""
  example_sharding = NamedSharding(mesh, P(None, "data"))
  sharded_batches = jax.tree.map(lambda leaf: _split(leaf, example_sharding, axis=1), batches)
  return jax.device_put(params, NamedSharding(mesh, P())), sharded_batches


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("function", sorted(DATA_PARALLEL_FUNCTIONS))
def test_data_parallel_dataset_loss_matches_one_device(function, axis_type):
  params, batches = _regression_data()
  fn = _on_dataset(DATA_PARALLEL_FUNCTIONS[function])
  expected = _host.to_numpy(fn(params, batches))
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    result = fn(*_data_parallel_inputs(mesh, params, batches))
  _assert_matches(result, expected)


@pytest.mark.parametrize("transform", sorted(CURVATURE_TRANSFORMS))
def test_jit_closing_over_explicitly_sharded_arrays_matches_one_device_under_set_mesh(transform):
  # A jitted function given no sharded argument (here it closes over params and data alike)
  # holds arrays split over Explicit axes as constants, which JAX types only under jax.set_mesh
  # (the README says so); there every transform must work as when they are arguments.
  def update_on(params, batches):
    value_fn = spectrum.dataset_value_fn(_regression_loss, batches)
    return jax.jit(lambda: _one_update(CURVATURE_TRANSFORMS[transform](), value_fn)(params))()

  params, batches = _regression_data()
  expected = _host.to_numpy(update_on(params, batches))
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    result = update_on(*_data_parallel_inputs(mesh, params, batches))
  _assert_matches(result, expected)


def test_dataset_split_along_its_batch_count_is_refused_by_name():
  # lax.map evaluates the batches one after another; split over devices, each would hold only
  # some of them. JAX's own error pointed into the library, at a shape check.
  _, batches = _regression_data()
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    # Eight batches, so that the count divides over the eight devices.
    along_count = jax.tree.map(
      lambda leaf: _split(
        np.pad(leaf, ((0, 5),) + ((0, 0),) * (leaf.ndim - 1)),
        NamedSharding(mesh, P("data")),
        axis=0,
      ),
      batches,
    )
    with pytest.raises(
      ValueError, match=r"leading axis of batches\[0\].*PartitionSpec\(None, 'data'\)"
    ):
      spectrum.dataset_value_fn(_regression_loss, along_count)


class _MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(NUM_FEATURES, NUM_HIDDEN, rngs=rngs)
    self.out = nnx.Linear(NUM_HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))[:, 0]


def _mse(model, inputs, targets):
  return jnp.mean((model(inputs) - targets) ** 2)


NNX_OPTIMIZERS = {
  "pgd": lambda: jaxsaddle.pgd(
    0.1, perturbation_radius=0.1, gradient_threshold=1e3, escape_steps=2, key=8
  ),
  "negative_curvature_descent": lambda: jaxsaddle.negative_curvature_descent(
    0.1, hessian_lipschitz=1.0, epsilon=1e-2, num_lanczos_steps=6, gradient_threshold=1e3, key=9
  ),
}
NNX_STEPS = 3
# How the nnx check splits its model's params: the hidden units, as a tensor-parallel layer.
NNX_SPECS = {
  "hidden": {"kernel": P(None, "x"), "bias": P("x")},
  "out": {"kernel": P("x", None), "bias": P()},
}


def _nnx_spec(path) -> P:
  layer, variable = (key.key for key in path[:2])
  return NNX_SPECS[layer][variable]


@pytest.mark.parametrize("optimizer", sorted(NNX_OPTIMIZERS))
def test_nnx_optimizer_on_a_sharded_model_matches_one_device(optimizer):
  # A flax model whose params are split over the mesh (the hidden layer's units), trained on a
  # batch split over the other axis, through nnx.Optimizer with value_fn from make_value_fn.
  _, (inputs, targets) = _regression_data()
  inputs, targets = inputs[0], targets[0]

  @nnx.jit
  def train_step(model, optimizer, inputs, targets):
    value_fn = jaxsaddle.flax.make_value_fn(model, _mse, inputs, targets)
    loss, grads = nnx.value_and_grad(_mse)(model, inputs, targets)
    optimizer.update(model, grads, value=loss, value_fn=value_fn)
    return loss

  def train(model, inputs, targets):
    opt = nnx.Optimizer(model, NNX_OPTIMIZERS[optimizer](), wrt=nnx.Param)
    losses = [train_step(model, opt, inputs, targets) for _ in range(NNX_STEPS)]
    return losses, nnx.state(model, nnx.Param)

  expected_losses, expected_params = _host.to_numpy(train(_MLP(nnx.Rngs(0)), inputs, targets))
  # "x" first: across processes it is the axis that spans them, so each process holds half of
  # every hidden layer (and a quarter of the batch's examples per device).
  mesh = jax.make_mesh((2, 4), ("x", "data"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = _MLP(nnx.Rngs(0))
    nnx.update(
      model,
      jax.tree.map_with_path(
        lambda path, leaf: jax.device_put(leaf, NamedSharding(mesh, _nnx_spec(path))),
        nnx.as_pure(nnx.state(model, nnx.Param)),
      ),
    )
    data_sharding = NamedSharding(mesh, P("data"))
    losses, params = train(
      model,
      *(_split(leaf, data_sharding, axis=0) for leaf in (inputs, targets)),
    )
  for path, leaf in jax.tree.leaves_with_path(params):
    expected_sharding = NamedSharding(mesh, _nnx_spec(path))
    assert leaf.sharding.is_equivalent_to(expected_sharding, leaf.ndim), (path, leaf.sharding)
  np.testing.assert_allclose(_host.to_numpy(losses), expected_losses, rtol=RTOL, atol=ATOL)
  for got, want in zip(
    jax.tree.leaves(_host.to_numpy(params)), jax.tree.leaves(expected_params), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
