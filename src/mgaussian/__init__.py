"""mgaussian: slice-to-volume MRI reconstruction with magnetic 3D Gaussians."""

import os as _os

# Numba's OpenMP threading layer and PyTorch's OpenMP runtime spin-wait against each other on a
# small machine: measured on 2 cores, a 20 ms PyTorch op took 300 ms right after a Numba kernel.
# Numba's own "workqueue" layer does not spin. Set before Numba is first imported (a user's own
# NUMBA_THREADING_LAYER wins).
_os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

__version__ = "0.1.0"

__all__ = ["__version__"]
