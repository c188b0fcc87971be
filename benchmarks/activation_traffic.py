"""Bytes one training step of the network writes and keeps for its backward pass, per precision mode.

    python benchmarks/activation_traffic.py                 # ddpmpp + ncsnpp CIFAR-10 networks (~1 min, CPU)
    python benchmarks/activation_traffic.py --quick         # tiny networks (tests/test_benchmark.py)

Convolutions aside, a U-Net step is bound by memory traffic, so the bytes of every tensor the forward and
backward passes write say how much time the non-matmul work costs on a GPU, independently of the card. The
counts are exact and the same on any device (they follow the operators PyTorch dispatches), so this runs on the
CPU. Two batch sizes separate the per-image part (activations) from the per-step part (weights, their casts
and gradients). torch.compile fuses part of this traffic away; --compile counts what it keeps for the backward
pass (the tensors a compiled forward writes and the backward reads back).
"""

import collections
import contextlib
import json
import os
import sys

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dnnlib  # noqa: E402
import train  # noqa: E402
from benchmarks import throughput  # noqa: E402
from torch_utils import precision as precision_mod  # noqa: E402


class WrittenBytes(TorchDispatchMode):
    """Sums, by dtype, the bytes every operator writes: its fresh outputs and the tensors it updates in place.
    Views (outputs that share an input's storage without writing it) cost nothing and are not counted; the
    operators that write something are counted."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()
        self.operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        in_place = any(r.alias_info is not None and r.alias_info.is_write for r in func._schema.returns)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        written = [t for t in _tensors(out) if t.numel() and (in_place or t.untyped_storage().data_ptr() not in inputs)]
        for tensor in written:
            self.bytes[str(tensor.dtype).replace('torch.', '')] += tensor.numel() * tensor.element_size()
        self.operators += bool(written)
        return out


def _tensors(tree):
    return [leaf for leaf in torch.utils._pytree.tree_leaves(tree) if torch.is_tensor(leaf)]


def network(arch, quick):
    """The network benchmarks/throughput.py measures (same configuration, same initial weights)."""
    s = dnnlib.EasyDict(quick=quick, resolution=8 if quick else 32)
    return throughput.build_network(arch, s, throughput.DROPOUT).train().requires_grad_(True)


def step_traffic(net, mode, batch, compile=False):
    """One forward + backward of the network on `batch` images under `mode`: (bytes written by dtype, operators
    that wrote) in eager mode, None for both under torch.compile (the compiled kernels are not dispatched one by
    one), and the bytes saved for the backward pass by dtype, in both."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=generator)
    sigma = torch.rand([batch], generator=generator) + 0.5
    augment_labels = torch.zeros([batch, 9])
    call = precision_mod.NetworkCall(net, mode, compile=compile)
    saved = collections.Counter()

    def pack(tensor):
        saved[str(tensor.dtype).replace('torch.', '')] += tensor.numel() * tensor.element_size()
        return tensor

    net.zero_grad(set_to_none=True)
    counter = WrittenBytes() if not compile else contextlib.nullcontext()
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = call(images, sigma, augment_labels=augment_labels).square().mean()
        loss.backward()
    net.zero_grad(set_to_none=True)
    if compile:
        return None, None, saved
    return counter.bytes, counter.operators, saved


def _per_image(small, large, counts_small, counts_large):
    """(per-image MiB by dtype, per-step fixed MiB) from the counts at two batch sizes."""
    per_image = {k: (counts_large[k] - counts_small[k]) / (large - small) / 2**20 for k in counts_large}
    fixed = sum(counts_small.values()) / 2**20 - small * sum(per_image.values())
    return {k: v for k, v in per_image.items() if v}, fixed


def measure(arch, modes, batches, quick, compile=False):
    net = network(arch, quick)
    small, large = batches
    rows = []
    for mode in modes:
        if compile:
            torch._dynamo.reset()  # a fresh graph per mode and batch size
        (written_small, ops_small, saved_small), (written_large, _, saved_large) = (
            step_traffic(net, mode, b, compile) for b in (small, large))
        saved, _ = _per_image(small, large, saved_small, saved_large)
        row = dict(arch=arch, mode=mode, compiled=bool(compile), saved_per_image_mib=sum(saved.values()),
                   saved_by_dtype_mib=saved)
        if written_small is not None:
            written, fixed = _per_image(small, large, written_small, written_large)
            row.update(per_image_mib=sum(written.values()), per_image_by_dtype_mib=written,
                       per_step_fixed_mib=fixed, operators=ops_small)
        rows.append(row)
    return rows


def _by_dtype(values):
    return ', '.join(f'{k} {v:.3g}' for k, v in sorted(values.items()))


def markdown(rows, batch_train):
    lines = [f'| arch | mode | MiB written per image | by dtype | × fp32 | per step at batch {batch_train}, GiB | '
             'fixed MiB per step (weights) | operators per step | MiB saved for backward per image | by dtype |',
             '|---|---|---:|---|---:|---:|---:|---:|---:|---|']
    fp32 = {row['arch']: row['per_image_mib'] for row in rows if row['mode'] == 'fp32' and not row['compiled']}
    for row in rows:
        mode = row['mode'] + (' (compiled)' if row['compiled'] else '')
        saved = f'{row["saved_per_image_mib"]:.4g} | {_by_dtype(row["saved_by_dtype_mib"])}'
        if 'per_image_mib' not in row:
            lines.append(f'| {row["arch"]} | {mode} | – | – | – | – | – | – | {saved} |')
            continue
        ratio = f'{row["per_image_mib"] / fp32[row["arch"]]:.2f}' if row['arch'] in fp32 else '–'
        step = (row['per_image_mib'] * batch_train + row['per_step_fixed_mib']) / 1024
        lines.append(f'| {row["arch"]} | {mode} | {row["per_image_mib"]:.4g} | '
                     f'{_by_dtype(row["per_image_by_dtype_mib"])} | {ratio} | {step:.3g} | '
                     f'{row["per_step_fixed_mib"]:.4g} | {row["operators"]} | {saved} |')
    return '\n'.join(lines) + '\n'


@click.command()
@click.option('--archs', default='ddpmpp,ncsnpp', show_default=True)
@click.option('--modes', default='fp32,bf16,bf16-native', show_default=True,
              help='Precision modes (fp16 and tf32 are fp32 on the CPU, so they are not counted here)')
@click.option('--batch-train', type=click.IntRange(min=1), default=128, show_default=True,
              help='Per-GPU batch for the per-step column')
@click.option('--compile', 'compile_backend', default=None, metavar='BACKEND',
              help='Also count the bytes saved for backward under torch.compile with this backend (inductor: '
                   'minutes per mode on a CPU)')
@click.option('--quick', is_flag=True, help='Tiny networks, 8×8 images')
@click.option('--out', default=None, metavar='PATH', help='Also write PATH.md and PATH.json')
def main(archs, modes, batch_train, compile_backend, quick, out):
    """Count the bytes one forward + backward writes and saves for backward per image, per precision mode."""
    modes = [m.strip() for m in modes.split(',') if m.strip()]
    for mode in modes:
        if mode not in ('fp32', 'bf16', 'bf16-native'):
            raise click.BadParameter(f'{mode!r}: choose from fp32, bf16, bf16-native (on the CPU fp16 and tf32 '
                                     f'compute in fp32)', param_hint='--modes')
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    rows = []
    for arch in [a.strip() for a in archs.split(',') if a.strip()]:
        if arch not in train.ARCH_PRESETS:
            raise click.BadParameter(f'{arch!r}: choose from {", ".join(train.ARCH_PRESETS)}',
                                     param_hint='--archs')
        rows += measure(arch, modes, (2, 4), quick)
        if compile_backend:
            rows += measure(arch, modes, (2, 4), quick, compile=dict(backend=compile_backend))
    table = markdown(rows, batch_train)
    print(table, end='')
    if out:
        out = os.path.splitext(out)[0] if os.path.splitext(out)[1] in ('.md', '.json') else out
        with dnnlib.util.atomic_write(out + '.json', 'w') as f:
            json.dump(dict(torch=torch.__version__, quick=quick, rows=rows), f, indent=2)
        with dnnlib.util.atomic_write(out + '.md', 'w') as f:
            f.write(table)


if __name__ == '__main__':
    main()
