"""The stacks' intensity fields (recon/bias.py): the part that belongs to the anatomy stays, and an
estimate repeated against the same model settles instead of adding up."""

import copy
import types

import numpy as np
import torch
from conftest import blob_volume

from mgaussian.geometry import rigid_matrix
from mgaussian.io import load_stacks
from mgaussian.recon import bias
from mgaussian.recon.motion.poses import slice_pose_from_matrix
from mgaussian.simulate import simulate_stacks


def _quadratic_of(fn, pos, centre, radius):
    """The 10 coefficients (bias._quadratic_terms) of the quadratic ``fn`` [P] at positions ``pos``."""
    t = bias._quadratic_terms(pos, centre, radius)
    return torch.linalg.lstsq(t, fn[:, None]).solution[:, 0]


def _moved_stacks(own_field_in_stack_1: bool):
    """Three stacks moved 15 deg / 8 mm from each other whose fitted log fields are one quadratic
    of the anatomy's position (what the model's blur or the anatomy puts in every stack's ratio),
    plus, optionally, in stack 1, a field of its own: (state with the stacks' slice poses, their
    positions, their fields' coefficients, the moves, the own field's coefficients, centre, radius)."""
    gen = torch.Generator().manual_seed(0)
    centre, radius = torch.zeros(3, dtype=torch.float64), 60.0
    turns_deg, shifts_mm = [(0, 0, 0), (15, 0, 5), (0, -12, 10)], [(0, 0, 0), (8, -3, 0), (-5, 6, 4)]
    moves = [rigid_matrix(np.radians(r), s, (0, 0, 0)) for r, s in zip(turns_deg, shifts_mm)]
    q = torch.tensor([0.0, 0.10, -0.06, 0.08, 0.05, -0.07, 0.04, 0.03, -0.02, 0.05], dtype=torch.float64)
    own = torch.tensor([0.0, -0.05, 0.09, 0.0, 0.06, 0.0, -0.04, 0.0, 0.03, 0.0], dtype=torch.float64)
    pos, coefs, rots, trans, cents = [], [], [], [], []
    for i, M in enumerate(moves):
        p = (torch.rand(3000, 3, generator=gen, dtype=torch.float64) - 0.5) * 80
        log_field = bias._quadratic_terms(_moved(M, p), centre, radius) @ q
        if i == 1 and own_field_in_stack_1:
            log_field = log_field + bias._quadratic_terms(p, centre, radius) @ own
        coefs.append(_quadratic_of(log_field, p, centre, radius))
        pos.append(p)
        c = (torch.rand(20, 3, generator=gen, dtype=torch.float64) - 0.5) * 60  # slice centres
        r, u = slice_pose_from_matrix(M, c.numpy())
        rots.append(torch.as_tensor(r, dtype=torch.float32))
        trans.append(torch.as_tensor(u, dtype=torch.float32))
        cents.append(c.float())
    state = types.SimpleNamespace(rots=rots, trans=trans, cents=cents)
    return state, pos, coefs, moves, own, centre, radius


def _moved(M, p):
    return p @ torch.as_tensor(M[:3, :3]).T + torch.as_tensor(M[:3, 3])


def _sd(pos, centre, radius, c):
    """A log field's sd over positions ``pos``, its constant aside."""
    f = bias._quadratic_terms(pos, centre, radius) @ c
    return float((f - f.mean()).std())


def test_a_field_the_anatomy_explains_stays_where_the_stacks_moved():
    """Fields that are one quadratic of the anatomy's position in every stack are left alone (no
    stack field to divide out), although the stacks moved; the stacks' mean quadratic in the
    scanner frame (the estimate before session 29) leaves a field in every stack, of the size of
    the anatomy's one times the motion, which makes the stacks disagree."""
    state, pos, coefs, _, _, centre, radius = _moved_stacks(own_field_in_stack_1=False)
    common = bias._anatomy_common_part(state, pos, coefs, centre, radius)
    left = [_sd(pos[i], centre, radius, coefs[i] - common[i]) for i in range(3)]
    assert max(left) < 2e-3, left
    scanner_mean = torch.stack(coefs).mean(0)
    assert max(_sd(pos[i], centre, radius, coefs[i] - scanner_mean) for i in range(3)) > 0.01


def test_what_is_divided_out_leaves_the_stacks_one_anatomy():
    """With a field of stack 1's own on top, which part of it is the anatomy's cannot be told, but
    what is divided out leaves the stacks consistent: one quadratic h of the anatomy's position
    such that each stack's divided field is its own field minus h at its moved positions (stack 0
    lies unmoved: h is minus its divided field)."""
    state, pos, coefs, moves, own, centre, radius = _moved_stacks(own_field_in_stack_1=True)
    common = bias._anatomy_common_part(state, pos, coefs, centre, radius)
    divided = [coefs[i] - common[i] for i in range(3)]
    h = -divided[0]
    for i, expected_own in ((1, own), (2, torch.zeros_like(own))):
        h_seen = bias._quadratic_terms(_moved(moves[i], pos[i]), centre, radius) @ h
        f = bias._quadratic_terms(pos[i], centre, radius) @ (divided[i] - expected_own) + h_seen
        assert float((f - f.mean()).std()) < 2e-3, i
    assert _sd(pos[1], centre, radius, own) > 0.03 and _sd(pos[0], centre, radius, h) > 0.005


def test_a_second_estimate_against_the_same_model_changes_nothing(tmp_path):
    """The fields are estimated from the slices as acquired (the field divided out before put
    back): estimated again against the same model, they come out the same and the slices stay as
    the first estimate left them; an estimate of what is left after the first (as before session
    29) would find next to nothing and replace the first by it."""
    from mgaussian.recon.config import config_from_dict
    from mgaussian.recon.levels import begin_level, level_schedule, warm_start
    from mgaussian.recon.prepare import prepare

    gt, aff, _ = blob_volume((28, 30, 26), spacing=1.5, sigma=7.0)
    gt = gt + 5.0
    d = tmp_path / "b"
    simulate_stacks(gt, aff, gt > 20, str(d), thickness=2.0, pixel=1.5, seed=2, bias_field=0.2, log=lambda s: None)
    stacks = load_stacks(
        [str(d / f"stack_{i:02d}.nii.gz") for i in range(3)], [str(d / f"mask_{i:02d}.nii.gz") for i in range(3)]
    )
    cfg = config_from_dict({"cg_iterations": 10, "motion": False, "threads": 1, "through_plane_fwhm_factor": 1.0})
    state = prepare(stacks, cfg, lambda s: None)
    schedule = level_schedule(state.cfg)
    level = begin_level(state, 0, len(schedule), *schedule[0], resumed=False)
    warm_start(state, level)
    acquired = [ss.obs.clone() for ss in state.sets]

    first = bias.correct_stack_bias(state)
    fields = copy.deepcopy(state.stack_fields)
    after_first = [ss.obs.clone() for ss in state.sets]
    second = bias.correct_stack_bias(state)

    assert max(hi - lo for lo, hi in (r["field_range"] for r in first)) > 0.1  # 20 % fields: found
    assert [r["field_range"] for r in second] == [r["field_range"] for r in first]
    for a, b in zip(fields["coefs"], state.stack_fields["coefs"]):
        assert np.allclose(a, b, atol=1e-6)
    for a, b, o in zip(after_first, state.sets, acquired):
        assert torch.allclose(a, b.obs, rtol=1e-5, atol=1e-6 * float(o.abs().max()))
        assert not torch.allclose(a, o, rtol=1e-3)  # the first estimate did divide a field out


def test_a_field_every_stack_shares_whole_is_divided_out(tmp_path):
    """One coil field of the scanner for the whole session (``simulate --bias-shared 1``): the stacks
    agree with each other, so their spread does not show it, but N4's field spans more than
    ``shared_field_min_range`` and is divided out (25.2 dB without the step, 29.1 with it, as
    measured); on the same stacks without a field N4's small field is left and the volume is the
    same bits as without the step."""
    from mgaussian.demo import demo_dir
    from mgaussian.io import load_image
    from mgaussian.metrics import score_volume
    from mgaussian.recon.config import config_from_dict
    from mgaussian.recon.pipeline import reconstruct

    gt, aff, _ = load_image(str(demo_dir() / "srr.nii.gz"))
    m, _, _ = load_image(str(demo_dir() / "mask.nii.gz"))
    cfg = config_from_dict({"motion": False, "threads": 2})
    psnr, logs = {}, {}
    for name, kw in (("session", {"bias_field": 0.15, "bias_shared": 1.0}), ("free", {})):
        d = tmp_path / name
        simulate_stacks(gt, aff, m > 0, str(d), thickness=3.2, pixel=1.6, seed=3, noise=0.01, log=lambda s: None, **kw)
        stacks = load_stacks(
            [str(d / f"stack_{i:02d}.nii.gz") for i in range(3)], [str(d / f"mask_{i:02d}.nii.gz") for i in range(3)]
        )
        for step in (True, False):
            lines = []
            res = reconstruct(
                stacks, config_from_dict({**cfg.to_dict(), "shared_field": step}), progress=False, log=lines.append
            )
            psnr[name, step] = score_volume(res.volume, res.affine, gt, aff, m > 0)["psnr"]
            logs[name, step] = [s for s in lines if "the field the stacks share" in s]
            if name == "free" and step:
                free_volume = res.volume
            if name == "free" and not step:
                assert np.array_equal(free_volume, res.volume)
    assert len(logs["session", True]) == 1 and logs["session", True][0].endswith("divided out")
    assert psnr["session", True] > psnr["session", False] + 2.0, psnr
    assert len(logs["free", True]) == 1 and "left" in logs["free", True][0]
    assert logs["session", False] == [] and psnr["free", True] == psnr["free", False]
