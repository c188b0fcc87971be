"""What a shared cluster does to a run, in the library and the scripts: stop signals (the guard), non-finite losses
and weights, training-state versions and the preemption state, write errors, damaged datasets and truncated npz
files. The end-to-end signal, divergence and full-disk runs of train.py are in test_train.py."""

import errno
import io
import os
import signal
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import fid
import train
from data_helpers import make_image_folder, make_image_zip
from test_fid import needs_detector
from test_training_loop import HostReads
from torch_utils import preemption
from training import checkpoint, dataset, fid_stats, generation, training_loop


# -------------------------------------------------------------------------------------------------- stop signals


def test_guard_keeps_the_first_signal_and_restores_the_handlers():
    # Catches: handlers not installed (the signal kills the process), a later signal overwriting the first, or
    # handlers left in place after the run (a later SIGTERM would be swallowed silently).
    before = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    with preemption.PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.describe() == 'SIGUSR1'
    assert {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS} == before


def test_data_loader_workers_ignore_stop_signals(tmp_path):
    # Catches a worker that dies of SLURM's SIGTERM (sent to every process) and breaks the final save.
    data = dataset.ImageFolderDataset(make_image_zip(str(tmp_path / 'd.zip'), num=4))
    loader = training_loop._data_loader(data, dict(num_workers=1), 2, 0, 0, torch.device('cpu'))
    assert loader.worker_init_fn is preemption.ignore_in_worker
    previous = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    try:
        preemption.ignore_in_worker(0)
        assert all(signal.getsignal(signum) == signal.SIG_IGN for signum in preemption.STOP_SIGNALS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_torchrun_usr1_note(monkeypatch):
    # Catches a missing warning under a torchrun agent that would die of SIGUSR1, and a spurious one elsewhere.
    monkeypatch.delenv('TORCHELASTIC_SIGNALS_TO_HANDLE', raising=False)
    assert preemption.torchrun_usr1_note() is None
    monkeypatch.setenv('TORCHELASTIC_SIGNALS_TO_HANDLE', 'SIGTERM,SIGINT,SIGHUP,SIGQUIT')
    assert '--signals-to-handle' in preemption.torchrun_usr1_note()
    monkeypatch.setenv('TORCHELASTIC_SIGNALS_TO_HANDLE', 'SIGTERM, SIGUSR1')
    assert preemption.torchrun_usr1_note() is None


# ----------------------------------------------------------------------------------------------------- divergence


def test_nonfinite_watch_counts_consecutive_steps_without_host_reads():
    # Brute force: the longest run of non-finite losses per read, a run continuing across reads, and no device
    # read inside a step (the step stays free of host synchronisation).
    pattern = [1, np.nan, np.nan, 1, np.inf, np.nan, np.nan, 2, np.nan]
    watch = training_loop.NonfiniteWatch(torch.device('cpu'))
    for value in pattern[:7]:
        with HostReads() as detector:
            watch.step(torch.tensor([0.5, value]))
        assert detector.reads == []
    assert watch.read_longest() == 3 and int(watch.streak) == 3
    for value in pattern[7:]:
        watch.step(torch.tensor([value]))
    assert watch.read_longest() == 3  # the run of 3 went on into this read, then ended; then a run of 1
    assert int(watch.streak) == 1 and training_loop.NonfiniteWatch(torch.device('cpu'), 5).read_longest() == 5


def test_save_state_never_writes_nonfinite_weights(tmp_path):
    # Catches a checkpoint written from NaN weights (it would replace the last good state as the one to resume).
    net = torch.nn.Linear(2, 2)
    ema = torch.nn.Linear(2, 2)
    net.config = {}
    optimizer = torch.optim.Adam(net.parameters())
    assert training_loop.weights_finite(net, ema)
    with torch.no_grad():
        ema.bias[1] = float('nan')
    assert not training_loop.weights_finite(net, ema)
    path = training_loop.save_state(str(tmp_path), net, ema, optimizer, torch.device('cpu'), {},
                                    progress=dict(cur_nimg=1000))
    assert path is None and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ training states


def _state_args(cur_nimg):
    return dict(network_config={}, net_state={'w': torch.ones(2)}, ema_state={'w': torch.ones(2)},
                optimizer_state={}, progress=dict(cur_nimg=cur_nimg))


def test_version_one_states_load_and_new_fields_get_defaults(tmp_path):
    # Catches a version bump that locks out existing runs, or a reader that trips on a field added since.
    path = str(tmp_path / 'training-state-000001.pt')
    checkpoint.save_training_state(path, **_state_args(1000))
    state = torch.load(path, weights_only=True)
    assert state['version'] == checkpoint.VERSION == 2
    state['version'] = 1
    state['progress'].pop('nonfinite_steps', None)
    torch.save(state, path)
    assert checkpoint.load_training_state(path)['progress'] == dict(cur_nimg=1000, nonfinite_steps=0)
    state['version'] = 3
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError, match='version 3 is not supported'):
        checkpoint.load_training_state(path)


def test_preemption_state_is_resumed_but_never_listed_as_a_checkpoint(tmp_path):
    # Catches generate.py/fid.py run-directory mode sampling a mid-tick state as if it were a regular checkpoint,
    # and a re-run ignoring the newer preemption state.
    run_dir = str(tmp_path)
    assert checkpoint.latest_resumable(run_dir) is None
    for kimg in (1, 2):
        checkpoint.save_training_state(os.path.join(run_dir, checkpoint.state_file_name(kimg)), **_state_args(kimg))
    assert checkpoint.latest_resumable(run_dir).endswith('training-state-000002.pt')
    preempted = os.path.join(run_dir, checkpoint.PREEMPTED_STATE_NAME)
    checkpoint.save_training_state(preempted, **_state_args(2500))
    assert [kimg for kimg, _ in checkpoint.find_checkpoints(run_dir)] == [1, 2]
    assert [kimg for kimg, _ in generation.list_run_checkpoints(run_dir)] == [1, 2]
    assert checkpoint.latest_resumable(run_dir) == preempted
    assert checkpoint.is_preempted_state(preempted) and not checkpoint.is_preempted_state(
        os.path.join(run_dir, checkpoint.state_file_name(2)))


# --------------------------------------------------------------------------------------------------- write errors


class FullDisk(io.RawIOBase):
    """A raw file whose writes fail with ENOSPC once `after_bytes` have been written: where a full disk reports
    itself."""

    def __init__(self, raw, after_bytes):
        self.raw, self.written, self.after_bytes = raw, 0, after_bytes

    def writable(self):
        return True

    def write(self, data):
        self.written += len(data)
        if self.written > self.after_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.raw.write(data)

    def fileno(self):
        return self.raw.fileno()

    def close(self):
        self.raw.close()
        super().close()


def full_disk_file(raw, mode, after_bytes, name):
    """A FullDisk named `name` behind the buffered (and, without 'b' in mode, text) layers `open` would give."""
    full = FullDisk(raw, after_bytes)
    full.name = name
    buffered = io.BufferedWriter(full)
    return buffered if 'b' in mode else io.TextIOWrapper(buffered)


def _failing_fdopen(monkeypatch, name_part, after_bytes=100):
    """Make the files atomic_write opens for `name_part` fail with ENOSPC after `after_bytes`, at the raw write."""
    real_fdopen = os.fdopen

    def fdopen(fd, mode='r', *args, **kwargs):
        path = os.readlink(f'/proc/self/fd/{fd}')
        if name_part in path and 'w' in mode:
            return full_disk_file(real_fdopen(fd, 'wb', buffering=0), mode, after_bytes, path)
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, 'fdopen', fdopen)


def failing_open(monkeypatch, module, name_part, after_bytes=100):
    """Make the files `module` opens for appending or writing whose path contains `name_part` fail with ENOSPC
    after `after_bytes` (module-level `open` shadows the builtin for that module only)."""
    def full_open(path, mode='r', *args, **kwargs):
        if name_part in os.fspath(path) and ('a' in mode or 'w' in mode):
            return full_disk_file(open(path, mode.replace('t', '') + ('b' if 'b' not in mode else ''), buffering=0),
                                  mode, after_bytes, os.fspath(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(module, 'open', full_open, raising=False)


@pytest.mark.parametrize('writer', ['state', 'npz', 'png'])
def test_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer):
    # Catches a torch.save error that hides the OSError behind "unexpected pos", a temporary left behind, a
    # half-written file in place of the previous one, and an error that does not say which file.
    path = str(tmp_path / {'state': 'training-state-000001.pt', 'npz': 'ref.npz', 'png': 'image.png'}[writer])

    def write(value):
        if writer == 'state':
            checkpoint.save_training_state(path, **dict(_state_args(1000), net_state={'w': torch.full([999], value)}))
        elif writer == 'npz':
            fid_stats.save_reference_stats(path, np.full(50, value), np.eye(50))
        else:
            image = np.random.RandomState(int(value)).randint(0, 256, [32, 32, 3]).astype(np.uint8)
            generation.save_png(image, path)  # noise: a few kB even compressed

    write(1.0)
    before = open(path, 'rb').read()
    _failing_fdopen(monkeypatch, os.path.basename(path))
    with pytest.raises(OSError) as info:
        write(2.0)
    assert info.value.errno == errno.ENOSPC and os.path.basename(path) in str(info.value)
    assert open(path, 'rb').read() == before
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


# ---------------------------------------------------------------------------------------------------- bad data


def damage_member(zip_path, member):
    """Flip bytes in the middle of `member`'s stored data (its header stays readable; its CRC-32 no longer
    matches), as a bad disk sector or an interrupted copy would."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(member)
    with open(zip_path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), '<u2')
        middle = info.header_offset + 30 + int(name_length) + int(extra_length) + info.compress_size // 2
        f.seek(middle)
        data = bytearray(f.read(8))
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in data))
    return zip_path


DAMAGED = '00000/img00000005.png'


@pytest.fixture
def damaged_zip(tmp_path):
    # 64x64: members over 4 kB, so the start-up header scan reads only the first part of each (no CRC check)
    return damage_member(make_image_zip(str(tmp_path / 'damaged.zip'), num=8, resolution=64), DAMAGED)


def _one_error_line(result):
    output = result.output
    errors = [line for line in output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), output
    assert 'Traceback' not in output and len(errors) == 1, output
    return errors[0]


def test_damaged_zip_member_is_named_by_the_library_train_and_dataset_tool(damaged_zip, tmp_path):
    # The header scan alone passes this file; the CRC check at start (train.py) and the full read
    # (dataset_tool.py) must name the member instead of failing in a DataLoader worker later.
    data = dataset.ImageFolderDataset(damaged_zip)
    with pytest.raises(ValueError, match=DAMAGED):
        data.check_archive()
    line = _one_error_line(CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', f'--data={damaged_zip}',
                                                           '--duration=0.001', '--cbase=16', '--cres=1,1']))
    assert DAMAGED in line and 'damaged' in line and not os.path.exists(tmp_path / 'out')
    line = _one_error_line(CliRunner().invoke(dataset_tool.main, ['--source', damaged_zip,
                                                                  '--dest', str(tmp_path / 'o.zip')]))
    assert DAMAGED in line and not os.path.exists(tmp_path / 'o.zip')


@needs_detector
def test_damaged_zip_member_is_named_by_fid(damaged_zip, tmp_path):
    line = _one_error_line(CliRunner().invoke(fid.main, ['ref', f'--data={damaged_zip}',
                                                         f'--dest={tmp_path / "ref.npz"}', '--workers=1']))
    assert DAMAGED in line and 'damaged' in line and not os.path.exists(tmp_path / 'ref.npz')


def test_unreadable_image_met_in_a_worker_is_one_line(tmp_path):
    # A folder has no checksums: the damage shows when a DataLoader worker decodes the image. The user gets the
    # worker's message (which file), not the worker's traceback.
    folder = make_image_folder(str(tmp_path / 'data'), num=8, resolution=8)
    victim = os.path.join(folder, '00000', 'img00000003.png')
    data = open(victim, 'rb').read()
    open(victim, 'wb').write(data[:len(data) // 2])  # the header stays readable: the start-up scan passes
    line = _one_error_line(CliRunner().invoke(train.main, [
        f'--outdir={tmp_path / "out"}', f'--data={folder}', '--duration=0.001', '--cbase=16', '--cres=1,1',
        '--nblock=1', '--batch=8', '--workers=1', '--seed=0']))
    assert 'img00000003.png' in line and 'Cannot decode image' in line


def test_truncated_npz_and_malformed_dataset_json_are_one_line(tmp_path):
    # Catches zipfile.BadZipFile escaping load_reference_stats (a traceback from fid.py calc), and a dataset.json
    # that is not JSON escaping train.py.
    good = tmp_path / 'ref.npz'
    fid_stats.save_reference_stats(good, np.zeros(2048), np.eye(2048))
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match='truncated or not an npz'):
        fid_stats.load_reference_stats(truncated)
    images = make_image_zip(str(tmp_path / 'images.zip'), num=4, resolution=8)
    line = _one_error_line(CliRunner().invoke(fid.main, ['calc', f'--images={images}', f'--ref={truncated}',
                                                         '--num=4', '--workers=0']))
    assert 'truncated.npz' in line and 'truncated or not an npz' in line

    labelled = make_image_zip(str(tmp_path / 'labelled.zip'), num=4, resolution=8, labels=True)
    bad_json = tmp_path / 'labels.zip'
    with zipfile.ZipFile(labelled) as source, zipfile.ZipFile(bad_json, 'w') as archive:
        for name in source.namelist():
            archive.writestr(name, source.read(name)[:20] if name == 'dataset.json' else source.read(name))
    line = _one_error_line(CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', f'--data={bad_json}',
                                                           '--cond=1', '--duration=0.001']))
    assert 'malformed dataset.json' in line and not os.path.exists(tmp_path / 'out')
