r"""Models for the experiments (flax.nnx): classifiers with their loss and accuracy, and a deep
autoencoder with its reconstruction loss and the saddle it starts from.

:func:`make_model` builds one of :data:`MODELS` for inputs of shape
``input_shape`` (one example, as :attr:`experiments.data.Dataset.input_shape`
gives it) and ``num_classes`` logits:

- ``"logistic"``: multinomial logistic regression, one dense layer.
- ``"mlp"``: one hidden layer of ``width`` units.
- ``"deep_mlp"``: ``depth`` dense layers (``depth - 1`` hidden layers of
  ``width`` units), ``depth >= 3``.
- ``"deep_linear"``: ``depth >= 2`` bias-free dense layers of ``width`` units
  and no nonlinearity, :math:`f(x) = W_D \cdots W_1 x`, the classic model
  whose origin is a saddle (below).
- ``"cnn"``: two ``3 x 3`` (or, for 1D inputs, length-3) convolutions of
  ``width`` channels, each followed by the activation and a ``2 x 2`` average
  pooling, then a dense layer. Inputs are ``(*spatial, channels)`` with one
  or two spatial axes of at least 4: 28x28x1 MNIST, 32x32x3 CIFAR-10, 8x8x1
  digits, 40x1 MNIST-1D.

The dense models flatten the example's axes; with ``batch_norm=True`` (``mlp`` and
``deep_mlp``) every hidden layer is followed by ``nnx.BatchNorm`` before its activation,
always normalising with the statistics of the batch it is given (no running averages): the
loss is then a function of the whole batch, and a Hessian of it is taken on the batch the loss
is (Ghorbani et al. 2019 found that BatchNorm removes the Hessian's large outliers). The
activation is ``tanh`` by
default: the escape guarantees assume a loss with a Lipschitz Hessian, which a
ReLU's kink breaks (``"relu"`` is there to compare). Average pooling, not max
pooling, for the same reason.

Initialisation: every parameter is flax's default (kernels LeCun normal,
variance :math:`1/\text{fan-in}`; biases zero) multiplied by ``init_scale``.
``init_scale=1`` is the standard initialisation; a small one (e.g. ``1e-3``)
starts near the origin and ``init_scale=0`` exactly at it. The origin is a
critical point of the deep linear network, and of the models with a hidden
layer when the training classes are balanced: there the only gradient is the
output bias's, ``1 / num_classes`` minus the class frequencies. (Logistic
regression is convex, with no saddle.)

The deep linear network's saddle: with all weights zero the gradient
:math:`\partial L / \partial W_i = (W_D \cdots W_{i+1})^\top G (W_{i-1} \cdots
W_1)^\top` has a zero factor, so it vanishes, where :math:`G = \tfrac1n
\sum_n (\mathrm{softmax}(0) - e_{y_n}) x_n^\top` is the loss's gradient with
respect to the end-to-end matrix. Near the origin :math:`L = L(0) + \langle G,
W_D \cdots W_1 \rangle + O(\|W\|^{2D})`, a form of degree ``depth``:

- ``depth = 2``: the Hessian is indefinite, with eigenvalues :math:`\pm
  \sigma_i(G)`, each ``width`` times, and zeros: a strict saddle.
- ``depth >= 3``: the Hessian is zero, a degenerate saddle that second-order
  methods cannot see; the loss still falls along :math:`W_D \cdots W_1
  \propto -G`, so the origin is not a minimum whenever :math:`G \ne 0`.

Example::

  import jax, optax
  from flax import nnx
  from experiments import data, models

  dataset = data.load("digits")
  model = models.make_model(
    "mlp", input_shape=dataset.input_shape, num_classes=dataset.num_classes, width=32,
    rngs=nnx.Rngs(0),
  )
  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(models.cross_entropy_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  for _ in range(10):
    train_step(model, optimizer, dataset.x_train, dataset.y_train)
  models.accuracy(model, dataset.x_test, dataset.y_test)

The autoencoder (:func:`make_autoencoder`) is Tripuraneni et al.'s (NeurIPS 2018, §5.2) deep
autoencoder: dense layers from the flattened input through ``hidden_sizes`` (the last is the
code) and back through the same sizes reversed, softplus after every hidden layer, the code
included (the paper says "softplus hidden units"; Hinton and Salakhutdinov's code layer was
linear), and a sigmoid output, trained on :func:`reconstruction_loss`. Its *mean-image saddle*
(:func:`mean_image_saddle`) is a critical point, exact but for the pixels whose mean is 0 or 1,
that is not a minimum.
"""

import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsaddle import _checks

MODELS = ("logistic", "mlp", "deep_mlp", "deep_linear", "cnn")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"tanh": jnp.tanh, "relu": jax.nn.relu}
DEFAULT_ACTIVATION = "tanh"
_USES_WIDTH = ("mlp", "deep_mlp", "deep_linear", "cnn")
_USES_DEPTH = ("deep_mlp", "deep_linear")
_USES_ACTIVATION = ("mlp", "deep_mlp", "cnn")
_USES_BATCH_NORM = ("mlp", "deep_mlp")
_MIN_DEPTH = {"deep_mlp": 3, "deep_linear": 2}


def _check_input(model_name: str, input_shape: tuple[int, ...], x: jax.Array) -> None:
  if x.ndim <= len(input_shape) or x.shape[x.ndim - len(input_shape) :] != input_shape:
    raise ValueError(
      f"{model_name} takes a batch of examples of shape {input_shape}, got shape {x.shape}."
    )


class DenseNetwork(nnx.Module):
  """Dense layers ``layer_sizes[0] -> ... -> layer_sizes[-1]`` on flattened examples.

  The activation (if any) follows every layer but the last.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    layer_sizes: Sequence[int],
    *,
    activation: str | None,
    use_bias: bool,
    batch_norm: bool = False,
    rngs: nnx.Rngs,
  ):
    self.input_shape = tuple(input_shape)
    self.activation = activation
    self.layers = nnx.List(
      [
        nnx.Linear(fan_in, fan_out, use_bias=use_bias, rngs=rngs)
        for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:], strict=True)
      ]
    )
    self.norms = nnx.List(
      [
        nnx.BatchNorm(size, use_running_average=False, rngs=rngs)
        for size in (layer_sizes[1:-1] if batch_norm else [])
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    _check_input(type(self).__name__, self.input_shape, x)
    x = x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1)
    for index, layer in enumerate(self.layers[:-1]):
      x = layer(x)
      if self.norms:
        x = self.norms[index](x)
      if self.activation is not None:
        x = ACTIVATIONS[self.activation](x)
    return self.layers[-1](x)


class ConvNetwork(nnx.Module):
  """Two convolutions with average pooling, then a dense layer to the logits."""

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int,
    activation: str,
    rngs: nnx.Rngs,
  ):
    self.input_shape = tuple(input_shape)
    *spatial, channels = self.input_shape
    if len(spatial) not in (1, 2) or min(spatial) < 4:
      raise ValueError(
        "cnn takes examples of shape (*spatial, channels) with one or two spatial axes of at "
        f"least 4, got input_shape {self.input_shape}."
      )
    self.window = (2,) * len(spatial)
    kernel = (3,) * len(spatial)
    self.activation = activation
    self.conv1 = nnx.Conv(channels, width, kernel, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, kernel, rngs=rngs)
    pooled_size = math.prod(size // 4 for size in spatial)  # two "VALID" 2x pools
    self.dense = nnx.Linear(pooled_size * width, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    _check_input(type(self).__name__, self.input_shape, x)
    activation = ACTIVATIONS[self.activation]
    for conv in (self.conv1, self.conv2):
      x = nnx.avg_pool(activation(conv(x)), self.window, strides=self.window)
    x = x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1)
    return self.dense(x)


def make_model(
  name: str,
  *,
  input_shape: Sequence[int],
  num_classes: int,
  width: int | None = None,
  depth: int | None = None,
  activation: str | None = None,
  batch_norm: bool = False,
  init_scale: float = 1.0,
  rngs: nnx.Rngs,
) -> nnx.Module:
  """Builds the classifier ``name``, one of :data:`MODELS`; see the module docstring.

  Args:
    name: the architecture.
    input_shape: the shape of one example.
    num_classes: the number of logits.
    width: hidden units (dense) or channels (``cnn``); required by every model
      but ``logistic``.
    depth: the number of weight matrices; required by ``deep_mlp`` (>= 3) and
      ``deep_linear`` (>= 2).
    activation: one of :data:`ACTIVATIONS` for ``mlp``, ``deep_mlp`` and
      ``cnn``; ``tanh`` when None.
    batch_norm: BatchNorm (batch statistics) after every hidden layer of ``mlp`` and
      ``deep_mlp``; see the module docstring.
    init_scale: every parameter is multiplied by it after flax's default
      initialisation: 1 is standard, ``1e-3`` near the origin, 0 at it.
    rngs: the initialisation randomness. Under ``jax.vmap`` over keys,
      ``nnx.split`` of the model gives one set of parameters per key.

  Raises:
    ValueError: an unknown name or activation, a required argument missing,
      an argument the model does not use given (so that it is not silently
      ignored), or a value out of range.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}.")
  for argument, value, users in (
    ("width", width, _USES_WIDTH),
    ("depth", depth, _USES_DEPTH),
    ("activation", activation, _USES_ACTIVATION),
  ):
    if value is not None and name not in users:
      raise ValueError(f"{name} has no {argument}; it is used by {', '.join(users)}.")
  if batch_norm and name not in _USES_BATCH_NORM:
    raise ValueError(f"{name} has no batch_norm; it is used by {', '.join(_USES_BATCH_NORM)}.")
  if name in _USES_WIDTH:
    if width is None:
      raise ValueError(f"{name} needs width.")
    _checks.check_at_least_one(name, "width", width)
  if name in _USES_DEPTH:
    if depth is None:
      raise ValueError(f"{name} needs depth.")
    _checks.check_at_least_one(name, "depth", depth)
    if depth < _MIN_DEPTH[name]:
      raise ValueError(f"{name} needs depth >= {_MIN_DEPTH[name]}, got {depth}.")
  activation = activation or DEFAULT_ACTIVATION
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}.")
  _checks.check_at_least_one(name, "num_classes", num_classes)
  _checks.check_nonnegative(name, "init_scale", init_scale)
  input_shape = tuple(input_shape)
  if not input_shape or not all(isinstance(size, int) and size >= 1 for size in input_shape):
    raise ValueError(f"input_shape must be positive integers, got {input_shape}.")
  num_inputs = math.prod(input_shape)

  if name == "cnn":
    model = ConvNetwork(input_shape, num_classes, width=width, activation=activation, rngs=rngs)
  else:
    if name == "logistic":
      hidden = []
    elif name == "mlp":
      hidden = [width]
    else:
      hidden = [width] * (depth - 1)
    model = DenseNetwork(
      input_shape,
      [num_inputs, *hidden, num_classes],
      activation=activation if name in _USES_ACTIVATION else None,
      use_bias=name != "deep_linear",
      batch_norm=batch_norm,
      rngs=rngs,
    )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda leaf: leaf * jnp.asarray(init_scale, leaf.dtype), params)
  return nnx.merge(graphdef, params, rest)


class Autoencoder(nnx.Module):
  """Dense encoder and mirrored decoder; softplus hidden units, sigmoid output."""

  def __init__(self, input_shape: Sequence[int], hidden_sizes: Sequence[int], *, rngs: nnx.Rngs):
    self.input_shape = tuple(input_shape)
    num_inputs = math.prod(self.input_shape)
    sizes = [num_inputs, *hidden_sizes, *reversed(hidden_sizes[:-1]), num_inputs]
    self.layers = nnx.List(
      [
        nnx.Linear(fan_in, fan_out, rngs=rngs)
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    _check_input(type(self).__name__, self.input_shape, x)
    shape = x.shape
    x = x.reshape(*shape[: x.ndim - len(self.input_shape)], -1)
    for layer in self.layers[:-1]:
      x = jax.nn.softplus(layer(x))
    return jax.nn.sigmoid(self.layers[-1](x)).reshape(shape)


def make_autoencoder(
  *, input_shape: Sequence[int], hidden_sizes: Sequence[int], rngs: nnx.Rngs
) -> Autoencoder:
  """The autoencoder ``input -> hidden_sizes -> reversed(hidden_sizes[:-1]) -> input`` with
  flax's default initialisation; ``(512, 256, 128, 32)`` on MNIST is Tripuraneni et al.'s."""
  input_shape = tuple(input_shape)
  if not input_shape or not all(isinstance(size, int) and size >= 1 for size in input_shape):
    raise ValueError(f"input_shape must be positive integers, got {input_shape}.")
  if not hidden_sizes:
    raise ValueError("hidden_sizes must name at least the code layer's size.")
  for size in hidden_sizes:
    _checks.check_at_least_one("autoencoder", "hidden_sizes", size)
  return Autoencoder(input_shape, tuple(hidden_sizes), rngs=rngs)


# Pixels whose training mean is 0 or 1 (MNIST's borders) have no finite logit: the output
# bias puts them this close instead, which leaves a bias gradient of 2 c^2 (1 - c) ~ 2e-8 per such
# pixel (c this clip), and the same times a hidden activation on the last kernel.
MEAN_IMAGE_CLIP = 1e-4


def mean_image_saddle(model: Autoencoder, images: jax.Array) -> Autoencoder:
  r"""``model`` moved to the critical point whose reconstruction of every image is their mean.

  With the first and last kernels zero, every hidden activation is the same for all images, so
  the output is the constant :math:`\sigma(b)`, :math:`b` the output bias, here the logit of
  the mean image :math:`\bar x` (clipped to ``[MEAN_IMAGE_CLIP, 1 - MEAN_IMAGE_CLIP]``). The
  gradient then vanishes (but for the clipped pixels): the output bias's is
  :math:`\tfrac{2}{n}\sum_i (\bar x - x_i) \odot \sigma'(b) = 0`; the last kernel's is a
  constant hidden vector times that same sum; and no other layer receives a signal through the
  zero last kernel. The loss is the total pixel variance.

  The point is a strict saddle. On the first and last kernels :math:`(W_1, W_L)` the Hessian
  has the blocks :math:`[[0, B^\top], [B, A]]`: the loss does not change with :math:`W_1`
  while :math:`W_L = 0`, so its block is zero; :math:`A \succeq 0`, since a change of
  :math:`W_L` alone changes every image's output alike and the residuals sum to zero, which
  leaves the Gauss-Newton term; and :math:`B(\delta W_1, \delta W_L) = -2\, \mathrm{tr}(D\,
  \delta W_L J\, \delta W_1 C)`, with :math:`D = \mathrm{diag}\, \sigma'(b)`, :math:`J` the
  middle layers' Jacobian and :math:`C` the images' covariance. Whenever :math:`B \ne 0` (the
  images vary and the middle layers pass a signal) such a matrix has a negative eigenvalue. The
  middle layers keep ``model``'s values.
  """
  mean = jnp.clip(jnp.mean(images, axis=0).reshape(-1), MEAN_IMAGE_CLIP, 1 - MEAN_IMAGE_CLIP)
  graphdef, params = nnx.split(model)
  first, last = params["layers"][0], params["layers"][len(model.layers) - 1]
  first["kernel"] = jnp.zeros_like(first["kernel"])
  last["kernel"] = jnp.zeros_like(last["kernel"])
  last["bias"] = (jnp.log(mean) - jnp.log1p(-mean)).astype(last["bias"].dtype)
  return nnx.merge(graphdef, params)


def reconstruction_loss(model: nnx.Module, x: jax.Array, target: jax.Array) -> jax.Array:
  """The squared error of ``model(x)`` against ``target``, summed over each example's entries
  and averaged over examples; for the mean image it is the total pixel variance."""
  error = (model(x) - target).reshape(x.shape[0], -1)
  return jnp.mean(jnp.sum(error**2, axis=-1))


def cross_entropy_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """The mean softmax cross-entropy of ``model(x)`` against integer labels ``y``."""
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def accuracy(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """The fraction of examples whose largest logit is at their label."""
  return jnp.mean(jnp.argmax(model(x), axis=-1) == y)
