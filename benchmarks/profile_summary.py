"""Where a step's device time goes: a torch.profiler run summarised by kernel category.

benchmarks/throughput.py --profile calls `profile` after each timed measurement, on the same (already compiled,
already autotuned) step. The summary answers the questions that decide the next optimisation:

- busy: device time / wall time. Well below 1, the GPU waits for the host (launch overhead, a synchronisation):
  CUDA graphs or fewer, larger kernels pay. Near 1, only faster kernels or fewer FLOPs/bytes pay.
- the share of each kernel category (convolutions and matmuls, attention, normalisation, element-wise, copies and
  layout changes, random numbers, optimizer/EMA), the kernel launches per step and the costliest kernels.

On the CPU (the --quick smoke test) the same summary is made from the operators' own CPU time.
"""

import re
import time

import torch

from torch_utils import misc

# (category, pattern) against the lower-cased kernel or operator name; the first match wins.
CATEGORIES = (
    ('attention', r'flash|fmha|attention|sdpa|softmax'),
    ('conv/matmul', r'conv|gemm|xmma|cutlass|cudnn|wgrad|dgrad|fprop|implicit|(^|[^a-z])(bmm|mm|addmm|matmul|linear)'
                    r'([^a-z]|$)|^sm\d+_'),
    ('normalisation', r'group_norm|groupnorm|layer_norm|batch_norm|welford|native_norm'),
    ('optimizer/EMA', r'adam|multi_tensor|foreach|lerp'),
    ('copy/layout', r'memcpy|memset|copy|nchw|nhwc|transpose|contiguous|(^|[^a-z])cat([^a-z]|$)|fill'),
    ('random', r'rand|normal|gamma|philox|bernoulli|dropout'),
    ('element-wise', r'.'),
)
CATEGORY_NAMES = tuple(name for name, _ in CATEGORIES)
_COMPILED = tuple((name, re.compile(pattern)) for name, pattern in CATEGORIES)


def categorise(name):
    lowered = name.lower()
    for category, pattern in _COMPILED:
        if pattern.search(lowered):
            return category
    return CATEGORY_NAMES[-1]


def _device_events(averages, device):
    """[(name, self time µs, calls)] of what ran on `device`: CUDA kernels/copies, or CPU operators."""
    events = []
    for event in averages:
        if getattr(event, 'is_user_annotation', False):  # record_function ranges span kernels counted already
            continue
        if device.type == 'cuda':
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = getattr(event, 'self_device_time_total', None)
            if micros is None:
                micros = event.self_cuda_time_total
        else:
            micros = event.self_cpu_time_total
        if micros > 0:
            events.append((event.key, float(micros), int(event.count)))
    return events


def summarise(events, wall_s, units, top=6):
    """The per-unit summary of [(name, µs, calls)] measured over `units` steps taking `wall_s` seconds."""
    device_ms = sum(micros for _, micros, _ in events) / 1e3 / units
    wall_ms = wall_s * 1e3 / units
    categories = dict.fromkeys(CATEGORY_NAMES, 0.0)
    for name, micros, _ in events:
        categories[categorise(name)] += micros / 1e3 / units
    costliest = sorted(events, key=lambda e: -e[1])[:top]
    return dict(wall_ms=wall_ms, device_ms=device_ms, busy=device_ms / wall_ms if wall_ms > 0 else None,
                launches=sum(calls for _, _, calls in events) / units, categories=categories,
                top=[dict(name=name, ms=micros / 1e3 / units, calls=calls / units) for name, micros, calls in costliest])


def profile(fn, device, repeats=2, units_per_call=1):
    """Run fn() `repeats` times under torch.profiler; the summary per unit (a training step, or one network
    evaluation when fn() runs several)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    misc.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        misc.synchronize(device)
        wall = time.perf_counter() - start
    return summarise(_device_events(prof.key_averages(), device), wall, repeats * units_per_call)


def category_shares(summary):
    """{category: % of the device time}."""
    total = summary['device_ms']
    return {name: 100 * ms / total if total else 0.0 for name, ms in summary['categories'].items()}


def markdown(rows):
    """A table of [(arch, mode, kind, summary)]: category shares in % of device time, then the costliest kernels."""
    short = {'conv/matmul': 'conv/mm', 'normalisation': 'norm', 'optimizer/EMA': 'optim', 'copy/layout': 'copy',
             'element-wise': 'elementwise', 'attention': 'attn', 'random': 'rand'}
    lines = ['| arch | mode | per | wall ms | device ms | busy | launches | '
             + ' | '.join(f'{short[c]} %' for c in CATEGORY_NAMES) + ' |',
             '|---|---|---|---:|---:|---:|---:|' + '---:|' * len(CATEGORY_NAMES)]
    for arch, mode, kind, s in rows:
        shares = [category_shares(s)[c] for c in CATEGORY_NAMES]
        lines.append(f'| {arch} | {mode} | {"step" if kind == "train" else "NFE"} | {s["wall_ms"]:.2f} | '
                     f'{s["device_ms"]:.2f} | {s["busy"]:.2f} | {s["launches"]:.0f} | '
                     + ' | '.join(f'{share:.0f}' for share in shares) + ' |')
    lines += ['', 'Costliest kernels (ms per step or NFE, launches):', '']
    for arch, mode, kind, s in rows:
        kernels = '; '.join(f'`{k["name"][:60]}` {k["ms"]:.2f} ms ×{k["calls"]:.0f}' for k in s['top'][:4])
        lines.append(f'- {arch} {mode} {kind}: {kernels}')
    return '\n'.join(lines)
