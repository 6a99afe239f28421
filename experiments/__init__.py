"""Experiments on saddle escape; run one with ``python -m experiments <name> [--quick]``."""
