"""A small convolutional network, for the loop-versus-unrolled rows of the curvature benchmark.

Two 3x3 convolutions (1 -> 16 -> 32 channels, ReLU, 2x2 max pooling after each) and a dense
layer to 10 classes, on a fixed batch of 64 random 28x28 single-channel images: the shape of
model for which XLA on the CPU runs Hessian-vector products many times slower inside a loop
(jax-ml/jax#12868).
"""

import jax
import jax.numpy as jnp
import optax

BATCH_SIZE = 64
IMAGE_SIZE = 28
CHANNELS = (1, 16, 32)
NUM_CLASSES = 10


def init(key: jax.Array) -> dict[str, jax.Array]:
  keys = jax.random.split(key, 3)
  pooled = IMAGE_SIZE // 4
  return {
    "conv1": jax.random.normal(keys[0], (3, 3, *CHANNELS[:2])) * (2 / (9 * CHANNELS[0])) ** 0.5,
    "conv2": jax.random.normal(keys[1], (3, 3, *CHANNELS[1:])) * (2 / (9 * CHANNELS[1])) ** 0.5,
    "dense": jax.random.normal(keys[2], (pooled * pooled * CHANNELS[2], NUM_CLASSES))
    * (1 / (pooled * pooled * CHANNELS[2])) ** 0.5,
  }


def random_batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  inputs_key, labels_key = jax.random.split(key)
  inputs = jax.random.normal(inputs_key, (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, CHANNELS[0]))
  return inputs, jax.random.randint(labels_key, (BATCH_SIZE,), 0, NUM_CLASSES)


def _conv_relu_pool(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
  hidden = jax.lax.conv_general_dilated(
    hidden, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jax.lax.reduce_window(
    jax.nn.relu(hidden), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
  )


def loss_fn(params, batch) -> jax.Array:
  inputs, labels = batch
  hidden = _conv_relu_pool(_conv_relu_pool(inputs, params["conv1"]), params["conv2"])
  logits = hidden.reshape(hidden.shape[0], -1) @ params["dense"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def description() -> str:
  num_params = sum(leaf.size for leaf in jax.tree.leaves(init(jax.random.key(0))))
  return (
    f"a conv net ({CHANNELS[1]} and {CHANNELS[2]} 3x3 channels, {num_params:,} params), "
    f"batch {BATCH_SIZE} of {IMAGE_SIZE}x{IMAGE_SIZE}"
  )
