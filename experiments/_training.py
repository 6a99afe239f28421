"""Training models for many seeds and learning rates in one jit, lanes vmapped or in turn.

:func:`train` is what the network experiments share: the seeds and
the learning rates are both ``jax.vmap``-ped, training runs in chunks of
``log_every`` steps (one compiled ``lax.scan``, called again and again, so the
wall time at each log is real), and every log holds the full-batch training loss
and gradient norm and the optimizer's counters read with ``optax.tree.get``.
Initialisation and mini-batches depend only on the seed, so every method and
learning rate sees the same ones.
"""

import functools
import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import _runner
from experiments import data
from experiments import models

# The optimizer-state fields logged when the optimizer has them (0 otherwise): escape
# diagnostics, and the oracle accounting of experiments._oracle.with_oracle_budget.
COUNTERS = (
  "num_perturbations",
  "num_curvature_steps",
  "num_lanczos_calls",
  "num_hvps",
  "oracle_calls",
  "num_steps_taken",
)


class TrainingResult(NamedTuple):
  """Logs of shape ``(learning_rates, seeds, logs)`` and end-of-training results.

  ``counters`` maps each name of :data:`COUNTERS` to its logs; ``wall`` holds
  the seconds since the start at each log; ``training_seconds`` is the time the
  optimizer steps took, all lanes together, without the logs and the first chunk of
  ``log_every`` steps (which compiles); ``test_metric`` is :func:`train`'s
  ``metric`` on the test set (accuracy for a classifier); ``params`` are the
  final parameters with leading ``(learning_rates, seeds)`` axes, for
  ``nnx.merge(graphdef, ...)``.
  """

  loss: np.ndarray
  grad_norm: np.ndarray
  counters: dict[str, np.ndarray]
  wall: list[float]
  training_seconds: float
  test_loss: np.ndarray
  test_metric: np.ndarray
  num_params: int
  oracle_per_step: float
  graphdef: Any
  params: Any


def _map_lanes(fn: Callable, in_axes: tuple[int | None, ...]) -> Callable:
  """``jax.vmap(fn, in_axes)`` computed lane by lane with ``lax.map`` (axes 0 or None only)."""

  def mapped(*args):
    axes = list(zip(args, in_axes, strict=True))

    def lane(lane_args):
      given = iter(lane_args)
      return fn(*(next(given) if axis == 0 else arg for arg, axis in axes))

    return jax.lax.map(lane, tuple(arg for arg, axis in axes if axis == 0))

  return mapped


def train(
  dataset: data.Dataset,
  build_model: Callable[[jax.Array], nnx.Module],
  make_optimizer: Callable[[jax.Array, jax.Array], optax.GradientTransformationExtraArgs],
  *,
  loss: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array] = models.cross_entropy_loss,
  metric: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array] = models.accuracy,
  learning_rates,
  seeds: int,
  steps: int,
  log_every: int,
  batch_size: int | None,
  vmap_lanes: bool = True,
) -> TrainingResult:
  """Trains ``build_model(key)`` by ``make_optimizer(learning_rate, key)`` on ``loss``.

  Args:
    dataset: the data; the whole training set is the full batch. ``y`` holds the targets
      that ``loss`` and ``metric`` compare the model's output with.
    build_model: a model from a PRNG key (traced: it is vmapped over seeds).
    make_optimizer: an optax transformation from a learning rate (or whichever
      hyperparameter is tuned) and a key (both traced). Its ``update`` receives
      ``value=`` the batch loss and ``value_fn=`` the batch loss as a function of
      the parameters.
    loss: ``loss(model, inputs, targets)``, the scalar trained on; cross-entropy
      against integer labels by default.
    metric: ``metric(model, inputs, targets)``, reported on the test set;
      accuracy by default.
    learning_rates: the candidates, all trained.
    seeds: seeds ``0 .. seeds - 1``; the seed keys the initialisation, the
      batches and the optimizer.
    steps: optimizer steps, a multiple of ``log_every``.
    log_every: steps between logs.
    batch_size: mini-batch size (drawn with replacement, so every step's batch
      is an independent draw), or None for full-batch gradients.
    vmap_lanes: train the (learning rate, seed) lanes under ``jax.vmap``. With
      False they run one after another (``lax.map``): under ``vmap`` a
      ``lax.cond`` becomes a select that computes both branches in every lane,
      so an optimizer with an expensive, rarely taken branch (negative
      curvature descent's Lanczos call) is far cheaper unbatched.
  """
  x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  num_examples = x.shape[0]
  if batch_size is None:
    batch_size = num_examples
  elif not 1 <= batch_size <= num_examples:
    # Clamping would train full-batch while the run's summary reports mini-batches.
    raise ValueError(
      f"batch_size must be in [1, {num_examples}] (the training set), got {batch_size}."
    )
  graphdef, example_params = nnx.split(build_model(jax.random.key(0)))
  learning_rates = jnp.asarray(learning_rates, jnp.float32)

  def loss_fn(params, inputs, targets):
    return loss(nnx.merge(graphdef, params), inputs, targets)

  def log_values(carry):
    params, state, _ = carry
    value, grads = jax.value_and_grad(loss_fn)(params, x, y)
    counters = [optax.tree.get(state, name, default=jnp.int32(0)) for name in COUNTERS]
    return value, optax.tree.norm(grads), counters

  def init(learning_rate, seed):
    model_key, optimizer_key, batch_key = jax.random.split(jax.random.key(seed), 3)
    _, params = nnx.split(build_model(model_key))
    state = make_optimizer(learning_rate, optimizer_key).init(params)
    carry = params, state, batch_key
    return carry, log_values(carry)

  def run_chunk(learning_rate, carry):
    # The key only seeds ``init``; updates read the key kept in the state.
    tx = make_optimizer(learning_rate, jax.random.key(0))

    def step(carry, _):
      params, state, batch_key = carry
      batch_key, draw_key = jax.random.split(batch_key)
      if batch_size == num_examples:
        inputs, targets = x, y
      else:
        index = jax.random.randint(draw_key, (batch_size,), 0, num_examples)
        inputs, targets = x[index], y[index]
      batch_loss = lambda p: loss_fn(p, inputs, targets)  # noqa: E731
      value, grads = jax.value_and_grad(batch_loss)(params)
      updates, state = tx.update(grads, state, params, value=value, value_fn=batch_loss)
      return (optax.apply_updates(params, updates), state, batch_key), None

    carry, _ = jax.lax.scan(step, carry, length=log_every)
    return carry

  def test_metrics(params):
    model = nnx.merge(graphdef, params)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    return loss(model, x_test, y_test), metric(model, x_test, y_test)

  def over_rates_and_seeds(fn, axes, batch=jax.vmap):
    return batch(batch(fn, axes[1]), axes[0])

  start = time.perf_counter()
  # Initialisation and test metrics run once: optimising them costs far more than it saves
  # (building a model's layers under two vmaps takes seconds to optimise).
  run_once = functools.partial(jax.jit, compiler_options=_runner.fast_compile_options())
  carry, first = run_once(over_rates_and_seeds(init, ((0, None), (None, 0))))(
    learning_rates, jnp.arange(seeds)
  )
  logs, wall = [first], [time.perf_counter() - start]
  lanes = jax.vmap if vmap_lanes else _map_lanes
  chunk = jax.jit(over_rates_and_seeds(run_chunk, ((0, 0), (None, 0)), lanes))
  log = jax.jit(jax.vmap(jax.vmap(log_values)))
  training_seconds = 0.0
  for index in range(steps // log_every):
    chunk_start = time.perf_counter()
    carry = jax.block_until_ready(chunk(learning_rates, carry))
    if index:  # the first call compiles
      training_seconds += time.perf_counter() - chunk_start
    logs.append(jax.block_until_ready(log(carry)))
    wall.append(time.perf_counter() - start)
  losses, grad_norms, counters = (
    jax.tree.map(lambda *v: np.stack(v, axis=-1), *parts) for parts in zip(*logs, strict=True)
  )
  test_loss, test_metric = run_once(jax.vmap(jax.vmap(test_metrics)))(carry[0])
  return TrainingResult(
    loss=losses,
    grad_norm=grad_norms,
    counters=dict(zip(COUNTERS, counters, strict=True)),
    wall=wall,
    training_seconds=training_seconds,
    test_loss=np.asarray(test_loss),
    test_metric=np.asarray(test_metric),
    num_params=int(sum(leaf.size for leaf in jax.tree.leaves(example_params))),
    oracle_per_step=batch_size / num_examples,
    graphdef=graphdef,
    params=carry[0],
  )
