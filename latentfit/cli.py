"""Command line (also ``python -m latentfit ...``).

* ``latentfit demo``: the theophylline fit compared with saemix;
* ``latentfit nlme fit MODEL.toml DATA.csv --out DIR``: fit an NLME model file (see
  :mod:`latentfit.models.nlme.config`) to a NONMEM-style data file and write the tables, plots and HTML report
  (:mod:`latentfit.report`);
* ``latentfit nlme simulate MODEL.toml --from DIR --design DESIGN.csv --out sim.csv [--n-rep K]``;
* ``latentfit nlme vpc MODEL.toml DATA.csv --from DIR --out vpc.png``.

Errors in the model file or the data (:class:`~latentfit.ModelSpecificationError`, :class:`~latentfit.DataError`)
are printed as one line, without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: saemix 3.4 (Comets, Lavenu & Lavielle, "Parameter estimation in nonlinear mixed effect models using saemix, an
#: R implementation of the SAEM algorithm", J. Stat. Softw. 80(3), 2017) run once with its defaults (K1=300, K2=100,
#: 5 chains, seed 23456) on ``theo.saemix``: one Monte-Carlo realisation (over 20 seeds saemix's own SD of ω²_V is
#: about 6%, and this run's ω²_V is below all 20), hence the exact maximum beside it.
SAEMIX_THEOPHYLLINE = {
    "ka": 1.5668, "V": 31.540, "CL": 2.7554,
    "omega2_ka": 0.3953, "omega2_V": 0.01449, "omega2_CL": 0.07953, "a": 0.7392,
}
#: The exact maximum of the same likelihood: adaptive Gauss–Hermite quadrature maximised by
#: ``latentfit.inference.likelihood.maximise_log_likelihood_gq`` (deterministic, and asserted by the test suite;
#: an independent quadrature and importance sampling with 400 000 draws per subject agree), logLik −172.718.
EXACT_ML_THEOPHYLLINE = {
    "ka": 1.5794, "V": 31.626, "CL": 2.7480,
    "omega2_ka": 0.3947, "omega2_V": 0.01789, "omega2_CL": 0.07075, "a": 0.7380,
}
#: saemix's wall time for its 400 SAEM iterations on theophylline: a constant recorded once when the reference
#: figures above were produced, on another machine; not measured here, so the ratio printed is indicative only.
SAEMIX_SECONDS = 1.5


def demo(out: str = "theophylline_convergence.png", seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Fit the theophylline Pyro model by SAEM (saemix defaults) and compare with saemix."""
    import matplotlib

    matplotlib.use("Agg")
    from latentfit.examples.theophylline import fit

    result = fit(seed=seed, progress=progress)
    p = result.params
    ka, v, cl = np.exp(p["mu"])
    om2 = p["omega"] ** 2
    ours = {"ka": ka, "V": v, "CL": cl, "omega2_ka": om2[0], "omega2_V": om2[1], "omega2_CL": om2[2],
            "a": float(p["a"])}
    print("Theophylline (120 rows, 12 subjects): one-compartment oral model, written as a plain Pyro model")
    print(f"SAEM, saemix defaults: K1={result.engine.schedule.K1}, K2={result.engine.schedule.K2}, "
          f"burn-in {result.engine.schedule.burn_in}, {result.engine.num_chains} chains per subject\n")
    print(f"{'parameter':<12}{'latentfit':>12}{'saemix 3.4':>12}{'exact ML':>12}{'vs exact':>10}")
    for name, ref in SAEMIX_THEOPHYLLINE.items():
        val, ml = float(ours[name]), EXACT_ML_THEOPHYLLINE[name]
        print(f"{name:<12}{val:>12.4f}{ref:>12.4f}{ml:>12.4f}{100 * (val - ml) / ml:>9.1f}%")
    print("saemix 3.4: its defaults, seed 23456 (published run; one Monte-Carlo realisation, so compare both with\n"
          "the exact ML: the maximum of the adaptive Gauss-Hermite likelihood, deterministic). One SAEM run with\n"
          "these settings carries Monte-Carlo error: the run-to-run SD of omega2_V is about 8%.")
    iters = result.num_iterations
    print(f"\nSAEM time: {result.elapsed:.2f} s for {iters} iterations "
          f"({1000 * result.time_per_iteration:.1f} ms/iteration); saemix 3.4: about {SAEMIX_SECONDS} s for its "
          f"400 iterations\n(a constant recorded once on another machine, not measured here: ratio "
          f"{result.elapsed / SAEMIX_SECONDS:.2f}x, indicative only)")
    fig = result.plot_convergence()
    fig.savefig(out, dpi=100)
    print(f"convergence plot written to {out}")
    return {k: float(v) for k, v in ours.items()}


# ----- latentfit nlme ... ------------------------------------------------------------------------------------------
def _data_error(err: Exception | str, path: str) -> str:
    """A data error's (or warning's) message with its data-frame row numbers (0-based) given as lines of the CSV file
    (header: line 1), and the file named."""
    msg = re.sub(r"\brow (\d+)\b", lambda m: f"line {int(m.group(1)) + 2} of {path}", str(err))
    return msg if path in msg else f"{path}: {msg}"


@contextlib.contextmanager
def _warnings_to_stderr(data_path: str | None = None) -> Iterator[list[str]]:
    """Every warning of the block printed once, as it comes, as one line ``warning: ...`` on stderr (no Python file
    and line: the user's command is not Python), a data file's rows as its lines; yields the list of the messages
    (for the report)."""
    seen: list[str] = []

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, DeprecationWarning | FutureWarning):
            return
        text = str(message)
        if data_path is not None and re.search(r"\brow \d+\b", text):
            text = _data_error(text, data_path)
        if text not in seen:
            seen.append(text)
            print(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield seen


def _bound(cfg: Any, data: Any, path: str) -> Any:
    from latentfit.inference.model import DataError

    try:
        return cfg.model(data)
    except DataError as err:
        raise DataError(_data_error(err, path)) from None


def _check_iterations(num_iters: tuple[int, int]) -> None:
    """K1 must exceed SAEM's burn-in (its default, read from the engine)."""
    import inspect

    from latentfit.inference.model import ModelSpecificationError
    from latentfit.inference.saem import SAEM

    burn_in = inspect.signature(SAEM.__init__).parameters["burn_in"].default
    if num_iters[0] <= burn_in:
        raise ModelSpecificationError(f"iterations K1 = {num_iters[0]} must exceed SAEM's burn-in of {burn_in} "
                                      f"iterations ([engine] iterations or --iterations K1 K2)")


def _prepare_output_folder(out: Path, force: bool) -> None:
    """Create ``out``; a folder holding an earlier fit's outputs is refused (its results would be replaced, and files
    of that run the new one does not write, e.g. ``replicates.csv``, would stay beside them) unless ``force``: then
    the files latentfit writes are removed first (the user's own files are kept)."""
    from latentfit.inference.model import ModelSpecificationError
    from latentfit.report import OUTPUT_FILES

    if out.exists() and not out.is_dir():
        raise ModelSpecificationError(f"--out {out}: a file of that name exists; --out names a folder")
    earlier = sorted(p.name for p in out.glob("*") if p.name in OUTPUT_FILES) if out.is_dir() else []
    if earlier and not force:
        shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise ModelSpecificationError(f"--out {out} holds the outputs of an earlier fit ({shown}): choose another "
                                      f"folder, or add --force to replace them")
    for name in earlier:
        (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _check_output_file(path: str) -> None:
    """An output file's folder exists (checked before the work, not after it)."""
    from latentfit.inference.model import ModelSpecificationError

    folder = Path(path).parent
    if not folder.is_dir():
        raise ModelSpecificationError(f"--out {path}: the folder {folder} does not exist")
    if Path(path).is_dir():
        raise ModelSpecificationError(f"--out {path} is a folder; --out names the file to write")


def nlme_fit(args: argparse.Namespace) -> int:
    """``latentfit nlme fit``: fit, then write the tables, plots and report."""
    import matplotlib

    matplotlib.use("Agg")
    from latentfit.models.nlme.config import load_config

    cfg = load_config(args.model, backend=args.backend)  # the model that checks the file on the run's backend
    if args.seed is not None:
        cfg.seed = args.seed
    if args.iterations is not None:
        cfg.num_iters = tuple(args.iterations)
    if args.chains is not None:
        cfg.num_chains = args.chains
    if args.replicates is not None:
        cfg.replicates = args.replicates
    _check_iterations(cfg.num_iters)
    with _warnings_to_stderr(args.data) as messages:  # the data's, the fit's and the outputs' warnings: the report's
        _run_fit(cfg, args, messages)
    return 0


def _run_fit(cfg: Any, args: argparse.Namespace, messages: list[str]) -> None:
    from latentfit.models.nlme.config import read_table
    from latentfit.report import run_information, write_fit_outputs

    model = _bound(cfg, read_table(args.data), args.data)
    _prepare_output_folder(Path(args.out), args.force)  # an unusable output directory fails before the fit
    reps = f", {cfg.replicates} replicates" if cfg.replicates > 1 else ""
    print(f"{model!r}\n{cfg.engine.upper()}: K1={cfg.num_iters[0]}, K2={cfg.num_iters[1]}, seed {cfg.seed}, "
          f"backend {cfg.backend}{reps}", file=sys.stderr)
    fit = model.fit(**cfg.fit_options(progress=not args.no_progress and sys.stderr.isatty()))  # no bar in a log
    rep = cfg.report
    extra = {"model file": str(args.model), "data file": str(args.data),
             "command": "latentfit " + " ".join(args.argv), "seed": cfg.seed, "backend": cfg.backend,
             "importance sampling": f"{rep['is_samples']} draws per subject, {rep['is_proposal']} proposal"}
    if cfg.description:
        extra = {"description": cfg.description, **extra}
    info = run_information(fit, **extra)
    paths = write_fit_outputs(fit, args.out, model_text=cfg.text, title=rep["title"], run_info=info,
                              warnings_list=messages, se_method=rep["se_method"],
                              log_y=rep["log_y"], vpc_simulations=rep["vpc_simulations"],
                              max_individual_plots=rep["max_individual_plots"], seed=cfg.seed,
                              is_proposal=rep["is_proposal"], is_samples=rep["is_samples"],
                              status=None if args.no_progress else lambda msg: print(msg, "...", file=sys.stderr))
    est = paths["estimates"]
    import pandas as pd

    print(pd.read_csv(est).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(pd.read_csv(paths["likelihood"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\n{len(paths)} files written to {args.out}/ (report: {paths['report']})")


def _saved_fit(cfg: Any, data: Any, data_path: str, estimates: str) -> Any:
    """The model of ``cfg`` bound to ``data`` with the covariate references of the fit (``covariates.csv``) and its
    ``estimates``."""
    import dataclasses

    from latentfit.models.nlme.config import read_covariate_reference, read_estimates
    from latentfit.report import SavedFit

    cfg = dataclasses.replace(cfg, covariate_reference=read_covariate_reference(estimates, cfg))
    model = _bound(cfg, data, data_path)
    return SavedFit(model, read_estimates(estimates, model))


def nlme_simulate(args: argparse.Namespace) -> int:
    """``latentfit nlme simulate``: replicate data sets of a design at saved estimates (column ``REP``)."""
    import pandas as pd

    from latentfit.models.nlme.config import load_config, prepare_design, read_table

    cfg = load_config(args.model)
    _check_output_file(args.out)
    with _warnings_to_stderr(args.design):
        design = prepare_design(read_table(args.design), cfg.data_options)
        source = args.params or args.from_dir
        if source is None:  # a simulation study: the model file's initial values are the truth
            from latentfit.report import SavedFit

            model = _bound(cfg, design, args.design)
            saved = SavedFit(model, {n: model.ops.to_numpy(v) for n, v in model.init_params().items()})
            print("simulating at the model file's initial values (no --params / --from)", file=sys.stderr)
        else:
            saved = _saved_fit(cfg, design, args.design, source)
        seed = cfg.seed if args.seed is None else args.seed
        sims = []
        for rep in range(args.n_rep):
            sim = saved.model.simulate(saved.params, seed=seed + rep)
            sim.insert(0, "REP", rep + 1)
            sims.append(sim)
    out = pd.concat(sims, ignore_index=True)
    out.to_csv(args.out, index=False, na_rep=".")
    print(f"{args.n_rep} simulated data set(s) of {saved.model.num_units} subjects written to {args.out}",
          file=sys.stderr)
    return 0


def nlme_vpc(args: argparse.Namespace) -> int:
    """``latentfit nlme vpc``: the (prediction-corrected) VPC of saved estimates on a data file."""
    import matplotlib

    matplotlib.use("Agg")
    from latentfit.models.nlme.config import load_config, read_table
    from latentfit.plots import plot_vpc

    cfg = load_config(args.model)
    _check_output_file(args.out)
    with _warnings_to_stderr(args.data):
        saved = _saved_fit(cfg, read_table(args.data), args.data, args.params or args.from_dir)
        rep = cfg.report
        continuous = getattr(saved.model, "outcome", None) is None  # discrete / event data: proportions or KM
        fig = plot_vpc(saved, num_sims=args.num_sims or rep["vpc_simulations"],
                       seed=cfg.seed if args.seed is None else args.seed,
                       log=bool(args.log or rep["log_y"]) and continuous, pred_corrected=False if args.no_pc else None)
    fig.savefig(args.out, dpi=100)
    print(f"VPC written to {args.out}", file=sys.stderr)
    return 0


def _add_nlme(sub: Any) -> None:
    p_nlme = sub.add_parser("nlme", help="nonlinear mixed-effects models from a TOML model file (fit, simulate, vpc)")
    nsub = p_nlme.add_subparsers(dest="nlme_command", required=True)
    p_fit = nsub.add_parser("fit", help="fit MODEL.toml to DATA.csv; write estimates, likelihoods, EBEs, residuals, "
                                        "plots and an HTML report to --out")
    p_fit.add_argument("model", help="model file (TOML; see examples/theophylline.toml)")
    p_fit.add_argument("data", help="data file (CSV, NONMEM-style: ID, TIME, DV, AMT, EVID, MDV, ...)")
    p_fit.add_argument("--out", required=True, help="output directory")
    p_fit.add_argument("--seed", type=int, help="overrides [engine] seed")
    p_fit.add_argument("--iterations", type=int, nargs=2, metavar=("K1", "K2"), help="overrides [engine] iterations")
    p_fit.add_argument("--chains", type=int, help="overrides [engine] chains")
    p_fit.add_argument("--backend", choices=("torch", "jax"), help="overrides [engine] backend")
    p_fit.add_argument("--replicates", type=int, help="overrides [engine] replicates (R fits, the best reported)")
    p_fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_fit.add_argument("--force", action="store_true", help="replace the outputs of an earlier fit in --out")
    p_fit.set_defaults(handler=nlme_fit)

    def estimates(p: argparse.ArgumentParser, required: bool = True) -> None:
        g = p.add_mutually_exclusive_group(required=required)
        g.add_argument("--params", help="estimates file (the estimates.csv of 'latentfit nlme fit')")
        g.add_argument("--from", dest="from_dir", help="output directory of 'latentfit nlme fit'")
        p.add_argument("--seed", type=int, help="simulation seed (default: [engine] seed)")

    p_sim = nsub.add_parser("simulate", help="simulate data sets of a design at estimated parameters (--params, "
                                             "--from) or at the model file's initial values")
    p_sim.add_argument("model", help="model file (TOML)")
    estimates(p_sim, required=False)  # neither: the model file's initial values
    p_sim.add_argument("--design", required=True, help="design (CSV, the data file's format; DV may be empty)")
    p_sim.add_argument("--out", required=True, help="CSV file of the simulated data (column REP: replicate)")
    p_sim.add_argument("--n-rep", type=int, default=1, help="number of simulated data sets (default 1)")
    p_sim.set_defaults(handler=nlme_simulate)
    p_vpc = nsub.add_parser("vpc", help="visual predictive check of estimated parameters on a data file")
    p_vpc.add_argument("model", help="model file (TOML)")
    p_vpc.add_argument("data", help="data file (CSV)")
    estimates(p_vpc)
    p_vpc.add_argument("--out", required=True, help="PNG file")
    p_vpc.add_argument("--num-sims", type=int, help="simulated data sets (default: [report] vpc_simulations)")
    p_vpc.add_argument("--log", action="store_true", help="logarithmic y-axis")
    p_vpc.add_argument("--no-pc", action="store_true", help="plain VPC (no prediction correction)")
    p_vpc.set_defaults(handler=nlme_vpc)


def main(argv: list[str] | None = None) -> int:
    from latentfit.inference.model import DataError, ModelSpecificationError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="latentfit", description="latentfit command line")
    sub = parser.add_subparsers(dest="command")
    p_demo = sub.add_parser("demo", help="fit the theophylline PK model by SAEM and compare with saemix")
    p_demo.add_argument("--out", default="theophylline_convergence.png", help="PNG file for the convergence plot")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--no-progress", action="store_true")
    _add_nlme(sub)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "demo":
        demo(out=args.out, seed=args.seed, progress=not args.no_progress)
        return 0
    if args.command == "nlme":
        try:
            for name in ("n_rep", "num_sims", "chains", "replicates"):
                value = getattr(args, name, None)
                if value is not None and value < 1:
                    raise ModelSpecificationError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            its = getattr(args, "iterations", None)
            if its is not None and (its[0] < 1 or its[1] < 0):
                raise ModelSpecificationError(f"--iterations K1 K2 needs K1 >= 1 and K2 >= 0, got {its[0]} {its[1]}")
            return args.handler(args)
        except (ModelSpecificationError, DataError, OSError) as err:
            kind = "data error" if isinstance(err, DataError) else "error"
            text = str(err)
            if isinstance(err, OSError) and err.strerror:  # "[Errno 17] File exists: 'x'" -> "x: file exists"
                text = f"{err.filename}: {err.strerror.lower()}" if err.filename else err.strerror
            print(f"latentfit nlme {args.nlme_command}: {kind}: {' '.join(text.split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"latentfit nlme {args.nlme_command}: interrupted", file=sys.stderr)
            return 130
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
