"""Small public data sets shipped with latentfit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

#: the folder of the shipped tables (this package's own: a plain path, without importlib.resources' readers)
_HERE = Path(__file__).resolve().parent


def theophylline(saemix_form: bool = False) -> pd.DataFrame:
    """The oral theophylline study (Boeckmann, Sheiner & Beal 1994; R's ``datasets::Theoph``).

    12 subjects, 11 samples each: 132 rows with columns ``Subject, Wt (kg), Dose (mg/kg),
    Time (h), conc (mg/L)``.  With ``saemix_form=True`` the table is saemix's ``theo.saemix``:
    the time-0 rows are dropped (120 rows) and the dose is in mg (``Dose * Wt``), with columns
    ``Id, Dose, Time, Concentration, Weight``.
    """
    df = pd.read_csv(_HERE / "theophylline.csv")
    if not saemix_form:
        return df
    keep = df["Time"].to_numpy() > 0  # the columns as arrays: no index alignment (half the time of a Series' frame)
    column = {name: df[name].to_numpy()[keep] for name in ("Subject", "Dose", "Time", "conc", "Wt")}
    return pd.DataFrame({
        "Id": column["Subject"].astype(int),
        "Dose": column["Dose"] * column["Wt"],
        "Time": column["Time"],
        "Concentration": column["conc"],
        "Weight": column["Wt"],
    })


__all__ = ["theophylline"]
