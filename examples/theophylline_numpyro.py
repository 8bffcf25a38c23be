"""Theophylline PK fitted by SAEM, the model written as a plain NumPyro model
(see ``latentfit/examples/theophylline_numpyro.py``); the twin of ``examples/theophylline.py``.

    python examples/theophylline_numpyro.py
"""

from __future__ import annotations

import numpy as np
import numpyro

from latentfit.examples.theophylline_numpyro import fit, one_compartment_oral, theophylline_arrays, theophylline_model

__all__ = ["fit", "one_compartment_oral", "theophylline_arrays", "theophylline_model"]

if __name__ == "__main__":
    numpyro.enable_x64()  # float64, as the Pyro example; float32 (NumPyro's default) lands in the same band
    result = fit()
    print(result.summary())
    ka, v, cl = np.exp(result.params["mu"])
    print(f"ka={ka:.3f}  V={v:.2f}  CL={cl:.3f}  omega^2={np.round(result.params['omega'] ** 2, 4)}  "
          f"a={result.params['a']:.3f}")
    ops = result.model.ops
    per_iter = (result.elapsed - result.init_time - ops.compile_time) / result.num_iterations
    print(f"SAEM time: {result.elapsed:.2f} s (compile {ops.compile_time:.2f} s, {1000 * per_iter:.2f} ms/iteration)")
