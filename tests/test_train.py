"""train.py end to end on the CPU: a tiny PFGM++ run, exact resume (explicit and by --name), torchrun with two
gloo processes (the same weights on both, exact resume), and every bad input answered with one line, a non-zero
exit and nothing written."""

import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile

import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from data_helpers import make_image_zip
from training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cbase=16', '--cres=1,1', '--nblock=1', '--batch=32', '--tick=1', '--dump=1', '--lr-rampup=0',
        '--seed=3', '--workers=1']
PFGMPP = ['--pfgmpp=1', '--aug_dim=128']
STATS_KEYS = ['Loss/loss', 'Progress/tick', 'Progress/kimg', 'Timing/total_sec', 'Timing/sec_per_tick',
              'Timing/sec_per_kimg', 'Timing/maintenance_sec', 'Resources/cpu_mem_gb', 'Resources/peak_gpu_mem_gb',
              'Resources/peak_gpu_mem_reserved_gb', 'timestamp']


def run_train(args, launcher=None, script=os.path.join(ROOT, 'train.py')):
    env = dict(os.environ, OMP_NUM_THREADS='1', PFGMPP_DEVICE='cpu')
    command = (launcher or [sys.executable]) + [script] + args
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    return make_image_zip(str(tmp_path_factory.mktemp('data') / 'tiny-8x8.zip'), num=96, resolution=8)


@pytest.fixture(scope='module')
def full_run(data_zip, tmp_path_factory):
    """One uninterrupted 2-kimg PFGM++ run (63 steps of 32 images)."""
    outdir = str(tmp_path_factory.mktemp('runs'))
    log = run_train([f'--outdir={outdir}', f'--data={data_zip}', '--name=full', '--duration=0.002'] + PFGMPP + TINY)
    return os.path.join(outdir, 'full'), outdir, log


def _tensors(state):
    flat = {f'net.{k}': v for k, v in state['net'].items()}
    flat.update({f'ema.{k}': v for k, v in state['ema'].items()})
    for index, param_state in state['optimizer_state']['state'].items():
        flat.update({f'adam.{index}.{k}': v for k, v in param_state.items()})
    for std, track in zip(state.get('phema', {}).get('stds', []), state.get('phema', {}).get('tracks', [])):
        flat.update({f'phema.{std:g}.{k}': v for k, v in track.items()})
    return flat


def assert_same_state(path_a, path_b):
    a, b = checkpoint.load_training_state(path_a), checkpoint.load_training_state(path_b)
    tensors_a, tensors_b = _tensors(a), _tensors(b)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), f'{name} differs'
    assert a['progress'] == b['progress']


# ------------------------------------------------------------------------------------------------------ end to end


def test_tiny_pfgmpp_run_writes_every_file(full_run):
    run_dir, _outdir, log = full_run
    files = sorted(os.listdir(run_dir))
    events = [name for name in files if name.startswith('events.out.tfevents.')]  # tensorboard: test requirement
    assert len(events) == 1 and [name for name in files if name not in events] == [
        'log.txt', 'stats.jsonl', 'training-state-000001.pt', 'training-state-000002.pt', 'training_options.json']
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert list(options)[:6] == ['dataset_kwargs', 'data_loader_kwargs', 'network_kwargs', 'loss_kwargs',
                                 'optimizer_kwargs', 'augment_kwargs']
    assert options['D'] == 128.0 and options['pfgmpp'] is True and options['loss_kwargs']['D'] == 128.0
    assert options['seed'] == 3 and options['total_kimg'] == 2 and options['batch_size'] == 32
    assert options['dataset_kwargs']['resolution'] == 8 and options['dataset_kwargs']['max_size'] == 96
    assert options['network_kwargs']['model_channels'] == 16 and options['opts']['aug_dim'] == 128.0
    assert options['run_dir'] == run_dir

    log_text = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'tick 0 ' in log_text and 'tick 2 ' in log_text and 'Exiting...' in log_text
    assert 'loss:' not in log_text  # no per-step prints

    ticks = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(ticks) == 3 and all(list(tick) == STATS_KEYS for tick in ticks)
    assert [tick['Progress/tick']['mean'] for tick in ticks] == [0, 1, 2]
    assert ticks[-1]['Progress/kimg']['mean'] == pytest.approx(2.016)
    assert ticks[1]['Loss/loss']['num'] == 32 * 32 * 3 * 64  # 32 steps of 32 images × 3×8×8 elements
    assert ticks[-1]['Loss/loss']['mean'] < ticks[0]['Loss/loss']['mean']  # the loss falls

    state = torch.load(os.path.join(run_dir, 'training-state-000002.pt'), map_location='cpu', weights_only=True)
    assert state['network_config']['D'] == 128.0
    assert state['network_config']['class_name'] == 'EDMPrecond' and state['network_config']['model_type'] == 'SongUNet'
    assert state['progress']['cur_nimg'] == 2016 and state['progress']['seed'] == 3
    assert len(state['extra']['rng_states']) == 1 and 'optimizer_state' in state
    net = checkpoint.network_from_state(state)
    assert net.D == 128.0
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 8, 8), torch.ones(2))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_resume_by_name_and_by_path_is_bit_identical(full_run, data_zip):
    full_dir, outdir, _log = full_run
    split = [f'--outdir={outdir}', f'--data={data_zip}', '--name=split'] + PFGMPP + TINY
    run_train(split + ['--duration=0.001'])
    split_dir = os.path.join(outdir, 'split')
    assert [kimg for kimg, _path in checkpoint.find_checkpoints(split_dir)] == [1]
    log = run_train(split + ['--duration=0.002'])  # the same command, longer: continues the run
    assert 'Resuming from' in log
    assert_same_state(os.path.join(full_dir, 'training-state-000002.pt'),
                      os.path.join(split_dir, 'training-state-000002.pt'))
    log = run_train(split + ['--duration=0.002'])  # nothing left to do: says so, writes nothing
    assert 'already complete' in log
    assert [kimg for kimg, _path in checkpoint.find_checkpoints(split_dir)] == [1, 2]

    explicit = os.path.join(outdir, 'explicit')
    run_train([f'--outdir={explicit}', f'--data={data_zip}', '--duration=0.002',
               f'--resume={os.path.join(split_dir, "training-state-000001.pt")}'] + PFGMPP + TINY)
    [numbered] = os.listdir(explicit)
    assert numbered == '00000-tiny-8x8-uncond-ddpmpp-edm-gpus1-batch32-fp32'
    assert_same_state(os.path.join(full_dir, 'training-state-000002.pt'),
                      os.path.join(explicit, numbered, 'training-state-000002.pt'))


TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
# With post-hoc EMA tracks on: also checks that torchrun keeps them equal on every process, that rank 0's tracks
# are what the snapshots and the training state hold, and (resume test) that they resume exactly.
DDP = ['--name=ddp', '--arch=ncsnpp', '--phema=0.05,0.1', '--phema-snap=1'] + PFGMPP + TINY


def run_torchrun_and_capture(outdir, args):
    """train.py under torchrun with 2 CPU processes; returns each rank's final {'net', 'ema'} weights."""
    prefix = os.path.join(str(outdir), 'weights')
    run_train([prefix, f'--outdir={outdir}'] + args, launcher=TORCHRUN,
              script=os.path.join(ROOT, 'tests', 'ddp_capture.py'))
    return [torch.load(f'{prefix}-rank{rank}.pt', weights_only=True) for rank in range(2)]


@pytest.fixture(scope='module')
def ddp_fp32_run(data_zip, tmp_path_factory):
    """A 1-kimg fp32 run with 2 processes: (run dir, each rank's final weights)."""
    outdir = tmp_path_factory.mktemp('ddp_fp32')
    ranks = run_torchrun_and_capture(outdir, [f'--data={data_zip}', '--duration=0.001', '--precision=fp32'] + DDP)
    return str(outdir), ranks


def _check_two_process_run(run_dir, ranks, precision):
    # Both processes end with the same weights, and those are what rank 0 saved.
    state = checkpoint.load_training_state(os.path.join(run_dir, 'training-state-000001.pt'))
    for which in ('net', 'ema'):
        assert ranks[0][which].keys() == ranks[1][which].keys() == state[which].keys()
        for name, tensor in ranks[0][which].items():
            assert torch.equal(tensor, ranks[1][which][name]), f'{which}.{name} differs between ranks'
            assert torch.equal(tensor, state[which][name]), f'{which}.{name} differs from the checkpoint'
    assert len(state['extra']['rng_states']) == 2 and state['progress']['world_size'] == 2
    for std, saved in zip(state['phema']['stds'], state['phema']['tracks']):
        snapshot = checkpoint.load_network_file(os.path.join(run_dir, f'phema-track-000001-{std:.3f}.pt'))
        assert snapshot['info']['run_id'] == state['phema']['run_id']
        for name, tensor in saved.items():
            assert torch.equal(tensor, ranks[0]['phema'][f'{std:g}'][name]), f'phema {std} {name} rank 0'
            assert torch.equal(tensor, ranks[1]['phema'][f'{std:g}'][name]), f'phema {std} {name} rank 1'
            assert torch.equal(tensor, snapshot['ema'][name]), f'phema {std} {name} snapshot'
    assert not torch.equal(state['extra']['rng_states'][0]['torch'], state['extra']['rng_states'][1]['torch'])
    assert state['network_config']['embedding_type'] == 'fourier'
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['batch_size'] == 32 and options['precision'] == precision


def test_torchrun_two_cpu_processes_fp32(ddp_fp32_run):
    outdir, ranks = ddp_fp32_run
    _check_two_process_run(os.path.join(outdir, 'ddp'), ranks, 'fp32')


def test_torchrun_two_cpu_processes_bf16_native(data_zip, tmp_path):  # DDP passes its dtype argument on
    ranks = run_torchrun_and_capture(tmp_path, [f'--data={data_zip}', '--duration=0.001',
                                                '--precision=bf16-native'] + DDP)
    _check_two_process_run(str(tmp_path / 'ddp'), ranks, 'bf16-native')


def test_torchrun_resume_is_bit_identical(ddp_fp32_run, data_zip, tmp_path):
    """2 processes: 1 kimg, then the same command continued to 2 kimg, equals 2 kimg in one go."""
    outdir, _ranks = ddp_fp32_run
    common = [f'--data={data_zip}', '--duration=0.002', '--precision=fp32'] + DDP
    log = run_train([f'--outdir={outdir}'] + common, launcher=TORCHRUN)
    assert 'Resuming from' in log
    run_train([f'--outdir={tmp_path}'] + common, launcher=TORCHRUN)
    assert_same_state(str(tmp_path / 'ddp' / 'training-state-000002.pt'),
                      os.path.join(outdir, 'ddp', 'training-state-000002.pt'))


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory, data_zip):
    root = tmp_path_factory.mktemp('bad')
    corrupt_zip = root / 'corrupt.zip'
    corrupt_zip.write_bytes(open(data_zip, 'rb').read()[:500])
    not_dataset = root / 'notes.txt'
    not_dataset.write_text('hello')
    empty_dir = root / 'empty'
    empty_dir.mkdir()
    mixed = root / 'mixed.zip'
    with zipfile.ZipFile(mixed, 'w') as archive:
        for index, size in enumerate([8, 16]):
            buffer = io.BytesIO()
            PIL.Image.new('RGB', (size, size)).save(buffer, format='png')
            archive.writestr(f'00000/img{index:08d}.png', buffer.getvalue())
    corrupt_state = root / 'training-state-000001.pt'
    corrupt_state.write_bytes(b'not a checkpoint')
    return dict(corrupt_zip=str(corrupt_zip), not_dataset=str(not_dataset), empty_dir=str(empty_dir),
                mixed=str(mixed), corrupt_state=str(corrupt_state), missing=str(root / 'missing.zip'))


def invoke(args):
    from train import main
    result = CliRunner().invoke(main, args)
    return result, result.output  # click ≥ 8.2: stdout and stderr interleaved


@pytest.mark.parametrize('case', ['missing', 'not_dataset', 'empty_dir', 'corrupt_zip', 'mixed', 'cond', 'batch',
                                  'resume_missing', 'resume_corrupt', 'resume_name', 'resume_incompatible',
                                  'transfer_and_resume', 'transfer_missing', 'aug_dim_zero', 'aug_dim_negative',
                                  'cres'])
def test_bad_input_one_line_no_files(case, bad_files, data_zip, full_run, tmp_path):
    outdir = str(tmp_path / 'out')
    state = os.path.join(full_run[0], 'training-state-000001.pt')
    data = dict(missing=bad_files['missing'], not_dataset=bad_files['not_dataset'],
                empty_dir=bad_files['empty_dir'], corrupt_zip=bad_files['corrupt_zip'],
                mixed=bad_files['mixed']).get(case, data_zip)
    extra, expected = {
        'missing': ([], '--data'), 'not_dataset': ([], '--data'), 'empty_dir': ([], '--data'),
        'corrupt_zip': ([], '--data'), 'mixed': ([], '--data'),
        'cond': (['--cond=1'], '--cond=True requires labels'),
        'batch': (['--batch-gpu=12'], '--batch=32'),
        'resume_missing': ([f'--resume={bad_files["missing"][:-4]}/training-state-000001.pt'], '--resume'),
        'resume_corrupt': ([f'--resume={bad_files["corrupt_state"]}'], '--resume'),
        'resume_name': ([f'--resume={data_zip}'], 'training-state-*.pt'),
        'resume_incompatible': ([f'--resume={state}', '--cbase=32'], 'does not match'),
        'transfer_and_resume': ([f'--resume={state}', f'--transfer={state}'], 'at the same time'),
        'transfer_missing': ([f'--transfer={bad_files["missing"]}'], '--transfer'),
        'aug_dim_zero': (['--aug_dim=0'], 'aug_dim'),
        'aug_dim_negative': (['--aug_dim=-3'], 'aug_dim'),
        'cres': (['--cres=1,x'], '--cres'),
    }[case]
    args = [f'--outdir={outdir}', f'--data={data}', '--duration=0.001'] + PFGMPP + TINY
    args = [a for a in args if not (a.startswith('--cbase') and any(e.startswith('--cbase') for e in extra))]
    result, output = invoke(args + extra)
    assert result.exit_code != 0, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    error_lines = [line for line in output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1 and expected in error_lines[0], output
    assert 'Traceback' not in output
    assert not os.path.exists(outdir)


def test_dry_run_names_the_run_dir_and_writes_nothing(data_zip, tmp_path):
    (tmp_path / '00007-earlier').mkdir()
    (tmp_path / '00042-a-file').write_text('files do not count')
    result, output = invoke([f'--outdir={tmp_path}', f'--data={data_zip}', '--dry-run', '--cond=0', '--arch=adm',
                             '--precond=ve', '--desc=try', '--batch=64'])
    assert result.exit_code == 0, output
    assert os.path.join(str(tmp_path), '00008-tiny-8x8-uncond-adm-ve-gpus1-batch64-fp32-try') in output
    assert 'Dry run; exiting.' in output
    assert sorted(os.listdir(tmp_path)) == ['00007-earlier', '00042-a-file']
    options = json.loads(output[output.index('{'):output.index('\n}\n') + 2])
    assert options['D'] is None and options['pfgmpp'] is False and options['opts']['aug_dim'] == 128
    assert options['network_kwargs']['class_name'] == 'training.networks.VEPrecond'
    assert options['loss_kwargs'] == dict(class_name='training.loss.VELoss', D=None, stf=False)
    assert options['ema_halflife_kimg'] == 500 and options['state_dump_ticks'] == 50


# ------------------------------------------------------------------------ preemption, divergence, full disk


PREEMPT = os.path.join(ROOT, 'tests', 'preempt_at.py')
SIGNAL_TO_EXIT_S = 60  # generous for 2 shared cores; a save that waits for anything (a missed signal) takes longer


def run_preempted(args, launcher=None):
    """train.py through preempt_at.py (args: its SIGNAL STEP TARGET STAMP, then train.py's); returns (exit
    status, output, seconds from the signal to the exit)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PFGMPP_DEVICE='cpu')
    result = subprocess.run((launcher or [sys.executable]) + [PREEMPT] + args, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    seconds = time.time() - float(open(args[3]).read())
    return result.returncode, result.stdout + result.stderr, seconds


def check_preempted(run_dir, output, first_step, last_step, world_size):
    """One line from our code, in log.txt too; a preemption state at a step boundary within the bounds that run
    directory mode does not list; the regular states untouched."""
    lines = [line for line in output.splitlines() if line.startswith('Preempted')]
    assert len(lines) == 1 and 'Re-run the same command' in lines[0], output[-3000:]
    assert open(os.path.join(run_dir, 'log.txt')).read().splitlines()[-1] == lines[0]
    state = checkpoint.load_training_state(os.path.join(run_dir, checkpoint.PREEMPTED_STATE_NAME))
    batches, remainder = divmod(state['progress']['cur_nimg'], 32)
    assert remainder == 0 and first_step <= batches <= last_step, state['progress']
    assert len(state['extra']['rng_states']) == world_size
    assert all(torch.isfinite(t).all() for t in _tensors(state).values())
    assert not [name for name in os.listdir(run_dir) if name.endswith('.tmp')]
    return state


@pytest.mark.parametrize('signame', ['TERM', 'USR1'])
def test_signal_saves_at_the_step_and_the_same_command_continues_bit_identically(signame, full_run, data_zip,
                                                                                tmp_path):
    """One process: the signal goes to it and its DataLoader worker (as SLURM sends it to every process) while
    step 40 runs, and once more as the save begins; the state is at the end of step 40 and re-running the command
    ends as the uninterrupted run.
    Catches an ignored signal, a save broken by the second signal, a lost step or tick, a state mistaken for a
    checkpoint, and an inexact resume."""
    full_dir = full_run[0]
    command = [f'--outdir={tmp_path}', f'--data={data_zip}', '--name=pre', '--duration=0.002'] + PFGMPP + TINY
    status, output, seconds = run_preempted([signame, '40', 'job', str(tmp_path / 'stamp')] + command)
    assert status == 75 and seconds < SIGNAL_TO_EXIT_S and 'Traceback' not in output, output[-3000:]
    run_dir = str(tmp_path / 'pre')
    check_preempted(run_dir, output, 40, 40, world_size=1)
    assert [kimg for kimg, _ in checkpoint.find_checkpoints(run_dir)] == [1]
    assert_same_state(os.path.join(full_dir, 'training-state-000001.pt'),
                      os.path.join(run_dir, 'training-state-000001.pt'))
    if signame == 'USR1':
        return  # the resume does not depend on the signal
    log = run_train(command)
    assert 'training-state-preempted.pt' in log.split('Resuming from')[1].splitlines()[0]
    assert_same_state(os.path.join(full_dir, 'training-state-000002.pt'),
                      os.path.join(run_dir, 'training-state-000002.pt'))
    assert not os.path.exists(os.path.join(run_dir, checkpoint.PREEMPTED_STATE_NAME))  # superseded


def test_torchrun_sigterm_to_every_process_then_the_same_command_is_bit_identical(ddp_fp32_run, data_zip, tmp_path):
    """2 processes; SIGTERM to the agent, both training processes and their workers at once while step 18 runs.
    Both stop on the same step (one state with both RNG states, within 4 steps), and the same command continues to
    the uninterrupted run's result. Catches ranks stopping on different steps (a hang or a mismatch), a signal
    killing a worker or the save, and a torchrun agent that stays up."""
    outdir, _ranks = ddp_fp32_run
    command = [f'--outdir={tmp_path}', f'--data={data_zip}', '--duration=0.001', '--precision=fp32'] + DDP
    status, output, seconds = run_preempted(['TERM', '18', 'job', str(tmp_path / 'stamp')] + command,
                                            launcher=TORCHRUN)
    assert status != 0 and seconds < SIGNAL_TO_EXIT_S, output[-3000:]
    check_preempted(str(tmp_path / 'ddp'), output, 18, 18 + 4, world_size=2)
    assert '--signals-to-handle' in output  # the note that SIGUSR1 to torchrun alone would kill it
    run_train(command, launcher=TORCHRUN)
    assert_same_state(os.path.join(outdir, 'ddp', 'training-state-000001.pt'),
                      str(tmp_path / 'ddp' / 'training-state-000001.pt'))


def test_torchrun_agent_alone_forwards_sigusr1(data_zip, tmp_path):
    """SIGUSR1 to the torchrun agent alone (SLURM's --signal=B:USR1), started with --signals-to-handle: it
    forwards the signal and the processes save. Catches a SIGUSR1 that kills the agent and orphans the ranks."""
    command = [f'--outdir={tmp_path}', f'--data={data_zip}', '--duration=0.001', '--precision=fp32'] + DDP
    launcher = TORCHRUN + ['--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1']
    status, output, seconds = run_preempted(['USR1', '10', 'agent', str(tmp_path / 'stamp')] + command,
                                            launcher=launcher)
    assert status != 0 and seconds < SIGNAL_TO_EXIT_S, output[-3000:]
    state = check_preempted(str(tmp_path / 'ddp'), output, 10, 10 + 4, world_size=2)
    assert 'SIGUSR1 received' in output and '--signals-to-handle' not in output.split('Training for')[1]
    assert state['progress']['world_size'] == 2


def _copy_state(source, run_dir):
    os.makedirs(run_dir)
    target = os.path.join(run_dir, os.path.basename(source))
    with open(source, 'rb') as f_in, open(target, 'wb') as f_out:
        f_out.write(f_in.read())
    return target


def test_divergence_stops_with_one_line_and_keeps_the_last_good_state(full_run, data_zip, tmp_path):
    """Continue the tiny run from 1 kimg with an absurd learning rate: the loss turns NaN, the run stops at the
    tick's end with one line naming the kimg and the causes, exit 1, and the 1-kimg state is the only one, intact
    and finite. Catches a diverged run that goes on and exits 0, or that writes a NaN checkpoint."""
    good = _copy_state(os.path.join(full_run[0], 'training-state-000001.pt'), str(tmp_path / 'div'))
    before = open(good, 'rb').read()
    result, output = invoke([f'--outdir={tmp_path}', f'--data={data_zip}', '--name=div', '--duration=0.002',
                             '--lr=1e30', '--diverge-steps=3'] + PFGMPP + TINY)
    errors = [line for line in output.splitlines() if line.startswith('Error')]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and len(errors) == 1, output
    assert 'diverged at 2.0' in errors[0] and 'kimg' in errors[0] and '--lr' in errors[0] and good in errors[0]
    assert [path for _kimg, path in checkpoint.find_checkpoints(str(tmp_path / 'div'))] == [good]
    assert open(good, 'rb').read() == before and 'Traceback' not in output
    assert re.search(r'^tick 2 +kimg 2\.0 +loss nan ', output, re.M), output  # the tick line shows it


@pytest.mark.parametrize('lr, diverge_steps', [('1e30', '3'), ('1e37', '0')])
def test_a_diverged_run_writes_no_post_hoc_ema_snapshot(lr, diverge_steps, data_zip, tmp_path):
    """Snapshots every kimg, ticks every 2 kimg. With the guard on (1e30: the loss turns NaN, the weights stay
    finite but meaningless) the run stops at the 1-kimg snapshot, before writing it; with the guard off (1e37: the
    weights overflow) it trains on but writes no snapshot of non-finite weights. Catches snapshots written before
    the tick's divergence check (the run used to leave phema-track-000001/000002 of its diverged weights)."""
    result, output = invoke([f'--outdir={tmp_path}', f'--data={data_zip}', '--name=div', '--duration=0.002',
                             f'--lr={lr}', f'--diverge-steps={diverge_steps}', '--phema=0.1', '--phema-snap=1']
                            + PFGMPP + TINY[:4] + ['--tick=2'] + TINY[5:])
    assert not [n for n in os.listdir(tmp_path / 'div') if n.startswith('phema-track')], output
    if diverge_steps == '0':
        assert result.exit_code == 0, output
        assert output.count('no post-hoc EMA snapshot written') == 2, output
    else:
        errors = [line for line in output.splitlines() if line.startswith('Error')]
        assert result.exit_code == 1 and len(errors) == 1 and 'diverged at 1.024 kimg' in errors[0], output


@pytest.mark.parametrize('full', ['log.txt', 'stats.jsonl'])
def test_full_disk_on_the_log_or_the_statistics(full, data_zip, tmp_path, monkeypatch):
    """log.txt full: the run goes on with one warning (log to the terminal only) and writes its training states;
    stats.jsonl full: one error line naming it, exit 1. Catches the traceback a full disk gave: the logger's failed
    write raised from inside print, and again while the error itself was printed."""
    import dnnlib.util
    from test_resilience import failing_open
    from torch_utils import training_stats
    failing_open(monkeypatch, dnnlib.util if full == 'log.txt' else training_stats, full, after_bytes=600)
    result, output = invoke([f'--outdir={tmp_path}', f'--data={data_zip}', '--name=disk', '--duration=0.002']
                            + PFGMPP + TINY)
    assert 'Traceback' not in output
    states = [n for n in os.listdir(tmp_path / 'disk') if n.startswith('training-state')]
    if full == 'log.txt':
        warnings = [line for line in output.splitlines() if line.startswith('Warning: cannot write')]
        assert result.exit_code == 0 and len(warnings) == 1 and 'log.txt' in warnings[0], output
        assert 'No space left on device' in warnings[0] and sorted(states) == ['training-state-000001.pt',
                                                                               'training-state-000002.pt']
        assert re.search(r'^tick 2 ', output, re.M), output  # the terminal still gets the log
    else:
        errors = [line for line in output.splitlines() if line.startswith('Error')]
        assert result.exit_code == 1 and len(errors) == 1, output
        assert 'No space left on device' in errors[0] and 'stats.jsonl' in errors[0], output


@pytest.mark.parametrize('target, extra, kept', [
    ('training-state-000002.pt', [], ['training-state-000001.pt']),
    ('phema-track-000001-0.100.pt', ['--phema=0.1', '--phema-snap=1'], [])])
def test_full_disk_on_rank_0_stops_every_rank_at_once(target, extra, kept, data_zip, tmp_path):
    """torchrun, 2 ranks: rank 0's write of the 2-kimg state (or of the 1-kimg post-hoc EMA snapshot) fails. One error line naming the file and no traceback
    from any rank (rank 1 used to be left at the barrier after the save and die there with gloo's 'Connection
    closed by peer' traceback; NCCL would leave it waiting), a prompt non-zero exit, the 1-kimg state kept and no
    temporary left."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PFGMPP_DEVICE='cpu')
    started = time.time()
    result = subprocess.run(TORCHRUN + [os.path.join(ROOT, 'tests', 'full_disk_at.py'), target,
                                        f'--outdir={tmp_path}', f'--data={data_zip}', '--name=disk',
                                        '--duration=0.002'] + PFGMPP + TINY + extra,
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds, output = time.time() - started, result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith('Error')]
    assert result.returncode != 0 and seconds < 300, (seconds, output[-3000:])
    assert len(errors) == 1 and 'No space left on device' in errors[0] and target in errors[0]
    assert not re.search(r'^\[rank\d\]:', output, re.M), output[-3000:]  # torchrun's prefix of a rank's traceback
    names = os.listdir(tmp_path / 'disk')
    assert [name for name in names if 'training-state' in name] == kept, names
    assert not [name for name in names if name.startswith('.') or name.endswith('.tmp') or 'phema' in name], names


def test_tick_line_shows_the_ticks_mean_loss(full_run):
    # The number printed is stats.jsonl's Loss/loss mean of the same tick (all micro-batches), not the last batch.
    full_dir, _outdir, log = full_run
    printed = [float(value) for value in re.findall(r'^tick \d+ +kimg \S+ +loss (\S+)', log, re.M)]
    means = [json.loads(line)['Loss/loss']['mean'] for line in open(os.path.join(full_dir, 'stats.jsonl'))]
    assert len(printed) == len(means) == 3
    assert all(abs(p - m) <= 5e-4 * abs(m) for p, m in zip(printed, means)), (printed, means)


def test_full_disk_during_a_checkpoint_is_one_line(full_run, data_zip, tmp_path, monkeypatch):
    """ENOSPC from the raw file write while the 2-kimg state is written: one line naming the file, exit 1, the
    1-kimg state intact, no temporary and no partial 2-kimg state. Catches a traceback (torch.save hides the
    OSError), a temporary left behind and a damaged previous state."""
    from test_resilience import _failing_fdopen
    good = _copy_state(os.path.join(full_run[0], 'training-state-000001.pt'), str(tmp_path / 'disk'))
    before = open(good, 'rb').read()
    _failing_fdopen(monkeypatch, 'training-state-000002.pt', after_bytes=4096)
    result, output = invoke([f'--outdir={tmp_path}', f'--data={data_zip}', '--name=disk', '--duration=0.002']
                            + PFGMPP + TINY)
    errors = [line for line in output.splitlines() if line.startswith('Error')]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and len(errors) == 1, output
    assert 'No space left on device' in errors[0] and 'training-state-000002.pt' in errors[0]
    assert 'Traceback' not in output
    names = os.listdir(tmp_path / 'disk')
    assert [name for name in names if 'training-state' in name] == ['training-state-000001.pt'], names
    assert not [name for name in names if name.startswith('.') or name.endswith('.tmp')], names
    assert open(good, 'rb').read() == before
