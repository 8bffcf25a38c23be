"""Bad input gives a clear error naming the problem, never a traceback from deep inside torch or JAX.

The property-based part (Hypothesis, 200 cases per front door) feeds corrupted NONMEM tables to the NLME front door
and corrupted arrays to the Pyro / NumPyro front doors and the mixture family.

Every test runs on both backends (the same errors from ``latentfit.pyro`` and ``latentfit.numpyro``);
the models are written once per PPL in ``models_pyro.py`` / ``models_numpyro.py``."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
from backends import Backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentfit import DataError, ModelSpecificationError
from latentfit.integrations.traced import TracedLatentModel, enlarging_obs_shape
from latentfit.models import GaussianMixture, nlme

Y = np.random.default_rng(0).normal(size=(20, 4))


def _fit(backend, model, *args, **options):
    return backend.fit("SAEM", model, *args, progress=False, **options)


def test_no_latent_site_says_use_svi(backend):
    with pytest.raises(ModelSpecificationError, match="no latent sample site.*SVI"):
        _fit(backend, backend.models.no_latent, backend.tensor(Y))


def test_no_param_site(backend):
    with pytest.raises(ModelSpecificationError, match=rf"no {backend.name}\.param"):
        _fit(backend, backend.models.no_param, backend.tensor(Y))


def test_latents_in_two_plates_need_unit_plate(backend):
    with pytest.raises(ModelSpecificationError, match="unit_plate"):
        _fit(backend, backend.models.two_plates, backend.tensor(Y))
    with pytest.raises(ModelSpecificationError, match=r"\['c'\].*outside the unit plate 'rows'"):
        _fit(backend, backend.models.two_plates, backend.tensor(Y), unit_plate="rows")


def test_nan_in_observed_data_names_site_and_count(backend):
    y = Y.copy()
    y[3, 1] = float("nan")
    y[5, 2] = float("inf")
    with pytest.raises(DataError, match=r"'y' holds 2 NaN/inf"):
        _fit(backend, backend.models.random_intercept, backend.tensor(y))


def test_nan_in_a_covariate_names_the_site_row_and_argument(backend):
    """A NaN covariate made the rows' log-density NaN, which the unit-map analysis read as rows depending on several
    units ("pass unit_index="); inside the unit plate it was blamed on the initial parameter values."""
    rng = np.random.default_rng(3)
    group = backend.tensor(np.repeat(np.arange(10), 5), dtype=backend.xp.int64)
    x, y = rng.normal(size=50), rng.normal(size=50)
    x[3] = np.nan
    with pytest.raises(DataError, match=r"log-density of observed site 'y' is NaN/inf at row 3; plate 'rows' .*"
                                        r"argument 'x' holds 1 NaN/inf value\(s\) \(the first at index 3\)"):
        _fit(backend, backend.models.group_covariate, group, backend.tensor(x), 10, backend.tensor(y))
    backend.reset()
    x2 = rng.normal(size=(20, 4))
    x2[2, 1] = np.nan
    with pytest.raises(DataError, match=r"site 'y' is NaN/inf at element \(2, 1\).*argument 't' holds 1 NaN/inf"):
        _fit(backend, backend.models.random_slope, backend.tensor(x2), backend.tensor(Y))


def test_forgotten_data_says_the_model_has_no_observed_site(backend):
    """``y=None``: every site latent, which had been refused as latents in two plates ("unit_plate=...")."""
    group = backend.tensor(np.repeat(np.arange(10), 5), dtype=backend.xp.int64)
    x = backend.tensor(np.random.default_rng(3).normal(size=50))
    with pytest.raises(ModelSpecificationError, match=r"no observed sample site: every .*sample site \(a, y\) is "
                                                      r"latent\. Did you pass the data \(obs=\.\.\.\)\?"):
        _fit(backend, backend.models.group_covariate, group, x, 10)


@pytest.mark.parametrize("engine", ["EM", "SAEM"])
def test_a_poisson_latent_says_what_each_engine_needs(backend, engine):
    """A Poisson latent given to EM had been told to "use an EM engine"."""
    message = (r"'k' is discrete \(Poisson\) with a support that cannot be enumerated \(infinite\): the EM family sums "
               r"out a discrete latent of finite support only \(Categorical, Bernoulli, \.\.\.\), and SAEM, FSAEM and "
               r"MCMCSGD move continuous latents only")
    with pytest.raises(ModelSpecificationError, match=message):
        backend.fit(engine, backend.models.poisson_latent, backend.tensor(Y[:, 0]), progress=False)


@pytest.mark.parametrize("engine", ["SAEM", "MCMCSGD"])
def test_an_enumerable_label_says_the_em_family_takes_it(backend, engine):
    """A finite Categorical label given to SAEM / MCMCSGD had been told its support "cannot be enumerated ... make
    it a finite Categorical", which it already was.  The message says what these engines need and which engines
    take the label (the EM family), and that engine fits it."""
    y = backend.tensor(np.random.default_rng(0).poisson(3.0, size=40))
    message = (rf"'z' is discrete \(Categorical\w*\) with a finite support, which the EM family sums out exactly; "
               rf"SAEM, FSAEM and MCMCSGD move continuous latents only .* Fit the model with an engine of the EM "
               rf"family from latentfit\.{backend.name}: EM \(exact\)")
    backend.reset()
    with pytest.raises(ModelSpecificationError, match=message):
        backend.fit(engine, backend.models.label_mixture, y, progress=False)
    backend.reset()  # the EM family reads it: full-batch EM by generalized EM (no closed-form M-step), the others
    with pytest.raises(ModelSpecificationError, match=r"found no closed-form M-step.*EM \(full batch\) fits"):
        backend.fit("MiniBatchEM", backend.models.label_mixture, y, batch_size=10, progress=False)
    backend.reset()
    assert backend.fit("EM", backend.models.label_mixture, y, tol=1e-4, progress=False).params["rates"].shape == (2,)


def test_a_label_beside_a_continuous_latent_says_no_engine_takes_both(backend):
    y = backend.tensor(np.random.default_rng(0).normal(size=30))
    backend.reset()
    with pytest.raises(ModelSpecificationError, match=r"'z' is discrete \(Categorical\w*\) with a finite "
                                                      r"support, beside the latent site\(s\) \['a'\].*no engine takes "
                                                      r"both"):
        backend.fit("SAEM", backend.models.label_and_intercept, y, progress=False)


@pytest.mark.parametrize("rows", [11, 13])
def test_observations_not_matching_their_plate_name_site_and_shapes(backend, rows):
    """An observation vector a row short (or long) of its plate: a DataError naming the site, the shape expected and
    the shape given, not a broadcasting error from inside a log-density."""
    group = backend.tensor(np.repeat(np.arange(4), 3), dtype=backend.xp.int64)
    y = np.random.default_rng(1).normal(size=13)
    with pytest.raises(DataError, match=rf"observed site 'y' was given data of shape \({rows},\), but its Normal "
                                        rf"expects shape \(12,\).*plate 'rows' \(size 12"):
        _fit(backend, backend.models.grouped_intercept, group, 4, backend.tensor(y[:rows]))
    fit = _fit(backend, backend.models.grouped_intercept, group, 4, backend.tensor(y[:12]), num_iters=(3, 2),
               burn_in=1)                                                # the data of the right length fits
    assert np.isfinite(fit.params["mu"])


def test_a_column_of_observations_is_refused_not_broadcast_to_a_square(backend):
    """``y[:, None]`` for a plate of n rows had been broadcast to an (n, n) site, every row's observation scored under
    every row's mean: the fit ran and its ω came out near 0 (0.008 instead of 0.74).  Refused, naming the site, the
    shape given, the shape expected and the square it would make."""
    group = backend.tensor(np.repeat(np.arange(4), 3), dtype=backend.xp.int64)
    y = np.random.default_rng(1).normal(size=12)
    with pytest.raises(DataError, match=r"observed site 'y' was given data of shape \(12, 1\), but its Normal expects "
                                        r"shape \(12,\) .*plate 'rows' \(size 12.*site of shape \(12, 12\)"):
        _fit(backend, backend.models.grouped_intercept, group, 4, backend.tensor(y[:, None]))


@pytest.mark.parametrize(("dist_shape", "value_shape", "enlarged"), [
    ((12,), (12, 1), (12, 12)),           # a column for a vector: the outer product
    ((12, 1), (12,), (12, 12)),           # a vector for a plate at dim -2
    ((12, 3), (12, 1, 3), (12, 12, 3)),   # a to_event(1) site given a column of events
    ((12,), (12,), None),                 # the distribution's own shape
    ((12, 1), (12, 1), None),
    ((12, 3), (12, 3), None),
    ((12, 1), (12, 5), None),             # a per-unit mean over a unit's T columns (no plate over them)
    ((), (12,), None),                    # a scalar distribution for a vector, outside any plate
    ((12,), (), None),                    # one value for the whole plate
    ((12,), (1, 12), None),               # a leading dim of 1 adds no observation
    ((3, 1, 12), (12,), None),            # enumerated components in front of the data
])
def test_which_observation_shapes_enlarge_a_site(dist_shape, value_shape, enlarged):
    """The rule: data is refused when broadcasting with it enlarges the distribution's shape while the data is itself
    broadcast along a dim where the distribution has several entries (the outer product); data that only enlarges
    (more columns than the distribution's mean) or is only broadcast keeps its meaning."""
    assert enlarging_obs_shape(dist_shape, value_shape) == enlarged


def _containers(backend: Backend) -> list[tuple[Any, str, str]]:
    """``(y, type named, the fix advised)`` for containers the backend's distributions cannot read."""
    y = np.random.default_rng(2).normal(size=12)
    if backend.name == "pyro":
        return [(y, "numpy.ndarray", r"torch.as_tensor\(y\)"),
                (pd.Series(y), "pandas.Series", r"torch.as_tensor\(y.to_numpy\(\)\)"),
                (y.tolist(), "builtins.list", r"torch.tensor\(y\)")]
    import torch

    return [(pd.Series(y), "pandas.Series", r"y.to_numpy\(\)"),
            (torch.as_tensor(y), "torch.Tensor", r"y.numpy\(\)"),
            (y.tolist(), "builtins.list", r"np.asarray\(y\)")]


def test_observations_in_a_container_the_ppl_cannot_read_name_site_type_and_fix(backend):
    """A numpy array, pandas Series or list given to a Pyro site (a Series, torch tensor or list to a NumPyro one) had
    failed deep inside a log-density (``unsupported operand type(s) for -: 'numpy.ndarray' and 'Tensor'``, a JAX
    TracerArrayConversionError), naming neither the site nor the fix."""
    group = backend.tensor(np.repeat(np.arange(4), 3), dtype=backend.xp.int64)
    for y, kind, fix in _containers(backend):
        backend.reset()
        with pytest.raises(DataError, match=rf"observed site 'y' was given a {kind}, which {backend.name} "
                                            rf"distributions cannot read: pass .*{fix}"):
            _fit(backend, backend.models.grouped_intercept_f64, group, 4, y)
    backend.reset()
    y = np.random.default_rng(2).normal(size=12)
    data = backend.tensor(y) if backend.name == "pyro" else y  # a numpy array is NumPyro data
    fit = _fit(backend, backend.models.grouped_intercept_f64, group, 4, data, num_iters=(3, 2), burn_in=1)
    assert np.isfinite(fit.params["mu"])


def _log_intercept_data(backend: Backend, scale: np.ndarray) -> tuple[Any, ...]:
    """30 groups of 3 rows, a_j ~ N(2, 0.3²) (all in the model's domain), y = log(a) + N(0, 0.5²)."""
    rng = np.random.default_rng(4)
    group = np.repeat(np.arange(30), 3)
    y = np.log(rng.normal(2.0, 0.3, size=30))[group] + 0.5 * rng.normal(size=group.size)
    return backend.tensor(group, dtype=backend.xp.int64), backend.tensor(scale), 30, backend.tensor(y)


@pytest.mark.parametrize("engine", ["SAEM", "FSAEM"])
def test_a_prior_draw_outside_the_domain_is_redrawn_not_refused(backend, engine, monkeypatch):
    """``log(a)`` with ``a ~ N(0.5, 1)`` at the start: the start-up check's one prior draw (a fixed key) put some a_j
    below 0 and refused the valid model on every seed, blaming the initial param values.  The units non-finite at
    that draw are redrawn, and the fit (whose chains leave such states at their first finite proposal) runs: SAEM's
    zeroed statistics had been 0 × the start's (NaN there), f-SAEM's MAP search started at such a state."""
    args = _log_intercept_data(backend, np.ones(90))
    model = backend.models.log_intercept
    if engine == "SAEM":  # once: a NumPyro model's analysis is then kept (and the checks not run again)
        with monkeypatch.context() as m:  # the first draw alone: refused (the check's draw does leave the domain)
            m.setattr(TracedLatentModel, "initial_redraws", 0)  # (the unit-map analysis then tries 2 draws)
            with pytest.raises(ModelSpecificationError, match=r"site 'y' is NaN/inf .* at each of [12] draw\(s\)"):
                _fit(backend, model, *args)
        backend.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chains' rejected proposals outside the domain are reported as a warning
        fit = backend.fit(engine, model, *args, progress=False, num_iters=(30, 20))
    assert all(np.isfinite(float(v)) for v in fit.params.values())
    assert 1.5 < float(fit.params["mu"]) < 2.5


def test_units_outside_the_domain_at_every_prior_draw_are_named(backend):
    """A unit non-finite at every redraw is refused, the message naming it (the rows, where they are outside the unit
    plate and the unit map is still to be found) and saying that the prior draws of the latents, not only the initial
    param values, may be at fault."""
    scale = np.ones(90)
    scale[9:12] = 0.0  # group 3's rows: log(0) whatever its latent
    args = _log_intercept_data(backend, scale)
    message = (r"the log-density of observed site 'y' is NaN/inf at 3 of its 90 element\(s\) \(index 9, 10, 11; "
               r"plate 'rows' \(size 90, dim -1\)\) at the initial parameter values, at each of 9 draw\(s\) of the "
               r"latents from the model's prior: the prior puts the latents where the model is not defined")
    with pytest.raises(ModelSpecificationError, match=message):
        _fit(backend, backend.models.log_intercept, *args)
    backend.reset()
    message = (r"site 'y' is NaN/inf for 1 of 30 unit\(s\) \(unit index 3\) at the initial parameter values, at "
               r"each of 32 draw\(s\) of their latents from the model's prior")
    with pytest.raises(ModelSpecificationError, match=message):  # the unit map given: found by the density check
        _fit(backend, backend.models.log_intercept, *args, unit_index=np.repeat(np.arange(30), 3))


def test_masked_nan_is_accepted(backend):
    y = Y.copy()
    y[3, 1] = float("nan")
    fit = _fit(backend, backend.models.masked_intercept, backend.tensor(y), backend.tensor(~np.isnan(y)),
               num_iters=(10, 5))
    assert np.isfinite(fit.params["mu"])


@pytest.mark.parametrize("num_iters", [(0, 100), (-5, 10), 0, (10, -1), "many"])
def test_num_iters_must_be_positive(backend, num_iters):
    with pytest.raises(ValueError, match="num_iters"):
        backend.engine("SAEM")(backend.models.random_intercept, num_iters=num_iters)


def test_nan_log_density_at_initial_values_names_site(backend):
    with pytest.raises(ModelSpecificationError, match=r"site 'y' is NaN/inf"):
        _fit(backend, backend.models.nan_at_init, backend.tensor(Y))


def test_model_that_is_not_callable(backend):
    with pytest.raises(TypeError, match="model"):
        backend.engine("SAEM")("not a model")


@pytest.mark.parametrize("engine", ["SAEM", "MCMCSGD", "MISSO", "EM"])
def test_engine_option_given_to_run_names_the_constructor(backend, engine):
    """``run`` passes its arguments to the model: an engine option given there (``callback=``) is refused before the
    model runs, the message naming the constructor, instead of a failure inside the model that blames the model."""
    def callback(*_: Any) -> None:
        pass

    with pytest.raises(TypeError, match=rf"callback is an option of {engine}\(\.\.\.\), not of run\(\.\.\.\).*"
                                        rf"{engine}\(model, callback=\.\.\.\)\.run"):
        backend.fit(engine, backend.models.random_intercept, backend.tensor(Y), model_kwargs={"callback": callback})


def test_engine_option_in_run_is_kept_for_models_that_take_it(backend):
    """The advice works (the option in the constructor reaches the engine), and a model whose own argument has an
    option's name, or that takes ``**kwargs``, still gets it from ``run``."""
    calls: list[Any] = []

    def callback(*_: Any) -> None:
        calls.append(1)

    _fit(backend, backend.models.random_intercept, backend.tensor(Y), num_iters=(3, 2), burn_in=1, callback=callback)
    assert calls
    seen: dict[str, Any] = {}

    def takes_seed(y: Any, seed: int = 0) -> None:
        seen["seed"] = seed
        backend.models.random_intercept(y)

    def takes_any(y: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        backend.models.random_intercept(y)

    _fit(backend, takes_seed, backend.tensor(Y), num_iters=(2, 1), burn_in=1, model_kwargs={"seed": 7})
    _fit(backend, takes_any, backend.tensor(Y), num_iters=(2, 1), burn_in=1, model_kwargs={"chunk_size": 3})
    assert seen == {"seed": 7, "chunk_size": 3}


def test_ready_made_model_refuses_arguments_to_run(backend):
    """A ready-made :class:`LatentModel` takes no arguments: ``run``'s keywords other than its own are refused, not
    silently dropped."""
    mixture = GaussianMixture(backend.tensor(Y), 2, init_iters=1)
    with pytest.raises(TypeError, match=r"seed is an option of EM\(\.\.\.\)"):
        backend.engine("EM")(mixture, num_epochs=2, progress=False).run(
            *(() if backend.name == "pyro" else (0,)), seed=3)
    with pytest.raises(TypeError, match="ready-made GaussianMixture, which takes no arguments"):
        backend.engine("EM")(mixture, num_epochs=2, progress=False).run(
            *(() if backend.name == "pyro" else (0,)), y=3)


# ----- property-based: corrupted NONMEM tables and arrays (issue 13, item 6) --------------------------------------
# Validation only (no fitting): each case either passes validation or raises the library's own error naming the
# column / row / site, never an exception from inside pandas, torch or JAX, and never modifies the caller's data.
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NONMEM_MODEL = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 2.0}, covariates={"CL": ["WT"]})


@st.composite
def nonmem_tables(draw: st.DrawFn) -> pd.DataFrame:
    """A valid NONMEM table: 1-4 IDs, each a dose at time 0 then 2-4 observations at increasing times, with a WT
    covariate; optional EVID/MDV/CMT columns and NONMEM's dosing columns (ADDL/II, RATE/DUR, SS) that are valid."""
    rows = []
    for i in range(draw(st.integers(1, 4))):
        wt = draw(st.floats(40.0, 120.0))
        amt = draw(st.sampled_from([50.0, 100.0, 320.0]))
        rows.append(dict(ID=i + 1, TIME=0.0, DV=np.nan, AMT=amt, EVID=1, MDV=1, CMT=1, WT=wt))
        times = sorted(draw(st.lists(st.floats(0.1, 48.0), min_size=2, max_size=4, unique=True)))
        for t in times:
            rows.append(dict(ID=i + 1, TIME=t, DV=draw(st.floats(0.01, 20.0)), AMT=0.0, EVID=0, MDV=0, CMT=1, WT=wt))
    df = pd.DataFrame(rows)
    extra = draw(st.sampled_from(["none", "addl", "rate", "event"]))
    dose = df["EVID"] == 1
    if extra == "addl":
        df["ADDL"] = np.where(dose, 1, 0)
        df["II"] = np.where(dose, 12.0, 0.0)
    elif extra == "rate":
        df["RATE"] = np.where(dose, df["AMT"] / 0.5, 0.0)
    elif extra == "event":  # an EVID 2 record (other event) between the observations
        other = df[~dose].iloc[[0]].assign(EVID=2, MDV=1, DV=np.nan)
        df = pd.concat([df, other], ignore_index=True)
    if draw(st.booleans()):
        df = df.drop(columns=["EVID", "MDV", "CMT"])
    return df


CORRUPTIONS = ("drop_column", "text_in_numeric", "negative_time", "unsorted", "duplicate_dose", "nan_covariate",
               "id_without_observation", "mixed_dtypes", "infinite_value", "missing_id", "mixed_id_types")


@st.composite
def corrupted_tables(draw: st.DrawFn) -> tuple[str, pd.DataFrame, dict[str, Any]]:
    df = draw(nonmem_tables())
    kind = draw(st.sampled_from(CORRUPTIONS))
    numeric = [c for c in ("TIME", "DV", "AMT", "EVID", "WT", "ADDL", "II", "RATE") if c in df.columns]
    row = draw(st.integers(0, len(df) - 1))
    info: dict[str, Any] = {"row": df.index[row]}
    if kind == "drop_column":
        info["column"] = draw(st.sampled_from(["ID", "TIME", "DV", "WT"]))
        df = df.drop(columns=[info["column"]])
    elif kind == "text_in_numeric":
        info["column"] = col = draw(st.sampled_from(numeric))
        text = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)
                    .filter(lambda s: pd.isna(pd.to_numeric(pd.Series([s]), errors="coerce")[0]) and s.strip() != ""))
        df = df.astype({col: object})
        df.loc[info["row"], col] = text
    elif kind == "negative_time":
        df.loc[info["row"], "TIME"] = -draw(st.floats(0.01, 100.0))
    elif kind == "unsorted":
        df = df.sample(frac=1.0, random_state=draw(st.integers(0, 2 ** 16)))
    elif kind == "duplicate_dose":
        dose_rows = df.index[df["AMT"] > 0]
        df = pd.concat([df, df.loc[[dose_rows[draw(st.integers(0, len(dose_rows) - 1))]]]], ignore_index=True)
    elif kind == "nan_covariate":
        df.loc[info["row"], "WT"] = np.nan
    elif kind == "id_without_observation":
        extra = df[df["ID"] == df["ID"].iloc[0]].iloc[[0]].assign(ID=99)  # a dose only
        df = pd.concat([df, extra], ignore_index=True)
    elif kind == "mixed_dtypes":  # numbers written as strings / Python ints in an object column: still numbers
        info["column"] = col = draw(st.sampled_from(numeric))
        df = df.astype({col: object})
        df[col] = [str(v) if (j % 2 == 0 and not pd.isna(v)) else v for j, v in enumerate(df[col])]
    elif kind == "infinite_value":
        info["column"] = col = draw(st.sampled_from([c for c in numeric if c != "EVID"]))
        df = df.astype({col: float})  # an integer column (ADDL) holds no inf
        df.loc[info["row"], col] = draw(st.sampled_from([np.inf, -np.inf]))
    elif kind == "missing_id":
        df = df.astype({"ID": float})  # as read from a CSV file with an empty ID cell
        df.loc[info["row"], "ID"] = np.nan
    elif kind == "mixed_id_types":
        df = df.astype({"ID": object})
        df.loc[df["ID"] == df["ID"].iloc[0], "ID"] = "A"
    return kind, df, info


def _bind(df: pd.DataFrame) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bound = NONMEM_MODEL.bind(df)
    return bound, [str(w.message) for w in caught]


@PROPERTY
@given(case=corrupted_tables())
def test_corrupted_nonmem_tables_get_the_librarys_error(case: tuple[str, pd.DataFrame, dict[str, Any]]) -> None:
    kind, df, info = case
    before = copy.deepcopy(df)
    try:
        bound, warned = _bind(df)
        error = None
    except DataError as err:
        error = str(err)
    pd.testing.assert_frame_equal(df, before)  # the caller's table is untouched
    if kind in ("drop_column", "text_in_numeric", "infinite_value"):
        assert error is not None and repr(info["column"]) in error, (kind, error)
        if kind != "drop_column":
            assert f"row {info['row']}" in error, error
    elif kind == "negative_time":
        assert error is not None and "negative time" in error and f"row {info['row']}" in error, error
    elif kind in ("nan_covariate", "missing_id"):
        column = "WT" if kind == "nan_covariate" else "ID"
        assert error is not None and repr(column) in error and f"row {info['row']}" in error, error
    elif kind == "duplicate_dose":
        assert error is None and any("duplicated dose record" in w for w in warned), warned
    elif kind == "id_without_observation":
        assert error is None and any("without any observation" in w and "99" in w for w in warned), warned
        assert 99 not in list(bound.data.ids)
    elif kind in ("unsorted", "mixed_dtypes"):  # valid: the same arrays as the clean table
        assert error is None, error
        clean = _bind(_clean(df))[0].data  # IDs come in their order of first appearance: compare by ID
        mine, ref = np.argsort(bound.data.ids, kind="stable"), np.argsort(clean.ids, kind="stable")
        for name in ("ids", "time", "dv", "mask", "dose_time", "dose_amt"):
            np.testing.assert_array_equal(getattr(bound.data, name)[mine], getattr(clean, name)[ref], err_msg=name)
    elif kind == "mixed_id_types":
        assert error is None or "'ID'" in error, error


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    """The table sorted by ID and time (dose first at equal times), numeric columns as floats."""
    out = df.apply(lambda c: pd.to_numeric(c) if c.dtype == object else c)
    keys = ["ID", "TIME"] + (["EVID"] if "EVID" in out else ["AMT"])
    ascending = [True, True, False]
    return out.sort_values(keys, ascending=ascending, kind="stable").reset_index(drop=True)


def test_valid_nonmem_features_are_accepted() -> None:
    """EVID 2-4, MDV, ADDL/II, SS, RATE, DUR, CMT: valid NONMEM records pass validation."""
    df = pd.DataFrame({
        "ID": [1, 1, 1, 1, 1, 1, 2, 2, 2, 2],
        "TIME": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 1.0, 2.0, 6.0],
        "DV": [np.nan, 3.0, np.nan, 2.0, 1.0, np.nan, np.nan, 4.0, 3.5, 2.0],
        "AMT": [100.0, 0, 0, 0, 0, 50.0, 100.0, 0, 0, 0],
        "EVID": [1, 0, 2, 0, 0, 4, 1, 0, 0, 0],
        "MDV": [1, 0, 1, 0, 1, 1, 1, 0, 0, 0],
        "CMT": [1, 2, 2, 2, 2, 1, 1, 2, 2, 2],
        "ADDL": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "II": [12.0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "SS": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "RATE": [0.0, 0, 0, 0, 0, 0, -2.0, 0, 0, 0],
        "DUR": [0.0, 0, 0, 0, 0, 0, 0.5, 0, 0, 0],
        "WT": [70.0] * 6 + [80.0] * 4,
    })
    before = df.copy()
    bound, _ = _bind(df)
    assert bound.num_units == 2 and int(bound.data.mask.sum()) == 5
    pd.testing.assert_frame_equal(df, before)


ARRAY_CORRUPTIONS = ("nan", "inf", "one_dim", "three_dim", "empty", "no_columns", "bool", "object", "list")


@st.composite
def corrupted_arrays(draw: st.DrawFn, shape: tuple[int, int] | None = None) -> tuple[str, Any]:
    """``(kind, array)``: an ``[n, t]`` float array (any shape, or ``shape``) corrupted as ``kind`` says."""
    n, t = shape if shape is not None else (draw(st.integers(2, 8)), draw(st.integers(1, 5)))
    y = np.asarray(draw(st.lists(st.floats(-5, 5), min_size=n * t, max_size=n * t))).reshape(n, t)
    kind = draw(st.sampled_from(ARRAY_CORRUPTIONS))
    if kind in ("nan", "inf"):
        k = draw(st.integers(1, n * t))
        flat = y.reshape(-1)
        idx = draw(st.lists(st.integers(0, n * t - 1), min_size=k, max_size=k, unique=True))
        flat[idx] = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
        return kind, y
    return kind, {"one_dim": y[:, 0], "three_dim": y[..., None], "empty": y[:0], "no_columns": y[:, :0],
                  "bool": y > 0, "object": y.astype(object), "list": y.tolist()}[kind]


def _as_backend(backend: Backend, kind: str, y: Any) -> Any:
    """The array as a user would pass it: a tensor / JAX array (bool stays bool), or the numpy object array or list."""
    return y if kind in ("object", "list") else backend.tensor(y)


def _assert_unchanged(after: Any, before: Any) -> None:
    """Numeric arrays equal (NaN equal to NaN); lists and object arrays equal element by element, as written."""
    if isinstance(after, np.ndarray) and after.dtype.kind in "biuf":
        np.testing.assert_array_equal(after, before)
    else:
        assert type(after) is type(before) and repr(after) == repr(before)


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_corrupted_arrays_at_the_ppl_front_doors(ppl: str) -> None:
    backend = Backend(ppl)

    @PROPERTY
    @given(case=corrupted_arrays())
    def check(case: tuple[str, Any]) -> None:
        kind, raw = case
        y = _as_backend(backend, kind, raw)
        before = copy.deepcopy(backend.to_numpy(y) if kind not in ("object", "list") else y)
        with pytest.raises((DataError, ModelSpecificationError)) as err:
            backend.engine("SAEM")(backend.models.random_intercept).latent_model(y)
        after = backend.to_numpy(y) if kind not in ("object", "list") else y
        _assert_unchanged(after, before)
        message = str(err.value)
        if kind in ("nan", "inf", "bool"):
            assert isinstance(err.value, DataError) and "'y'" in message, message
        else:  # the model itself cannot run on it: the library says so, naming the argument's failure
            assert "running the model with the given arguments failed" in message, message

    check()


@PROPERTY
@given(case=corrupted_arrays(shape=(6, 3)), ppl=st.sampled_from(["pyro", "numpyro"]), k=st.integers(-1, 7))
def test_corrupted_arrays_in_the_mixture_family(case: tuple[str, Any], ppl: str, k: int) -> None:
    """One data shape (the accepted cases build the model: on JAX a compilation per shape), any corruption, any
    number of components."""
    kind, raw = case
    backend = Backend(ppl)
    x = _as_backend(backend, kind, raw)
    before = copy.deepcopy(backend.to_numpy(x) if kind not in ("object", "list") else x)
    try:
        model = GaussianMixture(x, k, init_iters=1)  # validation is the point, not the k-means start
        error = None
    except ValueError as err:  # DataError, or the library's ValueError for an option (num_components)
        error = err
    after = backend.to_numpy(x) if kind not in ("object", "list") else x
    _assert_unchanged(after, before)
    if error is None:  # accepted: numbers, as floats
        assert kind in ("one_dim", "bool", "object", "list") and 1 <= k <= model.num_units, (kind, k)
        assert np.issubdtype(model.ops.to_numpy(model.x).dtype, np.floating)
    elif kind in ("nan", "inf", "three_dim", "empty", "no_columns"):
        assert isinstance(error, DataError), error
    else:
        assert "num_components" in str(error), error


# ----- post-fit computations that need latent draws -------------------------------------------------------------
@pytest.mark.slow_on("numpyro")
def test_fits_without_kept_draws_draw_them_at_the_estimate(backend):
    """A fit that kept no latent draws (SAEM with ``num_draws=0``, MISSO, which keeps none) used to refuse Louis'
    SEs; the post-fit tools now draw them from ``p(z | y; θ̂)`` (``postfit.draws_at_estimate``): SAEM's SEs from
    those draws are within 10% of the same fit's from its own kept draws, and MISSO's are finite."""
    rng = np.random.default_rng(1)
    y = backend.tensor(1.0 + 0.8 * rng.normal(size=(40, 1)) + 0.5 * rng.normal(size=(40, 4)))
    saem = _fit(backend, backend.models.random_intercept, y, num_iters=(100, 60), num_draws=0)
    kept = _fit(backend, backend.models.random_intercept, y, num_iters=(100, 60), num_draws=100)
    drawn, own = saem.standard_errors("sa"), kept.standard_errors("sa")
    for name in ("mu", "omega", "sigma"):
        np.testing.assert_allclose(drawn[name], own[name], rtol=0.1)
    misso = backend.fit("MISSO", backend.models.random_intercept, y, num_epochs=2, progress=False)
    assert all(np.all(np.isfinite(v)) for v in misso.standard_errors("sa").values())


def test_missing_draws_advice_names_options_that_exist():
    """Where no draws are made (an exact-E-step mixture's conditional moments: discrete latents), the message names
    the engines that keep draws (each takes ``num_draws=``) and says the fit's engine has no such option."""
    import torch

    from latentfit.inference.em import EM
    from latentfit.models.mixture import GaussianMixture

    x = np.random.default_rng(0).normal(size=(60, 2))
    fit = EM(GaussianMixture(torch.tensor(x), 2, "full", seed=1), num_epochs=3, progress=False).run()
    with pytest.raises(ValueError, match="needs the latent draws") as err:
        fit.conditional_moments()
    message = str(err.value)
    assert "EM keeps no latent draws" in message and "num_draws=" not in message.split(";")[0], message
    for name in ("SAEM", "FSAEM", "MCMCSGD"):
        assert name in message, message
    assert "log_likelihood('gq')" in message


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_unknown_engine_options_are_refused_at_construction(ppl):
    """A misspelt or foreign option (``num_iter=``, MISSO's ``num_draws=``) is refused when the engine is built,
    naming the engine and its options: it had been accepted, then refused by an internal class's ``__init__`` once
    ``run`` had traced the model ("StatEngine.__init__() got an unexpected keyword argument")."""
    front = pytest.importorskip("latentfit.pyro" if ppl == "pyro" else "latentfit.numpyro")

    def model(x):
        return None

    with pytest.raises(TypeError, match=r"SAEM\(\.\.\.\) got an unexpected option 'num_iter'; did you mean "
                                        r"'num_iters'\? \(options of SAEM: .*num_iters"):
        front.SAEM(model, num_iter=(5, 5))
    with pytest.raises(TypeError, match=r"SAEM\(\.\.\.\) got an unexpected option 'seeds'; did you mean 'seed'\?"):
        front.SAEM(model, seeds=0)
    with pytest.raises(TypeError, match=r"MISSO\(\.\.\.\) got an unexpected option 'num_draws'.* \(options of MISSO: "):
        front.MISSO(model, num_draws=50)
    for engine, options in ((front.SAEM, {"num_draws": 5}), (front.MISSO, {"num_epochs": 3}),
                            (front.EM, {"num_epochs": 3}), (front.MCMCSGD, {"num_iters": 50})):
        engine(model, progress=False, **options)  # their own options pass
