"""Statistics gathered during training: cheap to report inside the step, synchronised once per tick.

`report(name, value)` adds the count, sum and sum of squares of `value` (any scalar, array or tensor; cast to
float32 first, then accumulated in float64) to a counter that lives on the value's device, so reporting never
waits for the device. `Collector.update()` sums the counters over devices and processes (one all_reduce) and
exposes num/mean/std of everything reported since the previous update. Every process must report the same
names in the same order; `report0` lets rank 0 report alone while the others only register the name.
"""

import json
import os
import re

import numpy as np
import torch
import torch.distributed as dist

import dnnlib
from torch_utils import distributed

_counters = dict()  # name -> {device: float64 tensor [count, sum, sum of squares]}, in first-report order


def report(name, value):
    """Accumulate the elements of `value` under `name`; returns `value` unchanged. Empty values only register."""
    by_device = _counters.setdefault(name, dict())
    if torch.is_tensor(value):
        elems = value.detach().flatten()
    else:
        elems = torch.as_tensor(np.asarray(value, dtype=np.float32)).flatten()
    if elems.numel() == 0:
        return value
    elems = elems.to(torch.float32).to(torch.float64)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    counter = by_device.get(moments.device)
    if counter is None:
        by_device[moments.device] = moments
    else:
        counter.add_(moments)
    return value


def report0(name, value):
    """Report on rank 0 only; the other ranks register `name` so all ranks sync the same list."""
    report(name, value if distributed.get_rank() == 0 else [])
    return value


class Collector:
    """Reads the counters whose names fully match `regex`: everything reported since the last update(). A name
    that got no new values keeps the statistics of the previous update."""

    def __init__(self, regex='.*'):
        self._regex = re.compile(regex)
        self._moments = dict()  # name -> float64 CPU tensor [count, sum, sum of squares]

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        """Collect and reset the counters, summed over devices and (under torchrun) processes."""
        names = self.names()
        if not names:
            return
        sync_device = distributed.device()
        deltas = []
        for name in names:
            delta = torch.zeros(3, dtype=torch.float64, device=sync_device)
            for counter in _counters[name].values():
                delta.add_(counter.to(sync_device))
                counter.zero_()
            deltas.append(delta)
        deltas = torch.stack(deltas)
        if distributed.get_world_size() > 1:
            dist.all_reduce(deltas)
        deltas = deltas.cpu()
        for name, delta in zip(names, deltas):
            if delta[0] == 0 and name in self._moments:
                continue
            self._moments[name] = delta

    def num(self, name):
        moments = self._moments.get(name)
        return 0 if moments is None else int(moments[0])

    def mean(self, name):
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        return float(moments[1] / moments[0])

    def std(self, name):
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0 or not torch.isfinite(moments[1]):
            return float('nan')
        if moments[0] == 1:
            return 0.0
        mean = moments[1] / moments[0]
        variance = moments[2] / moments[0] - mean.square()
        return float(variance.clamp(min=0).sqrt())

    def as_dict(self):
        """{name: {'num', 'mean', 'std'}} in first-report order (the reference's stats.jsonl layout)."""
        return {name: dict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                for name in self.names() if name in self._moments}

    def __getitem__(self, name):
        return self.mean(name)


default_collector = Collector()


class StatsFiles:
    """Where rank 0 writes each tick's statistics: `stats.jsonl` (one JSON line per tick, the reference's format)
    and, when the optional `tensorboard` package is installed, TensorBoard event files in the same folder
    (`tensorboard --logdir training-runs`): one scalar per statistic (its mean), the step being the images seen."""

    def __init__(self, run_dir):
        self.jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
        self.events = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            print('TensorBoard is not installed: statistics go to stats.jsonl only (pip install tensorboard).')
        else:
            self.events = SummaryWriter(run_dir)

    def write(self, stats, nimg, timestamp):
        """stats: {name: {'num', 'mean', 'std'}} (Collector.as_dict()); nimg: images seen so far."""
        try:
            self.jsonl.write(json.dumps(dict(stats, timestamp=timestamp)) + '\n')
            self.jsonl.flush()
        except OSError as error:  # a full disk: say which file
            named = dnnlib.util.name_the_file(error, self.jsonl.name)
            if named is not error:
                raise named from error
            raise
        if self.events is not None:
            for name, value in stats.items():
                self.events.add_scalar(name, value['mean'], global_step=int(nimg), walltime=timestamp)
            self.events.flush()

    def close(self, quiet=False):
        """quiet: ignore a failed flush (the error that ends the run is already on its way)."""
        try:
            self.jsonl.close()
        except OSError:
            if not quiet:
                raise
        if self.events is not None:
            self.events.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(quiet=exc_type is not None)
