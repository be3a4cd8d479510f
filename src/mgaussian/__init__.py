"""mgaussian: slice-to-volume MRI reconstruction with magnetic 3D Gaussians."""

__version__ = "0.1.0"

__all__ = ["__version__"]
