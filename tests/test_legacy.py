"""Reference network files (EDM .pkl, PFGM++ training-state .pt), built by hand in the reference pickle format,
open without executing their embedded source code."""

import collections
import copyreg
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
from training.checkpoint import CheckpointError, load_network
from training.legacy import load_legacy_network
from training.networks import build_network


def tiny_config(D, class_name='EDMPrecond', label_dim=0):
    return dict(class_name=class_name, img_resolution=8, img_channels=3, label_dim=label_dim, D=D,
                model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                dropout=0.0)


def evil_source(marker):
    # What the reference would exec() when loading; running it would leave a marker file and raise.
    return (f'import pathlib\npathlib.Path({marker!r}).write_text("executed")\n'
            f'raise RuntimeError("module_src was executed")\n')


@pytest.fixture
def persistence_module(monkeypatch):
    """A stand-in `torch_utils.persistence` so pickle can name its _reconstruct_persistent_obj while writing."""
    module = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('only used for writing')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, 'torch_utils.persistence', module)
    return module


class PersistentModule:
    """Pickles exactly like a reference @persistent_class module: _reconstruct_persistent_obj(meta)."""

    def __init__(self, reconstruct, class_name, state, source):
        self.reconstruct, self.class_name, self.state, self.source = reconstruct, class_name, state, source

    def __reduce__(self):
        meta = dict(type='class', version=6, module_src=self.source, class_name=self.class_name, state=self.state)
        return (self.reconstruct, (meta,))


class PlainModuleDict:
    """Pickles like a torch.nn.ModuleDict (NEWOBJ of the real class + BUILD with its __dict__)."""

    def __init__(self, state):
        self.state = state

    @property
    def __class__(self):
        return torch.nn.ModuleDict

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (torch.nn.ModuleDict,), self.state)


def module_state(module, converted_children):
    return {
        'training': False,
        '_parameters': collections.OrderedDict((k, None if v is None else torch.nn.Parameter(v.detach().clone(),
                                                requires_grad=False)) for k, v in module._parameters.items()),
        '_buffers': collections.OrderedDict((k, None if v is None else v.detach().clone())
                                            for k, v in module._buffers.items()),
        '_non_persistent_buffers_set': set(),
        '_backward_hooks': collections.OrderedDict(), '_forward_hooks': collections.OrderedDict(),
        '_modules': converted_children,
    }


def to_reference_tree(module, reconstruct, source, init_kwargs=None):
    children = collections.OrderedDict((name, to_reference_tree(child, reconstruct, source))
                                       for name, child in module._modules.items())
    state = module_state(module, children)
    if isinstance(module, torch.nn.ModuleDict):
        return PlainModuleDict(state)
    state['skip_scale'] = np.float64(np.sqrt(0.5))  # numpy scalars appear in real states
    if init_kwargs is not None:
        state['_init_args'] = ()
        state['_init_kwargs'] = init_kwargs
    return PersistentModule(reconstruct, type(module).__name__, state, source)


def reference_kwargs(config, pfgmpp):
    kwargs = {k: v for k, v in config.items() if k not in ('class_name', 'D')}
    if pfgmpp is not None:
        kwargs.update(pfgmpp=pfgmpp, D=128 if config['D'] is None else int(config['D']))
    return kwargs


def check_same_network(ours, original):
    assert ours.config == original.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), original.state_dict().values()))
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.equal(ours(x, sigma), original.eval()(x, sigma))


def test_edm_network_snapshot_pkl(tmp_path, persistence_module):
    marker = str(tmp_path / 'executed.txt')
    torch.manual_seed(0)
    original = build_network(tiny_config(None, label_dim=4))
    tree = to_reference_tree(original, persistence_module._reconstruct_persistent_obj, evil_source(marker),
                             reference_kwargs(original.config, pfgmpp=None))
    path = tmp_path / 'network-snapshot-000200.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=tree, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(path='x.zip')), f)
    assert b'torch_utils.persistence' in path.read_bytes() and b'_load_from_bytes' in path.read_bytes()
    net = load_network(str(path))
    check_same_network(net, original)
    assert net.D is None and not net.training
    assert not os.path.exists(marker)


@pytest.mark.parametrize('class_name, pfgmpp, expected_D', [
    ('EDMPrecond', True, 64.0), ('EDMPrecond', False, None), ('VEPrecond', True, 64.0)])
def test_pfgmpp_training_state_pt(tmp_path, persistence_module, class_name, pfgmpp, expected_D):
    marker = str(tmp_path / 'executed.txt')
    torch.manual_seed(1)
    config = tiny_config(64.0, class_name)
    original = build_network(dict(config, D=expected_D))
    kwargs = reference_kwargs(config, pfgmpp)
    reconstruct, source = persistence_module._reconstruct_persistent_obj, evil_source(marker)
    state = dict(optimizer_state={'state': {}, 'param_groups': []}, step=200000,
                 ema=to_reference_tree(original, reconstruct, source, kwargs),
                 net=to_reference_tree(original, reconstruct, source, kwargs))
    path = tmp_path / 'training-state-000200.pt'
    torch.save(state, str(path))
    with pytest.raises(pickle.UnpicklingError):  # what PyTorch >= 2.6 itself says about such files
        torch.load(str(path), weights_only=True)
    net = load_network(str(path))
    check_same_network(net, original)
    assert net.D == expected_D
    assert not os.path.exists(marker)
    # And generate.py samples it (the prior's D comes from the file).
    out = tmp_path / 'out'
    result = CliRunner().invoke(generate.main, [f'--network={path}', f'--outdir={out}', '--seeds=0-1', '--steps=2']
                                + (['--aug_dim=64'] if expected_D else []))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ['000000.png', '000001.png']


def test_unknown_globals_are_refused(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=Evil())))
    with pytest.raises(CheckpointError, match='refusing to load global'):
        load_legacy_network(str(path))
    assert not marker.exists()
    path.write_bytes(pickle.dumps(dict(ema=collections.OrderedDict())))
    with pytest.raises(CheckpointError, match='preconditioned network'):
        load_legacy_network(str(path))
    path.write_bytes(b'\x80\x04garbage')
    with pytest.raises(CheckpointError, match='not a readable network file'):
        load_network(str(path))
