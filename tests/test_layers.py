"""The layers point downwards (DESIGN.md): ``inference/`` imports nothing from the layers above it, ``models/`` no
engine, no PPL adapter and no plot; the conveniences users reach through lower-layer objects (``fit.plot_*()``,
``fit.to_arviz()``, ``model.fit(df)``, ``model.pyro_model``) go through hooks bound at the top
(:mod:`latentfit._hooks`).  The imports are read from the syntax tree (function-level and relative imports included),
so a lazy import inside a method is caught as well as one at the top."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import latentfit
from latentfit import _hooks
from latentfit.inference import postfit
from latentfit.inference.results import HOOKS, FitResult

ROOT = pathlib.Path(latentfit.__file__).resolve().parent

#: what no module of a layer may import (module names and their submodules)
ABOVE_INFERENCE = ("latentfit.plots", "latentfit.integrations", "latentfit.models", "latentfit.pyro",
                   "latentfit.numpyro", "latentfit.cli", "latentfit.report", "latentfit.examples", "arviz",
                   "matplotlib", "pyro", "numpyro")
ABOVE_MODELS = ("latentfit.plots", "latentfit.integrations", "latentfit.pyro", "latentfit.numpyro", "latentfit.cli",
                "latentfit.report", "latentfit.examples", "arviz", "matplotlib", "pyro", "numpyro")
#: the parts of ``inference/`` a model family may use: the model contract, the backend shim, unit blocks and the
#: likelihood toolkit; never an engine (saem, em, driver, ...)
INFERENCE_FOR_MODELS = ("latentfit.inference.model", "latentfit.inference.ops", "latentfit.inference.units",
                        "latentfit.inference.likelihood")


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file (``from a import b`` gives ``a`` and ``a.b``; relative imports
    resolved), and of every dynamic import (``importlib.import_module`` / ``__import__``, as ``<dynamic>``)."""
    package = list(path.relative_to(ROOT.parent).with_suffix("").parts)[:-1]  # the package holding the file
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, "<dynamic>"))
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(folder: str, forbidden: tuple[str, ...], allowed_inference: tuple[str, ...] | None = None) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, mod in imported_modules(path):
            bad = mod == "<dynamic>" or _within(mod, forbidden)
            if allowed_inference is not None and _within(mod, ("latentfit.inference",)):
                bad = bad or not _within(mod, allowed_inference)
            if bad:
                out.append(f"{path.relative_to(ROOT)}:{line}: {mod}")
    return out


def test_the_scan_sees_lazy_relative_and_dynamic_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "latentfit" / "inference"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..plots import plot_gof\n    import importlib\n"
                              "    importlib.import_module('latentfit.models')\nfrom . import saem\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "latentfit")
    assert [m for _, m in imported_modules(pkg / "x.py")] == [
        "latentfit.inference", "latentfit.inference.saem", "latentfit.plots", "latentfit.plots.plot_gof", "importlib",
        "<dynamic>"]


def test_inference_imports_nothing_from_above():
    """No engine, record or post-fit module imports plots, arviz, matplotlib, a PPL adapter or a model family."""
    bad = offenders("inference", ABOVE_INFERENCE)
    assert not bad, "inference/ imports from a layer above it:\n" + "\n".join(bad)


def test_models_import_no_engine_and_nothing_from_above():
    """Model families use the model contract, the shim, unit blocks and the likelihood toolkit of ``inference/``,
    never an engine, and reach the integrations layer only through hooks."""
    bad = offenders("models", ABOVE_MODELS, INFERENCE_FOR_MODELS)
    assert not bad, "models/ imports an engine or a layer above it:\n" + "\n".join(bad)


def test_every_hook_is_bound_to_an_existing_callable_or_module():
    bound = _hooks.bound()
    assert set(HOOKS) | {"fit_nlme", "families", "glmm_families", "ode_solvers", "vfg"} <= set(bound)
    for name in HOOKS + ("fit_nlme",):
        assert callable(_hooks._resolve(name)), name
    with pytest.raises(LookupError, match="no implementation"):
        _hooks.call("no_such_hook")


def test_post_fit_methods_are_the_postfit_functions():
    """The record offers the post-fit functions themselves (one signature, one docstring)."""
    for name in ("log_likelihood", "standard_errors", "covariance", "summary", "individual_estimates",
                 "individual_parameters", "likelihood_table", "residuals", "vpc", "conditional_moments"):
        assert getattr(FitResult, name) is getattr(postfit, name), name


def test_importing_latentfit_loads_no_plotting_arviz_or_ppl():
    code = ("import sys, latentfit, latentfit.models.nlme, latentfit.inference.results\n"
            "print(sorted(m for m in ('matplotlib', 'arviz', 'torch', 'jax', 'pyro', 'numpyro') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
