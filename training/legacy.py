"""Open the reference codebases' network files without running the code they carry.

The released models come as EDM `network-snapshot-*.pkl` (a plain pickle dict, key 'ema') and PFGM++
`training-state-*.pt` / `*.pkl` (torch.save zip or plain pickle, key 'ema'). Their modules are pickled by
`torch_utils.persistence`: each is `_reconstruct_persistent_obj(meta)` where meta holds `module_src` (the whole
source file, which the reference exec()s), `class_name` and `state` (the module's __dict__: `_init_kwargs`,
`_parameters`, `_buffers`, `_modules`, ...).

Here a restricted unpickler resolves only a short list of known globals; the persistent objects become plain
`LegacyObject(class_name, state)` records (module_src is never looked at), storages are read as raw bytes, and
the preconditioner's stored constructor arguments build our own network (same parameter names), into which the
weights are copied strictly.
"""

import codecs
import collections
import io
import os
import pickle
import zipfile

import numpy as np
import torch

from dnnlib.util import EasyDict, error_summary, plain_data
from training.errors import CheckpointError
from training.networks import build_network

__all__ = ['LegacyObject', 'load_legacy_pickle', 'legacy_network_config', 'legacy_state_dict',
           'load_legacy_network']

PERSISTENCE_VERSION = 6
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch's pre-zip serialisation, used for storages inside plain pickles
PRECONDITIONERS = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')

_STORAGE_DTYPES = {
    'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8, 'BoolStorage': torch.bool,
    'UntypedStorage': torch.uint8,
}


class LegacyObject:
    """A pickled object kept as data: its class name and its state dict (never instantiated)."""

    def __init__(self, class_name, state=None):
        self.class_name = class_name
        self.state = state if state is not None else {}

    def __setstate__(self, state):  # BUILD opcode of a plainly pickled module (e.g. torch.nn.ModuleDict)
        self.state = state

    def __repr__(self):
        return f'LegacyObject({self.class_name})'


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != PERSISTENCE_VERSION:
        raise pickle.UnpicklingError(f'unsupported persistent object (type {meta.get("type")!r}, version '
                                     f'{meta.get("version")!r}; expected class, {PERSISTENCE_VERSION})')
    return LegacyObject(str(meta['class_name']), meta.get('state'))


def _plain_container(class_name):
    """A class whose instances, created by NEWOBJ and filled by BUILD, are LegacyObject records."""
    return type(class_name, (LegacyObject,), {'__new__': lambda cls, *a: LegacyObject.__new__(cls),
                                              '__init__': lambda self, *a: LegacyObject.__init__(self, class_name)})


_CONTAINERS = {name: _plain_container(name) for name in ('ModuleDict', 'ModuleList', 'Sequential')}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _flat_tensor(storage):
    """Our storages are 1-D tensors of their dtype; torch's own TypedStorage is accepted too."""
    if isinstance(storage, torch.Tensor):
        return storage
    if isinstance(storage, torch.storage.TypedStorage):
        return torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage)
    raise pickle.UnpicklingError(f'unexpected storage object {type(storage).__name__}')


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _flat_tensor(storage).as_strided(size, stride, storage_offset).clone()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _numpy_scalar():
    core = getattr(np, '_core', None) or np.core
    return core.multiarray.scalar


def _load_from_bytes(data):
    """A storage saved with torch's legacy (pre-zip) format, as plain pickles of storages are."""
    f = io.BytesIO(data)
    if _RestrictedUnpickler(f).load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError('storage bytes are not in torch\'s legacy format')
    _RestrictedUnpickler(f).load()  # protocol version
    _RestrictedUnpickler(f).load()  # system info
    declared = {}

    def persistent_load(pid):
        # ('storage', storage_type, key, location, numel, view_metadata)
        if not isinstance(pid, tuple) or pid[0] != 'storage':
            raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
        declared.setdefault(pid[2], pid[1].dtype)
        return ('storage', pid[2])

    unpickler = _RestrictedUnpickler(f)
    unpickler.persistent_load = persistent_load
    root = unpickler.load()
    storages = {}
    for key in _RestrictedUnpickler(f).load():
        dtype = declared[key]
        numel = int.from_bytes(f.read(8), 'little', signed=True)
        raw = f.read(numel * torch.empty(0, dtype=dtype).element_size())
        storages[key] = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    if not (isinstance(root, tuple) and root[0] == 'storage'):
        raise pickle.UnpicklingError('storage bytes hold something other than a storage')
    return storages[root[1]]


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals that reference network files contain; anything else is refused."""

    ALLOWED = {
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
        ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
        ('torch.storage', '_load_from_bytes'): _load_from_bytes,
        ('numpy', 'dtype'): np.dtype,
        ('numpy._core.multiarray', 'scalar'): _numpy_scalar(),
        ('numpy.core.multiarray', 'scalar'): _numpy_scalar(),
        ('dnnlib.util', 'EasyDict'): EasyDict,
        ('dnnlib', 'EasyDict'): EasyDict,
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('__builtin__', 'set'): set,  # protocol 2 (torch.save) writes Python 2 names
        ('__builtin__', 'frozenset'): frozenset,
        ('_codecs', 'encode'): codecs.encode,  # protocol 2's spelling of bytes (numpy scalars in torch.save files)
        ('torch', 'device'): torch.device,
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith('torch.nn.modules.') and name in _CONTAINERS:
            return _CONTAINERS[name]
        raise pickle.UnpicklingError(f'refusing to load global {module}.{name} (not part of a network file)')


def _load_zip(path):
    """torch.save's zip format: <prefix>/data.pkl plus one raw file per storage in <prefix>/data/.

    Not torch.load(weights_only=True) under torch.serialization.safe_globals, although that reads these files too
    (tried with torch 2.13: the names above mapped to our records, plus every numpy DType class). safe_globals
    came with torch 2.5 (requirements.txt allows 2.1), and torch's refusal of a foreign global says in its first
    line "Re-running torch.load with weights_only set to False will likely succeed", the one thing not to do with
    these files; here a refusal names the global, as for the plain pickles, and both formats share one list."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith('data.pkl')]
        if len(pickles) != 1:
            raise pickle.UnpicklingError('zip file does not hold exactly one data.pkl')
        prefix = pickles[0][:-len('data.pkl')]
        cache = {}

        def persistent_load(pid):
            # ('storage', storage_type, key, location, numel)
            if not isinstance(pid, tuple) or pid[0] != 'storage':
                raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
            key, dtype = str(pid[2]), pid[1].dtype
            if key not in cache:
                raw = archive.read(f'{prefix}data/{key}')
                cache[key] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            return cache[key].view(dtype) if cache[key].dtype != dtype else cache[key]

        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])))
        unpickler.persistent_load = persistent_load
        return unpickler.load()


def load_legacy_pickle(path):
    """The top-level object of a reference file (plain pickle or torch.save zip), with modules as LegacyObjects."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, 'rb') as f:
            return _RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError,
            IndexError, RuntimeError, OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f'{path}: not a readable network file ({error_summary(err)})') from None


def legacy_network_config(record):
    """Our network config from a reference preconditioner record. P's EDMPrecond stores pfgmpp and D; its
    VEPrecond takes them as arguments without storing D; EDM's networks have neither (D = None, diffusion)."""
    if not isinstance(record, LegacyObject) or record.class_name not in PRECONDITIONERS:
        found = record.class_name if isinstance(record, LegacyObject) else type(record).__name__
        raise ValueError(f'expected a preconditioned network ({", ".join(PRECONDITIONERS)}), found {found}')
    kwargs = dict(plain_data(record.state.get('_init_kwargs') or {}))
    args = list(record.state.get('_init_args') or ())
    for name, value in zip(('img_resolution', 'img_channels', 'label_dim', 'use_fp16'), args):
        kwargs[name] = plain_data(value)
    pfgmpp = kwargs.pop('pfgmpp', False)
    D = kwargs.pop('D', None)
    return dict(class_name=record.class_name, **kwargs, D=float(D) if pfgmpp and D is not None else None)


def legacy_state_dict(record, prefix=''):
    """Parameters and persistent buffers of a module record tree, by their state_dict names."""
    state = record.state
    tensors = {}
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for name, tensor in (state.get('_parameters') or {}).items():
        if tensor is not None:
            tensors[prefix + name] = tensor
    for name, tensor in (state.get('_buffers') or {}).items():
        if tensor is not None and name not in non_persistent:
            tensors[prefix + name] = tensor
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            tensors.update(legacy_state_dict(child, f'{prefix}{name}.'))
    return tensors


def load_legacy_network(path, key='ema'):
    """Our network (eval mode, CPU) with the weights of a reference network file's `key` entry."""
    data = load_legacy_pickle(path)
    if isinstance(data, dict) and key in data:
        record = data[key]
    elif isinstance(data, LegacyObject):
        record = data
    else:
        raise CheckpointError(f'{path}: no "{key}" network in this file')
    try:
        net = build_network(legacy_network_config(record))
        net.load_state_dict(legacy_state_dict(record), strict=True)
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        raise CheckpointError(f'{path}: network does not load ({error_summary(err)})') from None
    return net.eval().requires_grad_(False)
