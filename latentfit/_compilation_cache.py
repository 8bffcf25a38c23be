"""Opt-in persistent compilation cache for the JAX (NumPyro) engines.

A NumPyro fit compiles its iteration chunks with XLA (seconds for a plain model).  JAX can keep compiled
programs on disk and reuse them in a later process when the program is the same (same model, data shapes,
options): a user re-running a script then skips compilation.  It is off by default (JAX's own default);
turn it on with :func:`enable_compilation_cache` or the environment variable ``LATENTFIT_COMPILATION_CACHE``
(a directory), read when :mod:`latentfit.numpyro` or the JAX backend (:mod:`latentfit.inference.ops_jax`: an NLME
model on ``backend="jax"``, the command line's ``--backend jax``) is first imported, unless a cache folder is already
set (one the user chose with :func:`enable_compilation_cache` before importing latentfit is kept).  With it on,
latentfit also keeps the traced programs in ``<directory>/latentfit-traces`` (:mod:`latentfit.inference.ops_jax_store`),
so a rerun neither traces nor lowers them, and the NumPyro adapter's analysis of each model, so a rerun runs the model
once (``ops_jax_store.ENABLED = False`` turns that part off).
"""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable naming the cache directory
ENV_VAR = "LATENTFIT_COMPILATION_CACHE"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/latentfit/jax`` (``~/.cache/latentfit/jax``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "latentfit" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None, min_compile_time_secs: float = 0.0) -> Path:
    """Keep JAX's compiled programs in ``path`` (default :func:`default_cache_dir`) and reuse them across processes.

    ``min_compile_time_secs``: programs that compile faster than this are not stored (JAX's own threshold is 1 s;
    0 stores every program).  Returns the directory.  Equivalent to setting JAX's ``jax_compilation_cache_dir``;
    it affects every JAX computation of the process, not only latentfit's.
    """
    import jax

    directory = Path(path) if path is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def enable_from_environment() -> Path | None:
    """:func:`enable_compilation_cache` at ``$LATENTFIT_COMPILATION_CACHE`` when that variable is set and no cache
    folder is set yet: a folder the user chose first (:func:`enable_compilation_cache`, JAX's
    ``jax_compilation_cache_dir``) is kept, whichever of latentfit's modules is imported after."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:
        return None
    return enable_compilation_cache(path)


__all__ = ["ENV_VAR", "default_cache_dir", "enable_compilation_cache", "enable_from_environment"]
