"""Statistics of the counter-hash noise that the perturbation family draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import jaxsaddle
from jaxsaddle import _random

NUM_SAMPLES = 1 << 20


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def test_standard_normal_moments_and_shape():
  z = np.asarray(_random.tree_standard_normal(jax.random.key(0), jnp.zeros(NUM_SAMPLES)))
  standard_error = 1 / math.sqrt(NUM_SAMPLES)
  assert abs(z.mean()) < 5 * standard_error
  assert abs(z.var() - 1) < 5 * math.sqrt(2) * standard_error
  assert abs(stats.kurtosis(z, fisher=False) - 3) < 5 * math.sqrt(24) * standard_error
  assert abs(stats.skew(z)) < 5 * math.sqrt(6) * standard_error
  assert stats.kstest(z, "norm").pvalue > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_extreme_bits_give_finite_symmetric_normals(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    bits = jnp.array([0, 511, 512, 2**31 - 1, 2**31, 2**32 - 512, 2**32 - 1], jnp.uint32)
    drawn = _random.uniform_from_bits(bits, dtype)
    assert drawn.dtype == dtype
    uniform = np.asarray(drawn, np.float64)
    assert np.all(np.abs(uniform) < 1)
    np.testing.assert_array_equal(uniform[[0, 1]], -1 + 2.0**-23)
    np.testing.assert_array_equal(uniform[[-1, -2]], 1 - 2.0**-23)
    complement = _random.uniform_from_bits(~bits, dtype)
    np.testing.assert_array_equal(np.asarray(complement, np.float64), -uniform)
    normal = np.asarray(jnp.sqrt(2.0) * jax.lax.erf_inv(jnp.asarray(uniform, dtype)))
    assert np.all(np.isfinite(normal)) and np.abs(normal).max() < 5.4


def test_a_long_stream_is_finite():
  # One draw in 2**23 hits an extreme cell; 2**25 draws meet several of them.
  z = _random.tree_standard_normal(jax.random.key(11), jnp.zeros(1 << 25))
  assert bool(jnp.all(jnp.isfinite(z)))
  assert float(jnp.max(jnp.abs(z))) > 5.0


def test_standard_normal_is_not_correlated_along_the_stream():
  z = np.asarray(_random.tree_standard_normal(jax.random.key(1), jnp.zeros(NUM_SAMPLES)))
  bound = 5 / math.sqrt(NUM_SAMPLES)
  for lag in (1, 2, 7, 256, 4096):
    assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound, lag
  # Independence also of magnitudes (a weak hash shows up in |z| before z).
  assert abs(np.corrcoef(np.abs(z[:-1]), np.abs(z[1:]))[0, 1]) < bound


def test_standard_normal_differs_across_keys_without_correlation():
  keys = jax.random.split(jax.random.key(2), 16)
  samples = np.asarray(
    jax.vmap(lambda k: _random.tree_standard_normal(k, jnp.zeros(1 << 16)))(keys)
  )
  correlations = np.corrcoef(samples)[np.triu_indices(16, k=1)]
  assert np.all(np.abs(correlations) < 5 / math.sqrt(1 << 16))
  # Neighbouring integer seeds are the typical user input; they must be independent too.
  neighbours = np.stack(
    [_random.tree_standard_normal(jax.random.key(s), jnp.zeros(1 << 16)) for s in range(4)]
  )
  assert np.all(np.abs(np.corrcoef(neighbours)[np.triu_indices(4, k=1)]) < 5 / 256)


def test_rademacher_signs_are_balanced_independent_and_follow_the_flattened_vector():
  signs = np.asarray(_random.tree_rademacher(jax.random.key(11), jnp.zeros(NUM_SAMPLES)))
  assert set(np.unique(signs)) == {-1.0, 1.0}
  assert abs(signs.mean()) < 5 / math.sqrt(NUM_SAMPLES)
  for lag in (1, 2, 31, 32, 4096):
    assert abs(np.mean(signs[:-lag] * signs[lag:])) < 5 / math.sqrt(NUM_SAMPLES), lag
  other = np.asarray(_random.tree_rademacher(jax.random.key(12), jnp.zeros(NUM_SAMPLES)))
  assert abs(np.mean(signs * other)) < 5 / math.sqrt(NUM_SAMPLES)
  key = jax.random.key(13)
  tree = {"a": jnp.zeros((3, 4), jnp.bfloat16), "b": (jnp.zeros(5), jnp.zeros((2, 1, 3)))}
  sampled = _random.tree_rademacher(key, tree)
  assert sampled["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(_flat(sampled), _random.tree_rademacher(key, jnp.zeros(23)))


def test_pytree_noise_equals_noise_of_the_flattened_vector():
  key = jax.random.key(3)
  tree = {"a": jnp.zeros((3, 4)), "b": (jnp.zeros(5), jnp.zeros((2, 1, 3)))}
  flat = _random.tree_standard_normal(key, jnp.zeros(23))
  np.testing.assert_array_equal(_flat(_random.tree_standard_normal(key, tree)), flat)


def test_vmap_over_keys_equals_a_loop():
  keys = jax.random.split(jax.random.key(4), 8)
  tree = {"w": jnp.zeros((4, 5), jnp.bfloat16), "b": jnp.zeros(3)}
  sample = jax.jit(lambda k: _random.sample_isotropic(k, tree, 0.5, "ball"))
  batched = jax.vmap(sample)(keys)
  for i, key in enumerate(keys):
    jax.tree.map(lambda b, s, i=i: np.testing.assert_array_equal(b[i], s), batched, sample(key))


def _tree_of_mixed_sizes(big_scale, small_scale):
  return {
    "w": big_scale * jnp.linspace(-1.0, 1.0, 2000).reshape(40, 50),
    "w2": big_scale * jnp.cos(jnp.arange(300.0)),
    "b": small_scale * jnp.sin(jnp.arange(10.0)),
    "b2": small_scale * jnp.ones(4, jnp.bfloat16),
  }


@pytest.mark.parametrize(
  "big_scale, small_scale", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (3.0, 1e-3)]
)
def test_norm_at_most_agrees_with_the_norm_on_both_sides_of_the_threshold(big_scale, small_scale):
  tree = _tree_of_mixed_sizes(big_scale, small_scale)
  norm = float(np.linalg.norm(_flat(tree)))
  test = jax.jit(_random.norm_at_most)
  for factor in np.geomspace(1e-3, 1e3, 25):
    if abs(factor - 1) > 1e-3:
      assert bool(test(tree, norm * factor)) == (norm <= norm * factor), factor
  assert bool(test(tree, 2 * norm + 1e-3))
  np.testing.assert_allclose(float(_random.global_norm(tree)), norm, rtol=1e-5)


def test_norm_at_most_reads_the_large_leaves_only_inside_the_cond():
  tree = _tree_of_mixed_sizes(1.0, 1.0)
  jaxpr = jax.make_jaxpr(lambda t: _random.norm_at_most(t, 0.5))(tree).jaxpr
  (cond,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
  read_first = [eqn.invars[0].aval.size for eqn in jaxpr.eqns if eqn.primitive.name == "reduce_sum"]
  assert sorted(read_first) == [4, 10]
  assert {v.aval.size for v in cond.invars} >= {300, 2000}


@pytest.mark.parametrize("leaf", ["w", "b"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_norm_at_most_is_false_for_nan_or_inf_in_any_leaf(leaf, bad):
  tree = _tree_of_mixed_sizes(1e-6, 1e-6)
  tree[leaf] = tree[leaf].at[(0,) * tree[leaf].ndim].set(bad)
  assert not bool(jax.jit(_random.norm_at_most)(tree, 1e6))


def test_norm_at_most_under_vmap_equals_a_loop():
  scales = jnp.array([0.0, 1e-3, 0.1, 1.0, 10.0])
  trees = jax.vmap(lambda s: _tree_of_mixed_sizes(s, 1e-3 * s))(scales)
  thresholds = jnp.array([0.5, 0.5, 5.0, 5.0, 5.0])
  batched = jax.vmap(_random.norm_at_most)(trees, thresholds)
  looped = [
    bool(_random.norm_at_most(jax.tree.map(lambda x, i=i: x[i], trees), thresholds[i]))
    for i in range(len(scales))
  ]
  assert batched.tolist() == looped and True in looped and False in looped
  norms = jax.vmap(_random.global_norm)(trees)
  assert looped == [bool(n <= t) for n, t in zip(norms, thresholds, strict=True)]


def test_sample_keeps_leaf_dtypes_and_is_float32_inside():
  tree = {"h": jnp.zeros(1000, jnp.float16), "b": jnp.zeros(1000, jnp.bfloat16)}
  noise = _random.sample_isotropic(jax.random.key(5), tree, 1.0, "sphere")
  assert noise["h"].dtype == jnp.float16 and noise["b"].dtype == jnp.bfloat16
  # Drawn and normalised in float32, then rounded once: exactly the float32 sample, cast.
  wide = _random.sample_isotropic(jax.random.key(5), jax.tree.map(jnp.float32, tree), 1.0, "sphere")
  for name, leaf in noise.items():
    np.testing.assert_array_equal(
      np.asarray(leaf, np.float32), np.asarray(wide[name].astype(leaf.dtype), np.float32)
    )
  # 2000 low-precision coordinates still lie on the unit sphere to their precision.
  assert abs(np.linalg.norm(_flat(noise)) - 1) < 1e-2


@pytest.mark.parametrize("distribution", ["gaussian", "sphere", "ball"])
def test_noise_of_a_key_does_not_depend_on_the_x64_flag(distribution):
  # The ball's radius was drawn in the default dtype: norm 0.62 without x64, 0.98 with it.
  tree = jnp.zeros(5, jnp.float32)
  without = _random.sample_isotropic(jax.random.key(0), tree, 1.0, distribution)
  with jax.enable_x64(True):
    with_x64 = _random.sample_isotropic(jax.random.key(0), tree, 1.0, distribution)
  assert with_x64.dtype == jnp.float32
  np.testing.assert_allclose(with_x64, without, rtol=1e-6)


def _angles(samples: np.ndarray) -> np.ndarray:
  return np.arctan2(samples[:, 1], samples[:, 0])


@pytest.mark.parametrize("distribution", ["gaussian", "sphere", "ball"])
def test_directions_are_uniform_in_two_and_three_dimensions(distribution):
  keys = jax.random.split(jax.random.key(6), 50_000)
  for dim in (2, 3):
    samples = np.asarray(
      jax.vmap(lambda k, d=dim: _random.sample_isotropic(k, jnp.zeros(d), 1.0, distribution))(keys),
      np.float64,
    )
    directions = samples / np.linalg.norm(samples, axis=1, keepdims=True)
    if dim == 2:
      assert stats.kstest(_angles(directions), "uniform", args=(-np.pi, 2 * np.pi)).pvalue > 1e-3
    else:
      # Archimedes: one coordinate of a uniform point on S^2 is uniform on [-1, 1].
      assert stats.kstest(directions[:, 2], "uniform", args=(-1, 2)).pvalue > 1e-3


@pytest.mark.parametrize("dim", [1, 3, 10])
def test_ball_radius_law_and_sphere_radius(dim):
  keys = jax.random.split(jax.random.key(7), 20_000)
  radius = 0.3
  ball = np.asarray(
    jax.vmap(lambda k: _random.sample_isotropic(k, jnp.zeros(dim), radius, "ball"))(keys)
  )
  norms = np.linalg.norm(ball, axis=1)
  assert norms.max() <= radius * (1 + 1e-6)
  # Uniform in the ball: (|x| / r)^d is uniform on [0, 1].
  assert stats.kstest((norms / radius) ** dim, "uniform").pvalue > 1e-3
  sphere = np.asarray(
    jax.vmap(lambda k: _random.sample_isotropic(k, jnp.zeros(dim), radius, "sphere"))(keys)
  )
  np.testing.assert_allclose(np.linalg.norm(sphere, axis=1), radius, rtol=1e-6)


def test_gaussian_noise_has_covariance_r2_over_d():
  dim, radius = 50, 2.0
  keys = jax.random.split(jax.random.key(8), 20_000)
  samples = np.asarray(
    jax.vmap(lambda k: _random.sample_isotropic(k, jnp.zeros(dim), radius, "gaussian"))(keys),
    np.float64,
  )
  covariance = np.cov(samples, rowvar=False)
  np.testing.assert_allclose(np.diag(covariance), radius**2 / dim, rtol=0.05)
  off_diagonal = covariance[~np.eye(dim, dtype=bool)]
  assert np.abs(off_diagonal).max() < 0.05 * radius**2 / dim
  np.testing.assert_allclose(np.mean(np.sum(samples**2, axis=1)), radius**2, rtol=0.02)


def test_noise_is_fresh_at_every_step_and_independent_of_the_previous_one():
  tx = jaxsaddle.add_isotropic_noise(1.0, distribution="gaussian", key=9)
  params = jnp.zeros(1 << 16)
  state = tx.init(params)
  update = jax.jit(tx.update)
  samples = []
  for _ in range(4):
    noise, state = update(params, state)
    samples.append(np.asarray(noise))
  correlations = np.corrcoef(np.stack(samples))[np.triu_indices(4, k=1)]
  assert np.all(np.abs(correlations) < 5 / 256)
  assert int(state.count) == 4


@pytest.mark.parametrize(
  "key",
  [7, jax.random.key(7), jax.random.PRNGKey(7), jax.random.key(7, impl="rbg")],
  ids=["int", "typed", "raw", "rbg"],
)
def test_every_key_form_is_accepted(key):
  typed = _random.canonicalize_key(key)
  assert jnp.issubdtype(typed.dtype, jax.dtypes.prng_key)
  noise = _random.tree_standard_normal(typed, jnp.zeros(16))
  assert np.all(np.isfinite(noise))
  if not isinstance(key, jax.Array) or key.dtype == jnp.uint32 or "fry" in str(key.dtype):
    np.testing.assert_array_equal(
      noise, _random.tree_standard_normal(jax.random.key(7), jnp.zeros(16))
    )


def test_a_seed_outside_32_bits_is_refused_without_x64():
  # JAX keeps a seed's low 32 bits: 2**32 and 0 would give the same noise, and -1 and 2**32 - 1.
  for seed in (2**32, 2**40, -1, np.int64(2**40), np.array(2**40)):
    with pytest.raises(ValueError, match=r"a seed must lie in \[0, 2\*\*32\)"):
      _random.canonicalize_key(seed)
  for seed in (0, 2**32 - 1, np.int64(5), np.array(7, np.uint32), jnp.array(3)):
    assert jnp.issubdtype(_random.canonicalize_key(seed).dtype, jax.dtypes.prng_key)
  with jax.enable_x64(True):
    wide = jax.random.key_data(_random.canonicalize_key(2**40))
  assert not np.array_equal(wide, jax.random.key_data(jax.random.key(0)))


@pytest.mark.parametrize(
  "keys",
  [jnp.arange(3), jax.random.split(jax.random.key(0), 3), jax.random.split(jax.random.PRNGKey(0))],
  ids=["seeds", "typed", "raw"],
)
def test_a_batch_of_keys_is_refused_with_the_vmap_route(keys):
  with pytest.raises(ValueError, match=r"batch of shape \(\d+,\).*jax.vmap"):
    jaxsaddle.noisy_gd(0.1, noise_scale=0.1, key=keys).init(jnp.zeros(3))
  # The route it names: one transform per key.
  states = jax.vmap(
    lambda key: jaxsaddle.noisy_gd(0.1, noise_scale=0.1, key=key).init(jnp.zeros(3))
  )(keys)
  assert optax.tree.get(states, "rng_key").shape == (keys.shape[0],)


def test_noise_never_hides_nan_gradients():
  tx = jaxsaddle.add_isotropic_noise(1.0, distribution="sphere", key=0)
  grads = jnp.array([1.0, jnp.nan, jnp.inf])
  updates, _ = tx.update(grads, tx.init(grads))
  assert np.isnan(updates[1]) and np.isposinf(updates[2]) and np.isfinite(updates[0])
  # Noise was added where the gradient is finite (the sphere's radius is 1).
  assert 0 < abs(float(updates[0]) - 1.0) <= 1.0


def test_noise_rejects_integer_parameters_and_bad_arguments():
  with pytest.raises(TypeError, match=r"\['step'\].*int32"):
    jaxsaddle.add_isotropic_noise(1.0).init({"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32)})
  with pytest.raises(ValueError, match="noise_scale"):
    jaxsaddle.add_isotropic_noise(-1.0)
  with pytest.raises(ValueError, match="distribution"):
    jaxsaddle.add_isotropic_noise(1.0, distribution="cauchy")
  with pytest.raises(ValueError, match="noise_scale"):
    jaxsaddle.noisy_gd(0.1, noise_scale=-0.5)
  # Integer updates would truncate the noise to zero.
  tx = jaxsaddle.noisy_gd(1.0, noise_scale=1.0)
  with pytest.raises(TypeError, match=r"\['a'\].*int32"):
    tx.update({"a": jnp.ones(4, jnp.int32)}, tx.init({"a": jnp.ones(4)}))


def test_zero_dimensional_uint32_seeds_are_seeds_and_vmap():
  params = jnp.zeros(3)

  def noise(seed):
    tx = jaxsaddle.perturbed_sgd(1.0, noise_scale=1.0, key=seed)
    return tx.update(params, tx.init(params))[0]

  seeds = jnp.arange(3, dtype=jnp.uint32)
  batched = jax.vmap(noise)(seeds)
  for i in range(3):
    # To float32 rounding: the loop's eager calls run jitted, the vmapped ones op by op.
    np.testing.assert_allclose(batched[i], noise(int(seeds[i])), rtol=1e-6, atol=0)
  np.testing.assert_array_equal(noise(jnp.uint32(2)), noise(2))


def test_isotropic_noise_state_is_readable_inside_a_chain():
  tx = optax.chain(optax.clip_by_global_norm(1.0), jaxsaddle.perturbed_sgd(0.1, noise_scale=0.1))
  state = tx.init(jnp.zeros(3))
  first_key = optax.tree.get(state, "rng_key")
  _, state = tx.update(jnp.ones(3), state)
  assert not np.array_equal(
    jax.random.key_data(first_key), jax.random.key_data(optax.tree.get(state, "rng_key"))
  )
