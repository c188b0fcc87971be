"""Checkpoints survive their writer being killed: the previous file stays whole and loadable, the half-written
temporary is invisible to resume and removed by the next write of the same file."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Writes a training state whose torch.save stops half way, says so, and waits to be killed.
# SIGINT gets Python's KeyboardInterrupt even when the test runs in the background (where the shell starts children
# with SIGINT ignored), as it does for a user's Ctrl-C.
KILLED_WRITER = '''
import io, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[2])
import torch
from training import checkpoint

def half_then_wait(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    f.flush()
    print('half written', flush=True)
    time.sleep(120)

real_save, torch.save = torch.save, half_then_wait
checkpoint.save_training_state(sys.argv[1], network_config={'class_name': 'EDMPrecond'},
                               net_state={'w': torch.full([1000], 2.0)}, ema_state={}, optimizer_state={},
                               progress={'cur_nimg': 2000})
'''


def save(path, value):
    checkpoint.save_training_state(path, network_config={'class_name': 'EDMPrecond'},
                                   net_state={'w': torch.full([1000], value)}, ema_state={}, optimizer_state={},
                                   progress={'cur_nimg': int(value * 1000)})


def hidden_temporaries(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith('.tmp'))


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_write_never_replaces_the_previous_checkpoint(sig, tmp_path):
    path = str(tmp_path / checkpoint.state_file_name(1))
    save(path, 1.0)
    before = open(path, 'rb').read()
    writer = subprocess.Popen([sys.executable, '-c', KILLED_WRITER, path, ROOT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == 'half written', writer.stderr.read()
        assert len(hidden_temporaries(tmp_path)) == 1  # the new state is being written beside the old one
        writer.send_signal(sig)
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode != 0
    assert open(path, 'rb').read() == before
    state = checkpoint.load_training_state(path)
    assert torch.equal(state['net']['w'], torch.full([1000], 1.0)) and state['progress']['cur_nimg'] == 1000
    assert checkpoint.find_checkpoints(str(tmp_path)) == [(1, path)]  # resume never sees the temporary
    # Python cleans up after SIGINT (KeyboardInterrupt); SIGKILL and SIGTERM leave the temporary behind ...
    assert len(hidden_temporaries(tmp_path)) == (0 if sig == signal.SIGINT else 1)
    # ... until the resumed run writes the same file again.
    save(path, 3.0)
    assert hidden_temporaries(tmp_path) == []
    assert torch.equal(checkpoint.load_training_state(path)['net']['w'], torch.full([1000], 3.0))
