"""Model files (TOML) for inter-occasion variability (``[iov]``) and several responses (``[error.<response>]``),
issue 14 items 2 and 3: parsed into the same model as the API, errors naming the line, ``latentfit nlme fit`` end to
end on a joint PK/PD data set with occasions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from latentfit.cli import main  # noqa: E402
from latentfit.models import nlme  # noqa: E402
from latentfit.models.nlme.config import ConfigError, parse_config  # noqa: E402

P = nlme.Parameter
MODEL_FILE = """\
[model]
structural = "oral_effect_imax"

[parameters]
ka = { init = 1.0, omega2 = 0.3 }
V = { init = 10.0, omega2 = 0.3 }
CL = { init = 0.5, omega2 = 0.3 }
ke0 = { init = 0.1, random = false }
E0 = { init = 100.0, omega2 = 0.1 }
Imax = { init = 0.8, transform = "logit", random = false }
IC50 = { init = 3.0, omega2 = 0.3 }

[error]
column = "YTYPE"

[error.conc]
model = "proportional"
b = 0.2
dvid = 1

[error.effect]
model = "constant"
a = 2.0
dvid = 2

[iov]
parameters = { CL = 0.05 }
column = "PERIOD"

[engine]
iterations = [8, 4]

[report]
vpc_simulations = 10
max_individual_plots = 4
"""


def _api_model(data: pd.DataFrame | None = None) -> nlme.NLME:
    """MODEL_FILE written with the library API."""
    params = {"ka": P(1.0, omega2=0.3), "V": P(10.0, omega2=0.3), "CL": P(0.5, omega2=0.3),
              "ke0": P(0.1, random=False), "E0": P(100.0, omega2=0.1), "Imax": P(0.8, transform="logit", random=False),
              "IC50": P(3.0, omega2=0.3)}
    return nlme.NLME("oral_effect_imax", params, error={"conc": "proportional", "effect": "constant"},
                     error_init={"conc": {"b": 0.2}, "effect": {"a": 2.0}}, response="YTYPE",
                     dvid={"conc": 1, "effect": 2}, iov={"CL": 0.05}, occasion="PERIOD", data=data)


def _data(num_ids: int = 8, seed: int = 0) -> pd.DataFrame:
    """Two periods of one dose each (EVID 4 resets the second), concentrations (YTYPE 1) and effects (YTYPE 2),
    simulated at the model file's initial values."""
    rows = []
    for i in range(1, num_ids + 1):
        for period in (1, 2):
            rows.append((i, 0.0, np.nan, 100.0, 1 if period == 1 else 4, 1, period))
            rows += [(i, t, 0.0, 0.0, 0, 1, period) for t in (0.5, 2.0, 8.0, 24.0)]
            rows += [(i, t, 0.0, 0.0, 0, 2, period) for t in (6.0, 24.0, 48.0)]
    df = pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "YTYPE", "PERIOD"])
    df = df.sort_values(["ID", "PERIOD", "TIME", "EVID"], ascending=[True, True, True, False], kind="stable")
    return _api_model(df.reset_index(drop=True)).simulate(seed=seed)


def test_model_file_is_the_api_model(tmp_path):
    cfg = parse_config(MODEL_FILE, tmp_path / "pkpd.toml")
    assert cfg.iov == {"CL": 0.05} and cfg.occasion == "PERIOD" and cfg.response == "YTYPE"
    assert cfg.error == {"conc": "proportional", "effect": "constant"} and cfg.dvid == {"conc": 1.0, "effect": 2.0}
    data = _data()
    from_file, api = cfg.model(data), _api_model(data)
    assert list(from_file.params) == list(api.params)
    assert {k: float(v) for k, v in from_file.init_params().items()} == {k: float(v) for k, v in
                                                                          api.init_params().items()}
    theta = api.init_params()
    z = api.sample_prior(theta, api.ops.key(0), 2)
    np.testing.assert_array_equal(np.asarray(from_file.log_joint(theta, z)), np.asarray(api.log_joint(theta, z)))


@pytest.mark.parametrize("edit, message", [
    (("parameters = { CL = 0.05 }", 'parameters = ["Q"]'), "line 27: [iov] 'Q' is not a parameter"),
    (("column = \"PERIOD\"", "columns = \"PERIOD\""), "unknown key 'columns'"),
    (("dvid = 2\n", ""), "dvid: give it for every response or for none (missing for effect)"),
    (("model = \"proportional\"", "model = \"exponential\""), "[error.conc] model = 'exponential'"),
    (("b = 0.2", "b = 0.2\nsd = 1"), "[error.conc]: unknown key 'sd'"),
])
def test_bad_sections_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError) as err:
        parse_config(MODEL_FILE.replace(*edit), tmp_path / "pkpd.toml")
    assert message in str(err.value)


def test_cli_fit_end_to_end(tmp_path):
    """``latentfit nlme fit`` on the model file: γ² and each response's error parameter in the estimates, which
    equal the API fit with the same seed; the report is written."""
    data_path, model_path, out = tmp_path / "pkpd.csv", tmp_path / "pkpd.toml", tmp_path / "fit"
    data = _data()
    data.to_csv(data_path, index=False, na_rep=".")
    model_path.write_text(MODEL_FILE)
    assert main(["nlme", "fit", str(model_path), str(data_path), "--out", str(out), "--no-progress"]) == 0
    est = pd.read_csv(out / "estimates.csv").set_index("parameter")["estimate"]
    api = _api_model(pd.read_csv(data_path, na_values=["."])).fit(seed=0, num_iters=(8, 4), progress=False)
    for name in ("gamma2_CL", "b_conc", "a_effect", "CL", "omega2_CL"):
        assert est[name] == pytest.approx(float(api.params[name]), rel=1e-12), name
    assert (out / "report.html").stat().st_size > 0
