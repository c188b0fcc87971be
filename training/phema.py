"""Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMA tracks during training, any EMA length afterwards.

A power-function EMA at time t (images seen) averages the iterates θ(τ), τ in [0, t], with the weight density
p(τ) = (γ+1) τ^γ / t^(γ+1). Its relative standard deviation σ_rel (the std of p divided by t) is
σ_rel² = (γ+1) / ((γ+2)² (γ+3)), which runs from 1/√12 (γ = 0, the plain average) down to 0 (γ → ∞).

Training: one step of Δ images that ends at t updates a track with β = (1 − Δ/t)^(γ+1), so the track equals
∫ p(τ) θ(τ) dτ exactly for the iterate held constant over each step (the first step, t = Δ, copies: β = 0).

Afterwards: snapshots of two or more tracks at several times span a space of profiles; the profile of any
σ_rel at a snapshot time is approximated in it by least squares (in float64), and the same coefficients
combine the snapshots' weights. Targets outside the tracked σ_rel range need large signed coefficients, which
amplify rounding: `reconstruction_weights` returns them so callers can report Σ|c|.

Files: snapshots `phema-track-{kimg:06d}-{std:.3f}.pt` in the run directory, reconstructions
`phema-{kimg:06d}-{std:.3f}.pt`; both are network files (training/checkpoint.py, `save_network_file`) whose
`info` holds std, gamma, nimg, kimg, batch_size and the run's id.
"""

import math
import os
import re
import uuid

import numpy as np
import torch

from training import checkpoint

MAX_STD = 1 / math.sqrt(12)  # γ = 0: the uniform average over the whole run
TRACK_RE = re.compile(r'phema-track-(\d+)-(\d+\.\d+)\.pt')
OUTPUT_RE = re.compile(r'phema-(\d+)-(\d+\.\d+)\.pt')


# ----------------------------------------------------------------------------------------------------------------
# Profiles.


def check_std(std):
    """σ_rel as a float; ValueError unless 0 < σ_rel < 1/√12."""
    std = float(std)
    if not 0 < std < MAX_STD:
        raise ValueError(f'EMA length σ_rel={std:g} is out of range: it must lie in (0, 1/√12 ≈ {MAX_STD:.4f})')
    return std


def gamma_to_std(gamma):
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std):
    """γ of a σ_rel: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, Newton-polished."""
    std = check_std(std)
    inv = std ** -2
    coefficients = [1, 7, 16 - inv, 12 - inv]
    roots = np.roots(coefficients)
    gamma = float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * max(1, abs(r))))
    for _ in range(2):
        value = ((gamma + 7) * gamma + 16 - inv) * gamma + 12 - inv
        slope = (3 * gamma + 14) * gamma + 16 - inv
        if slope != 0:
            gamma -= value / slope
    return gamma


def power_beta(gamma, cur_nimg, batch_size):
    """The per-step decay for a step of `batch_size` images ending at `cur_nimg` images: (1 − Δ/t)^(γ+1)."""
    return (1 - batch_size / cur_nimg) ** (gamma + 1)


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """∫ p_a(τ) p_b(τ) dτ of two power profiles (ending at t_a, t_b); numpy-broadcast, float64."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    # Over [0, min(t_a, t_b)]: c/max · (min/max)^(γ of the longer profile).
    c = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    a_shorter = t_a < t_b
    ratio = np.where(a_shorter, t_a / t_b, t_b / t_a)
    exponent = np.where(a_shorter, gamma_b, gamma_a)
    return c / np.maximum(t_a, t_b) * ratio ** exponent


def reconstruction_weights(in_nimg, in_gamma, out_nimg, out_gamma):
    """Coefficients X [inputs × outputs] with Σ_i X_ik p_i ≈ p_k in L2 (float64 solve, columns summing to 1)."""
    in_nimg, in_gamma = np.asarray(in_nimg, np.float64), np.asarray(in_gamma, np.float64)
    out_nimg, out_gamma = np.asarray(out_nimg, np.float64), np.asarray(out_gamma, np.float64)
    gram = profile_inner(in_nimg[:, None], in_gamma[:, None], in_nimg[None, :], in_gamma[None, :])
    target = profile_inner(in_nimg[:, None], in_gamma[:, None], out_nimg[None, :], out_gamma[None, :])
    try:
        weights = np.linalg.solve(gram, target)
    except np.linalg.LinAlgError:
        raise ValueError('the snapshots\' profiles are linearly dependent (a snapshot given twice?)') from None
    return weights / weights.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------
# Tracks during training.


def snapshot_due(prev_nimg, cur_nimg, snap_kimg):
    """Whether the step from prev_nimg to cur_nimg crossed a multiple of snap_kimg thousand images."""
    snap_nimg = int(round(snap_kimg * 1000))
    return cur_nimg // snap_nimg > prev_nimg // snap_nimg


def new_run_id():
    return uuid.uuid4().hex  # from the OS, so the training's random streams are untouched


class PowerEMA:
    """Power-function EMA tracks of a network's parameters (one copy of them per σ_rel, the parameters' dtype and
    device); buffers are taken from the network when a track is written out."""

    def __init__(self, net, stds, run_id=None):
        self.stds = [check_std(std) for std in stds]
        if not self.stds or len(set(self.stds)) != len(self.stds):
            raise ValueError(f'post-hoc EMA needs distinct σ_rel values, got {list(stds)}')
        self.gammas = [std_to_gamma(std) for std in self.stds]
        self.run_id = run_id or new_run_id()
        self.names = [name for name, _ in net.named_parameters()]
        self.tracks = [[p.detach().clone() for p in net.parameters()] for _ in self.stds]

    @torch.no_grad()
    def update(self, net, cur_nimg, batch_size):
        """After a step of batch_size images that brought the run to cur_nimg images."""
        params = [p.detach() for p in net.parameters()]
        for gamma, track in zip(self.gammas, self.tracks):
            torch._foreach_lerp_(track, params, 1 - power_beta(gamma, cur_nimg, batch_size))

    def state_dict(self):
        return dict(stds=list(self.stds), run_id=self.run_id,
                    tracks=[dict(zip(self.names, track)) for track in self.tracks])

    @torch.no_grad()
    def load_state_dict(self, state):
        if [float(s) for s in state['stds']] != self.stds:
            raise ValueError(f'the saved tracks have σ_rel {list(state["stds"])}, not {self.stds}')
        self.run_id = state['run_id']
        for track, saved in zip(self.tracks, state['tracks']):
            for name, tensor in zip(self.names, track):
                tensor.copy_(saved[name])

    def network_state(self, index, net):
        """net's state_dict with its parameters replaced by track `index`."""
        state = dict(net.state_dict())
        state.update(zip(self.names, self.tracks[index]))
        return state

    def info(self, index, cur_nimg, batch_size):
        return dict(kind='phema-track', std=self.stds[index], gamma=self.gammas[index], nimg=int(cur_nimg),
                    kimg=int(cur_nimg) // 1000, batch_size=int(batch_size), run_id=self.run_id)


def track_file_name(kimg, std):
    return f'phema-track-{int(kimg):06d}-{std:.3f}.pt'


def output_file_name(kimg, std):
    return f'phema-{int(kimg):06d}-{std:.3f}.pt'


def output_file_std(path):
    """σ_rel in a reconstruction's file name (`phema-{kimg}-{std}.pt`), None for any other name."""
    match = OUTPUT_RE.fullmatch(os.path.basename(path))
    return float(match.group(2)) if match else None


def output_file_kimg(path):
    match = OUTPUT_RE.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction from a run's snapshots.

LARGE_COEFFICIENTS = 10  # Σ|c| above this: the target lies well outside what the tracks span


def find_track_snapshots(indir):
    """Sorted paths of the `phema-track-*.pt` snapshots in indir; ValueError when there are none."""
    if not os.path.isdir(indir):
        raise ValueError(f'{indir}: no such directory')
    paths = sorted(os.path.join(indir, name) for name in os.listdir(indir) if TRACK_RE.fullmatch(name))
    if not paths:
        raise ValueError(f'{indir}: no post-hoc EMA snapshots (phema-track-*.pt); train with --phema to write them')
    return paths


def read_snapshot_infos(paths):
    """[(path, info, network_config)] of snapshot files, with one check: one run and one network."""
    snapshots = []
    for path in paths:
        state = checkpoint.load_network_file(path, mmap=True)
        snapshots.append((path, state['info'], state['network_config']))
        del state
    first_path, first_info, first_config = snapshots[0]
    for path, info, config in snapshots[1:]:
        if info.get('run_id') != first_info.get('run_id'):
            raise ValueError(f'{path} and {first_path} come from different training runs; keep one run\'s '
                             f'snapshots in --indir')
        if config != first_config:
            what = (f'D={config.get("D")} vs D={first_config.get("D")}' if config.get('D') != first_config.get('D')
                    else 'the network configurations differ')
            raise ValueError(f'{path} and {first_path} hold different networks ({what}); keep one run\'s '
                             f'snapshots in --indir')
    return snapshots


def plan_reconstruction(snapshots, out_stds, out_kimg=None, in_stds=None):
    """(inputs [(path, info)], out_nimg, weights [inputs × outputs]) for reconstructing out_stds at out_kimg
    (default: the latest snapshot time) from the snapshots up to that time, of the tracks in_stds (default all)."""
    out_stds = [check_std(std) for std in out_stds]
    names = [output_file_name(0, std) for std in out_stds]
    if len(set(names)) != len(names):
        raise ValueError(f'σ_rel values {out_stds} name the same file twice (file names keep 3 decimals)')
    available = sorted({round(info['std'], 6) for _path, info, _config in snapshots})
    if in_stds is not None:
        missing = [std for std in in_stds if round(std, 6) not in available]
        if missing:
            raise ValueError(f'no snapshots of σ_rel {missing}; the snapshots track {available}')
        snapshots = [s for s in snapshots if round(s[1]['std'], 6) in {round(std, 6) for std in in_stds}]
    times = {}
    for _path, info, _config in snapshots:
        times.setdefault(info['kimg'], set()).add(info['nimg'])
    if out_kimg is None:
        out_kimg = max(times)
    if out_kimg not in times:
        raise ValueError(f'--outkimg={out_kimg} is not a snapshot time; snapshots exist at kimg '
                         f'{", ".join(map(str, sorted(times)))}')
    if len(times[out_kimg]) != 1:
        raise ValueError(f'the snapshots at kimg {out_kimg} were taken at different image counts '
                         f'{sorted(times[out_kimg])}')
    [out_nimg] = times[out_kimg]
    inputs = [(path, info) for path, info, _config in snapshots if info['nimg'] <= out_nimg]
    weights = reconstruction_weights([info['nimg'] for _path, info in inputs],
                                     [info['gamma'] for _path, info in inputs],
                                     [out_nimg] * len(out_stds), [std_to_gamma(std) for std in out_stds])
    return inputs, out_nimg, weights


@torch.no_grad()
def combine_snapshots(inputs, weights):
    """[state_dict per output column]: Σ_i weights[i, k] · snapshot_i in float64, cast back to each tensor's dtype.
    Non-float tensors and buffers are taken from the last input (all snapshots share them)."""
    sums, template = None, None
    for row, (path, _info) in enumerate(inputs):
        template = checkpoint.load_network_file(path)['ema']
        if sums is None:
            sums = [{name: torch.zeros_like(t, dtype=torch.float64) for name, t in template.items()
                     if t.is_floating_point()} for _ in range(weights.shape[1])]
        for column, total in enumerate(sums):
            for name, acc in total.items():
                acc.add_(template[name].to(torch.float64), alpha=float(weights[row, column]))
    return [{name: total[name].to(t.dtype) if name in total else t for name, t in template.items()} for total in sums]


def reconstruct(indir, outdir, out_stds, out_kimg=None, in_stds=None, skip=False, batch=8, log=print):
    """Write `phema-{kimg}-{std}.pt` into outdir for each σ_rel in out_stds; returns [(path, std, Σ|c|)].
    Raises ValueError for bad input before anything is written. batch: outputs combined per pass over the inputs
    (each holds a float64 copy of the weights)."""
    snapshots = read_snapshot_infos(find_track_snapshots(indir))
    inputs, out_nimg, weights = plan_reconstruction(snapshots, out_stds, out_kimg, in_stds)
    out_stds = [check_std(std) for std in out_stds]
    _path, last_info, network_config = snapshots[[s[0] for s in snapshots].index(inputs[-1][0])]
    log(f'Reconstructing {len(out_stds)} EMA length(s) at kimg {out_nimg // 1000} from {len(inputs)} snapshots '
        f'of σ_rel {sorted({info["std"] for _p, info in inputs})}')
    results, todo = [], []
    for column, std in enumerate(out_stds):
        path = os.path.join(outdir, output_file_name(out_nimg // 1000, std))
        sum_abs = float(np.abs(weights[:, column]).sum())
        results.append((path, std, sum_abs))
        warning = ' (large: outside the tracked range, rounding is amplified)' if sum_abs > LARGE_COEFFICIENTS else ''
        if skip and os.path.isfile(path):
            log(f'  σ_rel {std:.3f}: {path} exists, skipped')
            continue
        log(f'  σ_rel {std:.3f}: Σ|c| = {sum_abs:.3f}{warning}')
        todo.append(column)
    for start in range(0, len(todo), batch):
        columns = todo[start:start + batch]
        for column, state in zip(columns, combine_snapshots(inputs, weights[:, columns])):
            path, std, sum_abs = results[column]
            info = dict(kind='phema-reconstruction', std=std, gamma=std_to_gamma(std), nimg=out_nimg,
                        kimg=out_nimg // 1000, run_id=last_info['run_id'], sum_abs_coefficients=sum_abs,
                        num_inputs=len(inputs))
            checkpoint.save_network_file(path, network_config=network_config, ema_state=state, info=info)
            log(f'  wrote {path}')
    return results
