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


def test_saem_defaults_are_those_the_readme_states():
    """README, "SAEM defaults (saemix)": burn-in 5 iterations (γ = 0), K1 = 300 (γ = 1), K2 = 100 (γ = 1/(k − K1)),
    MH kernels (2, 2, 2), scales adapted toward 40% acceptance, annealing over K1/2, ceil(50/N) chains per unit, a
    collapsing random-effect variance floored at 1e-12."""
    from latentfit.inference import mcmc
    from latentfit.inference.saem import SAEM
    from latentfit.models import nlme
    from latentfit.models.nlme.model import OMEGA2_FLOOR

    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5},
                      data=lf.datasets.theophylline(saemix_form=True),
                      columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    engine = SAEM(model)
    sched = engine.schedule
    assert (sched.burn_in, sched.K1, sched.K2) == (5, 300, 100)
    assert [float(sched(k)) for k in (5, 6, 300, 301, 302, 400)] == [0.0, 1.0, 1.0, 1.0, 0.5, 0.01]
    assert engine.kernels == (2, 2, 2) and mcmc.TARGET_ACCEPTANCE == 0.4
    assert sched.sa_iters == 150 and bool(sched.annealing(150)) and not bool(sched.annealing(151))
    assert engine.num_chains == 5 == int(np.ceil(50 / 12))
    assert OMEGA2_FLOOR == 1e-12


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
    assert list(saemix.columns) == ["Id", "Dose", "Time", "Concentration", "Weight"]
    assert list(saemix.index) == list(range(120)) and saemix["Id"].dtype.kind == "i"
    first = saemix[saemix["Id"] == 1]
    np.testing.assert_allclose(first["Dose"].iloc[0], 4.02 * 79.6)
    kept = full[full["Time"] > 0]
    np.testing.assert_array_equal(saemix["Concentration"], kept["conc"])
    np.testing.assert_array_equal(saemix["Dose"], kept["Dose"] * kept["Wt"])


def test_cli_without_command_prints_help(capsys):
    from latentfit.cli import main

    assert main([]) == 1
    assert "demo" in capsys.readouterr().out


def test_history_arrays_from_the_chunks_blocks_equal_the_stacked_rows():
    """A compiled run's history entries are the concatenation of its chunks' stacked records (one copy at the end
    of the fit), the same values and dtypes as stacking the per-iteration rows; an entry that does not consist of
    exactly those blocks (restored from a checkpoint before them, truncated after an interrupt) stacks its rows."""
    from latentfit.inference.driver import _extend_history, _history_arrays

    history, blocks = {}, {}
    chunks = [{"objective": np.arange(3.0), "theta": {"ka": np.arange(6.0).reshape(3, 2), "n": np.arange(3)}},
              {"objective": np.arange(3.0, 5.0), "theta": {"ka": np.arange(6.0, 10.0).reshape(2, 2),
                                                           "n": np.arange(3, 5)}}]
    for chunk in chunks:
        _extend_history(history, chunk, len(chunk["objective"]), blocks=blocks)
    arrays = _history_arrays(history, blocks)
    assert list(arrays) == ["objective", "theta.ka", "theta.n"]
    for name, rows in history.items():
        assert arrays[name].dtype == np.stack(rows).dtype and np.array_equal(arrays[name], np.stack(rows))
    restored = {"objective": [np.array(-1.0)]}  # a resumed run: rows before the blocks
    more = {}
    _extend_history(restored, {"objective": np.arange(2.0)}, 2, blocks=more)
    np.testing.assert_array_equal(_history_arrays(restored, more)["objective"], [-1.0, 0.0, 1.0])
    history["theta.ka"].pop()  # truncated
    np.testing.assert_array_equal(_history_arrays(history, blocks)["theta.ka"], np.arange(8.0).reshape(4, 2))
