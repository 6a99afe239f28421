"""jaxsaddle's optimizers on parameters sharded over 8 CPU devices.

JAX fixes the number of CPU devices when its backend starts, so these checks need a process of
their own: ``tests/test_sharding.py`` runs them with

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python -m pytest tests/sharding_check.py

which is also the command to run them by hand. The module name does not match ``test_*.py``, so
the normal suite does not collect it in a process that sees one device.

What is checked, on 1-D and 2-D meshes with Explicit and Auto axis types:

- ``init`` and a jitted ``update`` keep the params' sharding in the updates and the state's
  sharding from step to step (with Explicit axes the sharding is part of ``jax.typeof``);
- sharded results equal the single-device results for the same params and key: the raw noise
  bitwise, the updates to float32 rounding (the sphere and ball radii sum squares shard by shard,
  in another order than one device; today the updates happen to come out bitwise equal too);
- the compiled update communicates nothing but all-reduces of scalars (perturbed SGD nothing);
- ``vmap`` over 16 keys of a jitted step works on sharded params;
- LSGD in ``"axis"`` mode smooths leaves sharded along their other axes without communication
  under Explicit axes (and without an all-gather under Auto ones, except for the FFT of a traced
  sigma), keeps their sharding and equals the single-device result; vectors that span devices
  (a sharded last axis, ``"leaf"`` and ``"global"`` modes) are gathered explicitly and the
  updates resharded like the params.

``tests/test_sharding.py`` also runs these checks as two processes of four devices each that
share one mesh (see ``tests/_multihost.py``); results are gathered with ``tests/_host.py``.
"""

import contextlib
import functools
import re
from typing import Any
from typing import NamedTuple

import _host
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsaddle
from jaxsaddle import _random

NUM_DEVICES = 8
if jax.device_count() != NUM_DEVICES:
  raise RuntimeError(
    f"sharding_check needs {NUM_DEVICES} devices, JAX sees {jax.device_count()}: run it with "
    f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES} JAX_PLATFORMS=cpu, "
    "as tests/test_sharding.py does."
  )

LEARNING_RATE = 0.1
RADIUS = 0.1
GRADIENT_THRESHOLD = 1e-3
# A gradient this small relative to the params is below GRADIENT_THRESHOLD, so PGD perturbs.
TINY_GRADIENT_FACTOR = 1e-6
# float32 results may differ by a few units in the last place of a leaf's scale between sharded
# and unsharded runs: their sums are ordered differently, so an entry that cancels to a small
# value (smoothing's solves have such entries) differs by more than its own few ulps.
RTOL = 1e-6
NUM_KEYS = 16
COLLECTIVES = (
  "all-gather",
  "all-reduce",
  "all-to-all",
  "ragged-all-to-all",
  "collective-broadcast",
  "collective-permute",
  "reduce-scatter",
)

# Params of a small two-layer MLP: 16 -> 8 -> 32.
PARAM_SHAPES = {"hidden": {"kernel": (16, 8), "bias": (8,)}, "head": {"kernel": (8, 32)}}


class MeshCase(NamedTuple):
  shape: tuple[int, ...]
  axis_names: tuple[str, ...]
  axis_type: AxisType
  set_context_mesh: bool  # Explicit axes require it; Auto code often runs without one.
  specs: dict


SPECS_1D = {"hidden": {"kernel": P("x", None), "bias": P()}, "head": {"kernel": P(None, "x")}}
SPECS_2D = {"hidden": {"kernel": P("x", "y"), "bias": P()}, "head": {"kernel": P(None, ("x", "y"))}}
MESH_CASES = {
  "explicit_1d": MeshCase((8,), ("x",), AxisType.Explicit, True, SPECS_1D),
  "explicit_2d": MeshCase((2, 4), ("x", "y"), AxisType.Explicit, True, SPECS_2D),
  "auto_2d_no_context_mesh": MeshCase((2, 4), ("x", "y"), AxisType.Auto, False, SPECS_2D),
}


def _perturb_near_saddle_adam(key):
  # Adam's moments are per-parameter state: they must keep the params' sharding too.
  return jaxsaddle.perturb_near_saddle(
    optax.adam(LEARNING_RATE),
    perturbation_radius=RADIUS,
    gradient_threshold=GRADIENT_THRESHOLD,
    escape_steps=5,
    key=key,
  )


OPTIMIZERS = {
  "pgd": lambda key: jaxsaddle.pgd(
    LEARNING_RATE,
    perturbation_radius=RADIUS,
    gradient_threshold=GRADIENT_THRESHOLD,
    escape_steps=5,
    key=key,
  ),
  "noisy_gd": lambda key: jaxsaddle.noisy_gd(LEARNING_RATE, noise_scale=RADIUS, key=key),
  "perturbed_sgd": lambda key: jaxsaddle.perturbed_sgd(LEARNING_RATE, noise_scale=RADIUS, key=key),
  "perturb_near_saddle_adam": _perturb_near_saddle_adam,
}
PERTURBING_OPTIMIZERS = ("pgd", "perturb_near_saddle_adam")
# Compiling a batched step is slow on CPU: each alias runs under vmap on one mesh only.
VMAP_CASES = [
  ("pgd", "explicit_2d"),
  ("noisy_gd", "auto_2d_no_context_mesh"),
  ("perturbed_sgd", "explicit_1d"),
]
SEED = 42

optimizer_names = pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
mesh_names = pytest.mark.parametrize("mesh_name", list(MESH_CASES))


def _host_params() -> dict:
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda shape: rng.normal(size=shape).astype(np.float32),
    PARAM_SHAPES,
    is_leaf=lambda node: isinstance(node, tuple),
  )


@functools.cache
def _mesh(mesh_name: str) -> jax.sharding.Mesh:
  case = MESH_CASES[mesh_name]
  return jax.make_mesh(case.shape, case.axis_names, axis_types=(case.axis_type,) * len(case.shape))


def _mesh_context(mesh_name: str):
  if MESH_CASES[mesh_name].set_context_mesh:
    return jax.set_mesh(_mesh(mesh_name))
  return contextlib.nullcontext()


def _sharded_params(mesh_name: str) -> dict:
  mesh = _mesh(mesh_name)
  return jax.tree.map(
    lambda leaf, spec: jax.device_put(leaf, NamedSharding(mesh, spec)),
    _host_params(),
    MESH_CASES[mesh_name].specs,
  )


def _gradients(params) -> list:
  """A gradient small enough to make PGD perturb, then one large enough to take a plain step."""
  return [jax.tree.map(lambda p: TINY_GRADIENT_FACTOR * p, params), params]


class Trajectory(NamedTuple):
  params: Any
  init_state: Any
  jitted_init_state: Any  # None for Auto axes, where XLA chooses where a jitted init's zeros go
  states: list  # after each update
  updates: list
  compiled_update: str  # HLO text of the executable that ran every update


def _run(optimizer_name: str, params, jit_init: bool) -> Trajectory:
  optimizer = OPTIMIZERS[optimizer_name](jax.random.key(SEED))
  init_state = optimizer.init(params)
  gradients = _gradients(params)
  # One executable for every step: a state whose shapes or dtypes changed would be rejected.
  update = jax.jit(optimizer.update).lower(gradients[0], init_state, params).compile()
  state = init_state
  states, updates = [], []
  for grads in gradients:
    step_updates, state = update(grads, state, params)
    states.append(state)
    updates.append(step_updates)
  jitted_init_state = jax.jit(optimizer.init)(params) if jit_init else None
  return Trajectory(params, init_state, jitted_init_state, states, updates, update.as_text())


@functools.cache
def _sharded_trajectory(optimizer_name: str, mesh_name: str) -> Trajectory:
  with _mesh_context(mesh_name):
    jit_init = MESH_CASES[mesh_name].axis_type == AxisType.Explicit
    return _run(optimizer_name, _sharded_params(mesh_name), jit_init)


@functools.cache
def _single_device_trajectory(optimizer_name: str) -> Trajectory:
  return _run(optimizer_name, jax.device_put(_host_params(), _host.local_device()), jit_init=False)


def _assert_same_sharding(actual, expected, what: str):
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (path, a), e in zip(
    jax.tree.leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert jax.typeof(a) == jax.typeof(e), f"{name}: {jax.typeof(a)} != {jax.typeof(e)}"
    assert a.sharding.is_equivalent_to(e.sharding, a.ndim), f"{name}: {a.sharding} != {e.sharding}"


def _assert_close(actual: np.ndarray, expected: np.ndarray):
  """Floats to a few units in the last place of the leaf's largest entry; counters, keys and
  flags exactly."""
  if np.issubdtype(expected.dtype, np.floating):
    # Finite entries only: an infinite one would make every value pass.
    scale = np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale)
  else:
    np.testing.assert_array_equal(actual, expected)


def _per_parameter_leaves(state) -> list:
  return [leaf for leaf in jax.tree.leaves(state) if leaf.ndim > 0]


@mesh_names
def test_raw_noise_is_bitwise_the_single_device_noise(mesh_name):
  key = jax.random.key(7)
  reference = jax.jit(_random.tree_standard_normal)(key, _host_params())
  params = _sharded_params(mesh_name)
  out_shardings = None
  if MESH_CASES[mesh_name].axis_type == AxisType.Auto:
    # The noise depends on the params only through their shapes, so with Auto axes its sharding
    # is whatever its use asks for (in an update, the sum with the gradient); ask here directly.
    out_shardings = jax.tree.map(lambda p: p.sharding, params)
  sample = jax.jit(_random.tree_standard_normal, out_shardings=out_shardings)
  with _mesh_context(mesh_name):
    compiled = sample.lower(key, params).compile()
    noise = compiled(key, params)
  _assert_same_sharding(noise, params, "noise")
  assert not [c for c in COLLECTIVES if c in compiled.as_text()]
  jax.tree.map(np.testing.assert_array_equal, _host.to_numpy(noise), _host.to_numpy(reference))


@optimizer_names
@mesh_names
def test_updates_and_state_keep_their_sharding(optimizer_name, mesh_name):
  trajectory = _sharded_trajectory(optimizer_name, mesh_name)
  for step, updates in enumerate(trajectory.updates):
    _assert_same_sharding(updates, trajectory.params, f"updates of step {step}")
  _assert_same_sharding(trajectory.states[1], trajectory.states[0], "state after step 1")
  if MESH_CASES[mesh_name].set_context_mesh:
    _assert_same_sharding(trajectory.states[0], trajectory.init_state, "state after step 0")
  else:
    # Without a context mesh ``init`` puts its scalar counters and key on the default device and
    # the first jitted update returns them replicated over the params' mesh, as for any optax
    # optimizer. Per-parameter state (Adam's moments) keeps the params' sharding from the start.
    _assert_same_sharding(
      _per_parameter_leaves(trajectory.states[0]),
      _per_parameter_leaves(trajectory.init_state),
      "state after step 0",
    )
    params_devices = jax.tree.leaves(trajectory.params)[0].sharding.device_set
    for path, leaf in jax.tree.leaves_with_path(trajectory.states[0]):
      if leaf.ndim == 0:
        name = f"state after step 0{jax.tree_util.keystr(path)}"
        assert leaf.sharding.is_fully_replicated, f"{name}: {leaf.sharding}"
        assert leaf.sharding.device_set == params_devices, f"{name}: {leaf.sharding}"
  if trajectory.jitted_init_state is not None:
    _assert_same_sharding(trajectory.jitted_init_state, trajectory.init_state, "jitted init")


@pytest.mark.parametrize("optimizer_name", PERTURBING_OPTIMIZERS)
def test_perturbing_step_is_taken_on_sharded_params(optimizer_name):
  for mesh_name in MESH_CASES:
    trajectory = _sharded_trajectory(optimizer_name, mesh_name)
    num_perturbations = [optax.tree.get(s, "num_perturbations") for s in trajectory.states]
    assert [int(n) for n in num_perturbations] == [1, 1], mesh_name
    with _mesh_context(mesh_name):
      displacement_norm = float(_random.global_norm(trajectory.updates[0]))
    assert 0 < displacement_norm <= RADIUS * (1 + RTOL), mesh_name


@optimizer_names
@mesh_names
def test_results_equal_the_single_device_results(optimizer_name, mesh_name):
  sharded = _sharded_trajectory(optimizer_name, mesh_name)
  reference = _single_device_trajectory(optimizer_name)
  for step in range(len(reference.updates)):
    jax.tree.map(
      _assert_close,
      _host.to_numpy((sharded.updates[step], sharded.states[step])),
      _host.to_numpy((reference.updates[step], reference.states[step])),
    )


def _collectives(hlo_text: str) -> list[tuple[str, tuple[str, ...]]]:
  """``(collective, [shape of each result])`` for every collective instruction in ``hlo_text``."""
  names = "|".join(re.escape(name) for name in COLLECTIVES)
  # The result shape is everything between "=" and the opcode: async collectives return nested
  # tuples, which a pattern for one level of parentheses would skip.
  pattern = re.compile(rf"=\s*(.*?)\s({names})(?:-start)?\(")
  return [
    (match.group(2), tuple(re.findall(r"\w+\[[\d,]*\]", match.group(1))))
    for match in pattern.finditer(hlo_text)
  ]


@optimizer_names
@mesh_names
def test_compiled_update_communicates_only_scalars(optimizer_name, mesh_name):
  collectives = _collectives(_sharded_trajectory(optimizer_name, mesh_name).compiled_update)
  if optimizer_name == "perturbed_sgd":
    # Gaussian noise needs no global norm and the step no gradient test: nothing to communicate.
    assert collectives == []
  # The gradient test and the sphere's radius sum squares shard by shard: their only
  # communication is an all-reduce of scalars. A gather, or one done as an all-reduce of a
  # padded array, would move a tensor.
  for name, shapes in collectives:
    assert name == "all-reduce", collectives
    assert all(shape.endswith("[]") for shape in shapes), collectives


def test_collective_parser_reads_compiled_collectives():
  # Guards the test above against an HLO spelling that the parser would not see.
  mesh = _mesh("auto_2d_no_context_mesh")
  sharded = NamedSharding(mesh, P("x", "y"))
  summed = jax.jit(lambda x: jnp.sum(x * x), in_shardings=sharded)
  replicated = jax.jit(lambda x: x, in_shardings=sharded, out_shardings=NamedSharding(mesh, P()))
  x = jnp.ones((8, 8))
  sum_collectives = _collectives(summed.lower(x).compile().as_text())
  assert sum_collectives and set(sum_collectives) == {("all-reduce", ("f32[]",))}
  gather_collectives = _collectives(replicated.lower(x).compile().as_text())
  assert gather_collectives and {name for name, _ in gather_collectives} == {"all-gather"}
  nested = "%a = ((f32[4]{0}, f32[4]{0}), (f32[8]{0}, f32[8]{0})) all-gather-start(%b, %c)"
  assert _collectives(nested) == [("all-gather", ("f32[4]", "f32[4]", "f32[8]", "f32[8]"))]
  assert _collectives("%r = s32[6]{0} ragged-all-to-all(%x)") == [
    ("ragged-all-to-all", ("s32[6]",))
  ]


@pytest.mark.parametrize(("optimizer_name", "mesh_name"), VMAP_CASES)
def test_vmap_over_keys_of_a_jitted_step(optimizer_name, mesh_name):
  def first_step(key, params):
    optimizer = OPTIMIZERS[optimizer_name](key)
    return optimizer.update(_gradients(params)[0], optimizer.init(params), params)

  # The first key is the one of the single-device trajectory, whose first step is this one.
  keys = jax.vmap(jax.random.key)(jnp.arange(SEED, SEED + NUM_KEYS))
  with _mesh_context(mesh_name):
    params = _sharded_params(mesh_name)
    updates, states = jax.vmap(jax.jit(first_step), in_axes=(0, None))(keys, params)

  mesh = _mesh(mesh_name)

  def check_batched_sharding(leaf, spec):
    assert leaf.shape[0] == NUM_KEYS
    # The key axis is replicated; the params' axes keep their sharding.
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P(None, *spec)), leaf.ndim)

  jax.tree.map(check_batched_sharding, updates, MESH_CASES[mesh_name].specs)
  # vmap equals a loop over keys on one device (test_perturbation.py); here the first row equals
  # the unbatched single-device step and the others are distinct draws.
  reference = _single_device_trajectory(optimizer_name)
  jax.tree.map(
    lambda batched, expected: _assert_close(batched[0], expected),
    _host.to_numpy((updates, states)),
    _host.to_numpy((reference.updates[0], reference.states[0])),
  )
  kernels = _host.to_numpy(updates["head"]["kernel"]).reshape(NUM_KEYS, -1)
  assert len(np.unique(kernels, axis=0)) == NUM_KEYS
  np.testing.assert_array_equal(_host.to_numpy(optax.tree.get(states, "count")), np.ones(NUM_KEYS))


# --- Laplacian smoothing (LSGD) -------------------------------------------------------------------

# Leaves sharded along every axis but the last, so "axis" mode can smooth each row where it lies.
SMOOTHING_SHAPES = {"kernel": (16, 40), "stack": (2, 8, 24)}
SMOOTHING_SPECS = {
  "explicit_1d": {"kernel": P("x", None), "stack": P(None, "x", None)},
  "explicit_2d": {"kernel": P(("x", "y"), None), "stack": P("x", "y", None)},
  "auto_2d_no_context_mesh": {"kernel": P(("x", "y"), None), "stack": P("x", "y", None)},
}
_inject_lsgd = optax.inject_hyperparams(jaxsaddle.lsgd, static_args=("order", "mode"))
SMOOTHERS = {
  # sigma = 1, order 1: the recursive solver; order 2: the direct one; a traced sigma: the FFT.
  "lsgd": lambda mode: jaxsaddle.lsgd(LEARNING_RATE, sigma=1.0, mode=mode),
  "lsgd_order_2": lambda mode: jaxsaddle.lsgd(LEARNING_RATE, sigma=1.0, order=2, mode=mode),
  "lsgd_traced_sigma": lambda mode: _inject_lsgd(LEARNING_RATE, sigma=1.0, mode=mode),
}
smoother_names = pytest.mark.parametrize("smoother_name", list(SMOOTHERS))


def _smoothing_params(shardings=None) -> dict:
  rng = np.random.default_rng(1)
  params = {
    name: rng.normal(size=shape).astype(np.float32) for name, shape in SMOOTHING_SHAPES.items()
  }
  if shardings is None:
    return jax.device_put(params, _host.local_device())
  return jax.tree.map(jax.device_put, params, shardings)


def _smoothing_step(smoother_name: str, mode: str, params):
  """The updates of one jitted LSGD step (the gradient is the params) and its compiled HLO."""
  optimizer = SMOOTHERS[smoother_name](mode)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update).lower(params, state, params).compile()
  updates, new_state = update(params, state, params)
  return updates, new_state, state, update.as_text()


@smoother_names
@mesh_names
def test_axis_smoothing_is_local_keeps_sharding_and_matches_one_device(smoother_name, mesh_name):
  mesh = _mesh(mesh_name)
  shardings = {name: NamedSharding(mesh, spec) for name, spec in SMOOTHING_SPECS[mesh_name].items()}
  with _mesh_context(mesh_name):
    params = _smoothing_params(shardings)
    updates, new_state, state, compiled = _smoothing_step(smoother_name, "axis", params)
  _assert_same_sharding(updates, params, "updates")
  if MESH_CASES[mesh_name].set_context_mesh:
    _assert_same_sharding(new_state, state, "state")
  reference, _, _, _ = _smoothing_step(smoother_name, "axis", _smoothing_params())
  jax.tree.map(_assert_close, _host.to_numpy(updates), _host.to_numpy(reference))
  if MESH_CASES[mesh_name].axis_type == AxisType.Explicit:
    # Each row is solved on the device that holds it (jax.shard_map): no communication at all.
    assert not [c for c in COLLECTIVES if c in compiled]
  elif smoother_name != "lsgd_traced_sigma":
    # Auto axes: XLA partitions the slices of the convolution solvers without gathering; it
    # does gather for FFTs (jax-ml/jax#15680, openxla/xla#24), which a traced sigma uses.
    assert "all-gather" not in compiled


@pytest.mark.parametrize(
  ("mode", "spec"), [("axis", P(None, "x")), ("leaf", P("x", None)), ("global", P(None, "x"))]
)
def test_smoothing_across_shards_gathers_explicitly_and_keeps_sharding(mode, spec):
  # The vectors to smooth span devices: the transform reshards them whole, then back.
  mesh = _mesh("explicit_1d")
  shardings = {
    "kernel": NamedSharding(mesh, spec),
    "stack": NamedSharding(mesh, P(None, "x", None)),
  }
  with _mesh_context("explicit_1d"):
    params = _smoothing_params(shardings)
    updates, _, _, compiled = _smoothing_step("lsgd", mode, params)
  _assert_same_sharding(updates, params, "updates")
  reference, _, _, _ = _smoothing_step("lsgd", mode, _smoothing_params())
  jax.tree.map(_assert_close, _host.to_numpy(updates), _host.to_numpy(reference))
  assert "all-gather" in compiled
