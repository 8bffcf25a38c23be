"""Theophylline PK fitted by SAEM: the model is a plain Pyro model (see ``latentfit/examples/theophylline.py``).

    python examples/theophylline.py
"""

from __future__ import annotations

import numpy as np

from latentfit.examples.theophylline import fit, one_compartment_oral, theophylline_arrays, theophylline_model

__all__ = ["fit", "one_compartment_oral", "theophylline_arrays", "theophylline_model"]

if __name__ == "__main__":
    result = fit()
    print(result.summary())
    ka, v, cl = np.exp(result.params["mu"])
    print(f"ka={ka:.3f}  V={v:.2f}  CL={cl:.3f}  omega^2={np.round(result.params['omega'] ** 2, 4)}  "
          f"a={result.params['a']:.3f}")
    print(f"SAEM time: {result.elapsed:.2f} s ({1000 * result.time_per_iteration:.1f} ms/iteration)")
