"""The state of a reconstruction: what every stage reads and changes, in one object.

Stages are functions ``stage(state, ...)``; nothing is shared through closures. A checkpoint is
the state's own ``snapshot()`` (plain CPU tensors and Python values) and ``restore()`` (back onto
the device), so a new piece of loop state is one more field here and one more entry in each of
the two.
"""

from __future__ import annotations

__all__ = ["ReconState", "Level"]

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..field import GaussianField
from ..io import Stack
from .config import ReconConfig
from .data import SliceSet
from .nrf import NeuralResidualField
from .progress import Progress

# the motion entries whose values are lists of per-stack tensors (moved between devices)
_TENSOR_LISTS = ("scs", "sws", "pws")


@dataclass
class ReconState:
    """One reconstruction in progress. Shapes: per stack ``K`` slices of ``h x w`` pixels."""

    cfg: ReconConfig
    dev: torch.device
    backend: str
    log: Callable[[str], None]
    t_start: float  # wall time of the start (moved back on resume by the time fitted before)
    # ---- inputs
    given: list[Stack]  # the stacks with their masks as given
    stacks: list[Stack]  # the same with the masks grown by the rim of data around them
    stack_poses: list[np.ndarray]  # each stack's registered rigid pose [4,4]
    sets: list[SliceSet]  # the slices of each stack (masked, cropped, normalised)
    cents: list[torch.Tensor]  # [K,3] each slice's centre, the pivot of its pose
    noise_sigma: float  # the slices' noise (Immerkaer), sets the smoothness prior
    n_pix: int  # masked pixels over all slices
    # ---- output grid and region
    shape: tuple[int, int, int]
    aff: np.ndarray  # [4,4] voxel -> world of the output grid
    region0: np.ndarray  # bool [shape]: the region from the stacks' poses
    region: np.ndarray  # bool [shape]: the current region (rebuilt from the slices' poses)
    init: np.ndarray  # naive average on the grid: the first level's intensities
    scale: float  # output = model value x scale
    centre: torch.Tensor  # [3] centre of the region's box (the outputs' pose centre)
    wlo: np.ndarray  # [3] the region's box in world mm
    whi: np.ndarray
    # ---- slice poses (rotation vector and displacement of the centre, per stack [K,3])
    rots: list[torch.Tensor]
    trans: list[torch.Tensor]
    start_poses: list[tuple[torch.Tensor, torch.Tensor]]  # where the headers put the slices
    # ---- robust weights
    scs: list[torch.Tensor]  # [K] per-slice intensity scales
    sws: list[torch.Tensor]  # [K] slice weights
    pws: list[torch.Tensor]  # [K,h,w] pixel weights
    wts: list[torch.Tensor]  # [K,h,w] loss weights: mask x pixel x slice weight
    motion: bool  # slice motion is being corrected
    # ---- the frame (see .frame)
    anchor: tuple[np.ndarray, np.ndarray]  # the slices' mean (rotation vector, displacement) held fixed
    anchor_pivot: np.ndarray | None  # set in the headers' frame: the poses' centre about it is held
    fov_pivot: np.ndarray  # the stacks' field-of-view centre (the headers' frame pivot)
    anchor_reliable: np.ndarray  # bool over all slices: those whose translations place the frame
    # ---- the fit
    rng: np.random.Generator  # the batches' order
    fld: GaussianField | None = None
    params: dict | None = None  # the level's leaf tensors (means, log_scales, quats, intensities)
    opt: torch.optim.Optimizer | None = None
    nrf: NeuralResidualField | None = None
    nrf_opt: torch.optim.Optimizer | None = None
    step: int = 0
    order: list = field(default_factory=list)  # the rest of the current epoch of slices
    history: list[dict] = field(default_factory=list)
    pose_history: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    region_cache: dict = field(default_factory=dict)
    progress: Progress | None = None
    total_steps: int = 0
    budget_cuts: list[str] = field(default_factory=list)  # where the time budget cut the fit short
    stack_fields: dict | None = None  # each stack's intensity field divided out (recon/bias.py)
    prior_choice: dict | None = None  # the last level's prior factor chosen by held-out slices (recon/prior_choice.py)

    def note_budget(self, where: str) -> None:
        """Record (and log, once per place) that the time budget cut ``where`` short: the result then
        depends on the machine's speed and load."""
        if where not in self.budget_cuts:
            self.budget_cuts.append(where)
            self.log(f"  time budget of {self.cfg.time_budget_s:g} s: {where} cut short")

    def add_time(self, key: str, t0: float) -> None:
        """Add the seconds since ``t0`` to the stage timing ``key``."""
        self.timings[key] = self.timings.get(key, 0.0) + time.time() - t0

    @property
    def multi(self) -> bool:
        return len(self.sets) > 1

    @property
    def half_extent(self) -> float:
        return float(np.max(self.whi - self.wlo) / 2)

    def make_nrf(self) -> NeuralResidualField:
        c = self.cfg
        return NeuralResidualField(self.wlo - 5, self.whi + 5, c.nrf_bands, c.nrf_width, c.nrf_depth, c.nrf_scale).to(
            self.dev
        )

    def elapsed(self) -> float:
        return time.time() - self.t_start

    def snapshot(self, level: int, iteration: int, cg_done: bool = True, done: bool = False) -> dict:
        """The loop state at an iteration boundary (``iteration`` = the next one to run in ``level``;
        ``level`` = number of levels when fitting is done), as CPU tensors and plain Python values."""
        fld, params = self.fld, self.params
        motion_state = {
            "scs": self.scs,
            "sws": self.sws,
            "pws": self.pws,
            "pose_history": self.pose_history,
            "stack_poses": [P.tolist() for P in self.stack_poses],
            "anchor": [np.asarray(a).tolist() for a in self.anchor],
            "anchor_pivot": None if self.anchor_pivot is None else np.asarray(self.anchor_pivot).tolist(),
            "stack_fields": self.stack_fields,  # recon/bias.py: divided out of the slices again on resume
            "prior_choice": self.prior_choice,  # recon/prior_choice.py: the last level's weight
        }
        return {
            "level": level,
            "iteration": iteration,
            "cg_done": cg_done,
            "done": done,
            "step": self.step,
            "elapsed_s": self.elapsed(),
            "history": list(self.history),
            "field": {
                **{k: v.detach().cpu().clone() for k, v in params.items()},
                "spacing": fld.spacing,
                "grid_origin": np.asarray(fld.grid_origin),
                "grid_index": fld.grid_index,
                "grid_shape": fld.grid_shape,
            },
            "opt": self.opt.state_dict() if self.opt is not None else None,  # Adam moments and step counts
            "nrf": {k: v.detach().cpu().clone() for k, v in self.nrf.state_dict().items()}
            if self.nrf is not None
            else None,
            "nrf_opt": self.nrf_opt.state_dict() if self.nrf_opt is not None else None,
            "rng": self.rng.bit_generator.state,
            "order": list(self.order),  # batch order: RNG + the rest of the epoch
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rots": [r.detach().cpu().clone() for r in self.rots],
            "trans": [t.detach().cpu().clone() for t in self.trans],
            # stack poses, slice scales / weights, pixel weights, pose history
            "motion": {
                k: ([x.detach().cpu().clone() for x in v] if k in _TENSOR_LISTS else v) for k, v in motion_state.items()
            },
        }

    def restore(self, st: dict) -> None:
        """Continue from a ``snapshot``: the field, NRF, poses, weights, frame, RNGs, batch order,
        history and the time already spent (the caller builds the level's Adam from ``st["opt"]``)."""
        dev = self.dev
        f = st["field"]
        self.fld = GaussianField(
            *(f[k].to(dev) for k in ("means", "log_scales", "quats", "intensities")),
            f["spacing"],
            np.asarray(f["grid_origin"]),
            f["grid_index"],
            f["grid_shape"],
        )
        self.nrf = self.nrf_opt = None
        if st["nrf"] is not None:
            self.nrf = self.make_nrf()
            self.nrf.load_state_dict(st["nrf"])
            self.nrf_opt = torch.optim.Adam(self.nrf.parameters(), lr=1.0)  # lr comes back with the state
            self.nrf_opt.load_state_dict(st["nrf_opt"])
        torch.set_rng_state(st["torch_rng"])
        if st.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.order = [tuple(x) for x in st["order"]]
        self.step, self.history = int(st["step"]), list(st["history"])
        self.rots, self.trans = [r.to(dev) for r in st["rots"]], [t.to(dev) for t in st["trans"]]
        motion = {k: ([x.to(dev) for x in v] if k in _TENSOR_LISTS else v) for k, v in st.get("motion", {}).items()}
        if motion:
            self.scs, self.sws, self.pws = motion["scs"], motion["sws"], motion["pws"]
            self.pose_history[:] = motion["pose_history"]
            if motion.get("anchor") is not None:
                self.anchor = tuple(np.asarray(a, dtype=np.float64) for a in motion["anchor"])
            if motion.get("anchor_pivot") is not None:
                self.anchor_pivot = np.asarray(motion["anchor_pivot"], dtype=np.float64)
            self.prior_choice = motion.get("prior_choice")
            if motion.get("stack_fields") is not None and self.stack_fields is None:
                from .bias import apply_stack_fields

                self.stack_fields = motion["stack_fields"]
                apply_stack_fields(self, self.stack_fields)
            from .motion.robust import loss_weights

            self.wts = loss_weights(self.sets, self.pws, self.sws)
        self.rng.bit_generator.state = st["rng"]
        self.t_start = time.time() - float(st["elapsed_s"])  # the time budget counts the time before the kill


def noisy_slices(state) -> bool:
    """Whether the slices' estimated noise is above ``adam_max_noise``: then no Adam follows the
    warm starts, the last level's prior is edge-preserving and the fits take ``noisy_cg_iterations``."""
    return state.noise_sigma > state.cfg.adam_max_noise


@dataclass
class Level:
    """One level of the progressive growth: its grid, its slices and its prior."""

    index: int
    count: int  # number of levels
    spacing: float  # mm between the Gaussians
    iterations: int  # Adam iterations after the warm start
    lsets: list[SliceSet]  # the slices its warm start and pose rounds see (binned at the coarse level)
    lwts: list[torch.Tensor]  # their loss weights
    smooth: float  # the lattice prior's weight
    pairs: torch.Tensor | None  # lattice neighbour pairs (None without a prior)
    deadline: float | None  # wall time where its warm start and rounds stop (only with a time budget)
    resumed: bool  # this level continues a checkpoint
    edge_w: torch.Tensor | None = None  # the edge-preserving prior's pair weights, once reweighted
    dcache: dict = field(default_factory=dict)  # the intensity fits' designs while the poses stay

    @property
    def last(self) -> bool:
        return self.index == self.count - 1
