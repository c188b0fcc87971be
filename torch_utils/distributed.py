"""Process groups that work everywhere: NCCL on GPUs, gloo on the CPU, nothing at all for one plain process.

`python x.py` runs as a single process without a process group; `torchrun --nproc_per_node=N x.py` sets
WORLD_SIZE/RANK/LOCAL_RANK and we join the group with the backend that fits the device.
"""

import os

import torch
import torch.distributed as dist

_device = None


def init():
    """Pick this process's device and, under torchrun, join the process group. Safe to call twice."""
    global _device
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    use_cuda = torch.cuda.is_available() and os.environ.get('PFGMPP_DEVICE', '') != 'cpu'
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        _device = torch.device('cuda', torch.cuda.current_device())
    else:
        _device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if use_cuda else 'gloo'
        dist.init_process_group(backend=backend, init_method='env://')
    return _device


def device():
    """The device chosen by init() (CPU if init() was never called)."""
    return _device if _device is not None else torch.device('cpu')


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_batches(items, batch_size, rank=None, world_size=None):
    """This process's share of `items` in batches of at most batch_size, the reference's sharding: the items are
    cut into ((n−1)//(batch·world)+1)·world near-equal consecutive chunks and rank r takes chunks r, r+world, ...
    rank, world_size: default this process's. Returns a list of lists (no empty ones)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if len(items) == 0:
        return []
    num_batches = ((len(items) - 1) // (batch_size * world_size) + 1) * world_size
    chunks = torch.as_tensor(items, dtype=torch.int64).tensor_split(num_batches)
    return [chunk.tolist() for chunk in chunks[rank::world_size] if len(chunk)]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
