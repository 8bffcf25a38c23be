"""Driver, schedules, datasets and CLI: the plumbing every engine relies on."""

from __future__ import annotations

import numpy as np
import pyro
import pytest

import latentfit as lf
from latentfit.inference.driver import default_num_chains
from latentfit.inference.schedules import SaemixPhases, polynomial


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_saemix_phases():
    sched = SaemixPhases(K1=10, K2=4, burn_in=3)
    gammas = [float(sched(k)) for k in range(1, 15)]
    assert gammas[:3] == [0.0, 0.0, 0.0]
    assert gammas[3:10] == [1.0] * 7
    np.testing.assert_allclose(gammas[10:], [1.0, 1 / 2, 1 / 3, 1 / 4])
    assert [bool(sched.annealing(k)) for k in (1, 5, 6)] == [True, True, False]
    g = polynomial(alpha=0.5, num_ones=2)
    np.testing.assert_allclose([float(g(k)) for k in (1, 2, 3, 6)], [1.0, 1.0, 1.0, 0.5])


def test_default_chains_follow_saemix():
    assert default_num_chains(12) == 5
    assert default_num_chains(50) == 1
    assert default_num_chains(1000) == 1


def test_callback_sees_every_iteration_and_annealing_bounds_the_variance_decrease(backend):
    y = backend.tensor(np.random.default_rng(1).normal(size=(30, 3)) * 0.1)
    seen = []
    fit = backend.fit("SAEM", backend.models.random_intercept, y, num_iters=(40, 10), progress=False,
                      callback=lambda k, rec: seen.append((k, float(rec["theta.omega"]))))
    assert [k for k, _ in seen] == list(range(1, 51))
    omega = fit.history["theta.omega"]
    # annealing during the first K1/2 = 20 iterations: ω² shrinks by at most 0.97 per iteration
    ratios = (omega[1:20] / omega[:19]) ** 2
    assert np.all(ratios >= 0.97 - 1e-9)
    assert np.any(np.isclose(ratios, 0.97))  # the floor was active (data want a small ω)
    np.testing.assert_allclose([w for _, w in seen], omega)


def test_theophylline_dataset():
    full = lf.datasets.theophylline()
    assert full.shape == (132, 5) and list(full.columns) == ["Subject", "Wt", "Dose", "Time", "conc"]
    saemix = lf.datasets.theophylline(saemix_form=True)
    assert saemix.shape[0] == 120 and (saemix["Time"] > 0).all()
    first = saemix[saemix["Id"] == 1]
    np.testing.assert_allclose(first["Dose"].iloc[0], 4.02 * 79.6)


def test_cli_without_command_prints_help(capsys):
    from latentfit.cli import main

    assert main([]) == 1
    assert "demo" in capsys.readouterr().out
