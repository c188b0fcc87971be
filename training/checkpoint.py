"""Training states on disk: tensors and plain data only, written atomically, readable with weights_only=True.

A file `training-state-{kimg:06d}.pt` is a torch.save'd dict:

    format            'pfgmpp-training-state'
    version           2 (version-1 files, which lack the optional entries below, still load)
    network_config    plain dict that networks.build_network() turns back into the preconditioned network,
                      including class_name, the architecture and the augmentation dimension D (None = EDM)
    net, ema          state_dicts (CPU tensors) of the trained network and of its EMA
    optimizer_state   torch.optim state_dict
    progress          {'cur_nimg': int, 'cur_tick': int, ...}: where the run stands; since version 2 also
                      'nonfinite_steps' (the current run of steps with a non-finite loss; default 0)
    training_options  the run's configuration (what training_options.json holds)
    extra             anything else the loop needs to resume exactly (RNG states, data order), plain data
    phema             optional (absent = none): the post-hoc EMA tracks, training/phema.PowerEMA.state_dict()

A network file (`save_network_file`: post-hoc EMA snapshots and reconstructions) is a smaller dict:

    format            'pfgmpp-network'
    version           1
    network_config    as above
    ema               the network's state_dict
    info              plain data describing the weights (e.g. σ_rel, γ, nimg, the run's id)

Nothing in it is a pickled class, so it opens on any PyTorch version and is safe to open.

A run stopped by a signal between regular states writes `training-state-preempted.pt` (same layout, any step).
It is not a regular checkpoint: find_checkpoints() and run-directory mode skip it, latest_resumable() prefers
it, and the next regular state written in its directory removes it.
"""

import os
import re
import glob
import pickle
import zipfile

import torch

from dnnlib.util import atomic_write, error_summary
from training.errors import CheckpointError
from training.legacy import load_legacy_network
from training.networks import build_network

__all__ = ['CheckpointError', 'FORMAT', 'VERSION', 'PREEMPTED_STATE_NAME', 'state_file_name', 'checkpoint_kimg',
           'find_checkpoints', 'latest_resumable', 'is_preempted_state', 'save_training_state',
           'load_training_state', 'network_from_state', 'load_network', 'NETWORK_FORMAT', 'save_network_file',
           'load_network_file']

FORMAT = 'pfgmpp-training-state'
VERSION = 2
READABLE_VERSIONS = (1, 2)
NETWORK_FORMAT = 'pfgmpp-network'
NETWORK_VERSION = 1
PREEMPTED_STATE_NAME = 'training-state-preempted.pt'
# Fields added after version 1, with the value a file without them means. Add new ones here.
PROGRESS_DEFAULTS = dict(nonfinite_steps=0)
STATE_NAME_RE = re.compile(r'training-state-(\d+)\.pt')


def state_file_name(kimg):
    return f'training-state-{int(kimg):06d}.pt'


def checkpoint_kimg(path):
    """The kimg number in a training-state file name, or None when the name is not of that form."""
    match = STATE_NAME_RE.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def find_checkpoints(run_dir):
    """Sorted [(kimg, path)] of the training states in run_dir (numbers of any length)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), 'training-state-*.pt')):
        kimg = checkpoint_kimg(path)
        if kimg is not None:
            found.append((kimg, path))
    return sorted(found)


def is_preempted_state(path):
    return os.path.basename(path) == PREEMPTED_STATE_NAME


def latest_resumable(run_dir):
    """The state a re-run continues from: the preemption state when there is one (the run removes it once a
    later regular state exists), else the latest regular state; None when run_dir holds neither."""
    preempted = os.path.join(run_dir, PREEMPTED_STATE_NAME)
    if os.path.isfile(preempted):
        return preempted
    found = find_checkpoints(run_dir)
    return found[-1][1] if found else None


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_training_state(path, *, network_config, net_state, ema_state, optimizer_state, progress,
                        training_options=None, extra=None, phema=None):
    """Write a training state atomically (temporary file, then rename). phema: the post-hoc EMA tracks, if any."""
    state = dict(
        format=FORMAT, version=VERSION, network_config=dict(network_config),
        net=_to_cpu(net_state), ema=_to_cpu(ema_state), optimizer_state=_to_cpu(optimizer_state),
        progress=dict(progress), training_options=training_options or {}, extra=_to_cpu(extra or {}),
    )
    if phema is not None:
        state['phema'] = _to_cpu(phema)
    _save_atomically(state, path)


def _save_atomically(state, path):
    """torch.save to a temporary, renamed over `path` when complete; a failed write raises its OSError."""
    with atomic_write(path, 'wb') as f:
        writer = _WriteErrorKeeper(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:  # torch.save turns a failed write into RuntimeError('unexpected pos')
                raise writer.error from None
            raise


class _WriteErrorKeeper:
    """A file's write() that remembers the OSError it raised (a full disk), so the caller can report it."""

    def __init__(self, file):
        self._file = file
        self.error = None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self._file.flush()


def load_training_state(path):
    """Read and validate a training state written by save_training_state. Raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    return _validated(_load_tensors(path, 'training state'), path)


def _load_tensors(path, what, mmap=False):
    """torch.load with weights_only; any failure to read becomes one CheckpointError naming `what` the file is."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f'{path}: not a readable {what} ({error_summary(err)})') from None


def _validated(state, path):
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise CheckpointError(f'{path}: not a PFGM++ training state (no "format": "{FORMAT}" entry)')
    if state.get('version') not in READABLE_VERSIONS:
        raise CheckpointError(f'{path}: training-state version {state.get("version")} is not supported '
                              f'(this code reads versions {", ".join(map(str, READABLE_VERSIONS))})')
    for key in ('network_config', 'net', 'ema', 'progress'):
        if key not in state:
            raise CheckpointError(f'{path}: training state lacks "{key}"')
    state['progress'] = dict(PROGRESS_DEFAULTS, **state['progress'])
    return state


def network_from_state(state, which='ema'):
    """Build the network described by a loaded training state and fill in its `which` weights (eval mode, CPU)."""
    try:
        net = build_network(state['network_config'])
        net.load_state_dict(state[which], strict=True)
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        raise CheckpointError(f'network in training state does not load: {error_summary(err)}') from None
    return net.eval().requires_grad_(False)


def load_network(path, which='ema'):
    """Open a network file for sampling: our training-state .pt, or the reference codebases' released files
    (EDM network-snapshot-*.pkl, PFGM++ training-state-*.pt with pickled modules; see training/legacy.py)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    state = None
    if zipfile.is_zipfile(path):  # torch.save's format; a bare pickle (EDM's .pkl) goes straight to legacy import
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception:  # e.g. PFGM++'s .pt with pickled modules: the legacy importer reads it safely
            state = None
    if isinstance(state, dict) and state.get('format') == FORMAT:
        return network_from_state(_validated(state, path), which=which)
    if isinstance(state, dict) and state.get('format') == NETWORK_FORMAT:
        return network_from_state(_validated_network_file(state, path), which='ema')
    return load_legacy_network(path)


def save_network_file(path, *, network_config, ema_state, info):
    """Write a network file (weights to sample from, no optimizer or progress) atomically."""
    state = dict(format=NETWORK_FORMAT, version=NETWORK_VERSION, network_config=dict(network_config),
                 ema=_to_cpu(ema_state), info=dict(info))
    _save_atomically(state, path)


def load_network_file(path, mmap=False):
    """Read a network file written by save_network_file (mmap: tensors read from disk only when used)."""
    return _validated_network_file(_load_tensors(path, 'network file', mmap=mmap), path)


def _validated_network_file(state, path):
    if not isinstance(state, dict) or state.get('format') != NETWORK_FORMAT:
        raise CheckpointError(f'{path}: not a PFGM++ network file (no "format": "{NETWORK_FORMAT}" entry)')
    if state.get('version') != NETWORK_VERSION:
        raise CheckpointError(f'{path}: network-file version {state.get("version")} is not supported '
                              f'(this code reads version {NETWORK_VERSION})')
    for key in ('network_config', 'ema', 'info'):
        if key not in state:
            raise CheckpointError(f'{path}: network file lacks "{key}"')
    return state
