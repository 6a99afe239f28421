"""``python -m experiments pgd-networks --quick`` end to end, and its config rules."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from _experiment_runs import assert_is_figure
from _experiment_runs import assert_resume_recomputes_only
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import shared_quick_run

from experiments import _runner
from experiments import _training
from experiments import data
from experiments import pgd_networks


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("pgd-networks", tmp_path_factory)


def test_quick_run_records_every_rate_seed_and_log(quick_run):
  saved = json.loads((quick_run / "config.json").read_text())["config"]
  config = _runner.config_from_dict(pgd_networks.Config, saved)
  records = read_metrics(quick_run)
  closing = closing_records(records)
  assert sorted(closing) == sorted(pgd_networks.unit_names(config))
  logs = config.steps // config.log_every + 1
  for unit, record in closing.items():
    steps = [r for r in records if r["unit"] == unit and "step" in r]
    assert len(steps) == logs * len(config.learning_rates)
    for step in steps:
      assert len(step["loss"]) == len(step["grad_norm"]) == config.seeds
      assert step["oracle_calls"] >= 0 and step["wall_time"] >= 0
    # The reported rate is the candidate with the lowest median final loss.
    by_rate = record["final_loss_by_rate"]
    assert record["learning_rate"] == float(min(by_rate, key=by_rate.get))
    chosen = [s for s in steps if s["learning_rate"] == record["learning_rate"]]
    assert chosen[-1]["loss"] == record["final_loss"]
    assert all(0 <= a <= 1 for a in record["test_accuracy"])
    # Each rate's figure is the median over seeds of its last logged loss.
    for rate, value in by_rate.items():
      last = [s for s in steps if s["learning_rate"] == float(rate)][-1]
      assert value == pytest.approx(float(np.median(last["loss"])), rel=1e-6)
    # At the chosen rate training lowered the median loss.
    assert np.all(np.isfinite(record["final_loss"]))
    assert np.median(chosen[-1]["loss"]) < np.median(chosen[0]["loss"])


def test_methods_share_initialisations_and_batches(quick_run):
  # Until PGD first perturbs, it takes GD's steps: the same losses at every log show the same
  # initialisation and the same batches, step by step.
  records = read_metrics(quick_run)
  logs = {
    (r["unit"], r["learning_rate"], r["step"]): r
    for r in records
    if "step" in r and r["unit"].endswith("gd")
  }
  compared = 0
  for (unit, rate, step), gd in logs.items():
    if not unit.endswith("/gd"):
      continue
    pgd = logs[(unit[: -len("gd")] + "pgd", rate, step)]
    for seed, perturbations in enumerate(pgd["num_perturbations"]):
      if perturbations == 0:
        assert pgd["loss"][seed] == pytest.approx(gd["loss"][seed], rel=1e-6), (unit, rate, step)
        compared += step > 0
  assert compared > 0


def _mean_and_half_width(values) -> str:
  """``mean ± half-width`` of the 95% Student-t interval, written out independently."""
  values = np.asarray(values, np.float64)
  half = scipy.stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
  return f"{values.mean():.4f} ± {half:.4f}"


def test_quick_summary_states_the_comparison(quick_run):
  summary = (quick_run / "summary.md").read_text()
  # Each setting's row carries its records' final losses and their paired difference.
  closing = closing_records(read_metrics(quick_run))
  for unit, gd in closing.items():
    if not unit.endswith("/gd"):
      continue
    dataset, spec, batch, init, _ = unit.split("/")
    pgd = closing[unit[: -len("gd")] + "pgd"]
    row = next(
      line
      for line in summary.splitlines()
      if line.startswith(f"| {dataset} | {spec} | {batch}/{init} |")
    )
    difference = np.subtract(gd["final_loss"], pgd["final_loss"])
    cells = [
      _mean_and_half_width(gd["final_loss"]),
      _mean_and_half_width(pgd["final_loss"]),
      _mean_and_half_width(difference),
    ]
    assert f"| {' | '.join(cells)} |" in row, row
  assert "| dataset | architecture | regime | params |" in summary
  assert "## What the numbers say" in summary
  assert "interval of the paired difference above zero" in summary
  for png in (quick_run / "figures").glob("*.png"):
    assert_is_figure(png, taller_than=200, wider_than=300)
  assert (quick_run / "figures" / "advantage.png").exists()
  assert (quick_run / "figures" / "digits-full-small.png").exists()


def test_cifar10_is_skipped_without_a_path_and_kept_with_one():
  config = pgd_networks.Config(datasets=("digits", "cifar10"), architectures=("logistic",))
  assert all(not u.startswith("cifar10/") for u in pgd_networks.unit_names(config))
  with_path = dataclasses.replace(config, cifar10_path="/somewhere")
  assert any(u.startswith("cifar10/") for u in pgd_networks.unit_names(with_path))


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(architectures=("resnet",)), "unknown architecture"),
    (dict(regimes=("full/huge",)), "unknown regime"),
    (dict(learning_rates=(0.1, -1.0)), "learning_rates"),
    (dict(steps=10, log_every=3), "multiple of log_every"),
    (dict(datasets=("imagenet",)), "unknown datasets"),
    (dict(max_train_examples=-5), "max_train_examples"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=32.0), "batch_size"),
  ],
)
def test_bad_configs_are_rejected(change, message):
  with pytest.raises(ValueError, match=message):
    pgd_networks.check_config(dataclasses.replace(pgd_networks.Config(), **change))


def test_a_cifar10_path_without_its_batch_files_is_rejected_before_the_run(tmp_path):
  # CIFAR-10's units come last: the path used to fail only after every other unit had run.
  config = pgd_networks.Config(datasets=("digits", "cifar10"), architectures=("logistic",))
  with pytest.raises(ValueError, match="cifar10_path .*nowhere does not exist"):
    pgd_networks.check_config(dataclasses.replace(config, cifar10_path=str(tmp_path / "nowhere")))
  (tmp_path / "data_batch_1").write_bytes(b"")
  with pytest.raises(ValueError, match="lacks the batch file\\(s\\) data_batch_2, .*test_batch"):
    pgd_networks.check_config(dataclasses.replace(config, cifar10_path=str(tmp_path)))


@pytest.mark.parametrize("batch_size", [0, 11])
def test_training_refuses_batches_outside_the_training_set(batch_size):
  # Clamped, a batch larger than the training set would train full-batch under a summary that
  # reports mini-batches.
  x = np.zeros((10, 4), np.float32)
  dataset = data.Dataset("tiny", x, np.zeros(10, np.int32), x, np.zeros(10, np.int32), 2)
  with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\]"):
    _training.train(
      dataset,
      lambda key: None,
      lambda rate, key: None,
      learning_rates=[0.1],
      seeds=1,
      steps=1,
      log_every=1,
      batch_size=batch_size,
    )


def test_confidence_interval_matches_student_t():
  mean, half = pgd_networks.confidence_interval([1.0, 2.0, 3.0, 4.0])
  # t_{0.975, 3} = 3.182446; sample std of 1..4 is sqrt(5/3).
  assert mean == pytest.approx(2.5)
  assert half == pytest.approx(3.182446 * np.sqrt(5 / 3) / 2, rel=1e-5)


def _row(architecture, advantage, size, perturbed_seeds=8):
  return dict(
    dataset="digits",
    architecture=architecture,
    regime="full/standard",
    num_params=size,
    advantage=advantage,
    pgd_escaped=0,
    gd_escaped=0,
    perturbed_seeds=perturbed_seeds,
    largest_difference=abs(advantage[0]) + advantage[1],
    gd_rate=0.1,
    pgd_rate=0.1,
  )


def test_verdict_counts_only_differences_beyond_noise_and_round_off():
  identical = [_row("shallow-8", (1e-7, 0.0), 100), _row("deep-3x16", (0.0, 0.0), 1000)]
  text = pgd_networks.verdict(identical, min_effect=1e-3)
  assert "above zero in 0 of 2 settings, and higher in 0" in text
  rows = [
    _row("shallow-8", (0.05, 0.01), 100),
    _row("shallow-32", (0.02, 0.01), 400),
    _row("deep-3x16", (0.0, 0.01), 1000),
    _row("deep-5x32", (-0.03, 0.01), 5000),
  ]
  text = pgd_networks.verdict(rows, min_effect=1e-3)
  assert "above zero in 2 of 4 settings, and higher in 1" in text
  assert "every setting where PGD helps is a shallow model" in text
  assert "perturbed on no seed" not in text
  # A PGD that never perturbed ran GD's algorithm: its differences, however significant they
  # look (rounding amplified over a run), are not counted for or against it.
  rows[3] = _row("deep-5x32", (-0.03, 0.01), 5000, perturbed_seeds=0)
  text = pgd_networks.verdict(rows, min_effect=1e-3)
  assert "above zero in 2 of 4 settings, and higher in 0" in text
  assert "In 1 setting PGD perturbed on no seed" in text
  assert "differed from GD's in 1 of 1, by up to 0.04" in text


def test_resume_recomputes_only_the_missing_unit(quick_run, tmp_path):
  # The cheapest unit: the smallest model, plain SGD.
  assert_resume_recomputes_only(
    "pgd-networks", quick_run, tmp_path, "digits/shallow-8/mini/standard/gd"
  )


def test_verdict_answers_depth_and_width_separately():
  rows = [
    _row("shallow-8", (0.0, 0.01), 100),
    _row("shallow-256", (0.0, 0.01), 3000),
    _row("deep-3x16", (0.5, 0.01), 1000),
    _row("linear-3x16", (0.4, 0.01), 900),
    _row("deep-5x32", (0.0, 0.01), 5000),
  ]
  text = pgd_networks.verdict(rows, min_effect=1e-3)
  assert "By depth (weight layers): 2: 0 of 2, 3: 2 of 2, 5: 0 of 1." in text
  assert "By width of the one-hidden-layer MLPs: 8: 0 of 1, 256: 0 of 1." in text
  assert "helps at depth 3 and at no other depth (2, 5)" in text
  assert "ends beyond depth 3" in text
  assert [
    pgd_networks.weight_layers(s) for s in ("logistic", "shallow-8", "cnn-8", "deep-8x32")
  ] == [
    1,
    2,
    3,
    8,
  ]
