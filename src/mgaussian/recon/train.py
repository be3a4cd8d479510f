"""Where ``reconstruct`` used to live: kept so that ``from mgaussian.recon.train import
reconstruct`` (and ``render_volume``, ``ReconResult``) go on working. The reconstruction is now a
driver (:mod:`.pipeline`) over stage modules; see ``docs/architecture.md``."""

from __future__ import annotations

from .output import ReconResult, render_volume
from .pipeline import reconstruct

__all__ = ["ReconResult", "reconstruct", "render_volume"]
