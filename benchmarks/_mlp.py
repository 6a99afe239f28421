"""The training problem the step-cost benchmarks share.

A 784-512-512-10 ReLU MLP with He-initialised weights and zero biases, trained
with softmax cross-entropy on a fixed batch of 128 random inputs and labels.
The batch is fixed because data loading is not what the benchmarks measure.
"""

import math

import jax
import jax.numpy as jnp
import optax

LAYER_SIZES = (784, 512, 512, 10)
BATCH_SIZE = 128


def init_mlp(key: jax.Array) -> list[dict[str, jax.Array]]:
  layer_keys = jax.random.split(key, len(LAYER_SIZES) - 1)
  return [
    {
      "w": jax.random.normal(k, (fan_in, fan_out)) * math.sqrt(2 / fan_in),
      "b": jnp.zeros(fan_out),
    }
    for k, fan_in, fan_out in zip(layer_keys, LAYER_SIZES[:-1], LAYER_SIZES[1:], strict=True)
  ]


def random_batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  inputs_key, labels_key = jax.random.split(key)
  inputs = jax.random.normal(inputs_key, (BATCH_SIZE, LAYER_SIZES[0]))
  labels = jax.random.randint(labels_key, (BATCH_SIZE,), 0, LAYER_SIZES[-1])
  return inputs, labels


def normalized(tree):
  """``tree`` over its norm: the unit tangents the curvature benchmarks feed to products."""
  norm = jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(tree)))
  return jax.tree.map(lambda leaf: leaf / norm, tree)


def loss_fn(params, batch) -> jax.Array:
  inputs, labels = batch
  hidden = inputs
  for layer in params[:-1]:
    hidden = jax.nn.relu(hidden @ layer["w"] + layer["b"])
  logits = hidden @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def description() -> str:
  """``a 784-512-512-10 ReLU MLP (669,706 params), batch 128``, for the reports."""
  num_params = sum(leaf.size for leaf in jax.tree.leaves(init_mlp(jax.random.key(0))))
  sizes = "-".join(map(str, LAYER_SIZES))
  return f"a {sizes} ReLU MLP ({num_params:,} params), batch {BATCH_SIZE}"


def training_step(tx: optax.GradientTransformation):
  """``(params, opt_state, batch) -> (params, opt_state)``, not yet jitted.

  The loss goes to ``tx.update`` as ``value``, which PGD's escape check reads and
  other transforms ignore.
  """

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state

  return step


class TrainingLoop:
  """A timing candidate's step: one jitted training step, params and state donated.

  Donating them (``donate_argnums``), as a training loop that keeps only the
  newest params does, lets XLA write them in place. ``constants`` are the
  step's arguments after the state, passed unchanged at every step.
  """

  def __init__(self, step, params, opt_state, *constants):
    self._step = jax.jit(step, donate_argnums=(0, 1))
    self._constants = constants
    self.params = params
    self.opt_state = opt_state

  def __call__(self):
    self.params, self.opt_state = self._step(self.params, self.opt_state, *self._constants)
    return self.params, self.opt_state
