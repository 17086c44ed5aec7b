"""Simulations shared by the fraud tests, built once per session (they are pure data)."""

from __future__ import annotations

import pytest

from slimserve.fraud import Simulation, run_simulation

# (customers, days, seed)
SMALL = (120, 21, 1)
TRAIN = (400, 30, 101)
TEST = (400, 30, 202)


@pytest.fixture(scope="session")
def small() -> Simulation:
    return run_simulation(*SMALL)


@pytest.fixture(scope="session")
def train() -> Simulation:
    return run_simulation(*TRAIN)


@pytest.fixture(scope="session")
def held_out() -> Simulation:
    return run_simulation(*TEST)
