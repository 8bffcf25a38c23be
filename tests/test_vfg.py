"""Variational Flow Graphical models (latentfit.integrations.vfg): exact flows, hand-computed messages and ELBO,
imputation on the paper's synthetic set against mean / KNN (/ IterativeImputer and MICE, slow), the
scikit-learn wrapper and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentfit.integrations.vfg import (
    GAUSSIAN_NETWORK_COLUMNS,
    GAUSSIAN_NETWORK_DAG,
    SYNTHETIC_MISSING,
    SYNTHETIC_STRUCTURE,
    VFG,
    VFGImputer,
    gaussian_network_conditional_f,
    gaussian_network_data,
    parse_structure,
    synthetic_imputation_data,
)

LOG_2PI = math.log(2 * math.pi)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jax_available() -> bool:
    try:
        import flowjax  # noqa: F401
    except ImportError:
        return False
    return True


def _split(n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = synthetic_imputation_data(n_train + n_test, seed=seed)
    tr, te = x[:n_train], x[n_train:]
    te_nan = te.copy()
    te_nan[:, SYNTHETIC_MISSING] = np.nan
    return tr, te, te_nan


def _mse(imp: np.ndarray, te: np.ndarray) -> float:
    return float(((imp - te)[:, SYNTHETIC_MISSING] ** 2).mean())


# -- structure ------------------------------------------------------------------------------------------
def test_parse_structure_nested_and_dict() -> None:
    g = parse_structure([[0, 1], [2, 3], [[4, 5], [6, 7]]])
    assert [n.cols for n in g.nodes if n.is_leaf] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert len(g.nodes) == 6 and g.nodes[g.root].children == [0, 1, 4]
    d = parse_structure({"root": ["a", "b"], "a": [0, 1], "b": ["c", 4], "c": [2, 3]})
    assert [n.cols for n in d.nodes if n.is_leaf] == [(0, 1), (2, 3), (4,)]
    assert d.nodes[d.root].dim == 2


# -- flows invert exactly -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.skipif(
    not _jax_available(), reason="flowjax not installed"))])
def test_flows_invert_exactly(backend: str) -> None:
    # 1-column leaves under a 1-D node (elementwise affine, min_dim=1), 2-D and 3-D coupling flows (two couplings
    # with a permutation between them)
    structure = [[[[0], [1]], [2, 3]], [4, 5, 6]]
    x = np.random.default_rng(0).standard_normal((64, 7))
    if backend == "torch":
        fit = VFG(structure, hidden=16, blocks=2, min_dim=1, identity_init=False).fit(x, num_epochs=1, batch_size=64,
                                                                                     progress=False)
        edges = fit.edge_flows()
    else:  # flowjax flows straight from the constructor, parameters perturbed (no jit compile: fast)
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        from latentfit.integrations.vfg_jax import bound_flows, make_flows

        model = VFG(structure, backend="jax", hidden=16, blocks=2, min_dim=1, identity_init=False)
        flows = make_flows(model, jax.random.PRNGKey(0))
        flows = jax.tree_util.tree_map(lambda a: a + 0.3 * jnp.sin(jnp.arange(a.size).reshape(a.shape) + 1.0)
                                       if eqx.is_inexact_array(a) else a, flows)
        bound = bound_flows(flows)
        fit = None
        edges = {e: bound[k] for k, e in enumerate(model.graph.edges)}
    graph = model.graph if fit is None else fit.graph
    dims = set()
    rng = np.random.default_rng(1)
    for (c, p), f in edges.items():
        m = graph.nodes[p].dim
        dims.add(m)
        h = 3.0 * rng.standard_normal((50, m))
        if backend == "torch":
            h_t = torch.as_tensor(h)
            with torch.no_grad():
                back = f.inverse(f.forward(h_t)).numpy()
                moved = float((f.forward(h_t) - h_t).abs().max())
            np.testing.assert_allclose(back, h, atol=1e-6, err_msg=f"edge {c}->{p}")
        else:
            h32 = h.astype(np.float32)
            back = np.asarray(f.inverse(f.forward(h32)))
            moved = float(np.abs(np.asarray(f.forward(h32)) - h32).max())
            np.testing.assert_allclose(back, h32, atol=1e-6 * 10, rtol=1e-6, err_msg=f"edge {c}->{p}")  # float32
        assert moved > 1e-3  # not the identity
    assert dims == {1, 2, 3}


# -- messages and objective by hand ---------------------------------------------------------------------
def test_messages_two_leaf_identity_tree() -> None:
    x = torch.tensor([[1.0, 3.0], [-2.0, 0.5], [0.0, 4.0]], dtype=torch.float64)
    fit = VFG([[0], [1]], blocks=0, min_dim=1, standardize=False).fit(x, num_epochs=1, progress=False)
    h = (x[:, 0] + x[:, 1]) / 2  # root = average of the children
    torch.testing.assert_close(fit.encode(x)[:, 0], h)
    torch.testing.assert_close(fit.decode(h[:, None]), torch.stack([h, h], 1))  # both leaves get the root
    # −ELBO = Σ_c [½(x_c − h)² + ½ log 2π] + ½h² + ½ log 2π (σ = 1, β = 1)
    nelbo = (0.5 * (x - h[:, None]) ** 2).sum(1) + LOG_2PI + 0.5 * h**2 + 0.5 * LOG_2PI
    assert fit.negative_elbo(x) == pytest.approx(float(nelbo.mean()), rel=1e-12)
    # imputation: the missing leaf is decoded from the root, which only averages the observed leaf
    xm = x.clone()
    xm[0, 1] = float("nan")
    imp = fit.impute(xm)
    assert imp[0, 1] == x[0, 0] and torch.equal(imp[1:], x[1:])


def test_messages_three_level_identity_tree() -> None:
    x = torch.tensor([[1.0, 3.0, -1.0], [2.0, -2.0, 5.0]], dtype=torch.float64)
    fit = VFG([[[0], [1]], [2]], blocks=0, min_dim=1, standardize=False, beta=0.5).fit(x, num_epochs=1,
                                                                                        progress=False)
    a = (x[:, 0] + x[:, 1]) / 2
    r = (a + x[:, 2]) / 2
    states = fit.encode(x, all_nodes=True)
    torch.testing.assert_close(states[2][:, 0], a)
    torch.testing.assert_close(states[fit.graph.root][:, 0], r)
    # KL: |a − â| + log 2 at the inner node (â = r with identity edges), −log N(r; 0, 1) at the root
    kl = (a - r).abs() + math.log(2) + 0.5 * r**2 + 0.5 * LOG_2PI
    rec = (0.5 * (x - r[:, None]) ** 2).sum(1) + 1.5 * LOG_2PI
    assert fit.negative_elbo(x) == pytest.approx(float((rec + 0.5 * kl).mean()), rel=1e-12)
    # closest observed ancestor: x1 missing → from node a (= x0); x0, x1 missing → from the root (= x2)
    xm = x.clone()
    xm[0, 1] = float("nan")
    xm[1, :2] = float("nan")
    imp = fit.impute(xm)
    assert imp[0, 1] == x[0, 0] and imp[1, 0] == x[1, 2] and imp[1, 1] == x[1, 2]
    # an explicit mask gives the same
    mask = ~torch.isnan(xm)
    torch.testing.assert_close(fit.impute(x, mask), imp)


# -- DAGs -------------------------------------------------------------------------------------------------
def test_parse_dag_gaussian_network() -> None:
    g = parse_structure(GAUSSIAN_NETWORK_DAG, min_dim=1)
    names = {n.name: n for n in g.nodes}
    assert [len(names[v].parents) for v in GAUSSIAN_NETWORK_COLUMNS] == [2, 2, 1, 2, 1, 1, 1]
    assert sorted(g.nodes[r].name for r in g.roots) == ["family_C", "family_D", "family_F"]
    assert len(g.edges) == 3 + 2 + 5 and not g.is_tree
    assert all(c < p for c, p in g.edges)  # topological order: children first
    with pytest.raises(ValueError, match="3 roots"):
        _ = g.root


DAG = {"a": [0], "b": [1], "c": [2], "p": ["a", "b"], "q": ["b", "c"]}  # b has two parents, two roots


def test_dag_identity_messages_elbo_log_prob_by_hand() -> None:
    x = torch.tensor([[1.0, 3.0, -1.0], [2.0, -2.0, 5.0], [0.5, 0.0, 1.5]], dtype=torch.float64)
    fit = VFG(DAG, blocks=0, min_dim=1, standardize=False).fit(x, num_epochs=1, progress=False)
    p, q = (x[:, 0] + x[:, 1]) / 2, (x[:, 1] + x[:, 2]) / 2  # forward: average of the children
    torch.testing.assert_close(fit.encode(x), torch.stack([p, q], 1))  # the two roots, concatenated
    xhat = torch.stack([p, (p + q) / 2, q], 1)  # backward: b averages its two parents
    torch.testing.assert_close(fit.decode(torch.stack([p, q], 1)), xhat)
    # −ELBO = Σ_c ½(x_c − x̂_c)² + 3·½ log 2π + ½p² + ½q² + 2·½ log 2π (σ = 1, β = 1, no inner node)
    nelbo = (0.5 * (x - xhat) ** 2).sum(1) + 1.5 * LOG_2PI + 0.5 * (p**2 + q**2) + LOG_2PI
    assert fit.negative_elbo(x) == pytest.approx(float(nelbo.mean()), rel=1e-12)
    torch.testing.assert_close(fit.log_prob(x), -nelbo, rtol=1e-12, atol=1e-12)
    # imputation: b missing → both roots informed (p = x0, q = x2), b̂ = (x0 + x2)/2;
    # a and b missing → p is uninformed: b̂ = q = x2 only, â from p alone = the prior mean 0
    xm = x.clone()
    xm[0, 1] = float("nan")
    xm[1, :2] = float("nan")
    imp = fit.impute(xm)
    assert imp[0, 1] == (x[0, 0] + x[0, 2]) / 2
    assert imp[1, 1] == x[1, 2] and imp[1, 0] == 0.0
    torch.testing.assert_close(imp[2], x[2])
    # log_prob of a partly observed row: the reconstruction of its observed entries only
    lp = fit.log_prob(xm)
    q1 = x[1, 2]  # row 1: only c observed → p unobserved (no KL), q = x2, ĉ = q
    assert float(lp[1]) == pytest.approx(-(0.5 * LOG_2PI + 0.5 * float(q1) ** 2 + 0.5 * LOG_2PI), rel=1e-12)


def test_dag_linear_gaussian_reaches_exact_conditional() -> None:
    # x0 = u + e, x1 = u + v + e, x2 = v + e (u, v ~ N(0, 1), e ~ N(0, 0.1²)): E[x1 | x0, x2] = (x0 + x2)/1.01,
    # noise floor 0.0308 on this test set.  DAG: x1's leaf has two parents (p over x0, x1; q over x1, x2), so its
    # imputation averages both; elementwise affine edges, Alg. 2 masking dropping ~one section at a time.
    # Measured MSE 0.0311 (1 % above the floor); 10 % allowed
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(3000), rng.standard_normal(3000)
    x = np.stack([u, u + v, v], 1) + 0.1 * rng.standard_normal((3000, 3))
    tr, te = x[:2000], x[2000:]
    fit = VFG(DAG, min_dim=1, masking=0.9, mask_drop=0.01, beta=0.1).fit(tr, num_epochs=40, batch_size=200,
                                                                           learning_rate=1e-2, progress=False)
    xm = te.copy()
    xm[:, 1] = np.nan
    mse = float(((fit.impute(xm).numpy()[:, 1] - te[:, 1]) ** 2).mean())
    floor = float((((te[:, 0] + te[:, 2]) / 1.01 - te[:, 1]) ** 2).mean())
    assert floor == pytest.approx(0.0308, abs=5e-4)
    assert mse < 1.1 * floor, (mse, floor)


@pytest.mark.slow  # about 30 s wall at load 6 (was 5 minutes on a loaded core)
def test_gaussian_network_dag_within_twice_the_noise_floor() -> None:
    # the 7-node linear Gaussian network, F missing in the last 500 of 5000 rows, VFG on the known DAG.
    # Noise floor (exact E[F | rest]) 0.00166 in MSE / Var F; measured VFG 0.00262 (1.58×; 0.00213 before the fit
    # drew from its own generator), the goal is < 2×
    x = gaussian_network_data(5000, seed=0)
    xm = x.copy()
    xm[4500:, 5] = np.nan
    fit = VFG(GAUSSIAN_NETWORK_DAG, hidden=32, blocks=2, min_dim=4, masking=1.0, mask_drop=0.01, beta=0.01).fit(
        xm, num_epochs=30, batch_size=256, learning_rate=1e-2, progress=False)
    te = x[4500:, 5]
    var = x[:, 5].var()
    mse = float(((fit.impute(xm).numpy()[4500:, 5] - te) ** 2).mean() / var)
    floor = float(((gaussian_network_conditional_f(x[4500:]) - te) ** 2).mean() / var)
    assert floor == pytest.approx(0.00166, abs=2e-5)
    assert mse < 2.0 * floor, (mse, floor)


@pytest.mark.skipif(not _jax_available(), reason="flowjax not installed")
def test_log_prob_and_imputation_agree_across_flavours() -> None:
    # the same (torch-trained, float64) weights in the flowjax flavour: log_prob, impute, encode to 1e-6
    # (measured: 1e-14), on a DAG with shared leaves, coupling flows (2-D nodes) and missing entries
    import jax

    from latentfit.integrations.vfg_jax import fit_from_torch

    x = gaussian_network_data(60, seed=1)
    fit = VFG(GAUSSIAN_NETWORK_DAG, hidden=8, blocks=2, min_dim=2, identity_init=False, masking=True).fit(
        x, num_epochs=2, batch_size=30, progress=False)
    xm = x.copy()
    xm[::3, 5] = np.nan
    xm[1::4, 0] = np.nan
    lt, it, et = fit.log_prob(xm).numpy(), fit.impute(xm).numpy(), fit.encode(x).numpy()
    with jax.enable_x64(True):
        jf = fit_from_torch(fit)
        lj, ij, ej = np.asarray(jf.log_prob(xm)), np.asarray(jf.impute(xm)), np.asarray(jf.encode(x))
    assert np.isfinite(lt).all() and lt.shape == (60,)
    np.testing.assert_allclose(lj, lt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ij, it, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ej, et, rtol=1e-6, atol=1e-6)


def test_log_prob_change_of_variables() -> None:
    # log_prob is a density of x in its own units: scaling the data by 10 shifts it by −d·log 10
    x = synthetic_imputation_data(64, seed=5).astype(np.float64)
    f1 = VFG(SYNTHETIC_STRUCTURE, hidden=8, blocks=1, identity_init=False).fit(x, num_epochs=1, progress=False)
    f2 = VFG(SYNTHETIC_STRUCTURE, hidden=8, blocks=1, identity_init=False).fit(10 * x, num_epochs=1, progress=False)
    np.testing.assert_allclose(f2.log_prob(10 * x).numpy(), f1.log_prob(x).numpy() - 8 * math.log(10), atol=1e-8)


# -- fit API ----------------------------------------------------------------------------------------------
def test_fit_api_history_sample_reconstruct() -> None:
    tr, _, _ = _split(200, 0, seed=3)
    calls: list = []
    fit = VFG(SYNTHETIC_STRUCTURE, hidden=16, blocks=2).fit(tr, num_epochs=4, batch_size=50, progress=False,
                                                            callback=lambda k, info: calls.append((k, info)))
    loss = fit.history["loss"]  # a FitResult's history: one entry per epoch (driver iteration)
    assert len(loss) == 4 and np.isfinite(loss).all() and fit.num_iterations == 4
    assert calls == [(k + 1, {"loss": v, "rollbacks": 0}) for k, v in enumerate(loss)]  # the driver's callbacks
    # training decreases the negative ELBO: per epoch (history: the epoch's mean over its steps, > 0 here as the
    # Gaussian terms alone exceed 8·½ log 2π) and on the data, against the untrained (identity) flows
    untrained = VFG(SYNTHETIC_STRUCTURE, hidden=16, blocks=2).fit(tr, num_epochs=0, progress=False)
    assert loss[0] > 8 * 0.5 * LOG_2PI and loss[-1] < loss[0], loss
    assert fit.negative_elbo(tr) < untrained.negative_elbo(tr) - 0.1
    # early stopping on held-out rows: the callback sees the validation loss; patience 1 stops at the first
    # epoch that does not improve on the best
    calls.clear()
    val = VFG(SYNTHETIC_STRUCTURE, hidden=16, blocks=2).fit(tr, num_epochs=30, batch_size=50, learning_rate=3e-2,
                                                            progress=False, validation=0.25, patience=1,
                                                            callback=lambda k, info: calls.append(info["val_loss"]))
    assert calls == val.val_history and len(val.history["loss"]) == len(calls) == val.num_iterations
    assert len(calls) == 30 or calls[-1] >= min(calls[:-1])
    h = fit.encode(tr)
    assert h.shape == (200, 2)
    assert fit.decode(h).shape == (200, 8)
    s = fit.sample(7, seed=1)
    assert s.shape == (7, 8) and torch.isfinite(s).all()


def test_tree_linear_gaussian_reaches_exact_conditional() -> None:
    # x = (u, u, 2u) + N(0, 0.3²) noise, u ~ N(0, 1), on the tree [[x0, x1], x2]; x2 missing at test is decoded from
    # the root (its closest observed ancestor): E[x2 | x0, x1] = 2(x0 + x1)/2.09, noise floor 0.2376 on this test
    # set.  Elementwise affine edges (min_dim=1) can represent it exactly; measured 1.004× the floor (1.000-1.004×
    # over seeds 0-2), 10 % allowed.  About 0.4 s on one core
    rng = np.random.default_rng(0)
    x = np.stack([np.ones(3000), np.ones(3000), 2 * np.ones(3000)], 1) * rng.standard_normal((3000, 1))
    x = x + 0.3 * rng.standard_normal((3000, 3))
    tr, te = x[:2000], x[2000:]
    fit = VFG([[[0], [1]], [2]], min_dim=1, masking=0.8, mask_drop=0.3, beta=0.1).fit(
        tr, num_epochs=20, batch_size=200, learning_rate=1e-2, progress=False)
    xm = te.copy()
    xm[:, 2] = np.nan
    mse = float(((fit.impute(xm).numpy()[:, 2] - te[:, 2]) ** 2).mean())
    floor = float(((2 * (te[:, 0] + te[:, 1]) / 2.09 - te[:, 2]) ** 2).mean())
    assert floor == pytest.approx(0.2376, abs=5e-3)
    assert mse < 1.1 * floor, (mse, floor)


def test_every_missingness_pattern() -> None:
    # all 2^8 observed/missing patterns of the 8 columns (a partly observed section, a whole sub-tree, everything, and
    # nothing missing), as NaNs and as an explicit mask: finite imputations that keep every observed entry, the
    # same from both routes; finite log_prob; a row with nothing observed gets the decoded prior mean (roots at 0)
    x = synthetic_imputation_data(256, seed=6).astype(np.float64)
    fit = VFG(SYNTHETIC_STRUCTURE, hidden=8, blocks=1, identity_init=False, masking=True).fit(x, num_epochs=1,
                                                                                              progress=False)
    mask = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # row r: bit j = column j observed
    xm = np.where(mask, x, np.nan)
    imp = fit.impute(xm).numpy()
    assert np.isfinite(imp).all()
    np.testing.assert_array_equal(imp[mask], x[mask])
    np.testing.assert_array_equal(fit.impute(x, mask).numpy(), imp)
    lp = fit.log_prob(xm).numpy()
    assert np.isfinite(lp).all() and lp[0] == 0.0  # nothing observed: an empty ELBO
    np.testing.assert_allclose(imp[0], fit.decode(np.zeros((1, 2))).numpy()[0], rtol=1e-12)


# -- non-linear imputation -------------------------------------------------------------------------------
def test_tree_nonlinear_imputation_near_exact_conditional() -> None:
    # x0 = z + e0, x1 = 2 sin z + e1 (z ~ N(0, 1), e ~ N(0, 0.1²)); x1 missing at test.  z | x0 ~ N(x0/1.01, 0.01/1.01),
    # so E[x1 | x0] = 2 sin(x0/1.01) exp(−0.005/1.01): the noise floor 0.0334 on this test set, the best linear
    # imputer 8.4× that.  Two sections padded to 2-D coupling flows under one root; measured 1.08× the floor (1.08-1.49×
    # over seeds 0-3), 2× allowed.  About 1 s on one core
    rng = np.random.default_rng(0)
    z = rng.standard_normal(1100)
    x = np.stack([z + 0.1 * rng.standard_normal(1100), 2 * np.sin(z) + 0.1 * rng.standard_normal(1100)], 1)
    tr, te = x[:600], x[600:]
    fit = VFG([[0], [1]], hidden=16, blocks=2, masking=0.8, beta=0.1).fit(tr, num_epochs=40, batch_size=200,
                                                                          learning_rate=1e-2, progress=False)
    xm = te.copy()
    xm[:, 1] = np.nan
    mse = float(((fit.impute(xm).numpy()[:, 1] - te[:, 1]) ** 2).mean())
    floor = float(((2 * np.sin(te[:, 0] / 1.01) * np.exp(-0.005 / 1.01) - te[:, 1]) ** 2).mean())
    linear = np.polyval(np.polyfit(tr[:, 0], tr[:, 1], 1), te[:, 0])
    assert floor == pytest.approx(0.0334, abs=5e-4)
    assert float(((linear - te[:, 1]) ** 2).mean()) > 5 * floor  # the conditional is far from linear
    assert mse < 2.0 * floor, (mse, floor)


# -- imputation on the paper's synthetic set --------------------------------------------------------------
@pytest.mark.slow  # about 10 s on one core
def test_synthetic_imputation_beats_mean_and_knn() -> None:
    from sklearn.impute import KNNImputer

    # 300 training rows, 60 epochs, the imputation settings (80 % masked steps, β = 0.1).  At this size the margin
    # over KNN depends on the draw (seed 1: 0.51 vs 0.81; before the fit drew from its own generator seed 1: 0.56 vs
    # 0.81, seed 3: 0.45 vs 1.50, seed 2: 1.63 vs 1.07): the 10-set benchmark (README) is the statistical check
    tr, te, te_nan = _split(300, 300, seed=1)
    fit = VFG(SYNTHETIC_STRUCTURE, masking=0.8, beta=0.1, min_dim=4).fit(tr, num_epochs=60, batch_size=100,
                                                                         learning_rate=3e-3, seed=0, progress=False)
    vfg = _mse(fit.impute(te_nan).numpy(), te)
    mean = _mse(np.where(np.isnan(te_nan), tr.mean(0), te_nan), te)
    knn = _mse(KNNImputer(n_neighbors=5).fit(tr).transform(te_nan), te)
    assert vfg < mean and vfg < knn, (vfg, mean, knn)


@pytest.mark.slow
def test_synthetic_imputation_full_size_vs_knn_and_iterative() -> None:
    # the paper's size (1000 training rows, 300 test rows), one set.  Before the robustness work (β = 1, half
    # the steps masked, Pyro's default coupling init) this draw diverged to NaN; measured now: VFG 0.156 (fit seeds
    # 1, 2: 0.059, 0.114; 0.085 before the fit drew from its own generator), KNN(5) 0.245, IterativeImputer 2.5e22
    # (x1 = x2 and x3 = x4 exactly: its chained regressions diverge).  One fit spans 0.24-0.64× KNN over these seeds,
    # hence the 0.8 margin; the 10-set benchmark (README: 0.12 ± 0.04 against 0.33 ± 0.17) is the statistical check
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer

    x = synthetic_imputation_data(1300, seed=1000)
    tr, te = x[:1000], x[1000:]
    te_nan = te.copy()
    te_nan[:, SYNTHETIC_MISSING] = np.nan
    fit = VFG(SYNTHETIC_STRUCTURE, masking=0.8, beta=0.1, min_dim=4).fit(
        tr, num_epochs=150, batch_size=128, learning_rate=3e-3, seed=0, progress=False, validation=0.1)
    imp = fit.impute(te_nan).numpy()
    vfg = _mse(imp, te)
    knn = _mse(KNNImputer(n_neighbors=5).fit(tr).transform(te_nan), te)
    it = _mse(IterativeImputer(random_state=0).fit(tr).transform(te_nan), te)
    assert np.isfinite(imp).all() and np.abs(imp).max() < 100
    assert vfg < 0.8 * knn and vfg < it, (vfg, knn, it)


@pytest.mark.slow  # about 30 s of compilation
@pytest.mark.skipif(not _jax_available(), reason="flowjax not installed")
def test_jax_backend_fits_and_imputes() -> None:
    tr, te, te_nan = _split(200, 100, seed=2)
    calls: list = []
    fit = VFG(SYNTHETIC_STRUCTURE, backend="jax", hidden=16, blocks=2, masking=True, min_dim=4).fit(
        tr, num_epochs=8, batch_size=200, learning_rate=1e-2, progress=False,  # one batch shape: two compiles
        callback=lambda k, info: calls.append((k, info)))
    loss = fit.history["loss"]  # through the engine driver, as the torch flavour
    assert len(loss) == 8 and np.isfinite(loss).all() and fit.compile_time > 0
    assert calls == [(k + 1, {"loss": v, "rollbacks": 0}) for k, v in enumerate(loss)]
    assert loss[-2] < loss[0]  # even epochs: plain steps
    imp = np.asarray(fit.impute(te_nan))
    assert np.isfinite(imp).all() and np.array_equal(imp[:, [0, 1, 4, 5]], te[:, [0, 1, 4, 5]])
    assert np.asarray(fit.sample(5)).shape == (5, 8)


# -- scikit-learn wrapper ---------------------------------------------------------------------------------
def test_imputer_in_pipeline() -> None:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    x = synthetic_imputation_data(240, seed=4).astype(np.float64)
    y = x[:, 0] + x[:, 4]
    xm = x.copy()
    xm[rng.random(x.shape) < 0.15] = np.nan
    for imputer in (VFGImputer(hidden=16, blocks=2, num_epochs=3, batch_size=80), IterativeImputer(random_state=0)):
        pipe = make_pipeline(imputer, LinearRegression()).fit(xm, y)
        assert np.isfinite(pipe.predict(xm)).all()
    out = VFGImputer(hidden=16, blocks=2, num_epochs=3, batch_size=80).fit_transform(xm)
    assert out.shape == x.shape and not np.isnan(out).any()
    np.testing.assert_array_equal(out[~np.isnan(xm)], xm[~np.isnan(xm)])  # observed entries untouched
    struct = VFGImputer(structure=SYNTHETIC_STRUCTURE, hidden=16, blocks=2, num_epochs=2).fit(xm)
    assert struct.transform(xm).shape == x.shape


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_raises() -> None:
    x = synthetic_imputation_data(20, seed=0)
    with pytest.raises(ValueError, match="more than once"):
        VFG([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"missing column\(s\) \[3\]"):
        VFG([[0, 1], [2], [4, 5, 6, 7]]).fit(x, num_epochs=1, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        VFG([[0, 1], [2, 3, 4, 5, 6, 7, 8]]).fit(x, num_epochs=1, progress=False)
    with pytest.raises(ValueError, match="cycle: a -> b -> c -> a"):
        VFG({"r": ["a", 3], "a": ["b", 0], "b": ["c", 1], "c": ["a", 2]})
    with pytest.raises(ValueError, match="no root"):
        VFG({"a": ["b", 0], "b": ["a", 1]})
    with pytest.raises(ValueError, match="unknown node"):
        VFG({"r": ["a", "zz"], "a": [0]})
    with pytest.raises(ValueError, match="non-empty"):
        VFG([[0, 1], []])
    xn = x.copy()
    xn[:, 3] = np.nan
    with pytest.raises(ValueError, match=r"column\(s\) \[3\].*all NaN"):
        VFG(SYNTHETIC_STRUCTURE).fit(xn, num_epochs=1, progress=False)
    with pytest.raises(ValueError, match="entirely missing"):
        VFGImputer().fit(xn)
    fit = VFG(SYNTHETIC_STRUCTURE, hidden=8, blocks=1).fit(x, num_epochs=1, progress=False)
    with pytest.raises(ValueError, match="mask must have the shape of x"):
        fit.impute(x, np.ones((20, 7), bool))
    with pytest.raises(ValueError, match=r"shape \[n, 8\]"):
        fit.impute(x[:, :5])
    with pytest.raises(ValueError, match="root's dimension"):
        fit.decode(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="backend"):
        VFG(SYNTHETIC_STRUCTURE, backend="tf")
    xo = x.copy()
    xo[4, 6] = np.nan  # NaN in an entry the mask declares observed
    with pytest.raises(ValueError, match="NaN at row 4, column 6"):
        fit.impute(xo, np.ones(x.shape, bool))
    with pytest.raises(ValueError, match="NaN at row 4, column 6"):
        fit.log_prob(xo, np.ones(x.shape, bool))
    with pytest.raises(ValueError, match="masking"):
        VFG(SYNTHETIC_STRUCTURE, masking=1.5)
    with pytest.raises(ValueError, match="mask_drop"):
        VFG(SYNTHETIC_STRUCTURE, mask_drop=1.0)
    with pytest.raises(ValueError, match="validation"):
        VFG(SYNTHETIC_STRUCTURE, blocks=0).fit(x, num_epochs=1, progress=False, validation=1.2)
    with pytest.raises(ValueError, match="has no children"):
        VFG({"r": ["a"], "a": []})
    with pytest.raises(ValueError, match="not fitted"):
        VFGImputer().transform(x)
    # data of another width than the fitted sections: every entry point names the expected shape
    for call in (fit.encode, fit.log_prob, fit.impute):
        with pytest.raises(ValueError, match=r"shape \[n, 8\], got \(20, 7\)"):
            call(x[:, :7])
    imputer = VFGImputer(hidden=8, blocks=1, num_epochs=1).fit(x)
    with pytest.raises(ValueError, match="X has 7 columns, the imputer was fitted on 8"):
        imputer.transform(x[:, :7])


# -- README -----------------------------------------------------------------------------------------------
def test_readme_vfg_block_runs() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.split(r"^## ", text, flags=re.M)
    vfg = [sec for sec in section if sec.startswith("Imputation with flow graphs (VFG)")]
    assert len(vfg) == 1
    code = "\n".join(re.findall(r"```python\n(.*?)```", vfg[0], flags=re.S))
    ns: dict = {}
    exec(compile(code, "README:vfg", "exec"), ns)
    x, x_nan, filled = ns["x"], ns["x_nan"], ns["x_filled"]
    assert not np.isnan(filled).any() and np.array_equal(filled[~np.isnan(x_nan)], x_nan[~np.isnan(x_nan)])
    names = {n.name: n for n in ns["fit"].graph.nodes}
    assert len(names["bmi"].parents) == 2 and len(ns["fit"].graph.roots) == 2
    assert tuple(ns["elbo"].shape) == (x.shape[0],) and torch.isfinite(ns["elbo"]).all()
    assert not torch.isnan(ns["x_hat"]).any()
    # the density block: a held-out score per pixel, better than the untrained (identity-initialised) flows'
    y, nll = ns["y"], float(ns["nll"])
    untrained = VFG(ns["tree"], hidden=16, blocks=2).fit(y[:1500], num_epochs=0, progress=False)
    assert math.isfinite(nll) and nll < float(-untrained.log_prob(y[1500:]).mean()) / 64 - 0.05, nll


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=[pytest.mark.slow, pytest.mark.skipif(
    not _jax_available(), reason="flowjax not installed")])])
def test_samples_have_the_datas_covariance(backend: str) -> None:
    # a linear-Gaussian latent tree: z ~ N(0, I₂), sections a = A z + e, b = B z + e (e ~ N(0, 0.3²)), so
    # Cov(x) = [[AAᵀ, ABᵀ], [BAᵀ, BBᵀ]] + 0.09 I.  The trained roots are far narrower than the ELBO's N(0, I) prior
    # (no entropy or log-det term): draws decoded from that prior had column variances 20-40× the data's (the audit:
    # [45.8, 80.5, 38.4, 45.4] against [1.34, 2.02, 1.09, 1.18]).  ``sample`` draws the roots from the Gaussian fitted
    # to the training rows' encoded roots: the draws' covariance within 0.2 of Cov(x) entrywise (measured on torch
    # 0.1 at most, variances [1.24, 2.05, 1.11, 1.09]), while the prior's draws are still available and far wider.
    rng = np.random.default_rng(0)
    a, b = np.array([[1.0, 0.5], [-0.7, 1.2]]), np.array([[0.8, -0.6], [0.3, 1.0]])
    z = rng.standard_normal((2500, 2))
    x = np.hstack([z @ a.T, z @ b.T]) + 0.3 * rng.standard_normal((2500, 4))
    sigma = np.block([[a @ a.T, a @ b.T], [b @ a.T, b @ b.T]]) + 0.09 * np.eye(4)
    fit = VFG({"root": ["a", "b"], "a": [0, 1], "b": [2, 3]}, backend=backend, hidden=16, blocks=2).fit(
        x, progress=False, seed=0, num_epochs=30)
    draws = np.asarray(fit.sample(20000, seed=1))
    assert np.abs(np.cov(draws, rowvar=False) - sigma).max() < 0.2, np.cov(draws, rowvar=False).round(2)
    assert np.abs(draws.mean(0)).max() < 0.1
    loc, cov = fit.fitted.root_distribution()
    h = np.asarray(fit.encode(x))
    np.testing.assert_allclose(loc, h.mean(0), atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(h, rowvar=False), rtol=1e-5, atol=1e-8)
    prior = np.asarray(fit.sample(2000, seed=1, roots="prior"))
    assert prior.var(0).min() > 5 * np.diag(sigma).max()
    with pytest.raises(ValueError, match="roots must be"):
        fit.sample(3, roots="posterior")
