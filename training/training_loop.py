"""The training loop: data → augment → loss → Adam, with DDP, gradient accumulation, EMA, ticks and checkpoints.

One step consumes `batch_size` images over all processes: each of the `world` processes runs
`num_accumulation_rounds` micro-batches of `batch_gpu` images (with STF, each micro-batch loads `rbatch` images
per process: the first `batch_gpu` are trained on, all `rbatch` form the reference set). Everything the step
reports stays on the device; statistics are read once per tick.

Semantics kept from the reference (documented because they are visible in results):
- lr = lr_base · min(cur_nimg / lr_rampup, 1) with cur_nimg counted *before* the step, so the very first step
  has lr 0 (and only moves Adam's moment estimates).
- EMA half-life `ema_halflife_kimg`, ramped up to `ema_rampup_ratio · cur_nimg` (None after --transfer); the
  first step copies the network (β = 0).
- Non-finite gradients become 0 / ±1e5 (nan_to_num); no clipping. Unlike the reference, gradients are divided
  by `loss_scaling` before Adam, so --ls changes nothing but the float16 dynamic range.

Resume is exact: a training state holds the network, EMA, Adam, cur_nimg, the tick counters, the position in the
data stream and every process's RNG states (torch CPU/CUDA, numpy); see training/checkpoint.py.
Post-hoc EMA tracks (phema_stds; training/phema.py) are updated after every step, written as snapshots by rank 0
and travel in the training state.

Stopping early (docs/cluster.md): SIGTERM or SIGUSR1 ends the run after the step in progress with a training state
at that step (torch_utils/preemption.py) and raises preemption.Preempted. A loss that stays non-finite for
`diverge_steps` consecutive steps, or non-finite weights, raises TrainingDiverged at the end of the tick (or at a
post-hoc EMA snapshot, if one comes first) without writing anything; no training state with non-finite weights is
ever written.
"""

import contextlib
import copy
import os
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed, misc, preemption, training_stats
from torch_utils import precision as precision_mod
from training import augment, checkpoint, dataset, loss, networks, phema


# ----------------------------------------------------------------------------------------------------------------
# Building the pieces from their plain-data options (the training_options.json form).


def _short_class_name(kwargs, kind):
    if 'class_name' not in kwargs:
        raise ValueError(f'{kind} options lack "class_name": {kwargs}')
    return kwargs['class_name'].rsplit('.', 1)[-1]


def build_dataset(dataset_kwargs):
    kwargs = dict(dataset_kwargs)
    name = _short_class_name(kwargs, 'dataset')
    if name != 'ImageFolderDataset':
        raise ValueError(f'unknown dataset class {kwargs["class_name"]!r}')
    del kwargs['class_name']
    return dataset.ImageFolderDataset(**kwargs)


def network_config_of(network_kwargs, img_resolution, img_channels, label_dim, D):
    """The `net.config`-style dict for the reference-style network_kwargs plus the dataset's interface."""
    kwargs = dict(network_kwargs)
    name = _short_class_name(kwargs, 'network')
    del kwargs['class_name']
    return dict(class_name=name, img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                D=D, **kwargs)


def build_network(network_kwargs, img_resolution, img_channels, label_dim, D):
    return networks.build_network(network_config_of(network_kwargs, img_resolution, img_channels, label_dim, D))


def build_loss(loss_kwargs):
    kwargs = dict(loss_kwargs)
    kwargs['class_name'] = _short_class_name(kwargs, 'loss')
    return loss.build_loss(kwargs)


def build_augment_pipe(augment_kwargs):
    if augment_kwargs is None:
        return None
    kwargs = dict(augment_kwargs)
    if _short_class_name(kwargs, 'augment') != 'AugmentPipe':
        raise ValueError(f'unknown augmentation class {kwargs["class_name"]!r}')
    del kwargs['class_name']
    return augment.AugmentPipe(**kwargs)


def build_optimizer(optimizer_kwargs, params, fused=False):
    """The optimizer from its plain-data options. fused: use the single-kernel CUDA implementation where the
    class has one (Adam/AdamW); the maths and the state dict layout are the same as the plain one."""
    kwargs = dict(optimizer_kwargs)
    name = _short_class_name(kwargs, 'optimizer')
    del kwargs['class_name']
    if not hasattr(torch.optim, name):
        raise ValueError(f'unknown optimizer {optimizer_kwargs["class_name"]!r}')
    if fused and name in ('Adam', 'AdamW'):
        kwargs['fused'] = True
    return getattr(torch.optim, name)(params, **kwargs)


def load_optimizer_state(optimizer, state_dict):
    """Load a saved optimizer state whichever implementation (fused / foreach / plain) and memory layout wrote it.

    Group flags that name the implementation are kept from `optimizer` (a fused CUDA run resumes on the CPU and
    back), and every state tensor takes its parameter's strides (fused kernels want them equal).
    """
    state_dict = copy.copy(state_dict)
    implementation_keys = ('fused', 'foreach', 'capturable', 'differentiable')
    state_dict['param_groups'] = [
        dict(saved, **{key: current[key] for key in implementation_keys if key in current})
        for saved, current in zip(state_dict['param_groups'], optimizer.param_groups)]
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group['params']:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


class TrainingDiverged(ValueError):
    """The loss (or the weights) stopped being finite; the message says where and what to try."""


# Runtime knobs that may change between a checkpoint and the run resuming it; everything else must match.
RESUME_MAY_DIFFER = ('dropout', 'use_fp16')


def check_resume_compatible(state, network_config, path='checkpoint'):
    """Raise CheckpointError unless the training state holds this run's network (same config, same tensors)."""
    saved = state['network_config']
    differing = sorted(key for key in set(saved) | set(network_config)
                       if key not in RESUME_MAY_DIFFER and saved.get(key, '<unset>') != network_config.get(key, '<unset>'))
    if differing:
        details = ', '.join(f'{key} {saved.get(key, "<unset>")!r} in the checkpoint vs {network_config.get(key, "<unset>")!r} '
                            f'here' for key in differing[:3])
        raise checkpoint.CheckpointError(f'{path}: the network in the checkpoint does not match this run ({details})')


def batch_layout(batch_size, batch_gpu, world_size):
    """(batch_gpu, num_accumulation_rounds) for a global batch; ValueError when it does not split evenly."""
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    rounds = batch_gpu_total // batch_gpu if batch_gpu > 0 else 0
    if batch_gpu == 0 or batch_size != batch_gpu * rounds * world_size:
        raise ValueError(f'batch size {batch_size} does not split into {world_size} process(es) × '
                         f'micro-batches of {batch_gpu} × accumulation rounds; choose --batch as a multiple of '
                         f'{world_size} × --batch-gpu')
    return batch_gpu, rounds


# ----------------------------------------------------------------------------------------------------------------
# One step. The benchmark (benchmarks/throughput.py) calls these same functions.
#
# Nothing here waits for the device: no .item(), no tensor-valued Python branches, no device→host copies. The
# loss is reported to training_stats on the device and read once per tick; σ, the PFGM++ noise and the
# augmentation are drawn on the device; the learning rate and the EMA β are Python floats.


def prepare_training(net, optimizer_kwargs, device, precision='fp32', compile=False, channels_last=False,
                     world_size=1):
    """Set up the fast path around a constructed network on `device`: returns (ddp, forward, optimizer).

    ddp: the network, or its DistributedDataParallel wrapper under torchrun. forward: what the loss calls as the
    network (torch_utils.precision.NetworkCall: autocast for bf16, torch.compile of ddp when asked, the way
    PyTorch recommends for DDP). optimizer: fused Adam when every parameter is on CUDA, plain otherwise.
    channels_last: NHWC weights; every activation after the first convolution follows, so inputs stay as they are.
    """
    precision_mod.check_precision(precision)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    fused = all(p.device.type == 'cuda' for p in net.parameters())
    optimizer = build_optimizer(optimizer_kwargs, net.parameters(), fused=fused)
    ddp = net
    if world_size > 1:  # DDP broadcasts rank 0's parameters and buffers (e.g. Fourier frequencies) at start
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    forward = precision_mod.NetworkCall(net, precision, compile=compile, callee=ddp)
    return ddp, forward, optimizer


def accumulate_gradients(ddp, loss_fn, images, labels, augment_pipe, ref_images, grad_scale, sync, forward=None):
    """Forward and backward of one micro-batch; gradients accumulate in .grad. Reports Loss/loss on the device.

    forward: what the loss calls as the network (see prepare_training); default ddp itself. Only that call runs
    under autocast: the augmentation, the noise and the loss weighting stay float32.
    """
    with misc.ddp_sync(ddp, sync):
        per_element = loss_fn(forward if forward is not None else ddp, images, labels, augment_pipe=augment_pipe,
                              ref_images=ref_images)
        training_stats.report('Loss/loss', per_element)
        per_element.sum().mul(grad_scale).backward()
    return per_element


def optimizer_step(net, optimizer, lr, loss_scaling):
    """Set the learning rate, sanitise the gradients, and step (no host synchronisation)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    grads = [param.grad for param in net.parameters() if param.grad is not None]
    if loss_scaling != 1:
        torch._foreach_div_(grads, loss_scaling)
    for grad in grads:
        torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5, out=grad)
    optimizer.step()


def training_step(ddp, forward, net, optimizer, loss_fn, augment_pipe, next_micro_batch, num_rounds, grad_scale, lr,
                  loss_scaling):
    """One optimizer step over `num_rounds` micro-batches from next_micro_batch() -> (images, labels, ref_images)
    on the device. Returns the last micro-batch's per-element loss (a device tensor; reading it would sync)."""
    optimizer.zero_grad(set_to_none=True)
    for round_idx in range(num_rounds):
        images, labels, ref_images = next_micro_batch()
        per_element = accumulate_gradients(ddp, loss_fn, images, labels, augment_pipe, ref_images, grad_scale,
                                           sync=round_idx == num_rounds - 1, forward=forward)
    optimizer_step(net, optimizer, lr, loss_scaling)
    return per_element.detach()


@torch.no_grad()
def update_ema(ema, net, beta):
    """ema ← net + β·(ema − net) for parameters (one multi-tensor kernel); buffers are copied so EMA and network
    never drift apart."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)


def ema_beta(batch_size, cur_nimg, ema_halflife_kimg, ema_rampup_ratio):
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def _resolve_precision(network_kwargs, precision):
    """(network_kwargs, precision) with use_fp16 and the precision agreeing; ValueError when they contradict."""
    use_fp16 = bool(network_kwargs.get('use_fp16', False))
    if precision is None:
        precision = 'fp16' if use_fp16 else 'fp32'
    precision_mod.check_precision(precision)
    if use_fp16 and precision != 'fp16':
        raise ValueError(f'network_kwargs use_fp16=True contradicts precision={precision!r} (use precision=fp16)')
    if precision == 'fp16' and not use_fp16:
        network_kwargs = dict(network_kwargs, use_fp16=True)
    return network_kwargs, precision


def _stream_seed(seed, rank, world_size):
    return (int(seed) * world_size + rank) % (1 << 31)


def _next_batch(data_iter, device):
    # non_blocking: from pinned memory the copy is queued behind the running step instead of waiting for it.
    images, labels = next(data_iter)
    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
    return images, labels.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------------
# The loop: set up (data, network, optimizer), restore a training state, then steps grouped into ticks.


def training_loop(
    run_dir='.', dataset_kwargs={}, data_loader_kwargs={}, network_kwargs={}, loss_kwargs={}, optimizer_kwargs={},
    augment_kwargs=None, seed=0, batch_size=512, batch_gpu=None, total_kimg=200000, ema_halflife_kimg=500,
    ema_rampup_ratio=0.05, lr_rampup_kimg=10000, loss_scaling=1, kimg_per_tick=50, snapshot_ticks=50,
    state_dump_ticks=500, resume_pkl=None, resume_state_dump=None, cudnn_benchmark=True, stf=False, rbatch=4096,
    D=None, pfgmpp=None, opts=None, precision=None, compile=False, channels_last=False, phema_stds=None,
    phema_snap_kimg=2500, diverge_steps=100, device=None,
):
    """Train; returns EasyDict(net, ema, cur_nimg, phema). Options are the training_options.json entries (see train.py).

    precision: one of torch_utils.precision.PRECISIONS; None takes network_kwargs' use_fp16 (fp16, else fp32).
    'fp16' sets the network's use_fp16. compile: False, True (torch.compile, inductor) or a dict of
    torch.compile arguments. channels_last: NHWC network weights (CUDA speed; same maths).
    diverge_steps: stop (TrainingDiverged) when the loss is non-finite for this many consecutive steps or the
    weights are non-finite, checked at each tick's end; 0 or None trains on regardless, as the reference does.

    resume_pkl: a network file to initialise from (--transfer). resume_state_dump: a training state to continue.
    snapshot_ticks is accepted for compatibility: only training states are written (every state_dump_ticks).
    pfgmpp and opts are recorded for the reader and not used (D decides: None = EDM).
    phema_stds: σ_rel of the power-function EMA tracks to keep (None: none; see training/phema.py), written as
    phema-track-*.pt every phema_snap_kimg and at the end; they must run from the start of the run.
    """
    options = dnnlib.EasyDict({key: value for key, value in locals().items() if key != 'device'})
    start_time = time.time()
    run = _set_up(options, device)
    cur_nimg = _train(run, options, start_time)
    if run.world_size > 1:
        misc.check_ddp_consistency(run.net)
        misc.check_ddp_consistency(run.ema)
        distributed.print0(f'Network and EMA weights are identical on all {run.world_size} processes.')
    distributed.print0()
    distributed.print0('Exiting...')
    return dnnlib.EasyDict(net=run.net, ema=run.ema, cur_nimg=cur_nimg, phema=run.phema)


def _set_up(options, device):
    """Everything the steps need, as an EasyDict: the device and process layout, the batch layout, the data loader,
    the network with its EMA, DDP wrapper, forward call and optimizer, the loss, the augmentation pipe and the
    progress counters; restored from options.resume_state_dump when given. Settles options.network_kwargs and
    options.precision in place (the checkpoints record the settled values)."""
    o = options
    run = dnnlib.EasyDict(device=torch.device(device) if device is not None else distributed.device(),
                          rank=distributed.get_rank(), world_size=distributed.get_world_size())
    run.batch_gpu, run.num_rounds = batch_layout(o.batch_size, o.batch_gpu, run.world_size)
    if o.stf and o.rbatch < run.batch_gpu:
        raise ValueError(f'rbatch ({o.rbatch} per process) must be at least the micro-batch ({run.batch_gpu})')
    run.loader_batch = o.rbatch if o.stf else run.batch_gpu
    o.network_kwargs, o.precision = _resolve_precision(o.network_kwargs, o.precision)
    torch.backends.cudnn.benchmark = bool(o.cudnn_benchmark)
    precision_mod.configure_backends(o.precision)

    state = checkpoint.load_training_state(o.resume_state_dump) if o.resume_state_dump else None
    run.progress = dict(cur_nimg=0, cur_tick=0, tick_start_nimg=0, data_position=0, nonfinite_steps=0)
    if state is not None:
        run.progress.update({key: int(state['progress'][key]) for key in run.progress if key in state['progress']})

    torch.manual_seed(o.seed)  # network initialisation: the same on every rank and for any process count
    distributed.print0('Loading dataset...')
    dataset_obj = build_dataset(o.dataset_kwargs)
    run.loader = _data_loader(dataset_obj, o.data_loader_kwargs, run.loader_batch, o.seed,
                              run.progress['data_position'], run.device)
    distributed.print0('Constructing network...')
    run.net = build_network(o.network_kwargs, dataset_obj.resolution, dataset_obj.num_channels,
                            dataset_obj.label_dim, o.D)
    run.net.train().requires_grad_(True).to(run.device)
    if run.rank == 0:
        _print_network_summary(run.net, run.batch_gpu, o.network_kwargs.get('augment_dim'), run.device)

    distributed.print0('Setting up training state...')
    run.loss_fn = build_loss(o.loss_kwargs)
    run.augment_pipe = build_augment_pipe(o.augment_kwargs)
    run.ddp, run.forward, run.optimizer = prepare_training(
        run.net, o.optimizer_kwargs, run.device, precision=o.precision, compile=o.compile,
        channels_last=o.channels_last, world_size=run.world_size)
    run.ema = _restore(state, o.resume_state_dump, o.resume_pkl, run)
    run.phema = _restore_phema(state, o.resume_state_dump, o.phema_stds, o.phema_snap_kimg, run.net)
    _seed_random_streams(state, o.seed, run)
    return run


def _data_loader(dataset_obj, data_loader_kwargs, batch, seed, data_position, device):
    """This process's share of an endless shuffled stream of the dataset, starting at data_position."""
    sampler = misc.InfiniteSampler(dataset_obj, rank=distributed.get_rank(),
                                   num_replicas=distributed.get_world_size(), seed=seed, start=data_position)
    num_workers = int(data_loader_kwargs.get('num_workers', 1))
    if num_workers > 0:
        preemption.start_resource_tracker()
    return torch.utils.data.DataLoader(
        dataset_obj, sampler=sampler, batch_size=batch, num_workers=num_workers,
        pin_memory=bool(data_loader_kwargs.get('pin_memory', True)) and device.type == 'cuda',
        prefetch_factor=data_loader_kwargs.get('prefetch_factor', 2) if num_workers > 0 else None,
        multiprocessing_context='spawn' if num_workers > 0 else None,  # forked ZIP handles are unsafe
        persistent_workers=num_workers > 0,
        worker_init_fn=preemption.ignore_in_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))  # worker seeds must not draw from the global stream


def _print_network_summary(net, batch_gpu, augment_dim, device):
    with torch.no_grad():
        images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        sigma = torch.ones([batch_gpu], device=device)
        labels = torch.zeros([batch_gpu, net.label_dim], device=device)
        augment_labels = {}
        if augment_dim:
            augment_labels['augment_labels'] = torch.zeros([batch_gpu, augment_dim], device=device)
        misc.print_module_summary(_WithKwargs(net, augment_labels), [images, sigma, labels], max_nesting=3)


def _restore(state, state_path, transfer_path, run):
    """Fill run.net and run.optimizer from the training state (or run.net from the --transfer network file when
    there is no state); returns the EMA, the state's or a copy of the network."""
    if transfer_path is not None and state is None:
        distributed.print0(f'Initialising from "{transfer_path}"...')
        misc.copy_params_and_buffers(checkpoint.load_network(transfer_path), run.net, require_all=False)
    if state is not None:
        distributed.print0(f'Resuming from "{state_path}" at {run.progress["cur_nimg"] / 1e3:.3f} kimg...')
        check_resume_compatible(state, run.net.config, state_path)
        run.net.load_state_dict(state['net'])
        load_optimizer_state(run.optimizer, state['optimizer_state'])
    ema = copy.deepcopy(run.net).eval().requires_grad_(False)
    if state is not None:
        ema.load_state_dict(state['ema'])
    return ema


def _restore_phema(state, state_path, stds, snap_kimg, net):
    """The post-hoc EMA tracks: new (fresh run), the state's (resume), or None. A track needs the iterates from
    the run's start, so tracks cannot be switched on, off or changed at a resume."""
    saved = state.get('phema') if state is not None else None
    saved_stds = [float(std) for std in saved['stds']] if saved is not None else None
    wanted = [float(std) for std in stds] if stds else None
    if state is not None and saved_stds != wanted:
        raise ValueError(f'{state_path} has post-hoc EMA tracks {saved_stds or "none"}, this run asks for '
                         f'{wanted or "none"}: tracks must run from the start of the run, so resume with the same '
                         f'σ_rel list (or start a new run)')
    if wanted is None:
        return None
    if not round(snap_kimg * 1000) >= 1:
        raise ValueError(f'phema_snap_kimg must be at least 0.001 (one image), got {snap_kimg}')
    tracks = phema.PowerEMA(net, wanted)
    if saved is not None:
        tracks.load_state_dict(saved)
    return tracks


def _seed_random_streams(state, seed, run):
    """The per-process random stream (noise, σ, augmentation, dropout): restored exactly from the state when it
    was written by as many processes, else seeded from (seed, rank, cur_nimg)."""
    saved_rng = state.get('extra', {}).get('rng_states') if state is not None else None
    if saved_rng is not None and len(saved_rng) == run.world_size:
        misc.set_rng_state(saved_rng[run.rank], run.device)
        return
    if saved_rng is not None:
        distributed.print0(f'Note: the checkpoint was written by {len(saved_rng)} process(es), this run has '
                           f'{run.world_size}; random streams are reseeded, so the run is not bit-identical.')
    stream_seed = _stream_seed(seed, run.rank, run.world_size) + run.progress['cur_nimg']
    torch.manual_seed(stream_seed)
    np.random.seed(stream_seed % (1 << 31))


def _train(run, options, start_time):
    """Steps until options.total_kimg, with a status line, statistics and (every state_dump_ticks) a training
    state at each tick; returns cur_nimg. Raises preemption.Preempted (state saved) or TrainingDiverged."""
    o = options
    progress = dnnlib.EasyDict(run.progress)
    total_nimg = o.total_kimg * 1000
    batch_per_process = o.batch_size // run.world_size
    distributed.print0(f'Training for {o.total_kimg} kimg...')
    distributed.print0()
    timing = dnnlib.EasyDict(start=start_time, tick_start=time.time())
    timing.maintenance = timing.tick_start - start_time
    done = progress.cur_nimg >= total_nimg
    data_iter = iter(run.loader) if not done else None

    def next_micro_batch():
        images, labels = _next_batch(data_iter, run.device)
        return images[:run.batch_gpu], labels[:run.batch_gpu], (images if o.stf else None)

    note = preemption.torchrun_usr1_note()
    if note is not None:
        distributed.print0(note)
    run.watch = NonfiniteWatch(run.device, progress.nonfinite_steps)
    with training_stats.StatsFiles(o.run_dir) if run.rank == 0 else contextlib.nullcontext() as stats, \
            preemption.PreemptionGuard() as guard, _workers_shut_down(data_iter):
        while not done:
            lr = o.optimizer_kwargs['lr'] * min(progress.cur_nimg / max(o.lr_rampup_kimg * 1000, 1e-8), 1)
            per_element = training_step(run.ddp, run.forward, run.net, run.optimizer, run.loss_fn, run.augment_pipe,
                                        next_micro_batch, run.num_rounds, grad_scale=o.loss_scaling / batch_per_process,
                                        lr=lr, loss_scaling=o.loss_scaling)
            run.watch.step(per_element)
            update_ema(run.ema, run.net, ema_beta(o.batch_size, progress.cur_nimg, o.ema_halflife_kimg,
                                                  o.ema_rampup_ratio))
            progress.cur_nimg += o.batch_size
            progress.data_position += run.loader_batch * run.num_rounds * run.world_size
            done = progress.cur_nimg >= total_nimg
            if run.phema is not None:
                _phema_step(run, o, progress, done)
            if done or progress.cur_tick == 0 or \
                    progress.cur_nimg >= progress.tick_start_nimg + o.kimg_per_tick * 1000:
                _end_tick(run, o, progress, timing, done, stats)
            if not done and guard.should_stop():
                _stop_on_signal(run, o, progress, guard)
    return progress.cur_nimg


def _phema_step(run, options, progress, done):
    """Update the post-hoc EMA tracks after a step; write their snapshots (rank 0) when one is due, after the
    divergence check (every rank takes part), so a diverged run leaves no snapshot of its diverged weights."""
    cur_nimg = progress.cur_nimg
    run.phema.update(run.net, cur_nimg, options.batch_size)
    if done or phema.snapshot_due(cur_nimg - options.batch_size, cur_nimg, options.phema_snap_kimg):
        finite = _run_finite(run)
        _check_divergence(run, options, progress, finite)
        if not finite:  # --diverge-steps=0 trains on, but keeps the last finite snapshots
            distributed.print0(f'Warning: the weights are not finite at {cur_nimg / 1e3:.3f} kimg; no post-hoc EMA '
                               f'snapshot written.')
        else:
            _write_phema_snapshots(run, options, cur_nimg)


def _write_phema_snapshots(run, options, cur_nimg):
    """Rank 0 writes one snapshot per track; a failed write stops every rank (see _share_write_outcome)."""
    error, path = None, options.run_dir
    if run.rank == 0:
        try:
            for index, std in enumerate(run.phema.stds):
                path = os.path.join(options.run_dir, phema.track_file_name(cur_nimg // 1000, std))
                checkpoint.save_network_file(path, network_config=run.net.config,
                                             ema_state=run.phema.network_state(index, run.net),
                                             info=run.phema.info(index, cur_nimg, options.batch_size))
        except OSError as caught:
            error = caught
    _share_write_outcome(error, path, run.device)


@contextlib.contextmanager
def _workers_shut_down(data_iter):
    """Stop the DataLoader workers however the loop ends. They ignore SIGTERM (preemption.ignore_in_worker), so
    they must leave through PyTorch's own shutdown: left to interpreter exit, multiprocessing would terminate
    (SIGTERM) and join them forever after an error."""
    try:
        yield
    finally:
        shutdown = getattr(data_iter, '_shutdown_workers', None)  # absent without workers
        if shutdown is not None:
            shutdown()


class NonfiniteWatch:
    """Counts on the device the current run of steps whose loss is not finite, and the longest run since the
    last read (no host synchronisation per step; read once per tick)."""

    def __init__(self, device, streak=0):
        self.streak = torch.tensor(int(streak), dtype=torch.int64, device=device)
        self.longest = self.streak.clone()

    def step(self, per_element_loss):
        nonfinite = torch.isfinite(per_element_loss).all().logical_not()
        self.streak.add_(1).mul_(nonfinite)
        torch.maximum(self.longest, self.streak, out=self.longest)

    def read_longest(self):
        """The longest run since the previous read, the maximum over all processes; restarts the count."""
        longest = self.longest.clone()
        if distributed.get_world_size() > 1:
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        self.longest.copy_(self.streak)
        return int(longest)


def weights_finite(*modules):
    """Whether every parameter and buffer of the modules is finite (one device→host read)."""
    return tensors_finite(t for m in modules for t in list(m.parameters()) + list(m.buffers()))


def tensors_finite(tensors):
    """Whether every floating-point tensor of `tensors` is finite (one device→host read)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _run_finite(run):
    """Whether the network, the EMA and the post-hoc EMA tracks (if any) are all finite."""
    return weights_finite(run.net, run.ema) and (
        run.phema is None or tensors_finite(t for track in run.phema.tracks for t in track))


def _progress_record(run, options, progress, tick_ended):
    """The progress a training state holds: at a tick's end, the start of the next tick; mid-tick (preemption),
    the tick in progress, so the resumed run keeps the same tick boundaries."""
    return dict(cur_nimg=progress.cur_nimg, cur_tick=progress.cur_tick + (1 if tick_ended else 0),
                tick_start_nimg=progress.cur_nimg if tick_ended else progress.tick_start_nimg,
                data_position=progress.data_position, nonfinite_steps=int(run.watch.streak),
                seed=int(options.seed), world_size=run.world_size, batch_size=options.batch_size)


def _stop_on_signal(run, options, progress, guard):
    """Save the state at this step boundary (every rank takes part) and raise Preempted with the one line."""
    path = save_state(options.run_dir, run.net, run.ema, run.optimizer, run.device, options,
                      progress=_progress_record(run, options, progress, tick_ended=False),
                      phema_state=run.phema.state_dict() if run.phema is not None else None, preempted=True)
    saved = f'saved {path}' if path is not None else 'nothing saved (the weights are not finite)'
    raise preemption.Preempted(
        f'Preempted: {guard.describe()} received; stopped at {progress.cur_nimg / 1e3:.3f} kimg and {saved}. '
        f'Re-run the same command to continue from there.')


def _check_divergence(run, options, progress, finite):
    """Raise TrainingDiverged when the tick saw a long run of non-finite losses or ended with non-finite weights."""
    longest = run.watch.read_longest()
    if not options.diverge_steps or (finite and longest < options.diverge_steps):
        return
    what = (f'the loss was not finite for {longest} consecutive steps' if longest >= options.diverge_steps
            else 'the weights are not finite')
    found = checkpoint.find_checkpoints(options.run_dir)
    last = f'the last good state is {found[-1][1]}' if found else 'no training state was written'
    raise TrainingDiverged(
        f'training diverged at {progress.cur_nimg / 1e3:.3f} kimg: {what}; {last}. Likely causes: a learning rate '
        f'too high (--lr) or float16 overflow (--precision=fp16, --ls); --diverge-steps=0 trains on regardless.')


def _end_tick(run, options, progress, timing, done, stats):
    """Status line, divergence check, training state (when due), the tick's statistics (stats.jsonl,
    TensorBoard); then the next tick."""
    timing.tick_end = time.time()
    _report_tick(progress, timing, run.device)
    finite = _run_finite(run)
    _check_divergence(run, options, progress, finite)
    if options.state_dump_ticks is not None and progress.cur_tick != 0 and \
            (done or progress.cur_tick % options.state_dump_ticks == 0):
        save_state(options.run_dir, run.net, run.ema, run.optimizer, run.device, options,
                   progress=_progress_record(run, options, progress, tick_ended=True), finite=finite,
                   phema_state=run.phema.state_dict() if run.phema is not None else None)
    if stats is not None:
        stats.write(training_stats.default_collector.as_dict(), nimg=progress.cur_nimg, timestamp=time.time())
    progress.cur_tick += 1
    progress.tick_start_nimg = progress.cur_nimg
    timing.tick_start = time.time()
    timing.maintenance = timing.tick_start - timing.tick_end


def _report_tick(progress, timing, device):
    """Print the tick's status line with the tick's mean loss (all processes); each other number also goes to
    training_stats (rank 0) for stats.jsonl. Collects the tick's statistics."""
    report0 = training_stats.report0
    tick_sec = timing.tick_end - timing.tick_start
    sec_per_kimg = tick_sec / max(progress.cur_nimg - progress.tick_start_nimg, 1) * 1e3
    cpu_mem = psutil.Process(os.getpid()).memory_info().rss / 2**30
    gpu_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0
    gpu_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == 'cuda' else 0
    fields = [
        f"tick {report0('Progress/tick', progress.cur_tick):<5d}",
        f"kimg {report0('Progress/kimg', progress.cur_nimg / 1e3):<9.1f}",
        f"time {dnnlib.util.format_time(report0('Timing/total_sec', timing.tick_end - timing.start)):<12s}",
        f"sec/tick {report0('Timing/sec_per_tick', tick_sec):<7.1f}",
        f"sec/kimg {report0('Timing/sec_per_kimg', sec_per_kimg):<7.2f}",
        f"maintenance {report0('Timing/maintenance_sec', timing.maintenance):<6.1f}",
        f"cpumem {report0('Resources/cpu_mem_gb', cpu_mem):<6.2f}",
        f"gpumem {report0('Resources/peak_gpu_mem_gb', gpu_mem):<6.2f}",
        f"reserved {report0('Resources/peak_gpu_mem_reserved_gb', gpu_reserved):<6.2f}",
    ]
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    training_stats.default_collector.update()
    fields.insert(2, f"loss {training_stats.default_collector.mean('Loss/loss'):<9.4g}")
    distributed.print0(' '.join(fields))


def save_state(run_dir, net, ema, optimizer, device, training_options, progress, phema_state=None, preempted=False,
               finite=None):
    """Write training-state-{kimg:06d}.pt, or with preempted=True training-state-preempted.pt, on rank 0
    (collective: every rank contributes its RNG state); a regular state removes the preemption state. phema_state:
    the post-hoc EMA tracks' state_dict, if any. Returns the path, or None without writing when the weights are not
    finite (finite: that check, already made)."""
    if not (finite if finite is not None else weights_finite(net, ema)):
        distributed.print0(f'Warning: the weights are not finite at {progress["cur_nimg"] / 1e3:.3f} kimg; '
                           f'no training state written.')
        return None
    rng_state = misc.get_rng_state(device)
    if distributed.get_world_size() > 1:
        misc.check_ddp_consistency(net)
        rng_states = [None] * distributed.get_world_size()
        torch.distributed.all_gather_object(rng_states, rng_state)
    else:
        rng_states = [rng_state]
    name = checkpoint.PREEMPTED_STATE_NAME if preempted else checkpoint.state_file_name(progress['cur_nimg'] // 1000)
    path = os.path.join(run_dir, name)
    error = None
    if distributed.get_rank() == 0:
        try:
            checkpoint.save_training_state(
                path, network_config=net.config, net_state=net.state_dict(), ema_state=ema.state_dict(),
                optimizer_state=optimizer.state_dict(), progress=progress,
                training_options=dnnlib.util.plain_data(training_options), extra=dict(rng_states=rng_states),
                phema=phema_state)
            if not preempted:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(run_dir, checkpoint.PREEMPTED_STATE_NAME))
        except OSError as caught:  # a full disk: every rank must stop, not wait at the next collective
            error = caught
    _share_write_outcome(error, path, device)
    return path


def _share_write_outcome(error, path, device):
    """Raise rank 0's write error on rank 0, and an OSError naming the file on the other ranks (instead of a
    barrier after which they would wait for rank 0 at the next collective until the timeout)."""
    if distributed.get_world_size() > 1:
        failed = torch.tensor([0 if error is None else 1], device=device)
        torch.distributed.broadcast(failed, src=0)
        if failed.item() and error is None:
            raise OSError(f'rank 0 could not write {path}')
    if error is not None:
        raise error


class _WithKwargs(torch.nn.Module):
    """Calls `module(*inputs, **kwargs)` so the summary can pass keyword-only inputs such as augment_labels."""

    def __init__(self, module, kwargs):
        super().__init__()
        self.module = module
        self.kwargs = kwargs

    def forward(self, *inputs):
        return self.module(*inputs, **self.kwargs)
