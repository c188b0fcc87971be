"""Post-hoc EMA: the profile formulas against numerical integration, the per-step update against the explicit
weighted average, reconstruction against directly tracked profiles, exact resume (in process and after kill -9),
the files in generate.py / fid.py, and one-line errors. The torchrun case lives in test_train.py (its DDP runs
keep tracks)."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.integrate
import torch
from click.testing import CliRunner

from data_helpers import make_image_zip, tiny_training_options
import fid
import generate
import reconstruct_ema
import train
from training import checkpoint, generation, phema, training_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------------- formulas


def test_gamma_std_round_trip_and_published_values():
    # Catches a wrong cubic coefficient or picking a root other than the largest real one.
    for std in np.linspace(0.005, 0.285, 57):
        assert phema.gamma_to_std(phema.std_to_gamma(std)) == pytest.approx(std, rel=1e-12)
    assert phema.std_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert phema.std_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize('gamma', [0.0, 0.7, 6.94, 16.97, 97.0])
def test_profile_std_matches_numerical_integration(gamma):
    # σ_rel must be the standard deviation of the weight density (γ+1)τ^γ/t^(γ+1) divided by t; catches a wrong
    # σ_rel formula (e.g. EDM2's expression with γ+1 and γ+2 swapped).
    t = 3.7
    density = lambda tau: (gamma + 1) * tau ** gamma / t ** (gamma + 1)  # noqa: E731
    total = scipy.integrate.quad(density, 0, t, epsabs=0, epsrel=1e-13)[0]
    mean = scipy.integrate.quad(lambda tau: tau * density(tau), 0, t, epsabs=0, epsrel=1e-13)[0]
    second = scipy.integrate.quad(lambda tau: tau ** 2 * density(tau), 0, t, epsabs=0, epsrel=1e-13)[0]
    assert total == pytest.approx(1, rel=1e-12)
    assert phema.gamma_to_std(gamma) == pytest.approx(math.sqrt(second - mean ** 2) / t, rel=1e-9)


@pytest.mark.parametrize('t_a, gamma_a, t_b, gamma_b', [(1.0, 6.94, 2.5, 16.97), (2.5, 6.94, 1.0, 16.97),
                                                         (3.0, 0.0, 3.0, 11.2), (7.0, 40.0, 2.0, 1.5)])
def test_inner_product_matches_quadrature(t_a, gamma_a, t_b, gamma_b):
    # Both orders (t_a < t_b and t_a > t_b) and equal times; catches the exponent of the wrong profile.
    def p(tau, t, gamma):
        return (gamma + 1) * tau ** gamma / t ** (gamma + 1)
    expected = scipy.integrate.quad(lambda tau: p(tau, t_a, gamma_a) * p(tau, t_b, gamma_b), 0, min(t_a, t_b),
                                    epsabs=0, epsrel=1e-13, limit=200)[0]
    assert float(phema.profile_inner(t_a, gamma_a, t_b, gamma_b)) == pytest.approx(expected, rel=1e-10)


def test_std_out_of_range_is_a_clear_error():
    for std in (0, -0.05, 1 / math.sqrt(12), 0.3):
        with pytest.raises(ValueError, match='out of range'):
            phema.std_to_gamma(std)


@pytest.mark.parametrize('batch', [1, 8])
def test_per_step_update_is_the_power_function_average(batch):
    """A float64 scalar parameter driven by a fixed sequence: after n steps the track must equal
    Σ_k w_k θ_k with w_k = ∫ over step k of the density = (k/n)^(γ+1) − ((k−1)/n)^(γ+1). Catches β computed with
    the images before the step, an exponent γ instead of γ+1, and a first step that does not copy."""
    net = torch.nn.Linear(1, 1, bias=False).double()
    tracks = phema.PowerEMA(net, [0.05, 0.2])
    iterates = [math.sin(1.3 * k) + 0.05 * k for k in range(1, 301)]
    for n, value in enumerate(iterates, start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        tracks.update(net, n * batch, batch)
        for gamma, track in zip(tracks.gammas, tracks.tracks):
            k = np.arange(1, n + 1, dtype=np.float64)
            weights = (k / n) ** (gamma + 1) - ((k - 1) / n) ** (gamma + 1)
            expected = float(np.dot(weights, iterates[:n]))
            assert float(track[0]) == pytest.approx(expected, rel=1e-13, abs=1e-14), (n, gamma)


def test_reconstructing_an_input_profile_returns_that_input():
    # The Gram system's exact solution for a target that is one of the inputs is the unit vector; catches a
    # transposed right-hand side or a wrong normalisation.
    nimg = [1000, 1000, 2000, 2000, 3000, 3000]
    gammas = [phema.std_to_gamma(s) for s in (0.05, 0.10)] * 3
    weights = phema.reconstruction_weights(nimg, gammas, [2000, 3000], [gammas[1], gammas[0]])
    np.testing.assert_allclose(weights[:, 0], np.eye(6)[3], atol=1e-8)
    np.testing.assert_allclose(weights[:, 1], np.eye(6)[4], atol=1e-8)


def _synthetic_reconstruction_error(num_snapshots, num_steps=2048, batch=8, dim=128):
    """‖reconstructed 0.07 − tracked 0.07‖ / ‖tracked 0.05 − tracked 0.10‖ at the end of a noisy drifting walk
    (an SGD-like trajectory), the 0.07 rebuilt from num_snapshots snapshots of the 0.05 and 0.10 tracks."""
    rng = np.random.default_rng(1)
    net = torch.nn.Linear(dim, 1, bias=False).double()
    tracks = phema.PowerEMA(net, [0.05, 0.07, 0.10])
    snapshots = []
    for step in range(1, num_steps + 1):
        with torch.no_grad():
            net.weight.add_(torch.from_numpy(rng.standard_normal((1, dim))) * 0.01 + 0.001)
        tracks.update(net, step * batch, batch)
        if step % (num_steps // num_snapshots) == 0:
            snapshots.append((step * batch, [t[0].clone() for t in tracks.tracks]))
    inputs = [(nimg, index) for nimg, _ in snapshots for index in (0, 2)]
    weights = phema.reconstruction_weights([n for n, _ in inputs], [tracks.gammas[i] for _, i in inputs],
                                           [snapshots[-1][0]], [tracks.gammas[1]])[:, 0]
    values = {(nimg, index): ws[index] for nimg, ws in snapshots for index in (0, 2)}
    rebuilt = sum(w * values[key] for w, key in zip(weights, inputs))
    final = snapshots[-1][1]
    return float((rebuilt - final[1]).norm() / (final[0] - final[2]).norm())


def test_reconstruction_recovers_a_directly_tracked_profile_and_improves_with_denser_snapshots():
    """0.07 rebuilt from 0.05 and 0.10 snapshots alone matches the tracked 0.07 (measured: 4.5e-2, 4.8e-4, 6.1e-6
    of the 0.05–0.10 distance for 4, 16, 64 snapshots per track). Catches any error in the Gram matrix, the
    targets or the times, which leave the error near 1 or make it stop falling."""
    errors = [_synthetic_reconstruction_error(n) for n in (4, 16, 64)]
    assert errors[0] < 0.1 and errors[1] < 2e-3 and errors[2] < 5e-5, errors
    assert errors[0] > errors[1] > errors[2]


def test_snapshot_due_on_crossing_a_multiple():
    assert phema.snapshot_due(992, 1024, 1) and phema.snapshot_due(0, 5000, 2)
    assert not phema.snapshot_due(1024, 1056, 1) and not phema.snapshot_due(1000, 1032, 1)
    assert phema.snapshot_due(968, 1000, 1)


# ---------------------------------------------------------------------------------------------- in-process runs


@pytest.fixture(scope='module')
def tiny_zip(tmp_path_factory):
    return make_image_zip(str(tmp_path_factory.mktemp('data') / 'tiny.zip'), num=40, resolution=8)


def _options(zip_path, **overrides):
    return tiny_training_options(zip_path, **{'batch_gpu': 8, **overrides})  # accumulation over 2 rounds


def test_tracks_leave_training_unchanged_and_resume_exactly(tiny_zip, tmp_path):
    """With tracks on (and --batch-gpu accumulation), the network and the traditional EMA are bit-identical to
    a run without them, and a resumed run ends with the same tracks, snapshots included. Catches a track update
    that touches the network or draws random numbers, and tracks missing from the training state."""
    for name in ('plain', 'full', 'split'):
        (tmp_path / name).mkdir()
    tracked = dict(phema_stds=[0.05, 0.1], phema_snap_kimg=1)
    plain = training_loop.training_loop(run_dir=str(tmp_path / 'plain'), **_options(tiny_zip))
    full = training_loop.training_loop(run_dir=str(tmp_path / 'full'), **_options(tiny_zip, **tracked))
    for which in ('net', 'ema'):
        for name, tensor in getattr(plain, which).state_dict().items():
            assert torch.equal(tensor, getattr(full, which).state_dict()[name]), f'{which}.{name}'
    training_loop.training_loop(run_dir=str(tmp_path / 'split'), **_options(tiny_zip, total_kimg=0.032, **tracked))
    [(_kimg, path)] = checkpoint.find_checkpoints(str(tmp_path / 'split'))
    resumed = training_loop.training_loop(run_dir=str(tmp_path / 'split'), resume_state_dump=path,
                                          **_options(tiny_zip, **tracked))
    assert resumed.phema.run_id == checkpoint.load_training_state(path)['phema']['run_id']
    for a, b in zip(full.phema.tracks, resumed.phema.tracks):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # The last snapshot (at 64 images, file kimg 0) holds the tracks, with the network's buffers.
    for index, std in enumerate([0.05, 0.1]):
        snapshot = checkpoint.load_network_file(str(tmp_path / 'split' / phema.track_file_name(0, std)))
        assert snapshot['info']['nimg'] == 64 and snapshot['info']['std'] == std
        assert snapshot['network_config']['D'] == 128.0
        for name, tensor in zip(full.phema.names, full.phema.tracks[index]):
            assert torch.equal(snapshot['ema'][name], tensor), name
    assert not torch.equal(full.phema.tracks[0][0], full.phema.tracks[1][0])  # the two lengths differ


def test_tracks_cannot_be_switched_on_or_changed_at_a_resume(tiny_zip, tmp_path):
    training_loop.training_loop(run_dir=str(tmp_path), **_options(tiny_zip, total_kimg=0.032))
    [(_kimg, path)] = checkpoint.find_checkpoints(str(tmp_path))
    with pytest.raises(ValueError, match='tracks must run from the start'):
        training_loop.training_loop(run_dir=str(tmp_path), resume_state_dump=path,
                                    **_options(tiny_zip, phema_stds=[0.05]))


def test_version_1_training_states_still_load(tmp_path):
    path = str(tmp_path / 'training-state-000001.pt')
    checkpoint.save_training_state(path, network_config={'D': None}, net_state={}, ema_state={},
                                   optimizer_state={}, progress={'cur_nimg': 1})
    state = torch.load(path, weights_only=True)
    assert state['version'] == 2 and 'phema' not in state
    state['version'] = 1
    torch.save(state, path)
    assert checkpoint.load_training_state(path).get('phema') is None
    state['version'] = 3
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError, match='version 3 is not supported'):
        checkpoint.load_training_state(path)


# ------------------------------------------------------------------------------------------ train.py end to end

TINY = ['--cbase=16', '--cres=1,1', '--nblock=1', '--batch=32', '--tick=1', '--dump=1', '--lr-rampup=0',
        '--seed=3', '--workers=1', '--pfgmpp=1', '--aug_dim=128', '--phema=0.05,0.07,0.1', '--phema-snap=1',
        '--duration=0.002']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PFGMPP_DEVICE='cpu')


def _train_command(outdir, data, name):
    return [sys.executable, os.path.join(ROOT, 'train.py'), f'--outdir={outdir}', f'--data={data}',
            f'--name={name}'] + TINY


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    return make_image_zip(str(tmp_path_factory.mktemp('data') / 'tiny-8x8.zip'), num=96, resolution=8)


@pytest.fixture(scope='module')
def tracked_run(data_zip, tmp_path_factory):
    """A 2-kimg PFGM++ run tracking σ_rel 0.05, 0.07, 0.10 with snapshots at 1 and 2 kimg."""
    outdir = str(tmp_path_factory.mktemp('runs'))
    result = subprocess.run(_train_command(outdir, data_zip, 'full'), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(outdir, 'full'), outdir


def _snapshot_tensors(run_dir):
    return {name: checkpoint.load_network_file(os.path.join(run_dir, name))['ema']
            for name in sorted(os.listdir(run_dir)) if phema.TRACK_RE.fullmatch(name)}


def test_kill_9_then_rerun_is_bit_identical(tracked_run, data_zip):
    """SIGKILL after the first training state, then the same command: the final state (tracks included) and every
    snapshot equal the uninterrupted run's, and no temporary is left beside the snapshots."""
    full_dir, outdir = tracked_run
    command = _train_command(outdir, data_zip, 'killed')
    killed_dir = os.path.join(outdir, 'killed')
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(killed_dir, 'training-state-000001.pt')) and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(killed_dir, 'training-state-000002.pt')), 'killed too late'
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and 'Resuming from' in result.stdout, result.stderr[-3000:]
    a = checkpoint.load_training_state(os.path.join(full_dir, 'training-state-000002.pt'))
    b = checkpoint.load_training_state(os.path.join(killed_dir, 'training-state-000002.pt'))
    assert a['phema']['stds'] == b['phema']['stds'] == [0.05, 0.07, 0.1]
    for track_a, track_b in zip(a['phema']['tracks'], b['phema']['tracks']):
        for name in track_a:
            assert torch.equal(track_a[name], track_b[name]), name
    expected, actual = _snapshot_tensors(full_dir), _snapshot_tensors(killed_dir)
    assert sorted(expected) == sorted(actual) and len(expected) == 6
    for file_name in expected:
        for name, tensor in expected[file_name].items():
            assert torch.equal(tensor, actual[file_name][name]), (file_name, name)
    assert not [name for name in os.listdir(killed_dir) if name.endswith('.tmp') and 'phema' in name]


def _flat(state):
    return torch.cat([t.flatten().double() for t in state.values() if t.is_floating_point()])


def test_reconstruct_ema_cli_recovers_tracked_profiles(tracked_run, tmp_path):
    """On a real run: 0.10 rebuilt from every snapshot equals the tracked 0.10 (it is in the span: catches a
    wrong file ↔ time/σ_rel pairing); 0.07 rebuilt from the 0.05 and 0.10 snapshots alone is close to the tracked
    0.07 relative to the 0.05–0.10 distance (two snapshots per track: the coarse end of the synthetic test)."""
    full_dir, _outdir = tracked_run
    result = CliRunner().invoke(reconstruct_ema.main, [f'--indir={full_dir}', f'--outdir={tmp_path / "all"}',
                                                       '--outstd=0.1'])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(reconstruct_ema.main, [f'--indir={full_dir}', f'--outdir={tmp_path / "two"}',
                                                       '--outstd=0.07', '--instd=0.05,0.1', '--outkimg=2'])
    assert result.exit_code == 0, result.output
    assert 'Σ|c|' in result.output
    tracked = {std: checkpoint.load_network_file(os.path.join(full_dir, phema.track_file_name(2, std)))['ema']
               for std in (0.05, 0.07, 0.1)}
    rebuilt = checkpoint.load_network_file(str(tmp_path / 'all' / 'phema-000002-0.100.pt'))
    assert rebuilt['info']['std'] == 0.1 and rebuilt['info']['nimg'] == 2016
    for name, tensor in tracked[0.1].items():
        torch.testing.assert_close(rebuilt['ema'][name], tensor, rtol=0, atol=1e-6)
    rebuilt = checkpoint.load_network_file(str(tmp_path / 'two' / 'phema-000002-0.070.pt'))['ema']
    distance = (_flat(tracked[0.05]) - _flat(tracked[0.1])).norm()
    error = float((_flat(rebuilt) - _flat(tracked[0.07])).norm() / distance)
    assert error < 0.25, error  # measured 0.150 (synthetic walk: 0.16 with 2 snapshots, 0.045 with 4)
    assert float((_flat(tracked[0.07]) - _flat(tracked[0.05])).norm() / distance) > 2 * error


def test_reconstructed_networks_are_checkpoints_for_generate_and_fid(tracked_run, tmp_path):
    """A run directory with phema-*.pt: generate.py's run-directory mode writes one ckpt_*_ema* folder per σ_rel
    beside the training state's, with the images --network gives for that file, and fid.py reads σ_rel back."""
    full_dir, _outdir = tracked_run
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    shutil.copy(os.path.join(full_dir, 'training-state-000002.pt'), run_dir)
    result = CliRunner().invoke(reconstruct_ema.main, [f'--indir={full_dir}', f'--outdir={run_dir}',
                                                       '--outstd=0.06,0.08'])
    assert result.exit_code == 0, result.output
    common = ['--seeds=0-1', '--steps=2', '--batch=2']
    result = CliRunner().invoke(generate.main, [f'--outdir={run_dir}'] + common)
    assert result.exit_code == 0, result.output
    folders = sorted(name for name in os.listdir(run_dir) if name.startswith('ckpt_'))
    assert folders == ['ckpt_000002', 'ckpt_000002_ema0.060', 'ckpt_000002_ema0.080']
    single = tmp_path / 'single'
    result = CliRunner().invoke(generate.main, [f'--network={run_dir / "phema-000002-0.080.pt"}',
                                                f'--outdir={single}'] + common)
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        in_run = open(generation.image_path(str(run_dir / 'ckpt_000002_ema0.080'), seed, True), 'rb').read()
        assert in_run == open(single / f'{seed:06d}.png', 'rb').read()
    assert open(generation.image_path(str(run_dir / 'ckpt_000002_ema0.060'), 0, True), 'rb').read() != \
        open(generation.image_path(str(run_dir / 'ckpt_000002_ema0.080'), 0, True), 'rb').read()
    found = {f.name: f.ema_std for f in fid.find_image_folders(str(run_dir))}
    assert found == {'ckpt_000002': None, 'ckpt_000002_ema0.060': 0.06, 'ckpt_000002_ema0.080': 0.08}
    assert fid.parse_folder_name(generation.folder_name(2, [0], axis='steps', value=9, solver='dpm2m',
                                                        fields={'end': 'stop'}, ema_std=0.07)) == dict(
        seed_set=1, kimg=2, axis='steps', value=9, solver='dpm2m', fields={'end': 'stop'}, ema_std=0.07, guidance='')


# ------------------------------------------------------------------------------------------------------ bad input


def _one_line_error(result):
    lines = result.output.strip().splitlines()
    return result.exit_code != 0 and result.exception is not None and 'Traceback' not in result.output and \
        lines[-1].startswith('Error') and isinstance(result.exception, SystemExit)


@pytest.mark.parametrize('case', ['std_too_large', 'std_zero', 'std_negative', 'outkimg', 'no_snapshots',
                                  'mixed_runs', 'mixed_D', 'bad_range', 'instd_missing'])
def test_reconstruct_bad_input_one_line_nothing_written(case, tracked_run, tmp_path):
    full_dir, outdir = tracked_run
    indir = tmp_path / 'in'
    shutil.copytree(full_dir, indir, ignore=shutil.ignore_patterns('training-state-*'))
    args = {'std_too_large': ['--outstd=0.05,0.29'], 'std_zero': ['--outstd=0'], 'std_negative': ['--outstd=-0.1'],
            'outkimg': ['--outstd=0.07', '--outkimg=5'], 'bad_range': ['--outstd=0.01,0.03,...,0.06'],
            'instd_missing': ['--outstd=0.07', '--instd=0.2']}.get(case, ['--outstd=0.07'])
    expected = {'std_too_large': 'out of range', 'std_zero': 'out of range', 'std_negative': 'out of range',
                'outkimg': 'not a snapshot time', 'no_snapshots': 'no post-hoc EMA snapshots',
                'mixed_runs': 'different training runs', 'mixed_D': 'D=64.0 vs D=128.0', 'bad_range': 'not reached',
                'instd_missing': 'no snapshots of σ_rel'}[case]
    if case == 'no_snapshots':
        for name in os.listdir(indir):
            os.remove(indir / name)
    if case in ('mixed_runs', 'mixed_D'):
        state = checkpoint.load_network_file(str(indir / 'phema-track-000002-0.050.pt'))
        if case == 'mixed_runs':
            state['info']['run_id'] = 'another'
        else:
            state['network_config']['D'] = 64.0
        checkpoint.save_network_file(str(indir / 'phema-track-000002-0.050.pt'), network_config=state['network_config'],
                                     ema_state=state['ema'], info=state['info'])
    out = tmp_path / 'out'
    result = CliRunner().invoke(reconstruct_ema.main, [f'--indir={indir}', f'--outdir={out}'] + args)
    assert _one_line_error(result), result.output
    assert expected in result.output, result.output
    assert not out.exists()


def test_train_refuses_tracks_switched_on_or_dropped_at_resume(tracked_run, data_zip, tmp_path):
    full_dir, _outdir = tracked_run
    state = checkpoint.load_training_state(os.path.join(full_dir, 'training-state-000001.pt'))
    untracked = str(tmp_path / 'training-state-000001.pt')
    checkpoint.save_training_state(untracked, network_config=state['network_config'], net_state=state['net'],
                                   ema_state=state['ema'], optimizer_state=state['optimizer_state'],
                                   progress=state['progress'], training_options=state['training_options'],
                                   extra=state['extra'])
    base = [f'--outdir={tmp_path / "out"}', f'--data={data_zip}'] + [a for a in TINY if not a.startswith('--phema=')]
    cases = [(base + ['--phema=0.05', f'--resume={untracked}'], 'trained without post-hoc EMA tracks'),
             (base + [f'--resume={os.path.join(full_dir, "training-state-000001.pt")}'], 'resume with --phema=0.05,0.07,0.1'),
             (base + ['--phema=0.05,0.3'], 'out of range'),
             (base + ['--phema=0.05,0.05'], 'twice')]
    for args, message in cases:
        result = CliRunner().invoke(train.main, args)
        assert _one_line_error(result) and message in result.output, result.output
        assert not (tmp_path / 'out').exists()
