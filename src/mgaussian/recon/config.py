"""Reconstruction settings: one frozen dataclass whose defaults are the seed's (M-Gaussian),
except where benchmarks/ records measured evidence for another value.

The resolved configuration is saved beside every output volume, so a run can be repeated.
"""

from __future__ import annotations

__all__ = ["ReconConfig", "load_config_file", "config_from_dict"]

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class ReconConfig:
    # output
    output_resolution: float | None = None  # mm; default: finest in-plane spacing of the inputs
    # The volume is written on a grid this many times finer than output_resolution (the Gaussians'
    # finest spacing), nested in it: every k-th voxel is a voxel of the output_resolution grid.
    # The model is continuous; sampled only at its lattice spacing, the linear interpolation that
    # viewers, registrations and BENCHMARK.md's scoring apply between voxels blurs it. Aligned PSNR
    # of the same fitted models written at 1 / 2 / 3 (benchmarks/TUNING.md, session 19): four 4 mm
    # stacks (1.2 mm) 26.34 / 27.00 / 27.11 dB, six stacks (1.0 mm) 30.52 / 31.77 / 31.94, three
    # stacks with drift and jumps 29.04 / 29.72 / 29.80; sb25-t3.2 and mni-t4, whose grids hold the
    # ground truth's voxels, are unchanged at 2 (a non-nested 1.5 cost sb25 1.0 dB). None: 2, or 1
    # where the finer grid would pass OVERSAMPLED_MAX_VOXELS (mni-t4, an adult brain at 1 mm: 40M
    # voxels at 2, 160 MB, its render 3 -> 15 s); 1 writes the lattice's grid as before.
    output_oversampling: int | None = None
    # Gaussian grid and progressive growth
    spacing_factors: tuple[float, ...] = (2.0, 1.0)  # Gaussian grid spacing per level, x output resolution
    growth: bool = True  # progressive growth (False: train the finest level only)
    scale_factor: float = 0.7  # initial sigma / grid spacing (0.6 -> 0.7: +0.6 dB on sb25, TUNING.md)
    dilate_mm: float | None = None  # grid kept within this distance of the mask (default 2 x spacing)
    # optimisation schedule: iterations per level and slices per iteration
    # Adam iterations per level (after the warm start). 60 -> 20 (issue 17): clean sb25-t3.2, fixed
    # schedule, 2 cores: 0 / 20 / 40 / 60 iterations 38.06 / 38.35 / 38.40 / 38.40 dB, each iteration
    # ~0.7-1.4 s (the backward pass of the renderer); the last 40 bought 0.05 dB for 2/3 of the time
    # (batch 32 is no cheaper per dB: 60 x 32 38.38 dB in the time of 35 x 64; benchmarks/SPEED.md)
    iterations: tuple[int, ...] = (0, 20)
    batch_slices: int = 64  # slices rendered per iteration (all stacks together)
    cg_iterations: int = 30  # conjugate-gradient warm start of the intensities at each level (0: off)
    # the same on noisy data (slices' noise above adam_max_noise; None: cg_iterations). With the
    # preconditioner below, the early stop regularises noisy fits: 18 / 24 / 30 / 45 iterations,
    # sb25-t3.2-motion 30.888 / 30.857 / 30.833 / 30.794 dB, sb25 + 2 % noise 32.369 / 32.290 /
    # 32.243 / 32.187, four 4 mm stacks 26.415 / 26.402 / 26.399 / 26.377, three with drift and jumps
    # 28.981 / 29.011 / 28.978 / 28.928; real leave-one-out NCC at 18 unchanged (0.696 / 0.862 /
    # 0.851), each run ~7 % faster. Clean data want more (sb25-t3.2 warm start: 20 / 30 / 45
    # iterations 38.10 / 38.47 / 38.55 dB): benchmarks/TUNING.md session 16
    noisy_cg_iterations: int | None = 18
    # the last level's warm start on clean data, where it grows from a coarser level (None:
    # cg_iterations), and its robust re-fit a third of it. The fine fit starts from the coarse one grown and the Adam iterations follow it;
    # its late iterations fit what the Gaussians cannot represent. Whole runs, defaults otherwise
    # (benchmarks/TUNING.md session 26), mni-t4 / sb25-t3.2 dB: fine 30 + re-fit 10 (as before)
    # 34.502 / 38.698; 24 + 10 34.507 / 38.718; 24 + 8 34.518 / 38.703; 20 + 10 34.509 / 38.719;
    # 20 + 8 34.513 / 38.694; every level at 24 (re-fits 8) 34.520 / 38.627; the coarse level at
    # 24 alone 34.501. mni-t4 ~5 s faster at 24 + 8
    fine_cg_iterations: int | None = 24
    # the intensity fits' conjugate gradients preconditioned by the normal matrix's exact diagonal
    # ("jacobi"; "none": plain CG, as before 2026-12-05). The same solution in fewer iterations: the
    # Gaussians' data terms differ widely (the rim's Gaussians, those few slices reach), and plain
    # CG was still far from it after 30 (a test phantom: 28 % away after 20 iterations, 13 % with
    # it). At the same 30 iterations, defaults otherwise (benchmarks/TUNING.md session 16): sb25-t3.2
    # 38.40 -> 38.70 dB, mni-t4 34.21 -> 34.49, sb25-t3.2-motion 30.77 -> 30.83, clinical-style cases
    # +0.12 to +0.20, real leave-one-out unchanged; the diagonal costs half an iteration per fit
    cg_preconditioner: str = "jacobi"
    # lattice-gradient prior lambda/2 sum (c_i - c_j)^2 over neighbouring Gaussians, in the warm start
    # and (divided by the pixel count) in the Adam loss. None: from the data's noise (levels.
    # smoothness_weight): lambda = smoothness_gain x sigma^2 x (1 mm / s)^2 x (s_level / s)^3, s the
    # finest level's spacing in mm, sigma by Immerkaer's estimator on the slices. lambda ~ sigma^2 /
    # (the anatomy's neighbour differences, ~ s^2): it does not grow with the amount of data (the
    # rule before, x masked pixels / Gaussians, gave six stacks twice the prior of three). 450 is
    # the old rule's weight on sb25 + 2 % noise at 0.8 mm, where 1100 of the old gain was best
    # (23.0 -> 31.5 dB; x0.5 / x2: -0.2 / -0.4 dB); on six clinical-style stacks at 1 mm the old rule
    # was 4x too strong (29.12 dB; 1/4 of it: 30.20) and on four 4 mm stacks 2-4x (26.41; 27.15):
    # benchmarks/TUNING.md, session 13
    cg_smoothness: float | None = None
    smoothness_gain: float = 450.0
    # the prior's form. "curvature" (default): lambda x curvature_scale x (1 mm / s)^2 / 2 x |L c|^2,
    # L the lattice graph Laplacian of the coefficients (edge-weighted where the prior is
    # edge-preserving), s the finest spacing (L grows as s^2); "gradient": lambda / 2 x sum (c_i -
    # c_j)^2 over neighbours (the default before 2026-12-06). The pose rounds' weak prior keeps the
    # gradient form (levels.refit). The gradient prior's penalty grows as the squared frequency: the
    # weight that holds the noise back in the finest detail also flattens the brain's 2-5 mm
    # structure (a mild unsharp mask on its volumes gained 0.3-0.9 dB on every clinical-style case);
    # the curvature's grows as the fourth power. Session 31 (benchmarks/TUNING.md), aligned PSNR,
    # gradient -> curvature: four 4 mm stacks (1.2 mm) seeds 12 / 13 / 14 / 15 27.32 / 26.80 / 26.97 /
    # 26.72 -> 27.69 / 27.10 / 27.11 / 26.87; three / six / nine stacks 29.69 / 31.85 / 31.50 ->
    # 30.01 / 32.19 / 31.87; sb25-t3.2-motion seeds 1-3 30.90 / 31.49 / 30.97 -> 31.07 / 31.75 /
    # 31.17. curvature_scale (the weight relative to lambda at s = 1 mm): sb25-t3.2-motion (s 0.8)
    # at 0.16 / 0.32 / 0.64 / 0.7 of it 30.65 / 31.34 / 31.79 / 31.79 dB (seed 2); the 4 mm stacks
    # (s 1.2) at 0.36 / 0.72 / 1.44 26.98 / 27.05 / 26.80 (seed 13); both with the pose rounds'
    # prior in the curvature form too
    smoothness_prior: str = "curvature"
    curvature_scale: float = 0.7
    # on noisy data the last level's weight is the rule's times a factor (1, 1/sqrt 2, ... 0.35)
    # chosen by how well its fit predicts every prior_holdout-th slice of each stack held out
    # (recon/prior_choice.py; 0: the rule's weight). Session 27 (benchmarks/TUNING.md), aligned PSNR:
    # four noisy 4 mm stacks on the 21 / 33-week brains 26.85 -> 27.03 (x0.71), 27.04 -> 27.28 (x0.5);
    # the 2 % cases kept x1 but one (+0.03 dB); each factor tried costs a warm start of the last level
    prior_holdout: int = 5
    # Adam refinement only where the slices' estimated noise sigma is below this (fraction of the
    # 99th percentile): on noisy data it fits the noise (sb25, 2 % noise: 31.5 dB after the warm
    # start, 25.0 dB after Adam; clean data gain +0.4 dB); above it each level ends after the warm start
    adam_max_noise: float = 0.005
    # wall-clock budget (s) for fitting, or None (the default): the fixed schedule above ends the fit,
    # so the same inputs and settings give the same volume whatever the machine's load (issue 17).
    # With a budget the last level's warm start stops at 60 % of it and Adam at 100 % (the volume is
    # still rendered and written after it), and the result depends on the machine's speed and load:
    # the log, OUT.config.json (time_budget_cut) and the report say where it cut the fit short
    time_budget_s: float | None = None
    # learning rates (Adam). The seed's are in a canonical [-1, 1] box: lr_means is in those units
    # and is multiplied by the half-extent of the region in mm. Seed: means 1e-3, intensities 5e-2,
    # scales 5e-3, quats 1e-3, NRF 1e-4. After the least-squares warm start the seed's rates
    # undo it (sb25-t3.2: 36.9 dB -> 30.5 dB); 10-25x lower rates refine it (-> 37.1 dB);
    # see benchmarks/RECONSTRUCT.md.
    # the Gaussians' parameters Adam updates (of "means", "intensities", "log_scales", "quats").
    # After the least-squares warm start the intensities are at the data term's optimum for the
    # Gaussians' shapes; the centres are what it cannot fit. 20 iterations from one warm start
    # (benchmarks/SPEED.md session 20): mni-t4 all four 34.485 dB, centres only 34.502, intensities
    # only 34.404, scales and rotations only 34.368 (warm start 34.359); sb25-t3.2 all 38.704,
    # centres only 38.697. Noisy data have no Adam iterations (adam_max_noise).
    adam_parameters: tuple[str, ...] = ("means",)
    lr_means: float = 1e-4
    lr_intensities: float = 2e-3
    lr_scales: float = 5e-4
    lr_quats: float = 1e-4
    lr_nrf: float = 1e-3
    # Adam's first steps are as large in every direction (its moments start empty); after a
    # least-squares warm start they threw the fit off (clean mni-t4: loss x10 over 4 iterations),
    # so the rates ramp up linearly over this many iterations (0: off)
    lr_warmup: int = 10
    lr_decay: float = 0.1  # learning rates decay exponentially to this fraction over each level
    # loss
    ssim_weight: float = 0.5
    use_ssim: bool = True
    smooth_l1_beta: float = 1.0
    anisotropy_weight: float = 0.1
    use_anisotropy: bool = True
    anisotropy_max_ratio: float = 1.5
    # every stack mask is grown in plane by this much before fitting (after the stack registration,
    # which uses the masks as given) where the data go on beyond it (not for masked or skull-
    # stripped stacks: data.grow_masks): the reconstruction covers the brain and a rim of the data
    # around it, fitted to its pixels. A brain mask ends where the signal does not, and a region cut
    # at the masks' edge predicted a held-out real stack's edge as 0 (benchmarks/MOTION.md session 10)
    mask_rim_mm: float = 2.0
    # a stack gets the rim only where the band 1.5-2.5 x mask_rim_mm outside its mask holds a median
    # of at least this fraction of the median inside (data.grow_masks; real fetal runs 0.72-0.92,
    # masked simulations 0.00-0.04); 0 grows every mask. Session 33 (benchmarks/TUNING.md) forced
    # it on masked simulations: a one-pixel rim (mask_rim_mm 1.0 at 1.2 mm pixels) gained 0.1-0.6 dB
    # on the four-stack clinical-style cases (H2 seeds 12 / 15 27.69 / 26.87 -> 27.91 / 27.36, on
    # the 23-week brain 26.72 -> 27.35; six stacks 32.19 -> 32.34), but the confidence map ranked the
    # smaller errors 0.01-0.04 worse (H2 seed 15 0.325 -> 0.294), so it stays at 0.2
    mask_rim_min_signal: float = 0.2
    # physics
    use_psf: bool = True  # exact analytic slice PSF (False: the seed's point evaluation)
    inplane_fwhm_factor: float = 1.2
    # Gaussian PSF FWHM = this x slice thickness. None: chosen from the data among
    # profile_candidates by the residual of a least-squares fit on the coarse grid (1.0 fits a
    # Gaussian slice profile, 0.8 a rectangular one; benchmarks/TUNING.md)
    through_plane_fwhm_factor: float | None = None
    profile_candidates: tuple[float, ...] = (1.0, 0.8)
    # another candidate replaces the first only when its residual above the noise floor is this
    # fraction smaller: misfit the profile cannot explain (motion left over, bias fields) favours
    # the narrower profile by a few per cent whatever the data. Real MIALSRTK stacks: 0.96-0.98 of
    # the first, and 1.0 predicts the held-out run better (NCC run5 0.802 -> 0.814, run3 0.838 ->
    # 0.845); box-profile sb25 with motion: 0.56, clean: 0.42 (benchmarks/MOTION.md, session 5)
    profile_margin: float = 0.15
    cutoff: float = 4.0  # Mahalanobis cut-off of a (pixel, Gaussian) term (3 -> 4: +0.5 dB, TUNING.md)
    renderer: str = "slices"  # "slices" (tile renderer) or "points" (the seed's block query)
    block_radius: int = 5  # for renderer="points"
    # neural residual field
    use_nrf: bool = (
        False  # off by default: +0.0 dB on sb25-t3.2 at 5x the time (benchmarks/TUNING.md); --nrf turns it on
    )
    nrf_start: float = 0.5  # fraction of the last level's iterations after which the NRF trains
    nrf_bands: int = 6
    nrf_width: int = 64
    nrf_depth: int = 4
    nrf_scale: float = 0.1
    # inputs without user help (mgaussian.masking): without --stack-masks, an automatic mask per
    # stack (the stacks' common field of view, Otsu, largest component; False: every voxel);
    # N4 bias-field correction of every stack inside its mask (SimpleITK)
    auto_mask: bool = True
    bias_correction: bool = False
    # each stack's smooth intensity field relative to the others (recon/bias.py), fitted to the
    # coarse level's model and divided out before the fine level (docs/clinical.md: six stacks, a
    # 15 % field each: 27.42 -> 28.45 dB; no field: 29.19 -> 29.12, sb25-t3.2 38.351 -> 38.344,
    # sb25-t3.2-motion 30.667 -> 30.682)
    stack_bias: bool = True
    # the fields estimated again after each of the coarse level's pose rounds (each estimate from
    # the slices as acquired, so that they settle): a field across a slice pulls its pose, and the
    # poses decide the fields. Session 29 (benchmarks/TUNING.md), aligned PSNR off -> on (the
    # anatomy-frame gauge in both): four 4 mm stacks with 15 % fields on the 21 / 25 / 33-week
    # brains 27.07 / 27.13 / 27.29 -> 27.08 / 27.31 / 27.42, other seeds of the 25-week one 26.78 /
    # 26.97 / 26.62 (before the session 26.62 / 26.30 / 26.33); nine stacks with 20 % fields 31.65
    # -> 31.99; field-free D3 29.66 -> 29.65, clin6 31.82 -> 31.80
    stack_bias_rounds: bool = True
    # the field the stacks share, divided out of the fitted model by N4 (a smooth field) where any
    # stack's field relative to the others reached this (log) spread: the coil's field is there and
    # the stacks most likely share part of it (recon/bias.py). Four stacks with 15 % fields: 25.77 ->
    # 26.39 dB aligned (docs/clinical.md, session 13)
    shared_field: bool = True
    shared_field_min_spread: float = 0.05
    # ... or where N4's own field spans more than this (log of its max / min over the region): a
    # field every stack shares whole (one coil for the session) leaves the stacks agreeing, so the
    # spread above misses it. Session 30 (benchmarks/TUNING.md), the span N4 finds: field-free fetal
    # volumes 0.003-0.030 (D3, clin6, sb25-t3.2, sb25-t3.2-motion, four 4 mm stacks on the 21- and
    # 33-week brains), the adult T1 mni-t4 / mni-t4-motion 0.052 / 0.049, one 15 % field for all
    # stacks 0.127-0.226; aligned PSNR with it, three stacks with drift (D3) 27.38 -> 29.37 dB, four
    # 4 mm stacks (H2, seed 15) 25.93 -> 26.66. A small phantom of smooth blobs reads 0.21
    # (tests/test_regression.py): N4 takes smooth anatomy for a field
    shared_field_min_range: float = 0.09
    # N4's fitting levels for that field (each doubles its B-spline mesh: 1 level, one span per axis;
    # 2, two). Session 27 (benchmarks/TUNING.md), clinical-style cases with fields, aligned PSNR 1 ->
    # 2 levels: four 4 mm stacks on the 21 / 25 / 33-week brains 26.45 -> 26.85, 27.03 -> 27.13,
    # 26.94 -> 27.04; nine stacks 31.52 -> 31.59; six stacks with 15 % fields 30.47 -> 30.60; a
    # field-free volume forced through it -0.09 dB at 2 levels, 0.00 at 1 (not run there by default:
    # the spread above); 3 levels -0.26 dB on the 33-week case. Real leave-one-out NCC (the field is
    # applied there) 0.693 / 0.862 / 0.854 -> 0.693 / 0.856 / 0.859
    shared_field_levels: int = 2
    # motion correction and robustness (issue 5)
    register_stacks: bool = True  # rigid stack-to-stack registration (SimpleITK) before fitting
    reference_stack: int = 0  # the stack the others are registered to (its lattice is the output's)
    motion: bool = True  # optimise one rigid pose per slice jointly with the field
    motion_rounds: int = 12  # coarse level: rounds of (pose steps, weights, intensity re-fit)
    # the smoothness prior while poses are fitted, x the level's noise prior: a smooth field pulls
    # slices off their true poses (sb25-t3.2-motion coarse level: at the full prior the poses fit
    # better than the true ones; at 0.025 x it the true poses fit best; benchmarks/MOTION.md)
    motion_smoothness_scale: float = 0.025
    # after the coarse rounds: when every stack's mean slice pose agrees with the others' within
    # these, the headers are consistent (no motion between stacks) and the volume is put in the
    # headers' frame (mean pose over all slices = identity); else in the registration's frame
    header_gauge_mm: float = 1.0
    header_gauge_deg: float = 3.0  # loose: a stack's tilt trades against its slices' in-plane shifts (weakly seen)
    # in the headers' frame, the slice poses' centre held at the identity: "mean" (mean rotation
    # vector and translation about the fields of view's centre) or "adaptive" (the translations'
    # range centre when the well-determined slices' shifts are light-tailed, as for motion bounded
    # about the planned position: benchmarks/MOTION.md session 8; else the mean)
    header_gauge_location: str = "adaptive"
    # the coarse level's warm start and pose rounds bin f x f slice pixels into one, f = its grid
    # spacing / pixel size up to this (1: off); the finer levels see every pixel
    coarse_binning: int = 2
    # slices with less pixel weight than this fraction of their stack's median slice are held near
    # the stack's mean pose (the anatomy's small edge slices; 0: off)
    pose_small_slice: float = 0.25
    # the last level's smoothness prior made edge-preserving (Huber on neighbour differences,
    # linear beyond edge_prior_k x their median) by this many reweighting rounds of its warm start
    # (its CG iterations split in rounds + 1 parts: the same time). 1 round at k 2 -> 2 rounds at
    # 1.5 (session 15, full pipeline, PSNR after a rigid alignment; benchmarks/TUNING.md): four 4 mm
    # stacks with motion and fields +0.33 dB, three 3.2 mm stacks with drift and jumps +0.22, six
    # clinical-style stacks +0.19, nine stacks +0.12; sb25 + 2 % noise at 0.8 mm -0.02 and
    # sb25-t3.2-motion -0.01 (there k 1 or a third round lost 0.1-0.3 dB); real leave-one-out NCC
    # -0.003 / +0.002 / +0.006. Clean data: the prior is ~0, nothing changes.
    edge_prior_rounds: int = 2
    edge_prior_k: float = 1.5
    motion_refit_iterations: int = 6  # conjugate-gradient iterations of the intensity re-fit after each pose round
    pose_iterations: int = 3  # Levenberg-Marquardt iterations on the slice poses per round (field fixed)
    # the LM Jacobian is recomputed every this many iterations of a round and reused in between
    # (with 6-render Jacobians, sb25-t3.2-motion seed 2: 3 -> 29.89 dB in 40 s, 1 -> 29.84 dB in 52 s;
    # analytic, seed 1: 3 -> 30.897 dB in 20.6 s, 1 -> 30.896 dB in 21.6 s)
    pose_jacobian_every: int = 3
    # how the LM Jacobian is had: "analytic" (one pass of the renderer's pose channels,
    # recon/slices.py::slice_pose_jacobian; the cpu and reference backends) or "differences" (one
    # render per pose parameter: 6 renders; always on the gpu backend and the points renderer).
    # Evidence: benchmarks/MOTION.md, session 24
    pose_jacobian: str = "analytic"
    # motion as a trajectory in acquisition time (issue 19): each slice pulled toward the slices of its
    # stack acquired just before and after it (Cauchy weights on their pose difference at this scale,
    # so a jump between two slices costs little), x the median slice's curvature; needs the slices'
    # acquisition order (sidecar SliceTiming, --slice-order, else the default interleaved). 0: off
    # (benchmarks/MOTION.md, session 11)
    pose_time_prior: float = 0.0
    pose_time_scale_mm: float = 1.0
    pose_tilt: bool = True  # estimate the slices' tilts (rotations about in-plane axes), not only the in-plane turn
    fine_pose_iterations: int = 3
    # rounds at each later level (sb25-t3.2-motion seeds 1 / 2 / 3 in session 4: 28.84 / 29.84 / 29.79 dB
    # without, 29.10 / 30.10 / 29.94 with 2; benchmarks/MOTION.md). 2 -> 1 (issue 17, 2026-12-04, idle
    # 2 cores, seed 1): 0 / 1 / 2 rounds 30.47 / 30.66 / 30.74 dB, the whole command 39.4 s with 1
    # against 46.7 s with 2 (a round ~8 s at 0.8 mm, ~65 s on mni-t4 at 1 mm; benchmarks/SPEED.md)
    fine_motion_rounds: int = 1
    # after each pose round from the second, the slices are carried on along the round's moves by
    # rho / (1 - rho) x them, rho = this round's moves projected on the last one's (the alternation
    # with the field converges linearly), at most this many times (0: off). sb25-t3.2-motion seeds
    # 1 / 3: 30.62 / 30.53 -> 30.74 / 30.79 dB at 2 (30.74 / 30.74 at 4; per-slice ratios 30.69 /
    # 30.71; Anderson mixing over 1-3 rounds was worse on the clean known-pose case); the clean
    # known-pose case's coarse rounds: 0.37 mm / 0.75 deg -> 0.23 mm / 0.55 deg (benchmarks/MOTION.md)
    pose_extrapolation: float = 2.0
    # a round that moves the slices less than this on average ends the rounds (at every level)
    motion_stop_mm: float = 0.1
    motion_stop_deg: float = 0.1
    # when the very first round moves the slices less than this, the data hold no slice motion
    # (the coarse field's fitting noise moves clean slices: clean mni-t4 0.02 mm, clean sb25 binned
    # 0.03 mm / 0.10 deg; sb25-t3.2-motion 1.9 deg, mni-t4-motion 1.1 deg) and later levels skip
    # it; slices that moved less than motion_none_mm and 5/3 x motion_none_deg from their stacks'
    # poses keep the nominal region
    motion_none_mm: float = 0.1
    motion_none_deg: float = 0.3
    lr_pose_rotation: float = 3e-4  # joint Adam iterations: rad per step
    lr_pose_translation: float = 0.01  # joint Adam iterations: mm per step
    joint_pose_lr: float = 0.0  # x the two rates above during the joint Adam iterations (0: poses fixed there)
    robust: bool = True  # per-slice and per-pixel robust weights (outliers down-weighted / excluded)
    slice_scale: bool = True  # one intensity scale per slice
    pixel_outlier_c: float = 3.0  # Cauchy weight 1/(1+(r/(c sigma))^2) on pixel residuals
    # floor of that sigma (fraction of the slices' 99th percentile). On clean data the residuals' MAD
    # is the model's misfit, tiny inside the brain, so the brain's blurred outer edge (3-8 % misfit)
    # was thrown away as outliers. 0.02 (the benchmarks' noise): mni-t4 warm start 33.96 -> 34.09 dB
    # (robust weights off: 34.09), sb25-t3.2 38.37 -> 38.40, sb25-t3.2-motion 30.68 -> 30.77; real
    # MIALSRTK leave-one-out unchanged (0.699 / 0.860 / 0.845: their residuals' sigma is above it)
    pixel_outlier_min_sigma: float = 0.02
    slice_outlier_z: float = 3.5  # slices more than this many robust SDs worse than the median are excluded
    slice_min_ncc: float = 0.5  # slices whose NCC with the prediction is below this are excluded
    # the confidence map (--output-confidence, recon/confidence.py): off unless asked (one more
    # design build, a render of the slices and two renders of the volume after the fit)
    confidence: bool = False
    # the diagonal of A^T W A by this many Rademacher probes (fixed seed) where the design is not an
    # explicit sparse map (gpu backend, or past design_memory_gb); the cpu design gives it exactly
    confidence_probes: int = 16
    # confidence = 1 / (1 + sd / (confidence_ref x s99)): the intensity's standard deviation at which
    # the confidence is 1/2, as a fraction of the inputs' 99th percentile in the mask (s99). 5 %:
    # about half a grey/white contrast; the test phantom (3 stacks, 3.6 mm slices) gets a median of
    # 0.96 clean and 0.77 at 2 % noise where all three stacks cover it (docs/clinical.md)
    confidence_ref: float = 0.05
    # the local misfit (robust residuals splatted on the Gaussians) as the noise where it exceeds the
    # slices' noise: off, it made the map rank the errors worse on the test phantom (Spearman of
    # 1 - confidence with |error| in the mask: 2 % noise 0.62 -> 0.59, clean 0.32 -> 0.31)
    confidence_misfit: bool = False
    # where the anatomy lies is known only so well (the slices' poses, the profile's blur): the
    # voxel's sd gains this shift (mm) x the volume's local gradient magnitude, averaged over a
    # Gaussian of sd confidence_position_smooth_mm (confidence.position_sd). Chosen by Spearman of
    # 1 - confidence with |error| on eight clinical-style cases from three brains (21, 25 and 33
    # weeks; benchmarks/TUNING.md session 25): 0.2 mm over 1.5 mm ranks every case as well as or
    # better than session 13's 0.4 mm over one voxel (mean 0.313 -> 0.324; 21 weeks' three stacks
    # 0.296 -> 0.320), and it is what the errors where the gradient is large ask for on the 25-week
    # brain (the errors' rms there is that of a 0.15-0.2 mm shift on top of the data term's sd)
    confidence_position_sd_mm: float = 0.2
    confidence_position_smooth_mm: float = 1.5
    # compute
    # the intensity fits (conjugate gradients) store each stack's render as an explicit sparse map
    # on the cpu backend, up to this much memory for all stacks together (about 5 bytes per
    # (pixel, Gaussian) term: sb25-t3.2 at 0.8 mm 0.3 GB, mni-t4 at 1 mm 3 GB); beyond it they render
    # through autograd (~20x slower per iteration, benchmarks/RENDER.md); 0: always autograd
    design_memory_gb: float = 4.0
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    # with --checkpoint-dir: seconds between checkpoints (at an iteration boundary; 0: every
    # iteration); checkpoints are also written after each level's warm start and at the end
    checkpoint_interval_s: float = 30.0

    def resolved(self, **kw) -> "ReconConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def validate(self, where: str = "--config") -> "ReconConfig":
        def bad(k, what):
            raise InputError(where, f"{k}: {what}")

        if not (isinstance(self.lr_warmup, int) and self.lr_warmup >= 0):
            bad("lr_warmup", f"must be an integer >= 0, got {self.lr_warmup}")
        if not (isinstance(self.motion_refit_iterations, int) and self.motion_refit_iterations >= 1):
            bad("motion_refit_iterations", f"must be an integer >= 1, got {self.motion_refit_iterations}")
        if not (isinstance(self.edge_prior_rounds, int) and self.edge_prior_rounds >= 0):
            bad("edge_prior_rounds", f"must be an integer >= 0, got {self.edge_prior_rounds}")
        if not (self.edge_prior_k > 0 and math.isfinite(self.edge_prior_k)):
            bad("edge_prior_k", f"must be > 0, got {self.edge_prior_k}")
        if not (isinstance(self.pose_extrapolation, (int, float)) and self.pose_extrapolation >= 0):
            bad("pose_extrapolation", f"must be a number >= 0, got {self.pose_extrapolation}")
        if not (isinstance(self.prior_holdout, int) and (self.prior_holdout == 0 or self.prior_holdout >= 2)):
            bad(
                "prior_holdout",
                f"must be 0 (off) or an integer >= 2 (every n-th slice held out), got {self.prior_holdout}",
            )
        if not (self.shared_field_min_spread >= 0 and math.isfinite(self.shared_field_min_spread)):
            bad("shared_field_min_spread", f"must be a number >= 0 (a log ratio), got {self.shared_field_min_spread}")
        if not (self.shared_field_min_range >= 0 and math.isfinite(self.shared_field_min_range)):
            bad("shared_field_min_range", f"must be a number >= 0 (a log ratio), got {self.shared_field_min_range}")
        if not (isinstance(self.shared_field_levels, int) and 1 <= self.shared_field_levels <= 4):
            bad("shared_field_levels", f"must be an integer from 1 to 4, got {self.shared_field_levels}")
        if not (self.confidence_position_sd_mm >= 0 and math.isfinite(self.confidence_position_sd_mm)):
            bad("confidence_position_sd_mm", f"must be a number >= 0 (mm), got {self.confidence_position_sd_mm}")
        if not (isinstance(self.confidence_probes, int) and self.confidence_probes >= 1):
            bad("confidence_probes", f"must be an integer >= 1, got {self.confidence_probes}")
        if not (self.confidence_position_smooth_mm >= 0 and math.isfinite(self.confidence_position_smooth_mm)):
            bad(
                "confidence_position_smooth_mm", f"must be a number >= 0 (mm), got {self.confidence_position_smooth_mm}"
            )
        if not (self.confidence_ref > 0 and math.isfinite(self.confidence_ref)):
            bad("confidence_ref", f"must be a number > 0, got {self.confidence_ref}")
        if not (0 <= self.pose_small_slice <= 1):
            bad("pose_small_slice", f"must be in [0, 1], got {self.pose_small_slice}")
        if not (self.pose_time_prior >= 0):
            bad("pose_time_prior", f"must be >= 0, got {self.pose_time_prior}")
        if not (self.pose_time_scale_mm > 0):
            bad("pose_time_scale_mm", f"must be > 0 mm, got {self.pose_time_scale_mm}")
        if not (self.mask_rim_mm >= 0 and math.isfinite(self.mask_rim_mm)):
            bad("mask_rim_mm", f"must be a number >= 0 (mm), got {self.mask_rim_mm}")
        if not (self.mask_rim_min_signal >= 0 and math.isfinite(self.mask_rim_min_signal)):
            bad("mask_rim_min_signal", f"must be a number >= 0 (a fraction), got {self.mask_rim_min_signal}")
        if not (self.design_memory_gb >= 0 and math.isfinite(self.design_memory_gb)):
            bad("design_memory_gb", f"must be a number >= 0, got {self.design_memory_gb}")
        if not (isinstance(self.pose_jacobian_every, int) and self.pose_jacobian_every >= 1):
            bad("pose_jacobian_every", f"must be an integer >= 1, got {self.pose_jacobian_every}")
        if not (isinstance(self.coarse_binning, int) and self.coarse_binning >= 1):
            bad("coarse_binning", f"must be an integer >= 1, got {self.coarse_binning}")
        if self.output_resolution is not None and not (
            self.output_resolution > 0 and math.isfinite(self.output_resolution)
        ):
            bad("output_resolution", f"must be > 0 mm, got {self.output_resolution}")
        if self.output_resolution is not None and self.output_resolution < 0.1:
            bad("output_resolution", f"{self.output_resolution} mm is absurdly fine (>= 0.1 mm)")
        if self.output_oversampling is not None and not (
            isinstance(self.output_oversampling, int) and 1 <= self.output_oversampling <= 4
        ):
            bad("output_oversampling", f"must be an integer from 1 to 4, got {self.output_oversampling}")
        if not self.spacing_factors or any(not (f > 0) for f in self.spacing_factors):
            bad("spacing_factors", "must be positive numbers")
        if len(self.iterations) != len(self.spacing_factors):
            bad("iterations", f"needs one count per level ({len(self.spacing_factors)}), got {len(self.iterations)}")
        if any(int(i) < 0 for i in self.iterations):
            bad("iterations", "must be >= 0")
        if self.batch_slices < 1:
            bad("batch_slices", "must be >= 1")
        known = ("means", "intensities", "log_scales", "quats")
        if not self.adam_parameters or any(k not in known for k in self.adam_parameters):
            bad("adam_parameters", f"must be a non-empty list of {', '.join(known)}, got {list(self.adam_parameters)}")
        for k in ("lr_means", "lr_intensities", "lr_scales", "lr_quats", "lr_nrf"):
            if not (getattr(self, k) >= 0):
                bad(k, "must be >= 0")
        if not (0 < self.lr_decay <= 1):
            bad("lr_decay", "must be in (0, 1]")
        if not (0 < self.scale_factor <= 3):
            bad("scale_factor", "must be in (0, 3]")
        if not (0 <= self.nrf_start <= 1):
            bad("nrf_start", "must be in [0, 1]")
        if self.through_plane_fwhm_factor is not None and not (0 < self.through_plane_fwhm_factor <= 3):
            bad("through_plane_fwhm_factor", "must be in (0, 3]")
        if self.cutoff < 1:
            bad("cutoff", "must be >= 1")
        if self.renderer not in ("slices", "points"):
            bad("renderer", "slices or points")
        if self.block_radius < 1:
            bad("block_radius", "must be >= 1")
        if self.backend not in ("auto", "reference", "cpu", "gpu"):
            bad("backend", "auto, reference, cpu or gpu")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "auto, cpu or cuda")
        for key in ("noisy_cg_iterations", "fine_cg_iterations"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                bad(key, f"must be an integer >= 0 or null, got {v}")
        if self.cg_preconditioner not in ("jacobi", "none"):
            bad("cg_preconditioner", f"jacobi or none, got {self.cg_preconditioner!r}")
        if self.pose_jacobian not in ("analytic", "differences"):
            bad("pose_jacobian", f"analytic or differences, got {self.pose_jacobian!r}")
        if self.header_gauge_location not in ("mean", "adaptive"):
            bad("header_gauge_location", "mean or adaptive")
        if self.time_budget_s is not None and not (self.time_budget_s > 0):
            bad("time_budget_s", "must be > 0 seconds or null")
        if not self.profile_candidates or any(not (0 < f <= 3) for f in self.profile_candidates):
            bad("profile_candidates", "must be numbers in (0, 3]")
        if not (0 <= self.profile_margin < 1):
            bad("profile_margin", f"must be in [0, 1), got {self.profile_margin}")
        if self.cg_smoothness is not None and not (self.cg_smoothness >= 0 and math.isfinite(self.cg_smoothness)):
            bad("cg_smoothness", "must be >= 0 or null (automatic)")
        if not (self.smoothness_gain >= 0):
            bad("smoothness_gain", "must be >= 0")
        if self.smoothness_prior not in ("curvature", "gradient"):
            bad("smoothness_prior", f"curvature or gradient, got {self.smoothness_prior!r}")
        if not (self.curvature_scale > 0 and math.isfinite(self.curvature_scale)):
            bad("curvature_scale", f"must be a number > 0, got {self.curvature_scale}")
        if self.reference_stack < 0:
            bad("reference_stack", "must be >= 0")
        for k in ("motion_rounds", "pose_iterations", "fine_pose_iterations", "fine_motion_rounds"):
            if getattr(self, k) < 0:
                bad(k, "must be >= 0")
        for k in ("lr_pose_rotation", "lr_pose_translation", "joint_pose_lr"):
            if not (getattr(self, k) >= 0):
                bad(k, "must be >= 0")
        if not (self.pixel_outlier_c > 0 and self.slice_outlier_z > 0):
            bad("pixel_outlier_c / slice_outlier_z", "must be > 0")
        if not (self.pixel_outlier_min_sigma >= 0 and math.isfinite(self.pixel_outlier_min_sigma)):
            bad("pixel_outlier_min_sigma", f"must be a number >= 0, got {self.pixel_outlier_min_sigma}")
        if not (self.checkpoint_interval_s >= 0 and math.isfinite(self.checkpoint_interval_s)):
            bad("checkpoint_interval_s", "must be >= 0 seconds")
        if self.threads is not None and self.threads < 1:
            bad("threads", "must be >= 1")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(ReconConfig)}
# settings renamed since an earlier version: their old names still read (saved *.config.json files)
_RENAMED = {"loss_mask_dilation_mm": "mask_rim_mm"}


def config_from_dict(d: dict, where: str = "--config", base: ReconConfig | None = None) -> ReconConfig:
    """Build a config from a mapping; unknown keys and wrong types are errors."""
    if not isinstance(d, dict):
        raise InputError(where, "must hold a mapping of settings")
    base = base or ReconConfig()
    kw = {}
    for k, v in d.items():
        k = _RENAMED.get(k, k)
        if k not in _FIELDS:
            raise InputError(where, f"unknown setting {k!r}")
        cur = getattr(base, k)
        try:
            if k == "time_budget_s":
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise TypeError
                v = None if v is None else float(v)
            elif k in ("noisy_cg_iterations", "fine_cg_iterations"):  # an integer, or null: cg_iterations
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise TypeError
            elif isinstance(cur, tuple):
                if not isinstance(v, (list, tuple)):
                    raise TypeError
                v = tuple(type(cur[0])(x) if cur else x for x in v)
            elif isinstance(cur, bool):
                if not isinstance(v, bool):
                    raise TypeError
            elif isinstance(cur, int) and not isinstance(cur, bool):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError
            elif isinstance(cur, float):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError
                v = float(v)
            elif (
                cur is None
                and v is not None
                and k in ("output_resolution", "dilate_mm", "cg_smoothness", "through_plane_fwhm_factor")
            ):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError
                v = float(v)
            elif cur is None and v is not None and k in ("threads", "output_oversampling"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError
            elif isinstance(cur, str) and not isinstance(v, str):
                raise TypeError
        except (TypeError, ValueError):
            raise InputError(where, f"setting {k!r} has the wrong type ({type(v).__name__})") from None
        kw[k] = v
    return dataclasses.replace(base, **kw).validate(where)


def load_config_file(path: str) -> dict:
    """Read a JSON (or, on Python >= 3.11, TOML) settings file into a dict."""
    if not os.path.isfile(path):
        if os.path.exists(path):  # a folder, or a pipe (read twice: before the run and by it)
            raise InputError(path, "config is not a regular file: give a JSON or TOML file")
        raise InputError(path, "config file not found")
    try:
        text = open(path, "rb").read()
    except OSError as exc:
        raise InputError(path, f"cannot read config file: {exc.strerror}") from None
    if path.lower().endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # pragma: no cover
            raise InputError(path, "TOML configs need Python >= 3.11; use JSON") from None
        try:
            d = tomllib.loads(text.decode())
        except Exception as exc:
            raise InputError(path, f"not valid TOML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            d = json.loads(text.decode())
        except Exception as exc:
            raise InputError(path, f"not valid JSON: {str(exc).splitlines()[0]}") from None
    if isinstance(d, dict) and "config" in d and isinstance(d["config"], dict):
        d = d["config"]  # a saved *.config.json from an earlier run
    return d
