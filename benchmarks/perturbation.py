"""Cost per training step of jaxsaddle's perturbation optimizers, against optax.

Run with ``python -m benchmarks.perturbation [--quick] [--json PATH]``.

The step is the whole jitted training step of a 784-512-512-10 ReLU MLP on a
batch of 128 random inputs with softmax cross-entropy: ``value_and_grad``,
``tx.update(grads, state, params, value=loss)`` and ``optax.apply_updates``.
Params and optimizer state are donated (``donate_argnums``), as in a training
loop that keeps only the newest params, so XLA may write them in place. The
batch is fixed: data loading is not what is measured. PGD runs with its escape
check on (``escape_threshold`` set, ``value`` passed), its most expensive use.

How each row is made:

- ``pgd, test fails``: ``gradient_threshold`` is 1e-12, so the gradient test
  fails at every step and ``lax.cond`` skips the draw; this is the cost of PGD
  away from saddles, i.e. almost always. As there, the norm of the smallest
  leaves alone exceeds the threshold, so the large leaves' gradients are not
  read a second time (``jaxsaddle._random.norm_at_most``).
- ``pgd, perturbs every step (forced)``: ``gradient_threshold`` is huge and the
  step sets ``steps_since_perturbation`` to its "never" value before calling
  ``update`` (one scalar store), so the test passes at every step and the same
  compiled ``lax.cond`` takes the perturbing branch every time.
- ``pgd, perturbs 1 step in 3``: huge threshold, ``escape_steps=1`` and no
  forcing, so the library's own schedule perturbs every third step; the
  perturbing step's cost it implies, ``3 t - 2 t_fail``, is printed beside the
  forced row as an upper bound: with the huge threshold the norm test of the
  two steps that do not perturb reads every leaf, where ``pgd, test fails``
  stops after the small ones, so the difference counts two extra reads of the
  large leaves' gradients against the perturbing step.
- ``vmap8``: one jitted step of 8 independent runs (own init, key and batch
  each) under ``jax.vmap``, where ``lax.cond`` becomes ``select`` and PGD draws
  its noise at every step even though the test fails; the forced vmapped row
  shows that a vmapped step costs the same whether it perturbs or not.

After the timing, every PGD row's ``num_perturbations`` is checked against what
its row name claims.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import optax

import jaxsaddle
from benchmarks import _mlp
from benchmarks import _timing
from jaxsaddle import _random

LEARNING_RATE = 1e-2
# Perturbation radius and noise scale; small enough that training stays finite
# when every step perturbs.
NOISE_SCALE = 1e-3
NUM_SEEDS = 8
NEVER = jnp.iinfo(jnp.int32).max


def training_step(tx: optax.GradientTransformation, *, force_perturbation: bool = False):
  """``(params, opt_state, batch) -> (params, opt_state)``, not yet jitted."""
  step = _mlp.training_step(tx)
  if not force_perturbation:
    return step

  def forced_step(params, opt_state, batch):
    opt_state = optax.tree.set(opt_state, steps_since_perturbation=NEVER)
    return step(params, opt_state, batch)

  return forced_step


def single_run(make_tx, *, force_perturbation: bool = False) -> _mlp.TrainingLoop:
  """One run; ``make_tx(key)`` builds the optimizer."""
  params_key, batch_key, tx_key = jax.random.split(jax.random.key(0), 3)
  tx = make_tx(tx_key)
  params = _mlp.init_mlp(params_key)
  step = training_step(tx, force_perturbation=force_perturbation)
  return _mlp.TrainingLoop(step, params, tx.init(params), _mlp.random_batch(batch_key))


def vmapped_runs(make_tx, *, force_perturbation: bool = False) -> _mlp.TrainingLoop:
  """``NUM_SEEDS`` independent runs in one step; the optimizer is built under ``vmap``."""
  seed_keys = jax.random.split(jax.random.key(0), NUM_SEEDS)
  params_keys, batch_keys, tx_keys = jax.vmap(lambda k: jax.random.split(k, 3))(seed_keys).T
  params = jax.vmap(_mlp.init_mlp)(params_keys)
  opt_state = jax.vmap(lambda k, p: make_tx(k).init(p))(tx_keys, params)
  batches = jax.vmap(_mlp.random_batch)(batch_keys)

  def step(params, opt_state, batch, tx_key):
    tx = make_tx(tx_key)
    return training_step(tx, force_perturbation=force_perturbation)(params, opt_state, batch)

  return _mlp.TrainingLoop(jax.vmap(step), params, opt_state, batches, tx_keys)


def sgd(key):
  del key
  return optax.sgd(LEARNING_RATE)


def pgd_test_fails(key):
  return jaxsaddle.pgd(
    LEARNING_RATE,
    perturbation_radius=NOISE_SCALE,
    gradient_threshold=1e-12,
    escape_steps=10,
    escape_threshold=1e-4,
    key=key,
  )


def pgd_test_passes(key):
  return jaxsaddle.pgd(
    LEARNING_RATE,
    perturbation_radius=NOISE_SCALE,
    gradient_threshold=1e30,
    escape_steps=1,
    escape_threshold=1e-4,
    key=key,
  )


class NoiseLoop:
  """A timing candidate's step: ``key, noise = sample(key)`` on the MLP's params."""

  def __init__(self, sample, key):
    def step(key, params):
      key, sample_key = jax.random.split(key)
      return key, sample(sample_key, params)

    self._step = jax.jit(step)
    self._params = _mlp.init_mlp(jax.random.key(0))
    self.key = key

  def __call__(self):
    self.key, noise = self._step(self.key, self._params)
    return self.key, noise


def threefry_normal(key, tree):
  """What ``optax.add_noise`` draws: ``jax.random.normal`` leaf by leaf."""
  return optax.tree.random_like(key, tree, jax.random.normal)


def check_runs(loops: dict[str, _mlp.TrainingLoop]) -> None:
  """Fails loudly if a row did not compute what its name says.

  Non-finite params would make a PGD gradient test fail (NaN norm) and turn the
  timed steps into different steps than the row claims, so they are checked
  first.
  """
  for name, loop in loops.items():
    if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(loop.params)):
      raise RuntimeError(
        f"{name}: params are not finite at the end of the timing, so some timed steps were "
        "not the steps the row describes (an infinite noise sample? a diverging step?)."
      )

  def counts(name):
    state = loops[name].opt_state
    return optax.tree.get(state, "num_perturbations"), optax.tree.get(state, "count")

  for name in ("pgd, test fails", "vmap8 pgd, test fails"):
    perturbations, _ = counts(name)
    if perturbations.any():
      raise RuntimeError(f"{name}: {perturbations} perturbations.")
  for name in ("pgd, perturbs every step (forced)", "vmap8 pgd, perturbs every step (forced)"):
    perturbations, steps = counts(name)
    if (perturbations != steps).any():
      raise RuntimeError(f"{name}: {perturbations} perturbations in {steps} steps.")
  perturbations, steps = counts("pgd, perturbs 1 step in 3")
  if perturbations != -(-steps // 3):
    raise RuntimeError(f"1 in 3: {perturbations} perturbations in {steps} steps.")


def time_training_steps(settings: _timing.Settings) -> list[_timing.Timing]:
  loops = {
    "optax.sgd": single_run(sgd),
    "optax.noisy_sgd (add_noise, threefry)": single_run(
      lambda key: optax.noisy_sgd(LEARNING_RATE, key=key)
    ),
    "pgd, test fails": single_run(pgd_test_fails),
    "pgd, perturbs every step (forced)": single_run(pgd_test_passes, force_perturbation=True),
    "pgd, perturbs 1 step in 3": single_run(pgd_test_passes),
    "noisy_gd (sphere, every step)": single_run(
      lambda key: jaxsaddle.noisy_gd(LEARNING_RATE, noise_scale=NOISE_SCALE, key=key)
    ),
    "perturbed_sgd (gaussian, every step)": single_run(
      lambda key: jaxsaddle.perturbed_sgd(LEARNING_RATE, noise_scale=NOISE_SCALE, key=key)
    ),
    "vmap8 optax.sgd": vmapped_runs(sgd),
    "vmap8 pgd, test fails": vmapped_runs(pgd_test_fails),
    "vmap8 pgd, perturbs every step (forced)": vmapped_runs(
      pgd_test_passes, force_perturbation=True
    ),
  }
  baselines = {
    "vmap8 pgd, test fails": "vmap8 optax.sgd",
    "vmap8 pgd, perturbs every step (forced)": "vmap8 optax.sgd",
  }
  timings = _timing.time_interleaved(
    [_timing.Candidate(name, loop, baselines.get(name)) for name, loop in loops.items()],
    settings,
  )
  check_runs(loops)
  return timings


def time_noise(settings: _timing.Settings) -> list[_timing.Timing]:
  key = jax.random.key(0)
  return _timing.time_interleaved(
    [
      _timing.Candidate("jax.random.normal, threefry", NoiseLoop(threefry_normal, key)),
      _timing.Candidate(
        "jax.random.normal, rbg key", NoiseLoop(threefry_normal, jax.random.key(0, impl="rbg"))
      ),
      _timing.Candidate(
        "jaxsaddle tree_standard_normal", NoiseLoop(_random.tree_standard_normal, key)
      ),
      _timing.Candidate(
        "jaxsaddle sample_isotropic, ball (pgd's draw)",
        NoiseLoop(lambda k, t: _random.sample_isotropic(k, t, NOISE_SCALE, "ball"), key),
      ),
    ],
    settings,
  )


def derived_ratios(median: dict[str, float]) -> dict[str, float]:
  """Ratios computed from the medians ``median[name]`` of the training-step rows."""
  sgd_step = median["optax.sgd"]
  pgd_step = median["pgd, test fails"]
  perturbing_step = 3 * median["pgd, perturbs 1 step in 3"] - 2 * pgd_step
  return {
    "perturbing pgd step / sgd, forced": median["pgd, perturbs every step (forced)"] / sgd_step,
    "perturbing pgd step / sgd, from the 1-in-3 schedule (3 t - 2 t_fail, an upper bound)": (
      perturbing_step / sgd_step
    ),
    "vmap8 sgd per seed / sgd": median["vmap8 optax.sgd"] / NUM_SEEDS / sgd_step,
    "vmap8 pgd per seed / sgd": median["vmap8 pgd, test fails"] / NUM_SEEDS / sgd_step,
    "vmap8 pgd per seed / pgd, test fails": median["vmap8 pgd, test fails"] / NUM_SEEDS / pgd_step,
  }


def main() -> None:
  args = _timing.argument_parser(__doc__.splitlines()[0]).parse_args()
  settings = _timing.settings_from(args)
  load_at_start = os.getloadavg()[0]
  step_timings = time_training_steps(settings)
  noise_timings = time_noise(settings)
  from_wall, from_cpu = _timing.print_report(
    f"Training step of {_mlp.description()}, params and state donated",
    settings,
    load_at_start,
    step_timings,
    derived_ratios,
  )
  print(
    "\nHow the pgd rows are made: 'test fails' has gradient_threshold 1e-12, so lax.cond "
    "never draws; 'forced' has a huge threshold and the step resets steps_since_perturbation "
    "before update, so the same compiled cond draws at every step; '1 step in 3' is the "
    "library's own schedule with escape_steps=1 and checks the forced row through "
    "3 t - 2 t_fail. Under vmap, lax.cond is a select: vmapped pgd draws its noise at every "
    "step even though its test fails, so both vmapped pgd rows cost the same. Every pgd "
    "row's num_perturbations was checked after the timing.\n"
  )
  print("One standard-normal sample shaped like the MLP's params, jitted:\n")
  print(_timing.markdown_table(noise_timings))

  if args.json:
    _timing.write_json(
      args.json,
      {
        "benchmark": "perturbation",
        "environment": _timing.environment(),
        "load_average_at_start": load_at_start,
        "settings": dataclasses.asdict(settings),
        "training_step": _timing.as_json(step_timings),
        "derived_from_wall_clock": from_wall,
        "derived_from_cpu_time": from_cpu,
        "noise": _timing.as_json(noise_timings),
      },
    )


if __name__ == "__main__":
  main()
