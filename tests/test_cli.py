"""``latentfit nlme fit / simulate / vpc`` (issue 14, item 7): the command line run in-process on the shipped
theophylline model file and NONMEM data file, its outputs against the library API (exact equalities: same seed,
same code path; CSV numbers are written as shortest round-trip reprs), the HTML report's sections and embedded
images, and the one-line errors (exit status 2) for bad model files and bad data."""

from __future__ import annotations

import base64
import io
import re
import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import latentfit as lf  # noqa: E402
from latentfit import report  # noqa: E402
from latentfit.cli import main  # noqa: E402
from latentfit.models import nlme  # noqa: E402
from latentfit.models.nlme.config import ConfigError, load_config, parse_config, read_estimates, read_table  # noqa: E402
from latentfit.plots import vpc_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
TOML = EXAMPLES / "theophylline.toml"
DATA = EXAMPLES / "theophylline.csv"
ITERS = (30, 20)  # a short SAEM run: the outputs are compared with the API fit of the same length, not with saemix
SEED = 3  # --seed overrides the file's seed = 0
PNG = b"\x89PNG\r\n\x1a\n"


def _api_model(data: pd.DataFrame | None = None) -> nlme.NLME:
    """examples/theophylline.toml written with the library API."""
    return nlme.NLME("one_compartment_oral",
                     {"ka": nlme.Parameter(1.0, omega2=1.0), "V": nlme.Parameter(20.0), "CL": nlme.Parameter(0.5)},
                     covariates={"V": {"WT": "linear"}}, covariate_init={"V": {"WT": 0.0}}, error="constant",
                     error_init={"a": 1.0}, data=data)


def _readme_section() -> str:
    text = README.read_text()
    return text.split("### From a NONMEM data file to a report", 1)[1].split("\n## ", 1)[0]


def _readme_command(name: str) -> list[str]:
    """The README's ``latentfit nlme <name> ...`` command line, paths resolved against the repository."""
    line = next(ln for ln in _readme_section().splitlines() if ln.startswith(f"latentfit nlme {name} "))
    return [str(ROOT / a) if a.startswith("examples/") else a for a in shlex.split(line)[1:]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The README's command with a different output directory, a seed and a short run."""
    out = tmp_path_factory.mktemp("theo_fit")
    argv = _readme_command("fit")
    assert argv[:4] == ["nlme", "fit", str(TOML), str(DATA)] and argv[4] == "--out"
    argv[5] = str(out)
    rc = main(argv + ["--seed", str(SEED), "--iterations", *map(str, ITERS), "--no-progress"])
    assert rc == 0
    api = _api_model().fit(pd.read_csv(DATA, na_values=["."]), seed=SEED, num_iters=ITERS, progress=False)
    return out, api


def test_fit_writes_every_output_file(run):
    out, _ = run
    names = {"estimates.csv", "likelihood.csv", "individual_estimates.csv", "shrinkage.csv", "residuals.csv",
             "individual_fits.png", "gof.png", "vpc.png", "convergence.png", "report.html"}
    assert names <= {p.name for p in out.iterdir()}
    for name in names:
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG
            assert plt.imread(out / name).ndim == 3


def test_estimates_equal_the_library_fit_with_the_same_seed(run):
    out, api = run
    est = pd.read_csv(out / "estimates.csv").set_index("parameter")
    assert list(est.columns) == ["estimate", "se", "rse%"]
    assert list(est.index) == ["ka", "V", "beta_V_WT", "CL", "omega2_ka", "omega2_V", "omega2_CL", "a"]
    se = api.standard_errors()
    for name, value in api.params.items():
        assert est.loc[name, "estimate"] == float(value), name  # bit for bit
        assert est.loc[name, "se"] == se[name], name
        assert est.loc[name, "rse%"] == pytest.approx(100 * se[name] / abs(float(value)), rel=1e-12)
    lik = pd.read_csv(out / "likelihood.csv").set_index("method")
    pd.testing.assert_frame_equal(lik, api.likelihood_table(), check_exact=True)


def test_the_nonmem_file_is_saemix_theophylline_data(run):
    """The shipped NONMEM file (dose rows, EVID/MDV, '.' for missing DV) gives the fit of saemix's theo.saemix table;
    the doses differ by the rounding of AMT to 1e-3 mg, hence the relative tolerance."""
    _, api = run
    theo = lf.datasets.theophylline(saemix_form=True).rename(columns={"Weight": "WT"})
    saemix_form = _api_model().fit(theo, columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose",
                                   seed=SEED, num_iters=ITERS, progress=False)
    for name, value in api.params.items():
        assert float(value) == pytest.approx(float(saemix_form.params[name]), rel=1e-6), name


def test_individual_estimates_shrinkage_and_residuals_tables(run):
    out, api = run
    ind = pd.read_csv(out / "individual_estimates.csv")
    assert list(ind["ID"]) == list(range(1, 13))
    psi = api.individual_parameters()
    for col in psi.columns:
        np.testing.assert_array_equal(ind[col].to_numpy(), psi[col].to_numpy())
    # η at the modes = log ψ_mode − (β + β_WT·WT) for the log-normal V
    p = api.params
    np.testing.assert_allclose(ind["eta_V"], np.log(ind["V.mode"]) - np.log(p["V"]) - p["beta_V_WT"] * ind["WT"],
                               atol=1e-10)
    shr = pd.read_csv(out / "shrinkage.csv").set_index("parameter")
    np.testing.assert_array_equal(shr["shrinkage_mode%"].to_numpy(),
                                  100 * np.asarray(api.individual_estimates().shrinkage_mode))
    res = pd.read_csv(out / "residuals.csv")
    assert list(res.columns) == ["ID", "TIME", "DV", "PRED", "IPRED", "IWRES", "EPRED", "PWRES", "NPDE"]
    ref = api.residuals().to_frame()
    assert len(res) == 120
    for col in ("DV", "PRED", "IPRED", "IWRES", "PWRES", "NPDE"):
        np.testing.assert_array_equal(res[col].to_numpy(), ref[col].to_numpy())
    data = pd.read_csv(DATA, na_values=["."])
    obs = data[data["EVID"] == 0]
    np.testing.assert_array_equal(res[["ID", "TIME", "DV"]].to_numpy(), obs[["ID", "TIME", "DV"]].to_numpy())


def test_html_report_is_self_contained_with_every_section_and_image(run):
    out, api = run
    page = (out / "report.html").read_text(encoding="utf-8")
    for sid, heading in report.SECTIONS.items():
        assert f'<section id="{sid}">' in page and f"<h2>{heading}</h2>" in page, sid
    images = re.findall(r'<figure id="fig-([a-z_]+)">.*?src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page, re.S)
    continuous = [s for s in report.FIGURES if s not in ("discrete_vpc", "joint_vpc")]  # continuous data, one response
    assert [stem for stem, _ in images] == continuous
    for stem, data in images:
        png = base64.b64decode(data, validate=True)
        assert png == (out / f"{stem}.png").read_bytes(), stem
        assert plt.imread(io.BytesIO(png), format="png").shape[0] > 100
    # nothing outside the page: the only links are anchors, the only sources data URIs
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))
    assert "<link" not in page and "<script" not in page and "url(" not in page
    # the model file (escaped), the run information and the tables
    assert "structural = &quot;oral1cpt&quot;" in page and "[covariates.V]" in page
    assert f"--seed {SEED}" in page and "30, 20" in page and "12 / 120" in page
    assert f"{float(api.params['CL']):.5g}" in page and "beta_V_WT" in page and "eta_CL" in page
    for method in ("lin", "is", "gq"):
        assert f"<td>{method}</td>" in page
    assert "5000 draws per subject, full proposal" in page and "MC SE" in page


def test_simulate_from_the_output_directory_equals_the_library_simulation(run, tmp_path, capsys):
    out, api = run
    design = pd.read_csv(DATA, na_values=["."]).drop(columns=["DV"])  # a design: no DV column at all
    design.to_csv(tmp_path / "design.csv", index=False)
    sim_path = tmp_path / "sim.csv"
    rc = main(["nlme", "simulate", str(TOML), "--from", str(out), "--design", str(tmp_path / "design.csv"),
               "--out", str(sim_path), "--n-rep", "2", "--seed", "11"])
    assert rc == 0
    sim = pd.read_csv(sim_path, na_values=["."])
    assert list(sim["REP"].unique()) == [1, 2] and len(sim) == 2 * len(design)
    model = _api_model(pd.read_csv(DATA, na_values=["."]))
    for rep, seed in ((1, 11), (2, 12)):
        ref = model.simulate(api.params, seed=seed)
        got = sim[sim["REP"] == rep].drop(columns="REP").reset_index(drop=True)
        np.testing.assert_array_equal(got["DV"].to_numpy(), ref["DV"].to_numpy())  # NaN on the dose rows
    # --params names the estimates file itself; the simulated data fit back through the CLI's data reader
    rc = main(["nlme", "simulate", str(TOML), "--params", str(out / "estimates.csv"), "--design", str(DATA),
               "--out", str(sim_path), "--seed", "11"])
    assert rc == 0
    assert _api_model(read_table(sim_path)).num_obs == 120


def test_vpc_from_the_output_directory_equals_the_fit_vpc(run, tmp_path):
    out, api = run
    rc = main(["nlme", "vpc", str(TOML), str(DATA), "--from", str(out), "--out", str(tmp_path / "vpc.png"),
               "--num-sims", "100"])
    assert rc == 0
    assert (tmp_path / "vpc.png").read_bytes()[:8] == PNG
    model = _api_model(pd.read_csv(DATA, na_values=["."]))
    saved = report.SavedFit(model, read_estimates(out, model))
    a, b = vpc_summary(saved, num_sims=100, seed=0), vpc_summary(api, num_sims=100, seed=0)
    np.testing.assert_array_equal(a.simulated, b.simulated)
    np.testing.assert_array_equal(a.observed, b.observed)


# ----- errors: one line, exit status 2 -------------------------------------------------------------------------------
def _fail(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _write(tmp_path: Path, text: str, name: str = "model.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BASE = '[model]\nstructural = "oral1cpt"\n\n[parameters]\nka = 1.0\nV = 20.0\nCL = 0.5\n'


def test_toml_syntax_error_names_line_and_column(tmp_path, capsys):
    bad = _write(tmp_path, BASE.replace("V = 20.0", "V = { init = 20.0"))
    err = _fail(["nlme", "fit", bad, str(DATA), "--out", str(tmp_path / "o")], capsys)
    assert re.search(r"model\.toml, line 6, column \d+: invalid TOML", err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, expected", [
    (BASE.replace("ka = 1.0", 'ka = { init = 1.0, transfrom = "log" }'),
     r"line 5: \[parameters\.ka\]: unknown key 'transfrom'; allowed keys are init, transform, random, fixed, omega2"),
    (BASE + '\n[error]\nmodel = "constant"\nsigma = 0.5\n',
     r"line 11: \[error\]: unknown key 'sigma'; allowed keys are model, a, b"),
    (BASE + '\n[engine]\niterations = [30, 20]\nchain = 3\n',
     r"line 11: \[engine\]: unknown key 'chain'; allowed keys are algorithm, iterations, chains, seed, backend"),
    (BASE + '\n[estimation]\nseed = 1\n', r"line 9: unknown section \[estimation\]; allowed sections are \[model\]"),
    (BASE.replace("CL = 0.5\n", ""), r"missing parameter\(s\) CL of the structural model 'one_compartment_oral'"),
    (BASE.replace("oral1cpt", "oral3cpt"), r"line 2: \[model\] structural = 'oral3cpt' is not in the library"),
    (BASE + '\n[data]\ncolumns = { ID = "ID", CONC = "DV" }\n', r"unknown NONMEM name 'CONC'; allowed names are ID,"),
    (BASE.replace("ka = 1.0", 'ka = { init = 1.0, transform = "logt" }'),
     r"\[parameters\.ka\] transform = 'logt': use one of log, normal, logit, probit"),
    (BASE.replace("V = 20.0", "V = -20.0"), r"parameter 'V' is log-normal: its initial value must be > 0"),
])
def test_bad_model_files_are_one_line_errors_naming_the_key(tmp_path, capsys, text, expected):
    err = _fail(["nlme", "fit", _write(tmp_path, text), str(DATA), "--out", str(tmp_path / "o")], capsys)
    assert err.startswith("latentfit nlme fit: error: ") and re.search(expected, err), err


def test_bad_data_file_names_the_column_and_the_line(tmp_path, capsys):
    lines = DATA.read_text().splitlines()
    lines[3] = lines[3].replace("6.57", "6,57x").replace(",6,57x", ',"6.57x"')  # a typo in DV on line 4
    bad = _write(tmp_path, "\n".join(lines) + "\n", "data.csv")
    err = _fail(["nlme", "fit", str(TOML), bad, "--out", str(tmp_path / "o")], capsys)
    assert "data error: column 'DV' has a non-numeric value '6.57x' (ID 1, line 4 of" in err, err
    err = _fail(["nlme", "fit", str(TOML), str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")], capsys)
    assert "nope.csv: no such data file" in err
    renamed = _write(tmp_path, DATA.read_text().replace("TIME", "Time"), "renamed.csv")
    err = _fail(["nlme", "fit", str(TOML), renamed, "--out", str(tmp_path / "o")], capsys)
    assert "column 'TIME' (role 'time') is not in the data" in err


def test_bad_options_and_output_paths_are_one_line_errors(tmp_path, capsys):
    err = _fail(["nlme", "fit", str(TOML), str(DATA), "--out", str(tmp_path / "o"), "--iterations", "0", "5"], capsys)
    assert "--iterations K1 K2 needs K1 >= 1 and K2 >= 0, got 0 5" in err
    err = _fail(["nlme", "fit", str(TOML), str(DATA), "--out", str(tmp_path / "o"), "--iterations", "5", "5"], capsys)
    assert "iterations K1 = 5 must exceed SAEM's burn-in of 5 iterations" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _fail(["nlme", "fit", str(TOML), str(DATA), "--out", str(blocker / "sub"), "--iterations", "6", "0",
                 "--no-progress"], capsys)
    assert "error:" in err and "file/sub" in err


def test_python_310_without_tomli_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "version_info", (3, 10, 0))
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match=r"Python 3\.10 needs the 'tomli' package: pip install tomli"):
        parse_config(BASE)


def test_estimates_of_another_model_are_refused(run, tmp_path, capsys):
    out, _ = run
    other = _write(tmp_path, BASE)  # no covariate: beta_V_WT is not a parameter of this model
    err = _fail(["nlme", "simulate", other, "--from", str(out), "--design", str(DATA), "--out",
                 str(tmp_path / "s.csv")], capsys)
    assert "the estimates have parameter(s) beta_V_WT that the model has not" in err


# ----- the model file -------------------------------------------------------------------------------------------------
def test_example_file_is_saemix_theophylline_model():
    cfg = load_config(TOML)
    assert cfg.structural == "one_compartment_oral" and cfg.num_iters == (300, 100) and cfg.engine == "saem"
    assert {n: (p.init, p.transform, p.omega2) for n, p in cfg.parameters.items()} == {
        "ka": (1.0, "log", 1.0), "V": (20.0, "log", 1.0), "CL": (0.5, "log", 1.0)}
    assert cfg.covariates == {"V": {"WT": "linear"}} and cfg.error == "constant" and cfg.error_init == {"a": 1.0}


def test_user_structural_file_blocks_fixed_and_categorical_covariates(tmp_path):
    """file = / function = loads f(psi, data); its predictions equal the library's one-compartment oral model.
    Omega blocks, fixed / non-random parameters and categorical covariate initial values reach NLME."""
    (tmp_path / "pk.py").write_text(
        "def oral(psi, data):\n"
        "    xp, t = data.xp, data.time\n"
        "    k = psi['CL'] / psi['V']\n"
        "    amt = data.dose_amt[:, :1]\n"
        "    return amt * psi['ka'] / (psi['V'] * (psi['ka'] - k)) * (xp.exp(-k * t) - xp.exp(-psi['ka'] * t))\n")
    text = ('[model]\nfile = "pk.py"\nfunction = "oral"\n[parameters]\n'
            'ka = { init = 1.5, fixed = true }\nV = 20.0\nCL = { init = 0.5, random = true }\n'
            '[omega]\nblocks = [["V", "CL"]]\n'
            '[covariates.CL]\nSEX = { transform = "categorical", init = { M = 0.2 } }\n'
            '[error]\nmodel = "combined"\na = 0.5\nb = 0.1\n')
    cfg = parse_config(text, tmp_path / "m.toml")
    data = read_table(DATA)
    data["SEX"] = np.where(data["ID"] % 2 == 0, "F", "M")
    user = cfg.model(data)
    assert user.omega_blocks == [("V", "CL"), ("ka",)] and user.spec["ka"].fixed
    theta = user.init_params()
    assert float(theta["beta_CL_SEX_M"]) == 0.2 and float(theta["b"]) == 0.1
    lib = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 20.0, "CL": 0.5}, data=data)
    z = lib.prior_moments(lib.init_params())[0]
    np.testing.assert_allclose(user.structural_prediction(theta, z).numpy(),
                               lib.structural_prediction(lib.init_params(), z).numpy(), rtol=1e-12)
    # estimates of a block-Ω model: Omega[i,j] entries reassembled into the matrix
    labels = [(n, float(v)) for n, v in theta.items() if np.ndim(v) == 0]
    omega = np.asarray(theta["Omega"])
    labels += [(f"Omega[{i},{j}]", float(omega[i, j])) for i in range(3) for j in range(3)]
    pd.DataFrame(labels, columns=["parameter", "estimate"]).to_csv(tmp_path / "estimates.csv", index=False)
    back = read_estimates(tmp_path, user)
    assert set(back) == set(theta) and np.array_equal(back["Omega"], omega)
    with pytest.raises(ConfigError, match=r"line 3: \[model\] function 'orl' is not defined in .*pk.py.*\['oral'\]"):
        parse_config(text.replace('"oral"', '"orl"'), tmp_path / "m.toml")


def test_readme_model_file_parses():
    block = re.search(r"```toml\n(.*?)```", _readme_section(), re.S).group(1)
    cfg = parse_config(block, ROOT / "readme.toml")
    assert cfg.structural == "one_compartment_oral" and cfg.num_chains == 5 and cfg.report["title"] == "My fit"
    assert cfg.data_options["columns"] == {"id": "Subject", "time": "Time", "dv": "Conc"}
    assert cfg.parameters["ka"] == nlme.Parameter(1.0, "log", True, False, 1.0)


def test_report_importance_sampling_options(run):
    """[report] is_proposal / is_samples: the likelihood table's importance sampling (fit.likelihood_table's proposal
    and num_samples); a proposal that does not exist is a one-line error naming the key."""
    _, api = run
    cfg = parse_config(BASE + '\n[report]\nis_proposal = "diagonal"\nis_samples = 2000\n')
    assert (cfg.report["is_proposal"], cfg.report["is_samples"]) == ("diagonal", 2000)
    assert parse_config(BASE).report["is_proposal"] == "full"
    table = report.likelihood_table(api, cfg.report["is_proposal"], cfg.report["is_samples"]).set_index("method")
    pd.testing.assert_frame_equal(table, api.likelihood_table(proposal="diagonal", num_samples=2000),
                                  check_exact=True)
    assert table.loc["is", "-2LL"] == -2 * api.log_likelihood("is", proposal="diagonal", num_samples=2000)
    with pytest.raises(ConfigError, match=r"line 10: \[report\] is_proposal = 'mixed': use one of diagonal, full"):
        parse_config(BASE + '\n[report]\nis_proposal = "mixed"\n')


def test_readme_simulate_and_vpc_commands_run(run, tmp_path):
    out, _ = run
    for name, target in (("simulate", "sim.csv"), ("vpc", "vpc.png")):
        argv = _readme_command(name)
        argv[argv.index("--from") + 1] = str(out)
        argv[argv.index("--out") + 1] = str(tmp_path / target)
        assert main(argv) == 0, name
    sim = pd.read_csv(tmp_path / "sim.csv", na_values=["."])
    assert sim["REP"].nunique() == 100 and sim["DV"].notna().sum() == 100 * 120
    assert (tmp_path / "vpc.png").read_bytes()[:8] == PNG


def test_replicates_from_the_model_file(tmp_path):
    """[engine] replicates = 2: both runs in replicates.csv and the report, the best one's estimates written."""
    text = TOML.read_text().replace("iterations = [300, 100]", "iterations = [10, 5]\nreplicates = 2")
    text = text.replace("vpc_simulations = 500", "vpc_simulations = 20")
    model_file = _write(tmp_path, text, "theo.toml")
    out = tmp_path / "fit"
    assert main(["nlme", "fit", model_file, str(DATA), "--out", str(out), "--no-progress"]) == 0
    reps = pd.read_csv(out / "replicates.csv")
    assert list(reps["seed"]) == [0, 1] and reps["best"].sum() == 1
    best = reps[reps["best"]].iloc[0]
    est = pd.read_csv(out / "estimates.csv").set_index("parameter")["estimate"]
    for name, value in est.items():
        assert best[name] == value, name
    page = (out / "report.html").read_text(encoding="utf-8")
    section = page.split('<section id="replicates">', 1)[1].split("</section>", 1)[0]
    assert "2 SAEM runs" in section and section.count("<tr") == 3  # header + 2 rows


def test_simulate_at_the_model_files_initial_values(tmp_path):
    """Without --params / --from the model file's initial values are the truth (a simulation study)."""
    sim_path = tmp_path / "sim.csv"
    assert main(["nlme", "simulate", str(TOML), "--design", str(DATA), "--out", str(sim_path), "--seed", "4"]) == 0
    model = _api_model(pd.read_csv(DATA, na_values=["."]))
    ref = model.simulate(seed=4)
    np.testing.assert_array_equal(pd.read_csv(sim_path, na_values=["."])["DV"].to_numpy(), ref["DV"].to_numpy())


def test_user_ode_file(tmp_path):
    """A user file may define a Structural made by nlme.ode (its parameters are the ODE's): the one-compartment
    oral system integrated by RK4 matches the closed form (RK4 at its default step, span/200: relative error
    measured 2.8e-6, O(h⁴))."""
    (tmp_path / "ode_pk.py").write_text(
        "from latentfit.models import nlme\n"
        "def rhs(t, x, psi, xp):\n"
        "    return (-psi['ka'] * x[0], psi['ka'] * x[0] - psi['CL'] / psi['V'] * x[1])\n"
        "oral = nlme.ode(rhs, ('ka', 'V', 'CL'), num_states=2, observe=lambda x, psi, xp: x[1] / psi['V'],\n"
        "                dose_compartment=1)\n")
    text = '[model]\nfile = "ode_pk.py"\nfunction = "oral"\n[parameters]\nCL = 2.8\nka = 1.5\nV = 31.0\n'
    cfg = parse_config(text, tmp_path / "m.toml")
    assert list(cfg.parameters) == ["ka", "V", "CL"]  # the ODE's order, whatever the file's
    data = read_table(DATA)
    user, lib = cfg.model(data), nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 31.0, "CL": 2.8}, data=data)
    z = lib.prior_moments(lib.init_params())[0]
    np.testing.assert_allclose(user.structural_prediction(user.init_params(), z).numpy(),
                               lib.structural_prediction(lib.init_params(), z).numpy(), rtol=1e-5)


def test_omega_covariances_are_initial_values_inside_the_blocks():
    """[omega] covariances: saemix's omega.init off the diagonal (the diagonal: the parameters' omega2)."""
    text = BASE.replace("V = 20.0", "V = { init = 20.0, omega2 = 0.5 }") + (
        '[omega]\nblocks = [["V", "CL"]]\ncovariances = [["CL", "V", 0.2]]\n')
    model = parse_config(text).model(read_table(DATA))
    np.testing.assert_array_equal(model.init_params()["Omega"].numpy(),
                                  [[1.0, 0.0, 0.0], [0.0, 0.5, 0.2], [0.0, 0.2, 1.0]])
    with pytest.raises(ConfigError, match=r"line 10: \[omega\] covariances: 'ka' and 'V' are not two parameters of "
                                          r"one Ω block \(blocks: \[\['V', 'CL'\]\]\)"):
        parse_config(text.replace('"CL", "V"', '"ka", "V"'))
    with pytest.raises(ConfigError, match=r"line 10: \[omega\] covariances: the initial Ω .* is not positive definite"):
        parse_config(text.replace("0.2]]", "0.9]]")).model(read_table(DATA))


NO_TORCH_SCRIPT = """
import json, sys
from latentfit.models.nlme.config import load_config
cfg = load_config(sys.argv[1], backend="jax")
print(json.dumps({"backend": cfg.backend, "torch": "torch" in sys.modules}))
"""


def test_a_jax_run_checks_its_model_file_without_importing_torch():
    """``--backend jax`` reaches the model built to check the file: that model was built on the file's backend
    (torch in the example), so every JAX run of the command line imported torch (~1 s) for nothing."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(TOML)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"backend": "jax", "torch": False}


# ----- output folders, warnings in the report, data-file faults (a user audit) ------------------------------------
def _short(argv: list[str]) -> list[str]:
    return argv + ["--iterations", "6", "2", "--no-progress"]


def test_an_earlier_fits_folder_is_refused_without_force_and_force_removes_its_stale_files(tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(_short(["nlme", "fit", str(TOML), str(DATA), "--out", str(out), "--replicates", "2"])) == 0
    assert (out / "replicates.csv").is_file()
    (out / "notes.txt").write_text("mine")
    before = (out / "estimates.csv").read_bytes()
    capsys.readouterr()
    err = _fail(_short(["nlme", "fit", str(TOML), str(DATA), "--out", str(out), "--seed", "5"]), capsys)
    assert f"--out {out} holds the outputs of an earlier fit (" in err and "add --force" in err, err
    assert (out / "estimates.csv").read_bytes() == before  # untouched
    assert main(_short(["nlme", "fit", str(TOML), str(DATA), "--out", str(out), "--seed", "5", "--force"])) == 0
    assert not (out / "replicates.csv").exists()  # the earlier run's file that this run does not write: gone
    assert (out / "notes.txt").read_text() == "mine" and (out / "estimates.csv").read_bytes() != before
    capsys.readouterr()
    err = _fail(["nlme", "vpc", str(TOML), str(DATA), "--from", str(out), "--out", str(tmp_path / "no" / "v.png")],
                capsys)
    assert "the folder" in err and "does not exist" in err, err


def test_warnings_of_the_data_the_fit_and_the_outputs_reach_the_terminal_and_the_report(tmp_path, capsys):
    data = pd.read_csv(DATA, na_values=["."])
    data.loc[data.index[5], "TIME"] = 0.1  # ID 1: a time before the record above it (line 7 of the file)
    data.loc[data.index[8], "WT"] = 90.0  # ID 1: a weight that changes within the subject
    path = tmp_path / "data.csv"
    data.to_csv(path, index=False, na_rep=".")
    model = _write(tmp_path, TOML.read_text().replace("[report]\n", "[report]\nmax_individual_plots = 4\n")
                   .replace("vpc_simulations = 500", "vpc_simulations = 20"))
    out = tmp_path / "fit"
    assert main(_short(["nlme", "fit", model, str(path), "--out", str(out)])) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    order = next(ln for ln in lines if "not in time order" in ln)
    assert f"line 7 of {path} has TIME 0.1 after 2.02 at line 6 of {path}" in order, order
    assert any("varies within" in ln for ln in lines) and any("4 of 12" in ln for ln in lines), lines
    assert "sys.exit" not in err and "UserWarning" not in err  # no Python plumbing
    page = (out / "report.html").read_text(encoding="utf-8")
    warns = page.split('<section id="warnings">', 1)[1].split("</section>", 1)[0]
    assert "None." not in warns and warns.count('class="warn"') == len(lines)
    assert "not in time order" in warns and "varies within" in warns and "4 of 12" in warns


def test_a_duplicated_column_is_a_data_error(tmp_path, capsys):
    lines = DATA.read_text().splitlines()
    lines = [ln + "," + ln.split(",")[3] for ln in lines]  # a second DV column at the end
    bad = _write(tmp_path, "\n".join(lines) + "\n", "dup.csv")
    err = _fail(["nlme", "fit", str(TOML), bad, "--out", str(tmp_path / "o")], capsys)
    assert "dup.csv, line 1: column 'DV' appears twice (columns 4 and 8)" in err, err
