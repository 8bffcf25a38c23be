"""``n_init``: several k-means++ starts of an EM fit of a ``GaussianMixture``, the best kept (scikit-learn's
``GaussianMixture(n_init=...)``).

References: separate single fits from the seeds ``seed, seed + 1, ...`` (the restarts' log-likelihoods, and the kept
fit equal to the single fit of the best seed bit for bit), on data where one seed's k-means++ start is found, in the
test, to end at a lower local maximum; scikit-learn's own ``GaussianMixture(n_init=...)`` on well-separated clusters
(the final log-likelihood per point to 1e-6)."""

from __future__ import annotations

import re
import warnings

import jax
import numpy as np
import pytest

from latentfit import ConvergenceWarning, DegenerateFitError, ModelSpecificationError, NonFiniteError
from latentfit.inference.em import EM
from latentfit.models import GaussianMixture

pytestmark = pytest.mark.usefixtures("jax_x64")

# five clusters, two pairs of them 2.2 sds apart: most k-means++ seeds find the five, some merge a pair
_rng = np.random.default_rng(0)
CENTRES = np.array([[0.0, 0.0], [2.2, 0.0], [6.0, 0.0], [6.0, 2.2], [3.0, 6.0]])
X = CENTRES[_rng.integers(0, 5, 600)] + 0.6 * _rng.normal(size=(600, 2))
OPTIONS = {"num_epochs": 500, "tol": 1e-8, "progress": False}


def _fit(backend, model, **options):
    """The front door's EM (latentfit.pyro / latentfit.numpyro), as a user of either PPL writes it."""
    cls = backend.engine("EM")
    if backend.name == "pyro":
        return cls(model, **OPTIONS, **options).run()
    return cls(model, **OPTIONS, **options).run(jax.random.PRNGKey(0))


def test_restarts_escape_a_local_maximum_and_equal_the_best_single_fit(backend):
    x = backend.tensor(X)
    singles = [_fit(backend, GaussianMixture(x, 5, seed=s)) for s in range(6)]
    ll = np.array([f.log_likelihood() for f in singles])
    bad = int(np.flatnonzero(ll < ll.max() - 1.0)[0])  # a seed whose single fit ends at a lower maximum
    ref = [_fit(backend, GaussianMixture(x, 5, seed=bad + r)) for r in range(3)]
    ref_ll = np.array([f.log_likelihood() for f in ref])
    assert ref_ll[0] < ref_ll.max() - 1.0
    best = int(np.argmax(ref_ll))

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit = _fit(backend, GaussianMixture(x, 5, seed=bad), n_init=3)
    table = fit.restarts
    assert list(table.index) == [0, 1, 2] and list(table["seed"]) == [bad, bad + 1, bad + 2]
    np.testing.assert_allclose(table["log_lik"].to_numpy(), ref_ll, rtol=1e-12, atol=0)
    np.testing.assert_allclose(table["score"].to_numpy(), ref_ll / len(X), rtol=1e-12, atol=0)
    assert list(table["num_iterations"]) == [f.num_iterations for f in ref]
    assert table["converged"].all() and list(table["kept"]) == [r == best for r in range(3)]
    assert table.attrs["best"] == best and table.attrs["n_init"] == 3
    # the better maximum, and the very fit of the best seed
    assert fit.log_likelihood() == pytest.approx(ref_ll.max(), rel=1e-12)
    assert fit.log_likelihood() > ref_ll[0] + 1.0
    for name, value in ref[best].params.items():
        np.testing.assert_array_equal(fit.params[name], value)
    np.testing.assert_array_equal(fit.history["objective"], ref[best].history["objective"])
    assert fit.score() == pytest.approx(ref_ll.max() / len(X), rel=1e-12)
    np.testing.assert_array_equal(fit.predict(), ref[best].predict())


# two clusters and three identical outlying points: with reg_covar=0, a k-means++ start (K = 3) that gives the outliers
# a component of their own degenerates (a singular covariance, at the start or during the fit), the others do not
_deg = np.random.default_rng(0)
X_DEGENERATE = np.concatenate([_deg.normal(size=(300, 2)), _deg.normal(size=(300, 2)) + [6.0, 0.0],
                               np.full((3, 2), [3.0, 9.0])])


def _single_or_none(backend, seed):
    """The single fit's final log-likelihood from ``seed``, or None where the start or the fit degenerates."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = _fit(backend, GaussianMixture(backend.tensor(X_DEGENERATE), 3, reg_covar=0.0, seed=seed))
            ll = float(fit.log_likelihood())
            return ll if np.isfinite(ll) else None
    except (ModelSpecificationError, NonFiniteError):  # a singular start at construction; a fit that degenerates
        return None  # (DegenerateFitError, a singular covariance, during the fit or in the final log-likelihood)


def _degenerate_error(backend, seed):
    """The error of the fit from ``seed`` on :data:`X_DEGENERATE` (K = 3, reg_covar=0), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(backend, GaussianMixture(backend.tensor(X_DEGENERATE), 3, reg_covar=0.0, seed=seed)).log_likelihood()
    except DegenerateFitError as exc:
        return exc
    return None


def test_a_degenerate_fit_raises_the_same_error_on_both_backends():
    """A component that shrinks onto the three identical points (reg_covar=0): torch's E-step raises a
    DegenerateFitError naming the component; JAX's compiled E-step cannot raise and gave NaN weights (a bare
    NonFiniteError) or, where the last M-step made the singular covariance, a NaN log-likelihood with no error at all.
    Now the driver asks the model (``degenerate_error``) about the last good θ, and the exact log-likelihood about a
    NaN: the same DegenerateFitError, message, iteration and last good state on both backends."""
    from backends import Backend

    pyro_, numpyro_ = Backend("pyro"), Backend("numpyro")
    for seed in (0, 2, 3):  # seeds whose fit degenerates on both backends (at the same iteration, or at the end)
        errors = [_degenerate_error(b, seed) for b in (pyro_, numpyro_)]
        assert all(isinstance(e, DegenerateFitError) for e in errors), (seed, errors)
        texts = [re.sub(r"checkpointed at '[^']*'", "", str(e)) for e in errors]
        assert texts[0] == texts[1] and "is singular" in texts[0], texts
        assert errors[0].iteration == errors[1].iteration and \
            errors[0].last_good_iteration == errors[1].last_good_iteration
        if errors[1].iteration is not None:  # stopped in the fit: the last good state comes with the error
            assert errors[1].result is not None and errors[1].result.num_iterations == errors[1].last_good_iteration
    # the exact log-likelihood at a θ with a singular covariance: the same error on both backends (was NaN on JAX)
    from latentfit.inference import likelihood as lk

    for cov_type, bad in (("full", np.zeros((2, 2))), ("diag", np.array([1.0, 0.0]))):
        texts = []
        for b in (pyro_, numpyro_):
            gm = GaussianMixture(b.tensor(X_DEGENERATE), 3, cov_type, seed=1)
            theta = {k: np.array(v.value) for k, v in gm.params.items()}
            theta["covariances"][2] = bad
            with pytest.raises(DegenerateFitError) as got:
                lk.log_likelihood_exact(gm, theta)
            texts.append(str(got.value))
        assert texts[0] == texts[1] and ("component(s) [2] is singular" in texts[0] or "variance is 0" in texts[0])


def test_a_start_that_degenerates_is_skipped_with_a_warning(backend):
    """scikit-learn aborts the whole fit when one initialisation's covariance becomes singular; here that start is
    skipped (a RuntimeWarning naming it, its row NaN with the error) and the best of the others is kept: the same fit
    as the best surviving seed's single fit.  The single fits from the same seeds say which degenerate."""
    singles = [_single_or_none(backend, s) for s in range(6)]
    failing = [s for s, ll in enumerate(singles) if ll is None]
    assert failing and len(failing) < 6, singles  # the design has both kinds
    n_init = 6
    with pytest.warns(RuntimeWarning, match=rf"EM\(n_init=6\): restart\(s\) {re.escape(str(failing))} failed and were "
                                            "skipped"):
        fit = _fit(backend, GaussianMixture(backend.tensor(X_DEGENERATE), 3, reg_covar=0.0, seed=0), n_init=n_init)
    table = fit.restarts
    assert list(table.index[table["log_lik"].isna()]) == failing
    assert (table.loc[failing, "error"].str.contains("singular|NaN")).all()
    assert (table.drop(index=failing)["error"] == "").all() and not table.loc[failing, "converged"].any()
    ok = np.array([np.nan if ll is None else ll for ll in singles])
    np.testing.assert_allclose(table["log_lik"].to_numpy(), ok, rtol=1e-12)
    best = int(np.nanargmax(ok))
    assert list(table["kept"]) == [r == best for r in range(n_init)]
    assert fit.log_likelihood() == pytest.approx(ok[best], rel=1e-12)


def test_every_start_failing_raises_the_first_error(backend):
    singles = [_single_or_none(backend, s) for s in range(6)]
    pair = next(s for s in range(5) if singles[s] is None and singles[s + 1] is None)
    with pytest.raises(NonFiniteError, match=r"every one of the n_init=2 starts failed; the first: .*(singular|NaN)"):
        _fit(backend, GaussianMixture(backend.tensor(X_DEGENERATE), 3, reg_covar=0.0, seed=pair), n_init=2)
    assert issubclass(DegenerateFitError, NonFiniteError)


def test_n_init_one_is_the_single_fit(backend):
    """n_init=1 (the default) is the plain fit: no restarts table, the same estimates."""
    x = backend.tensor(X)
    a = _fit(backend, GaussianMixture(x, 5, seed=2))
    b = _fit(backend, GaussianMixture(x, 5, seed=2), n_init=1)
    assert a.restarts is None and b.restarts is None
    for name, value in a.params.items():
        np.testing.assert_array_equal(b.params[name], value)


def test_agrees_with_sklearn_n_init():
    """Three well-separated clusters: the final log-likelihood per point of scikit-learn's n_init=4 fit (its
    ``score``) to 1e-6, and every restart at that maximum."""
    pytest.importorskip("sklearn")
    from sklearn.mixture import GaussianMixture as SkGMM

    rng = np.random.default_rng(7)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = centres[rng.choice(3, 450, p=[0.5, 0.3, 0.2])] + rng.normal(size=(450, 2)) * [[0.8, 0.5]]
    for cov_type in ("full", "diag"):
        sk = SkGMM(3, covariance_type=cov_type, n_init=4, random_state=0, tol=1e-10, max_iter=2000).fit(x)
        fit = EM(GaussianMixture(x, 3, cov_type, seed=0), n_init=4, num_epochs=2000, tol=1e-10,
                 progress=False).run()
        assert fit.score() == pytest.approx(sk.score(x), abs=1e-6)
        np.testing.assert_allclose(fit.restarts["score"], sk.score(x), rtol=0, atol=1e-6)
        order = np.argsort(fit.params["locs"][:, 0] + 10 * fit.params["locs"][:, 1])
        sk_order = np.argsort(sk.means_[:, 0] + 10 * sk.means_[:, 1])
        np.testing.assert_allclose(fit.params["locs"][order], sk.means_[sk_order], atol=1e-4)


def test_warns_when_the_kept_start_did_not_converge():
    """Three epochs each with tol=1e-9: every restart still rises by more than tol; one ConvergenceWarning, the kept
    restart's, naming it (the others' dropped)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fit = EM(GaussianMixture(X, 5, seed=0), n_init=3, num_epochs=3, tol=1e-9, progress=False).run()
    conv = [w for w in got if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1
    best = fit.restarts.attrs["best"]
    assert f"restart {best}, seed {best}" in str(conv[0].message) and "n_init=3" in str(conv[0].message)
    assert not fit.restarts["converged"].any()


@pytest.mark.parametrize("bad", [0, -2, 2.5, 3.0, True, "3", None])
def test_n_init_validation(backend, bad):
    gm = GaussianMixture(backend.tensor(X), 5)
    with pytest.raises(ValueError, match=r"n_init must be a positive integer \(the number of starts"):
        EM(gm, n_init=bad)
    with pytest.raises(ValueError, match=r"n_init must be a positive integer"):  # the front door, at construction
        backend.engine("EM")(gm, n_init=bad)


def test_n_init_refuses_what_it_cannot_restart():
    """Given locs (every start the same), a plain Pyro mixture (no random start), checkpoints."""
    from backends import Backend
    from test_mixture_predict import _enum_mixture

    with pytest.raises(ModelSpecificationError, match="with locs= given every restart starts at the same point"):
        EM(GaussianMixture(X, 2, locs=[[0.0, 0.0], [3.0, 0.0]]), n_init=2, progress=False).run()
    from latentfit.pyro import EM as PyroEM
    with pytest.raises(ModelSpecificationError, match="has no random start"):
        pyro = Backend("pyro")
        PyroEM(_enum_mixture(pyro), n_init=2, progress=False).run(pyro.tensor(np.linspace(-1, 1, 20)))
    with pytest.raises(ValueError, match=r"run\(checkpoint=...\) is not supported with restarts"):
        EM(GaussianMixture(X, 2), n_init=2, progress=False).run(checkpoint="/nonexistent/ckpt")
