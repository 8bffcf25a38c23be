"""The backend shim: each primitive on both backends against numpy/scipy, and the layering rule that only
the shim knows which array library it runs on."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import scipy.special as sps
import scipy.stats as st

from latentfit.inference.ops import LOG_2PI, TorchOps, make_ops, ops_for, select


def test_log_2pi():
    assert LOG_2PI == pytest.approx(np.log(2 * np.pi), abs=0)


def test_special_functions(backend):
    ops = backend.ops()
    p = np.array([1e-6, 0.02, 0.3, 0.5, 0.9, 1 - 1e-9])
    x = np.array([-40.0, -5.0, -0.3, 0.0, 2.0, 9.0])
    for name, ref, arg in [("ndtri", sps.ndtri, p), ("logit", sps.logit, p), ("ndtr", sps.ndtr, x),
                           ("expit", sps.expit, x), ("log_ndtr", sps.log_ndtr, x)]:
        got = ops.to_numpy(getattr(ops, name)(ops.asarray(arg)))
        np.testing.assert_allclose(got, ref(arg), rtol=1e-10, atol=1e-12, err_msg=name)


def test_logsumexp(backend):
    ops = backend.ops()
    t = np.array([[1000.0, -np.inf, 0.5], [1001.0, -np.inf, -3.0], [999.0, -np.inf, 2.0]])
    got = ops.to_numpy(ops.logsumexp(ops.asarray(t), 0))
    np.testing.assert_allclose(got, sps.logsumexp(t, 0))
    assert got[1] == -np.inf


def test_linear_algebra(backend):
    ops = backend.ops()
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3, 3))
    spd = a @ a.transpose(0, 2, 1) + np.eye(3)
    chol = np.linalg.cholesky(spd)
    np.testing.assert_allclose(ops.to_numpy(ops.small_cholesky(ops.asarray(spd))), chol, atol=1e-12)
    np.testing.assert_allclose(ops.to_numpy(ops.small_cholesky(ops.asarray(spd), max_unrolled=2)), chol, atol=1e-12)
    b = rng.normal(size=(4, 3, 2))
    np.testing.assert_allclose(ops.to_numpy(ops.solve_triangular(ops.asarray(chol), ops.asarray(b))),
                               np.linalg.solve(chol, b), atol=1e-12)
    upper = chol.transpose(0, 2, 1)
    np.testing.assert_allclose(ops.to_numpy(ops.solve_triangular(ops.asarray(upper), ops.asarray(b), lower=False)),
                               np.linalg.solve(upper, b), atol=1e-12)
    # Gaussian log-density [S, n] with per-unit covariances
    mean, x = rng.normal(size=(4, 3)), rng.normal(size=(5, 4, 3))
    ref = np.array([[st.multivariate_normal(mean[i], spd[i]).logpdf(x[s, i]) for i in range(4)] for s in range(5)])
    np.testing.assert_allclose(ops.to_numpy(ops.mvn_log_prob(ops.asarray(x), ops.asarray(mean), ops.asarray(chol))),
                               ref, atol=1e-10)


def test_spd_factor_solve_and_inverse_without_lapack(backend):
    """The shim's Cholesky factor, solve and inverse written in array operations (no LAPACK) equal the array library's
    own (LAPACK) on random SPD batches to 1e-12 relative, for a latent's d and an observation vector's; ``spd_solve`` /
    ``spd_inverse`` are those on JAX and the library's ``solve`` / ``inv`` on torch (its results unchanged)."""
    ops = backend.ops()
    xp = ops.xp
    rng = np.random.default_rng(3)
    for d in (1, 2, 3, 11):
        a = rng.normal(size=(20, d, d))
        spd = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(d)
        b = rng.normal(size=(20, d, 4))
        A, B = ops.asarray(spd), ops.asarray(b)
        refs = {"chol": ops.cholesky(A), "solve": ops.solve(A, B), "inv": xp.linalg.inv(A)}
        chol = ops.column_cholesky(A)
        got = {"chol": chol, "solve": ops.cholesky_solve(chol, B), "inv": ops.cholesky_inverse(chol),
               "spd_solve": ops.spd_solve(A, B), "spd_inverse": ops.spd_inverse(A)}
        for name, value in got.items():
            ref = ops.to_numpy(refs[name.replace("spd_", "").replace("inverse", "inv")])
            value = ops.to_numpy(value)
            scale = np.abs(ref).max(axis=(-2, -1), keepdims=True)
            assert np.all(np.abs(value - ref) <= 1e-12 * scale), (d, name, np.max(np.abs(value - ref) / scale))
        assert np.all(np.triu(ops.to_numpy(chol), 1) == 0)
        inv = ops.to_numpy(got["inv"])
        np.testing.assert_array_equal(inv, inv.transpose(0, 2, 1))  # symmetric to the last bit
        if backend.name == "pyro":  # torch keeps its library's solve and inverse
            np.testing.assert_array_equal(ops.to_numpy(got["spd_solve"]), ops.to_numpy(refs["solve"]))
            np.testing.assert_array_equal(ops.to_numpy(got["spd_inverse"]), ops.to_numpy(refs["inv"]))
    # a single matrix (no batch), as the prior precision Ω⁻¹ is
    np.testing.assert_allclose(ops.to_numpy(ops.spd_inverse(ops.asarray(spd[0]))), np.linalg.inv(spd[0]),
                               rtol=1e-12, atol=1e-12 * np.abs(np.linalg.inv(spd[0])).max())


def test_spd_solve_compiles_without_lapack_on_jax():
    """On JAX a compiled SPD solve and inverse hold no LAPACK custom call (whose kernels' first use in a process imports
    scipy's bindings); above :attr:`~latentfit.inference.ops.Ops.MAX_SPD_WITHOUT_LAPACK` the library's solve is used."""
    jax = pytest.importorskip("jax")

    ops = make_ops("jax")
    a = np.eye(3)[None] * np.array([1.0, 2.0])[:, None, None]
    text = jax.jit(lambda m, v: (ops.spd_solve(m, v), ops.spd_inverse(m))).lower(a, a[..., :1]).compile().as_text()
    assert "custom_call_target" not in text
    big = np.eye(ops.MAX_SPD_WITHOUT_LAPACK + 1)[None]
    text = jax.jit(lambda m, v: ops.spd_solve(m, v)).lower(big, big[..., :1]).compile().as_text()
    assert "lapack" in text


def test_derivatives(backend):
    ops = backend.ops()
    xp = ops.xp
    x = ops.asarray(np.array([0.3, -1.2]))
    f = lambda v: xp.stack([v[0] * v[1], xp.sin(v[0]), v[1] ** 3])  # noqa: E731
    jac = np.array([[-1.2, 0.3], [np.cos(0.3), 0.0], [0.0, 3 * 1.44]])
    np.testing.assert_allclose(ops.to_numpy(ops.jacfwd(f)(x)), jac, atol=1e-12)
    out, tangent = ops.jvp(f, x, ops.asarray(np.array([1.0, 2.0])))
    np.testing.assert_allclose(ops.to_numpy(out), [-0.36, np.sin(0.3), -1.728], atol=1e-12)
    np.testing.assert_allclose(ops.to_numpy(tangent), jac @ [1.0, 2.0], atol=1e-12)
    # per-row value, gradient and Hessian of f(z_i) = z_i0² z_i1 + exp(z_i1)
    z = np.array([[1.0, 2.0], [-0.5, 0.1]])
    v, g, h = ops.value_grad_hessian(lambda u: u[:, 0] ** 2 * u[:, 1] + xp.exp(u[:, 1]), ops.asarray(z))
    a, b = z[:, 0], z[:, 1]
    np.testing.assert_allclose(ops.to_numpy(v), a * a * b + np.exp(b), atol=1e-12)
    np.testing.assert_allclose(ops.to_numpy(g), np.stack([2 * a * b, a * a + np.exp(b)], -1), atol=1e-12)
    hess = np.stack([np.stack([2 * b, 2 * a], -1), np.stack([2 * a, np.exp(b)], -1)], -2)
    np.testing.assert_allclose(ops.to_numpy(h), hess, atol=1e-12)


def test_torch_jacobian_columns_equal_forward_mode_on_awkward_functions():
    """TorchOps.jacobian_columns (the double-backward trick) against torch's forward mode: matrix-valued outputs,
    outputs that do not read some inputs or none, a random draw inside ``f`` shared by every column, float32."""
    import torch

    ops = TorchOps()
    x = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    noise = torch.randn(4, 3, dtype=torch.float64)
    cases = {
        "matrix": lambda v: torch.exp(v[:, None] * v[None, :]) @ noise.T + torch.where(v > 0, v, 2 * v)[:, None],
        "unused input": lambda v: torch.stack([v[0] * v[0], torch.sin(v[0])]),
        "constant": lambda v: noise.sum(0),
        "broadcast": lambda v: v[0] + 0.0 * noise,
    }
    for name, f in cases.items():
        np.testing.assert_allclose(ops.jacobian_columns(f)(x).numpy(), torch.func.jacfwd(f)(x).numpy(), rtol=1e-14,
                                   atol=1e-15, err_msg=name)

    def drawn(v: torch.Tensor) -> torch.Tensor:  # a draw inside f: the same for every column (one evaluation)
        return v * torch.randn(3, dtype=v.dtype)

    torch.manual_seed(0)
    jac = ops.jacobian_columns(drawn)(x)
    torch.manual_seed(0)
    np.testing.assert_array_equal(jac.numpy(), torch.diag(torch.randn(3, dtype=torch.float64)).numpy())
    x32, noise32 = x.float(), noise.float()

    def f32(v: torch.Tensor) -> torch.Tensor:
        return torch.exp(v[:, None] * v[None, :]) @ noise32.T

    jac32 = TorchOps(dtype=torch.float32).jacobian_columns(f32)(x32)
    assert jac32.dtype == torch.float32
    np.testing.assert_allclose(jac32.numpy(), torch.func.jacfwd(f32)(x32).numpy(), rtol=1e-5)


TORCH_SE_SCRIPT = """
import json, sys
from latentfit.models import nlme
from latentfit.datasets import theophylline

model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=theophylline(saemix_form=True),
                  columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
fit = model.fit(num_iters=(20, 10), progress=False)
fit.summary(method="lin")
fit.log_likelihood("lin")
fit.summary(method="sa")  # Louis' formula: its scores' Jacobian too
print(json.dumps({m: m in sys.modules for m in ("torch._dynamo", "sympy")}))
"""


def test_torch_standard_errors_import_neither_dynamo_nor_sympy():
    """A fresh process's SEs on torch, by linearisation (the default path of a saemix user) and by Louis' formula (the
    default for non-Gaussian outcomes), load no compiler: torch's forward mode imported ``torch._dynamo`` (and with it
    sympy) on its first multiplication (~0.9 s: theophylline's linearisation SEs 0.97 -> 0.01 s, a binary model's
    Louis SEs 0.95 -> 0.02 s), and an explicit ``grad_outputs`` imports sympy (~0.4 s)."""
    import json
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", TORCH_SE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch._dynamo": False, "sympy": False}


@pytest.mark.parametrize("df", [1, 4, 5, 101])
def test_student_t_draws(backend, df):
    """Student-t draws follow the law (Kolmogorov-Smirnov, 40 000 draws), reproducibly: df odd and even (JAX: a normal
    over a chi-square of exponentials, plus a squared normal for an odd df; torch the same, its chi-square as one
    logarithm of a product up to 32 factors, a sum of logarithms beyond)."""
    ops = backend.ops()
    with ops.seed_context(3):
        t1 = ops.to_numpy(ops.student_t(ops.key(3), df, (20000, 2)))
    with ops.seed_context(3):
        t2 = ops.to_numpy(ops.student_t(ops.key(3), df, (20000, 2)))
    np.testing.assert_array_equal(t1, t2)  # reproducible under the seed
    assert t1.shape == (20000, 2) and np.all(np.isfinite(t1))
    assert st.kstest(t1.ravel(), st.t(df).cdf).pvalue > 1e-3


def test_sorting_and_loops(backend):
    ops = backend.ops()
    a = ops.asarray(np.array([[2.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    order = ops.argsort(a)
    np.testing.assert_array_equal(ops.to_numpy(order), [[3, 1, 0, 2], [0, 1, 2, 3]])  # stable: ties keep order
    np.testing.assert_array_equal(ops.to_numpy(ops.take_along_axis(a, order)), [[0, 1, 2, 2], [1, 1, 1, 1]])
    carry = ops.fori_loop(0, 5, lambda i, c: (c[0] + 1.0, c[1] * 2.0), (ops.asarray(0.0), ops.asarray(1.0)))
    assert float(ops.to_numpy(carry[0])) == 5.0 and float(ops.to_numpy(carry[1])) == 32.0


def test_choosing_the_shim(backend):
    import torch

    x = backend.tensor(np.ones(3))
    assert ops_for(x).name == backend.ops().name
    assert ops_for(backend.xp).name == backend.ops().name
    assert isinstance(ops_for(np.ones(3)), TorchOps) and ops_for(np.ones(3)).dtype == torch.float64
    assert ops_for(torch.ones(2, dtype=torch.float32)).dtype == torch.float32
    assert make_ops("torch").dtype == torch.float64
    with pytest.raises(ValueError, match="backend"):
        make_ops("numpy")
    k = backend.tensor(np.array([3.0]))[0]
    assert float(backend.to_numpy(select(k > 2, 1.0, 0.5))) == 1.0
    assert select(True, 1.0, 0.5) == 1.0


# ----- layering ------------------------------------------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parents[1] / "latentfit"
FORBIDDEN = re.compile(r"^\s*(import|from)\s+(torch|jax|jaxlib|pyro|numpyro)\b|__import__\(|__module__"
                       r"|isinstance\([^)]*\b(torch|jax|jnp)\.|\.name\s*==\s*[\"'](torch|jax)[\"']")


@pytest.mark.parametrize("folder", ["inference", "models"])
def test_only_the_shim_knows_the_backend(folder):
    """Outside ``inference/ops.py`` and ``inference/ops_jax.py`` (with its trace memo ``ops_jax_memo.py``, the memo's
    on-disk store ``ops_jax_store.py`` and the ops of several JAX processes ``ops_jax_procs.py``) no module of
    ``inference/`` or ``models/`` imports an array library or a PPL or asks which backend an array comes from."""
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if folder == "inference" and path.name in ("ops.py", "ops_jax.py", "ops_jax_memo.py", "ops_jax_store.py",
                                                       "ops_jax_procs.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "backend knowledge outside the shim:\n" + "\n".join(offenders)


# ----- JAX compilation and draws on CPU ------------------------------------------------------------------
def test_jax_unrolled_threefry_draws_are_jax_randoms(monkeypatch):
    """The JAX shim's normal and uniform draws come from an unrolled Threefry-2x32 (one fused loop instead of JAX's
    rolled CPU lowering): the same bits, hence the same numbers, as ``jax.random`` for every width, shape and dtype,
    compiled, vmapped over keys, and with ``jax_threefry_partitionable`` off (JAX's own bits then)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    impl = ops_jax.fast_threefry_impl()
    assert impl is not None
    ops = make_ops("jax", dtype="float64")
    ops32 = ops.with_draw_dtype("float32")
    widths = (jnp.uint8, jnp.uint16, jnp.uint32, jnp.uint64)

    def draws(key, shape, fast):  # one program per shape: the library's draws, or jax.random's
        k = jax.random.wrap_key_data(key, impl=impl) if fast else key
        bits = [jax.random.bits(k, shape, dt) for dt in widths]
        if fast:
            return bits + [ops.normal(key, shape), ops32.normal(key, shape), ops.uniform(key, shape)]
        return bits + [jax.random.normal(key, shape, jnp.float64),
                       jax.random.normal(key, shape, jnp.float32).astype(jnp.float64),
                       jax.random.uniform(key, shape, jnp.float64)]

    for shape in [(), (0,), (7,), (2, 3, 5), (1, 5000, 3)]:
        ours, theirs = (jax.jit(lambda k, f=fast, s=shape: draws(k, s, f)) for fast in (True, False))
        for seed in (0, 3, 2 ** 31 + 7):
            key = jax.random.PRNGKey(seed)
            for a, b in zip(ours(key), theirs(key)):
                assert a.dtype == b.dtype and np.array_equal(a, b), (seed, shape, a.dtype)
    for seed in (0, 3):  # fold-ins and splits are threefry's: the keys of a fast key are the plain keys
        key = jax.random.PRNGKey(seed)
        fast = jax.random.wrap_key_data(key, impl=impl)
        assert np.array_equal(jax.random.key_data(jax.random.split(fast, 3)), jax.random.split(key, 3))
        assert np.array_equal(jax.random.key_data(jax.random.fold_in(fast, 11)), jax.random.fold_in(key, 11))
        assert np.array_equal(ops.normal(key, (2, 3)), jax.random.normal(key, (2, 3)))  # eager
    key = jax.random.PRNGKey(5)
    assert np.array_equal(jax.jit(lambda k: ops.normal(k, (4, 6)))(key), jax.random.normal(key, (4, 6)))
    keys = jax.random.split(key, 4)
    assert np.array_equal(jax.vmap(lambda k: ops.uniform(k, (3, 2)))(keys),
                          jax.vmap(lambda k: jax.random.uniform(k, (3, 2)))(keys))
    assert ops_jax._draw_key(key).dtype != key.dtype  # a fast key on CPU, the raw key on other platforms
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops_jax._draw_key(key) is key
    monkeypatch.undo()
    typed = jax.random.key(5)  # a typed key keeps its own implementation
    assert np.array_equal(ops.normal(typed, (3,)), jax.random.normal(typed, (3,)))
    jax.config.update("jax_threefry_partitionable", False)
    try:
        assert np.array_equal(ops.normal(key, (2, 3)), jax.random.normal(key, (2, 3)))
        assert np.array_equal(ops.split(key, 3), jax.random.split(key, 3))
    finally:
        jax.config.update("jax_threefry_partitionable", True)


def test_jax_student_t_draws_drawn_flat_are_the_shaped_draws():
    """The JAX shim's integer-df Student-t draws are drawn flat and reshaped (XLA:CPU vectorises along the minor
    axis, of length 1 or 2 for the normals and uniforms of a shaped draw): bit for bit the draws of ``jax.random``'s
    normals and uniforms of ``shape + (k,)``, ``t = x₀ / sqrt(χ²/df)``, for odd and even df, in a trace and called
    directly."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    ops = make_ops("jax", dtype="float64")

    def shaped(key, df, shape):  # the formula drawn in the shape, with jax.random's own draws
        k_normal, k_uniform = jax.random.split(key)
        x = jax.random.normal(k_normal, shape + (1 + df % 2,), jnp.float64)
        u = jax.random.uniform(k_uniform, shape + (df // 2,), jnp.float64)
        chi2 = -2.0 * jnp.sum(jnp.log1p(-u), -1)
        if df % 2:
            chi2 = chi2 + x[..., 1] * x[..., 1]
        return x[..., 0] / jnp.sqrt(chi2 / df)

    for df in (1, 2, 3, 4, 5):
        for shape in [(7,), (2, 3, 5), (500, 12, 3)]:
            key = jax.random.PRNGKey(df)
            ours = jax.jit(lambda k, d=df, s=shape: ops.student_t(k, d, s))(key)
            theirs = jax.jit(lambda k, d=df, s=shape: shaped(k, d, s))(key)
            assert ours.shape == shape and np.array_equal(ours, theirs), (df, shape)
    key = jax.random.PRNGKey(9)
    assert np.array_equal(ops.student_t(key, 4, (3, 2)), jax.jit(lambda k: shaped(k, 4, (3, 2)))(key))  # eager call


def test_jax_student_t_normals_and_uniforms_come_from_one_hash():
    """The integer-df Student-t draws' normals and uniforms (two keys, two ``jax.random`` calls) come from one pass of
    the unrolled threefry over both keys' counters: ``jax.random.normal`` / ``uniform`` bit for bit, in float32 and
    float64, with no uniform (df = 1); and the compiled draw holds one copy of the hash (20 rounds, an xor each, plus
    the key split's), where two calls of JAX's draws hold two (~180 HLO instructions each that a warm process
    deserialises)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    for dtype in (jnp.float32, jnp.float64):
        for num_normal, num_uniform in [(7, 14), (30, 0), (36000, 180000)]:
            k_normal, k_uniform = jax.random.split(jax.random.PRNGKey(num_normal))
            x, u = jax.jit(lambda a, b, n=num_normal, m=num_uniform, t=dtype: ops_jax._normals_and_uniforms(
                a, n, b, m, jnp.dtype(t)))(k_normal, k_uniform)
            assert np.array_equal(x, jax.random.normal(k_normal, (num_normal,), dtype))
            assert np.array_equal(u, jax.random.uniform(k_uniform, (num_uniform,), dtype))

    def xors(fn):  # compiled as latentfit compiles a small program
        options = ops_jax._compiler_options("cpu", (np.zeros(3),))
        text = jax.jit(fn).lower(jax.random.PRNGKey(0)).compile(compiler_options=options).as_text()
        return sum(" xor(" in line for line in text.splitlines())

    ops = make_ops("jax", dtype="float64").with_draw_dtype("float32")

    def two_calls(key):
        a, b = jax.random.split(key)
        return (jax.random.normal(ops_jax._draw_key(a), (6000,), jnp.float32),
                jax.random.uniform(ops_jax._draw_key(b), (30000,), jnp.float32))

    assert xors(lambda k: ops.student_t(k, 10, (2000, 3))) < 40 < xors(two_calls)


def test_jax_unrolled_split_and_units_minor_draws_are_jax_randoms():
    """``JaxOps.split`` hashes a raw key's counters with the unrolled Threefry: ``jax.random.split``'s keys, eagerly and
    compiled; ``normal_units_minor`` gives ``normal`` of the swapped shape transposed (base shim and JAX, bit for
    bit)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    ops = make_ops("jax", dtype="float64")
    compiled = {n: jax.jit(lambda k, n=n: ops.split(k, n)) for n in (2, 9)}
    for seed in (0, 2 ** 31 - 1):
        key = ops.key(seed)
        for n in (1, 2, 9):
            assert np.array_equal(ops.split(key, n), jax.random.split(key, n)), (seed, n)
        sub = jax.random.split(key, 3)[2]
        for n, split in compiled.items():
            assert np.array_equal(split(sub), jax.random.split(sub, n)), (seed, n)
    key = ops.key(4)
    for view in (ops, ops.with_draw_dtype("float32")):
        want = np.swapaxes(np.asarray(view.normal(key, (2, 11, 3))), -1, -2)
        assert np.array_equal(view.normal_units_minor(key, (2, 3, 11)), want)
        assert np.array_equal(jax.jit(lambda k, v=view: v.normal_units_minor(k, (2, 3, 11)))(key), want)
    torch_ops = make_ops("torch")
    gen = torch_ops.key(2)
    want = np.swapaxes(torch_ops.to_numpy(torch_ops.normal(torch_ops.key(2), (3, 4))), -1, -2)
    assert np.array_equal(torch_ops.to_numpy(torch_ops.normal_units_minor(gen, (4, 3))), want)


def test_jax_cpu_programs_leave_reductions_to_xla(monkeypatch):
    """Programs compiled by the JAX shim on CPU keep YNNPACK for matrix products only (reductions and their fused
    element-wise chains run as XLA's loops); an option named in ``XLA_FLAGS`` is left to the flag, and an XLA that
    refuses the options compiles with its defaults."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU options")
    x = jnp.linspace(0.0, 1.0, 500).reshape(50, 10)

    def f(a):
        return jnp.sum(jnp.exp(-a) - jnp.exp(-2 * a), -1)

    program = ops_jax._program_for(f, x)
    assert "__ynn_fusion" not in program.executable.as_text()
    np.testing.assert_allclose(program(x), f(x), rtol=1e-14)
    assert ops_jax._compiler_options("gpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE")
    flagged = "xla_cpu_experimental_ynn_fusion_type"
    left = ops_jax._compiler_options("cpu")  # the flag's option left to the flag, the others kept
    assert flagged not in left and left == {k: v for k, v in ops_jax.CPU_COMPILER_OPTIONS.items() if k != flagged}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(ops_jax, "CPU_COMPILER_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_TYPE"})
    monkeypatch.setattr(ops_jax, "SMALL_PROGRAM_ELEMENTS", None)  # (a small program's options would override it)
    monkeypatch.setattr(ops_jax, "_OPTIONS_REFUSED", [])
    lowered = jax.jit(f).lower(x + 1.0)
    np.testing.assert_allclose(ops_jax._compile(lowered, "cpu")(x + 1.0), f(x + 1.0), rtol=1e-14)
    assert ops_jax._OPTIONS_REFUSED and ops_jax._compiler_options("cpu") == {}


def test_jax_cpu_options_are_accepted_and_drop_loop_copies():
    """Every option of ``CPU_COMPILER_OPTIONS`` is one this XLA accepts (one refused drops them all, silently: the
    programs then compile with XLA's defaults), and copy insertion's region analysis leaves fewer loop-state copies in
    a loop than XLA's default copy insertion, the same values."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax import lax

    from latentfit.inference import ops_jax

    if jax.default_backend() != "cpu" or ops_jax._OPTIONS_REFUSED:
        pytest.skip("XLA:CPU options")

    def f(x, y):
        return lax.fori_loop(0, 10, lambda i, c: (c[1] * 2.0 + c[0], c[0] - c[1]), (x, y))

    x, y = jnp.linspace(0.0, 1.0, 60).reshape(5, 12), jnp.ones((5, 12))
    lowered = jax.jit(f).lower(x, y)
    ours, plain = ops_jax._compile(lowered, "cpu"), lowered.compile()
    assert not ops_jax._OPTIONS_REFUSED, "this XLA refused an option of CPU_COMPILER_OPTIONS"
    assert ops_jax.CPU_COMPILER_OPTIONS.get("xla_cpu_copy_insertion_use_region_analysis") is True
    assert ours.as_text().count(" copy(") < plain.as_text().count(" copy(")
    for a, b in zip(ours(x, y), plain(x, y)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("x64", [True, False])
def test_jax_asarray_transfers_what_jnp_asarray_makes(x64):
    """``JaxOps.asarray`` outside a trace (a host cast and ``device_put``, ~5x cheaper a call than ``jnp.asarray``):
    the same values, dtype, shape and weak type as ``jnp.asarray(x, dtype)`` for floats (arrays, scalars, lists,
    another float width asked for); inside a trace, the trace's constant as before."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from latentfit.inference.ops_jax import JaxOps

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        ops = JaxOps()
        values = [1.5, [0.25, 1e-300, 3.0], np.float32(2.5), np.linspace(-3.0, 3.0, 7).reshape(7, 1),
                  np.array([1 / 3, np.inf, -0.0], dtype=np.float64), np.array([1 / 3], dtype=np.float32)]
        for value in values:
            for dtype in (None, jnp.float32, "float64"):
                got = ops.asarray(value, dtype)
                want = jnp.asarray(np.asarray(value), dtype=dtype or ops.dtype)
                assert isinstance(got, jax.Array) and got.dtype == want.dtype and got.shape == want.shape
                assert got.weak_type == want.weak_type
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        traced = jax.jit(lambda a: a + ops.asarray(np.array([0.1, 0.2])))(jnp.zeros(2, ops.dtype))
        np.testing.assert_array_equal(np.asarray(traced), np.asarray(jnp.asarray(np.array([0.1, 0.2]), ops.dtype)))
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("name", ["sgd", "adam", "amsgrad", "opt-amsgrad"])
def test_torch_flat_optimizer_is_pure_and_steps_as_torch(name):
    """TorchOps.optimizer's named optimisers (pure tensor updates for sgd / adam / amsgrad, a copied optimiser object
    for opt-amsgrad): the iterates equal, bit for bit, those of the torch optimiser stepped in place (rate set per
    step) and those of the deep-copied path (a factory), and an update leaves the state it was given as it was."""
    import torch

    from latentfit.optim import OptAMSGrad

    ops = TorchOps()
    rate = lambda t: 0.05 / (1.0 + t) ** 0.5  # noqa: E731
    make = {"sgd": lambda p, lr: torch.optim.SGD(p, lr=lr), "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
            "amsgrad": lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True),
            "opt-amsgrad": lambda p, lr: OptAMSGrad(p, lr=lr)}[name]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, generator=gen, dtype=torch.float64)
    grads = torch.randn(30, 5, generator=gen, dtype=torch.float64)

    flat = ops.optimizer(name, rate)
    x, state = x0, flat.init(x0)
    p = x0.clone().requires_grad_(True)  # the reference: one optimiser stepped in place
    ref = make([p], rate(1))
    deep = ops.optimizer(lambda q: make(q, 0.05), rate)  # a factory: deep-copied whole, its own constant rate
    flat_const = ops.optimizer(name, lambda t: 0.05)
    xd, sd, xc, sc = x0, deep.init(x0), x0, flat_const.init(x0)
    def snapshot(st):  # the optimiser's per-parameter state: the object's (opt-amsgrad) or the tensors themselves
        inner = st["opt"].state.get(st["leaf"], {}) if "opt" in st else st
        return {k: (v.clone() if isinstance(v, torch.Tensor) else repr(v)) for k, v in inner.items()}

    for t, g in enumerate(grads, start=1):
        before = snapshot(state)
        x_new, new_state = flat.update(g, state, x)
        after = snapshot(state)
        assert before.keys() == after.keys()
        for k in before:  # the given state is untouched
            assert (torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor)
                    else before[k] == after[k])
        assert torch.equal(flat.update(g, state, x)[0], x_new)  # the same call, the same step
        x, state = x_new, new_state
        for group in ref.param_groups:
            group["lr"] = rate(t)
        p.grad = -g
        ref.step()
        assert torch.equal(x, p.detach()), t
        xd, sd = deep.update(g, sd, xd)
        xc, sc = flat_const.update(g, sc, xc)
        assert torch.equal(xc, xd), t


def test_small_programs_compile_with_loop_emitters_into_fewer_object_files(monkeypatch):
    """A program whose arguments all have fewer than ``SMALL_PROGRAM_ELEMENTS`` entries compiles with
    ``SMALL_PROGRAM_OPTIONS`` (this XLA accepts them; its executable links fewer object files, which a warm process
    loads faster, and has no YNNPACK fusion to set up), the same values to rounding; a program with a large argument,
    a wide chunk or no known size keeps the default options, and an option named in ``XLA_FLAGS`` is left to the
    flag."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    if jax.default_backend() != "cpu" or ops_jax._OPTIONS_REFUSED:
        pytest.skip("XLA:CPU options")
    assert ops_jax.SMALL_PROGRAM_OPTIONS and ops_jax.SMALL_PROGRAM_ELEMENTS == 4096
    default = ops_jax._compiler_options("cpu")  # no size known: the options of every program
    assert default == {**ops_jax.CPU_COMPILER_OPTIONS} and "xla_cpu_use_fusion_emitters" not in default
    small = ops_jax._compiler_options("cpu", [np.zeros((64, 63))])
    assert small == {**default, **ops_jax.SMALL_PROGRAM_OPTIONS}
    assert ops_jax._compiler_options("cpu", [np.zeros(3), np.zeros((64, 64))]) == default
    ops_jax._WIDE_VECTORS[0] = True  # a wide chunk compiling
    try:
        wide = ops_jax._compiler_options("cpu", [np.zeros(3)])
    finally:
        ops_jax._WIDE_VECTORS[0] = False
    assert wide == {**default, **ops_jax.WIDE_VECTOR_OPTIONS}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    assert "xla_cpu_use_fusion_emitters" not in ops_jax._compiler_options("cpu", [np.zeros(3)])
    monkeypatch.delenv("XLA_FLAGS")

    def f(a, b):
        s = jnp.sum(jnp.exp(-a) * b, -1)
        return s / jnp.max(s), jnp.sort(a * b, -1)[:, ::2], jnp.cumsum(jnp.log1p(a), 0), jnp.tanh(a @ b.T)

    a = jnp.linspace(0.0, 2.0, 120).reshape(12, 10)
    b = jnp.cos(a)
    lowered = jax.jit(f).lower(a, b)
    ours = ops_jax._compile(lowered, "cpu")
    plain = lowered.compile(compiler_options=default)  # as if large
    assert not ops_jax._OPTIONS_REFUSED, "this XLA refused an option of SMALL_PROGRAM_OPTIONS"
    client = jax.devices()[0].client

    def object_files(compiled):
        return bytes(client.serialize_executable(compiled.runtime_executable())).count(b"\x7fELF")

    assert 1 <= object_files(ours) < object_files(plain)
    assert "__ynn" in plain.as_text() and "__ynn" not in ours.as_text()  # XLA's own code for its small dot
    for x, y in zip(ours(a, b), plain(a, b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-14)


def test_jax_shape_of_element_wise_transforms_without_a_trace(monkeypatch):
    """``JaxOps.shape_of`` gives an element-wise function's output shape without tracing it (the parameters' ``log``
    transforms at an engine's set-up), the same shape as ``jax.eval_shape``; any other function is traced."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    ops = ops_jax.JaxOps()
    x = jnp.ones((3, 2))
    traced = []
    real_eval_shape = jax.eval_shape

    def counting(f, *args):
        traced.append(f)
        return real_eval_shape(f, *args)

    monkeypatch.setattr(jax, "eval_shape", counting)
    for f in ops_jax._ELEMENTWISE_UNARY:
        assert ops.shape_of(f, x) == real_eval_shape(f, x).shape == (3, 2)
    assert ops.shape_of(jnp.log, jnp.float64(2.0)) == ()
    assert not traced
    assert ops.shape_of(lambda v: jnp.reshape(v, (-1,)), x) == (6,) and len(traced) == 1
    assert ops.shape_of(jnp.add, x, x) == (3, 2) and len(traced) == 2

    class Unhashable:  # a transform object with ``__eq__`` and no hash (NumPyro's inverse transforms)
        __hash__ = None

        def __eq__(self, other):
            return self is other

        def __call__(self, v):
            return jnp.exp(v)

    assert ops.shape_of(Unhashable(), x) == (3, 2) and len(traced) == 3


PYRO_SCRIPT = """
import json, sys
import numpy as np, torch
import pyro, pyro.distributions as dist
from pyro.distributions import constraints
import latentfit.pyro as lp


def model(group_idx, x, num_groups, y=None):  # as the Pyro tutorials write it
    loc = pyro.param("loc", torch.tensor(0.0, dtype=torch.float64))
    scale = pyro.param("scale", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    beta = pyro.param("beta", torch.tensor(0.0, dtype=torch.float64))
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("groups", num_groups):
        alpha = pyro.sample("alpha", dist.Normal(loc, scale))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(alpha[group_idx] + beta * x, sigma), obs=y)


rng = np.random.default_rng(0)
sizes = rng.integers(3, 12, size=20)
g = np.repeat(np.arange(20), sizes)
x = rng.standard_normal(len(g))
y = 1.0 + 0.7 * rng.standard_normal(20)[g] + 0.5 * x + 0.3 * rng.standard_normal(len(g))
fit = lp.SAEM(model, num_iters=(20, 10), progress=False, seed=0).run(torch.as_tensor(g), torch.as_tensor(x), 20,
                                                                     torch.as_tensor(y))
fit.summary()
fit.log_likelihood("is", num_samples=200)
print(json.dumps({m: m in sys.modules for m in ("torch._dynamo", "sympy")}))
"""


def test_a_pyro_fit_and_its_post_fit_work_import_neither_dynamo_nor_sympy():
    """A tutorial-style Pyro model fitted by SAEM in a fresh process, with its SEs and IS log-likelihood, loads no
    compiler: the adapter's analysis of the model (which unit each log-density element reads: one forward-mode
    derivative) imported ``torch._dynamo`` and sympy, and ``torch.broadcast_shapes`` in its Normal log-density sympy
    (~1.3 s of every first Pyro fit in a process)."""
    import json
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", PYRO_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch._dynamo": False, "sympy": False}
