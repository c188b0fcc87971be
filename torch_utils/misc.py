"""Small training helpers: a resumable infinite sampler, weight copying, DDP checks, RNG state capture, and the
module summary table printed at the start of training."""

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from torch_utils import distributed


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices, split between ranks, that can restart at any position.

    The global stream visits the dataset once per pass, in an order that is a fresh permutation per pass, drawn
    from (seed, pass number) alone; rank r takes stream positions r, r + num_replicas, r + 2·num_replicas, ...
    Because the order is a pure function of the position, a resumed run passes `start` (the number of stream
    positions consumed so far, all ranks together) and continues exactly. (The reference's windowed in-place
    reshuffle has no compact state, so its position could not be restored.)
    """

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start=0):
        if len(dataset) == 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside [0, {num_replicas})')
        super().__init__()
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = int(seed)
        self.start = int(start)

    def order(self, epoch):
        """The dataset order of pass `epoch` (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed % (1 << 32), epoch]).permutation(self.dataset_size)

    def __iter__(self):
        position = self.start + (self.rank - self.start) % self.num_replicas  # first position owned by this rank
        epoch = position // self.dataset_size
        order = self.order(epoch)
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = self.order(epoch)
            yield int(order[position % self.dataset_size])
            position += self.num_replicas


def synchronize(device):
    """Wait for the device's queued work (a no-op on the CPU, where work is synchronous): for timing."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy parameters and buffers by name from src to dst (in place). Shapes must match; names missing in src
    are an error only with require_all."""
    src_tensors = dict(src_module.named_parameters())
    src_tensors.update(src_module.named_buffers())
    for name, tensor in list(dst_module.named_parameters()) + list(dst_module.named_buffers()):
        if name not in src_tensors:
            if require_all:
                raise ValueError(f'{name} is missing in the source network')
            continue
        if src_tensors[name].shape != tensor.shape:
            raise ValueError(f'{name} has shape {list(src_tensors[name].shape)} in the source network but '
                             f'{list(tensor.shape)} here')
        tensor.copy_(src_tensors[name].detach())


@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip DDP's gradient all-reduce (no_sync) unless `sync`; a plain module passes through."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


@torch.no_grad()
def check_ddp_consistency(module):
    """Raise ValueError if any parameter or buffer differs from rank 0's copy (a collective: call on all ranks).
    The tensors are flattened into one vector, so this costs a single broadcast."""
    if distributed.get_world_size() == 1:
        return
    named = list(module.named_parameters()) + list(module.named_buffers())
    if not named:
        return
    flat = torch.cat([tensor.detach().to(torch.float64).flatten() for _name, tensor in named])
    flat = torch.nan_to_num(flat)
    other = flat.clone()
    dist.broadcast(other, src=0)
    if not torch.equal(flat, other):
        offset = 0
        for name, tensor in named:
            part = slice(offset, offset + tensor.numel())
            if not torch.equal(flat[part], other[part]):
                raise ValueError(f'{type(module).__name__}.{name} differs between rank 0 and rank '
                                 f'{distributed.get_rank()}')
            offset += tensor.numel()


def get_rng_state(device):
    """Plain-data snapshot of the global RNGs this process uses (torch CPU, the CUDA device if any, numpy)."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(),
                 numpy=dict(kind=np_state[0], keys=torch.from_numpy(np_state[1].astype(np.int64)),
                            pos=int(np_state[2]), has_gauss=int(np_state[3]), cached_gaussian=float(np_state[4])))
    if torch.device(device).type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Restore a snapshot taken by get_rng_state."""
    torch.set_rng_state(state['torch'])
    np_state = state['numpy']
    np.random.set_state((np_state['kind'], np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    if torch.device(device).type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def print_module_summary(module, inputs, max_nesting=3):
    """Run `module(*inputs)` once and print a table of its submodules: parameters, buffers, output shape, dtype.
    Containers that hold no tensors of their own and return at most one output are left out. Returns the outputs."""
    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append((mod, [t for t in outputs if torch.is_tensor(t)]))

    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    seen = set()
    names = {mod: name for name, mod in module.named_modules()}
    rows = [['Module', 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    total_params = total_buffers = 0
    for mod, outs in entries:
        params = [t for t in mod.parameters() if id(t) not in seen]
        buffers = [t for t in mod.buffers() if id(t) not in seen]
        seen.update(id(t) for t in params + buffers)
        if not params and not buffers and mod is not module and len(outs) <= 1 and len(list(mod.children())) > 0:
            continue
        num_params = sum(t.numel() for t in params)
        num_buffers = sum(t.numel() for t in buffers)
        total_params += num_params
        total_buffers += num_buffers
        name = '<top-level>' if mod is module else names.get(mod, type(mod).__name__)
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in outs] or ['-']
        rows.append([name + (':0' if len(outs) >= 2 else ''), str(num_params) if num_params else '-',
                     str(num_buffers) if num_buffers else '-', shapes[0], dtypes[0]])
        for i in range(1, len(outs)):
            rows.append([name + f':{i}', '-', '-', shapes[i], dtypes[i]])
    rows += [['---'] * 5, ['Total', str(total_params), str(total_buffers), '-', '-']]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)).rstrip())
    print()
    return outputs
