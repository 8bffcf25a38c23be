"""NLME ``model.fit(df, ..., distributed=True)`` (issue 13): every process passes the whole theophylline table and
fits its contiguous block of the 12 subjects (6 each on 2 gloo processes spawned with ``torch.multiprocessing``),
with per-unit random streams and statistics all-reduced in float64; the estimates equal the one-process fit with
``rng="per_unit"`` to 1e-10, on every process, and so do the post-fit computations: standard errors (the Fisher
information, a sum over subjects, all-reduced in float64; Louis' formula on fresh MCMC draws at θ̂ too, each
subject drawing from its own stream), the residuals and the VPC (each subject's simulations from its own stream;
the VPC bins every subject's observations and simulations, gathered), the individual estimates (EBEs, conditional
means and sds: each process computes its subjects', every process gets all of them in subject order) and their
shrinkage.  NLME outcome models (binary, time-to-event) too: the IS log-likelihood (its pilot pass on the
individuals' streams) and the discrete VPC.
A covariate centred at the data's mean keeps the whole table's mean; with distributed="local" (each process its own
rows) it is refused unless its reference is given (each block would centre it at its own mean).  ka without a
random effect (a numerical M-step, its Newton objective all-reduced) equals the one-process fit likewise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

COLUMNS = {"id": "Id", "time": "Time", "dv": "Concentration"}
OPTIONS = dict(num_iters=(8, 4), seed=0, progress=False, rng="per_unit", chunk_size=4)


#: covariates on parameters with a random effect: β by GLS with Σ_i X_iᵀ X_i, which every process must sum; Weight on
#: V centred at the whole table's mean (each process's block keeps the reference of the table it was cut from)
LOG_WEIGHT_ON_CL = {"CL": {"Weight": "log"}, "V": {"Weight": "center"}}


def _fit(covariates: dict | None = None, ka_random: bool = True, block: int | None = None, **options: object):
    """SAEM on theophylline; ``block``: only the rows of the 6 subjects ``6 block .. 6 block + 5`` (in ID order)."""
    import latentfit as lf
    from latentfit.models import nlme

    df = lf.datasets.theophylline(saemix_form=True)
    if block is not None:
        ids = sorted(df["Id"].unique())
        df = df[df["Id"].isin(ids[6 * block:6 * block + 6])]
    ka = 1.0 if ka_random else nlme.Parameter(1.0, random=False)  # no random effect: a numerical M-step
    model = nlme.NLME("one_compartment_oral", {"ka": ka, "V": 20.0, "CL": 0.5}, covariates=covariates)
    return model.fit(df, columns=COLUMNS, dose="Dose", **OPTIONS, **options)


def _outcome_fit(case: str, **options: object):
    """A binary or time-to-event (constant hazard) NLME model fitted to 24 simulated individuals, with per-unit
    streams: its IS pilot pass, IS draws and discrete VPC come from the individuals' streams."""
    import pandas as pd

    from latentfit.models import nlme
    from latentfit.models.nlme import outcomes as oc

    P = nlme.Parameter
    times = np.arange(6.0) if case == "binary" else np.array([8.0])
    table = pd.DataFrame({"ID": np.repeat(np.arange(1, 25), len(times)), "TIME": np.tile(times, 24), "DV": 0.0})
    if case == "binary":
        model = nlme.NLME(lambda psi, d: psi["theta1"] + psi["theta2"] * d.time,
                          {"theta1": P(-0.5, "normal"), "theta2": P(0.1, "normal", random=False)}, outcome="binary")
        truth = {"theta1": -1.0, "theta2": 0.25, "omega2_theta1": 1.5}
    else:
        model = nlme.NLME(None, {"lambda": P(5.0)}, outcome=oc.TimeToEvent("constant"))
        truth = {"lambda": 3.0, "omega2_lambda": 0.25}
    bound = model.bind(table)
    theta = {k: bound.ops.asarray(v) for k, v in {**bound.init_params(), **truth}.items()}
    return model.fit(bound.simulate(theta, seed=1), **{**OPTIONS, "chunk_size": 6}, **options)


def _outcome_post_fit(fit) -> dict[str, np.ndarray]:
    """IS log-likelihood (pilot pass and draws on the individuals' streams) and the discrete VPC (every individual's
    simulations from its stream, pooled over the processes)."""
    from latentfit.plots import discrete_vpc_summary

    out = {"ll_is": fit.log_likelihood("is", num_samples=200, batch_size=80)}
    out["ll_is_se"] = fit.log_likelihoods["is"].mc_se
    vpc = discrete_vpc_summary(fit, num_sims=30, seed=3)
    out.update({f"vpc_{k}": getattr(vpc, k) for k in ("x", "observed", "simulated")})
    out.update({f"param_{k}": np.asarray(v) for k, v in fit.params.items()})
    return out


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from latentfit import ModelSpecificationError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fit = _fit(distributed=True)
        refused = ""
        try:  # each process's block would centre at its own mean: refused unless the reference is given
            _fit(covariates={"CL": {"Weight": "center"}}, block=rank, distributed="local")
        except ModelSpecificationError as err:
            refused = str(err)
        ll = fit.log_likelihood("gq", num_nodes=5)  # post-fit: this process's individuals, summed over processes
        ll_is = fit.log_likelihood("is", num_samples=200, batch_size=80)  # each subject's draws from its stream
        post = _post_fit(fit)  # collectives: Fisher information all-reduced, individual estimates gathered
        for case in ("binary", "tte"):  # outcome models: IS pilot pass and discrete VPC on the individuals' streams
            ofit = _outcome_fit(case, distributed=True)
            np.savez(Path(out) / f"outcome-{case}-rank{rank}.npz", num_units=ofit.model.num_units,
                     **_outcome_post_fit(ofit))
        # distributed="local": this process passes only its 6 subjects' rows; then blocks that share subject 7
        local = _fit(block=rank, distributed="local")
        np.savez(Path(out) / f"local-rank{rank}.npz", objective=local.history["objective"],
                 num_units=local.model.num_units, **{f"param_{k}": np.asarray(v) for k, v in local.params.items()})
        import latentfit as lf
        from latentfit.models import nlme

        df = lf.datasets.theophylline(saemix_form=True)
        rows = df[df["Id"].isin(sorted(df["Id"].unique())[5 * rank:5 * rank + 7])]  # subjects 1-7 and 6-12
        try:
            nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}).fit(
                rows, columns=COLUMNS, dose="Dose", **OPTIONS, distributed="local")
            overlap = ""
        except ModelSpecificationError as err:
            overlap = str(err)
        (Path(out) / f"overlap-rank{rank}.txt").write_text(overlap)
        cov = _fit(covariates=LOG_WEIGHT_ON_CL, distributed=True)
        np.savez(Path(out) / f"covariate-rank{rank}.npz", objective=cov.history["objective"],
                 **{f"param_{k}": np.asarray(v) for k, v in cov.params.items()})
        ka_fixed = _fit(ka_random=False, distributed=True)
        np.savez(Path(out) / f"ka-fixed-rank{rank}.npz", objective=ka_fixed.history["objective"],
                 **{f"param_{k}": np.asarray(v) for k, v in ka_fixed.params.items()})
        np.savez(Path(out) / f"rank{rank}.npz", num_units=fit.model.num_units, refused=refused, ll=ll, ll_is=ll_is,
                 ll_is_se=fit.log_likelihoods["is"].mc_se, **post,
                 bic_penalty=fit.bic - fit.minus_two_ll,  # p log N: N the individuals of every process
                 objective=fit.history["objective"], **{f"param_{k}": np.asarray(v) for k, v in fit.params.items()})
    finally:
        dist.destroy_process_group()


def _post_fit(fit) -> dict[str, np.ndarray]:
    """Standard errors (linearisation: the default for NLME; Louis' formula on the chains' draws), the EBE table,
    the shrinkage and the individual parameters on the natural scale: of every subject on every process."""
    out = {f"se_lin_{k}": v for k, v in fit.standard_errors("lin").items()}
    out.update({f"se_sa_{k}": v for k, v in fit.standard_errors("sa").items()})
    # Louis' formula on 4 fresh MCMC iterations at θ̂, each subject drawing from its own stream
    out.update({f"se_fresh_{k}": v for k, v in fit.standard_errors("sa", num_iters=4).items()})
    res = fit.residuals(num_sims=40)  # each subject's simulations from its own stream, every subject gathered
    out.update({f"res_{k}": getattr(res, k) for k in ("mask", "pred", "epred", "pwres", "npde", "ipred", "iwres")})
    from latentfit.plots import vpc_summary

    for pc in (True, False):  # pcVPC (NLME's default) and the plain VPC: every subject's observations and simulations
        vpc = vpc_summary(fit, num_sims=30, seed=3, pred_corrected=pc)
        out.update({f"vpc{int(pc)}_{k}": getattr(vpc, k) for k in ("bin_edges", "bin_x", "observed", "simulated",
                                                                      "y")})
    ebe = fit.individual_estimates()
    table = fit.individual_parameters()  # natural scale: <name>.mode, .mean, .sd
    modes = [c for c in table.columns if c.endswith(".mode")]
    out.update(ebe_mode=ebe.mode, ebe_mean=ebe.mean, ebe_sd=ebe.sd, shrinkage_mode=ebe.shrinkage_mode,
               shrinkage_mean=ebe.shrinkage_mean, psi_mode=table[modes].to_numpy(),
               psi_mean_sd=table.drop(columns=modes).to_numpy(), summary_se=fit.summary()["se"].to_numpy())
    return out


#: Tolerances of the post-fit comparison.  The estimates of the two fits differ by ~3e-14 (relative: the order of
#: the all-reduced sums).  Louis' SEs and the conditional means/sds are smooth in them: 1e-10.  The conditional
#: modes (EBEs) come from a damped Newton whose steps are accepted on objective values, so near the mode they are
#: determined only to ~sqrt(machine eps): the one-process computation itself moves them by 5e-8 (and the
#: linearisation SEs, computed at them, by 3e-10) when θ moves by 3e-14 (measured); hence 1e-6 and 1e-8 there (and
#: 1e-6 for IPRED / IWRES, predictions at the modes).
POST_RTOL = {"ebe_mode": 1e-6, "psi_mode": 1e-6, "shrinkage_mode": 1e-6, "se_lin_": 1e-8, "res_ipred": 1e-6,
             "res_iwres": 1e-6}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed_nlme")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


def test_two_processes_equal_one(two_processes: Path) -> None:
    one = _fit()
    post = _post_fit(one)
    assert post["ebe_mode"].shape == (12, 3) and post["psi_mean_sd"].shape == (12, 6)  # 12 subjects, 3 latents
    assert post["res_npde"].shape[0] == 12 and int(post["res_mask"].sum()) == 120  # residuals of every observation
    assert post["vpc1_y"].shape == (120,) and post["vpc1_simulated"].shape == post["vpc1_observed"].shape + (3,)
    assert all(np.isfinite(post[f"se_lin_{k}"]) and post[f"se_lin_{k}"] > 0 for k in one.params)
    # the fresh draws are new draws: their standard errors differ from those of the chains' last draws
    assert all(post[f"se_fresh_{k}"] > 0 and abs(post[f"se_fresh_{k}"] - post[f"se_sa_{k}"]) > 1e-8
               for k in one.params)
    # importance sampling, each subject's draws from its own stream: value and MC SE (one.bic then recomputes "is"
    # with its defaults, which replaces fit.log_likelihoods["is"])
    ll_is = [one.log_likelihood("is", num_samples=200, batch_size=80), one.log_likelihoods["is"].mc_se]
    for rank in range(2):
        r = np.load(two_processes / f"rank{rank}.npz")
        assert int(r["num_units"]) == 6  # this process's block of the 12 subjects
        for name, value in one.params.items():
            np.testing.assert_allclose(r[f"param_{name}"], np.asarray(value), rtol=0, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(r["objective"], one.history["objective"], rtol=1e-12, atol=0)
        np.testing.assert_allclose(r["ll"], one.log_likelihood("gq", num_nodes=5), rtol=1e-9)
        # the value to 1e-10; its MC SE (a sum of squared deviations over subjects whose proposals come from batched
        # Newton steps: other batch sizes per process round otherwise, measured 2e-9) to 1e-7
        np.testing.assert_allclose(r["ll_is"], ll_is[0], rtol=1e-10)
        np.testing.assert_allclose(r["ll_is_se"], ll_is[1], rtol=1e-7)
        np.testing.assert_allclose(r["bic_penalty"], one.bic - one.minus_two_ll, rtol=1e-12)
        assert "Weight (center)" in str(r["refused"]) and "covariate_reference=" in str(r["refused"])
        # fit(df_block, distributed="local"): each process passed only its 6 subjects' rows, the same fit
        local = np.load(two_processes / f"local-rank{rank}.npz")
        assert int(local["num_units"]) == 6
        for name, value in one.params.items():
            np.testing.assert_allclose(local[f"param_{name}"], np.asarray(value), rtol=0, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(local["objective"], one.history["objective"], rtol=1e-12, atol=0)
        overlap = (two_processes / f"overlap-rank{rank}.txt").read_text()
        assert "2 individual(s) are in the rows of several processes: 6 (processes [0, 1]), 7" in overlap, overlap
        for name, value in post.items():  # post-fit of a distributed fit == one process (every subject, in order)
            tol = next((t for prefix, t in POST_RTOL.items() if name.startswith(prefix)), 1e-10)
            np.testing.assert_allclose(r[name], value, rtol=tol, atol=tol, err_msg=name)
    assert sorted(one.params) == ["CL", "V", "a", "ka", "omega2_CL", "omega2_V", "omega2_ka"]


@pytest.mark.parametrize("case", ["binary", "tte"])
def test_outcome_models_two_processes_equal_one(two_processes: Path, case: str) -> None:
    """NLME outcome models: the IS log-likelihood (its pilot pass and draws on the individuals' streams) and the
    discrete VPC (proportions per bin / Kaplan-Meier band, every individual's simulations pooled) of the 2-process fit
    equal the one-process fit's (1e-10)."""
    one = _outcome_post_fit(_outcome_fit(case))
    assert np.isfinite(one["ll_is"]) and one["ll_is_se"] > 0
    assert np.any(one["vpc_simulated"][..., 0] < one["vpc_simulated"][..., 2])  # the simulations vary
    for rank in range(2):
        r = np.load(two_processes / f"outcome-{case}-rank{rank}.npz")
        assert int(r["num_units"]) == 12  # this process's block of the 24 individuals
        for name, value in one.items():
            np.testing.assert_allclose(r[name], value, rtol=1e-10, atol=1e-10, err_msg=name)


def test_numeric_ka_two_processes_equal_one(two_processes: Path) -> None:
    """ka without a random effect has no closed-form M-step: SAEM's Newton step on the complete-data log-likelihood
    (the model's cheaper objective, NLME.numeric_objective) all-reduces its value, gradient and Hessian; the
    estimates and the objective's history equal the one-process fit (1e-10, 1e-12)."""
    one = _fit(ka_random=False)
    assert one.model.numeric_params == ["ka"]
    ka = one.history["theta.ka"]
    assert abs(ka[-1] - ka[0]) > 0.1  # the numerical step moved ka from its initial value
    for rank in range(2):
        r = np.load(two_processes / f"ka-fixed-rank{rank}.npz")
        for name, value in one.params.items():
            np.testing.assert_allclose(r[f"param_{name}"], np.asarray(value), rtol=0, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(r["objective"], one.history["objective"], rtol=1e-12, atol=0)


def test_covariate_model_two_processes_equal_one(two_processes: Path) -> None:
    """log(Weight) on CL: the GLS M-step of the covariate coefficient reads Σ_i X_iᵀ X_i over every process's
    individuals (``NLME.shard_view``; with one process's own, the fit diverged: CL 1e16); the estimates and the
    objective's history equal the one-process fit."""
    one = _fit(covariates=LOG_WEIGHT_ON_CL)
    assert "beta_CL_Weight" in one.params and "beta_V_Weight" in one.params
    for rank in range(2):
        r = np.load(two_processes / f"covariate-rank{rank}.npz")
        for name, value in one.params.items():
            np.testing.assert_allclose(r[f"param_{name}"], np.asarray(value), rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(r["objective"], one.history["objective"], rtol=1e-10, atol=0)


def test_distributed_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="torchrun"):
        _fit(distributed=True)


JAX_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import latentfit as lf
from latentfit.inference.saem import SAEM
from latentfit.models import nlme

df = lf.datasets.theophylline(saemix_form=True)
model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, backend="jax",
                  columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
opts = dict(num_iters=(8, 4), seed=0, progress=False, rng="per_unit", chunk_size=4)
fits = [SAEM(model, **opts).run(devices=d) for d in (None, 2)]
z = fits[1].state.z
print("RESULT" + json.dumps({
    "diff": max(float(np.max(np.abs(np.asarray(fits[0].params[k]) - np.asarray(fits[1].params[k]))))
                for k in fits[0].params),
    "z_devices": len(z.sharding.device_set), "z_shard": list(z.sharding.shard_shape(z.shape))}))
"""


@pytest.mark.slow
def test_nlme_two_jax_devices_equal_one() -> None:
    """The NLME fast path with ``backend="jax"``: theophylline's chains [5, 12, 3] split over two host devices, the
    estimates equal the one-device fit to 1e-10."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", JAX_CHILD], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert out["diff"] < 1e-10
    assert out["z_devices"] == 2 and out["z_shard"] == [5, 6, 3]


def test_block_padded_like_the_whole_table() -> None:
    """``pad_data`` (a ``distributed="local"`` JAX block, :func:`~latentfit.integrations.families.same_layout`): a block
    of subjects read apart, with fewer observations per subject than another block, padded to the whole table's widths
    holds exactly the whole table's arrays for its subjects (times, DV, mask, censoring, row positions, doses)."""
    import latentfit as lf
    from latentfit.models import nlme
    from latentfit.models.nlme.data import data_widths

    df = lf.datasets.theophylline(saemix_form=True)
    ids = sorted(df["Id"].unique())
    first = df.groupby("Id").cumcount() == 0
    df = df[~(first & df["Id"].isin(ids[6:]))].reset_index(drop=True)  # subjects 7-12: 9 observations
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5})
    whole = model.bind(df, columns=COLUMNS, dose="Dose")
    block = df[df["Id"].isin(ids[6:])].reset_index(drop=True)
    alone = model.bind(block, columns=COLUMNS, dose="Dose")
    assert data_widths(alone.data) == (9, 1, 1) and data_widths(whole.data) == (10, 1, 1)
    wide = model.bind(block, columns=COLUMNS, dose="Dose")
    wide.pad_widths = data_widths(whole.data)
    wide = wide.bind()
    for name in ("time", "dv", "mask", "cens", "dose_time", "dose_amt", "dose_rate", "dose_cmt", "seg_start"):
        np.testing.assert_array_equal(getattr(wide.data, name), getattr(whole.data, name)[6:], err_msg=name)
    # row positions: in the block's own table (the whole table's minus its first 60 rows), padding -1 alike
    np.testing.assert_array_equal(np.where(wide.data.obs_rows >= 0, wide.data.obs_rows + 60, -1),
                                  whole.data.obs_rows[6:])
    assert wide.num_obs == alone.num_obs == 54 and not wide._no_padding
