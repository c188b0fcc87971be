"""Train diffusion (EDM) or PFGM++ models: `python train.py ...` on one device, `torchrun ... train.py ...` on many.

Every option of the reference train.py (EDM's and the PFGM++ fork's) with the same name, type and default.
Bad input is reported in one line before anything is written.
"""

import json
import os
import re

import click
import torch

import dnnlib
from torch_utils import distributed, precision
from training import checkpoint, phema, training_loop
from training.pfgmpp import check_aug_dim

# The reference's --arch choices (network_kwargs) and its --augment pipeline; benchmarks/ uses them too.
ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECOND_CLASSES = {'vp': ('VPPrecond', 'VPLoss'), 've': ('VEPrecond', 'VELoss'), 'edm': ('EDMPrecond', 'EDMLoss')}


def augment_preset(p):
    """AugmentPipe options for --augment=p: x-flips always armed, the geometric ops with probability p
    (9 augmentation labels for the network's augment_dim)."""
    return dict(class_name='training.augment.AugmentPipe', p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                translate_frac=1)


def parse_int_list_option(_ctx, _param, value):
    if value is None:
        return None
    try:
        return dnnlib.util.parse_int_list(value)
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a comma-separated list of integers (e.g. 1,2,2)') from None


def parse_phema_option(_ctx, _param, value):
    """--phema=0.05,0.10 → [0.05, 0.1]: distinct σ_rel values in (0, 1/√12)."""
    if value is None:
        return None
    try:
        stds = [float(piece) for piece in value.split(',')]
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a comma-separated list of numbers (e.g. 0.05,0.10)') from None
    try:
        for std in stds:
            phema.check_std(std)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if len(set(stds)) != len(stds):
        raise click.BadParameter(f'{value!r} lists a σ_rel twice')
    return stds


def build_options(opts):
    """The reference's training_options dict (same keys, same order) from the parsed options."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=opts.workers, prefetch_factor=2)
    c.network_kwargs = dnnlib.EasyDict(ARCH_PRESETS[opts.arch])
    net_class, loss_class = PRECOND_CLASSES[opts.precond]
    c.network_kwargs.class_name = f'training.networks.{net_class}'
    D = check_aug_dim(opts.aug_dim) if opts.pfgmpp else None
    c.loss_kwargs = dnnlib.EasyDict(class_name=f'training.loss.{loss_class}', D=D, stf=opts.stf)
    if opts.precond == 'edm':
        c.loss_kwargs.lsun = opts.lsun
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(augment_preset(opts.augment))
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)
    if opts.cond_drop:  # recorded in the network's config (label_dropout), where guidance looks for it
        c.network_kwargs.label_dropout = opts.cond_drop
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.nblock is not None:
        c.network_kwargs.num_blocks = opts.nblock

    c.total_kimg = max(int(opts.duration * 1000), 1)
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.update(rbatch=opts.rbatch, stf=opts.stf, D=D, pfgmpp=opts.pfgmpp)
    c.lr_rampup_kimg = opts.lr_rampup * 1000
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu, loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    c.update(precision=opts.precision, compile=opts.compile, channels_last=opts.channels_last)
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)
    if opts.phema is not None:  # recorded only when on, so runs without it keep the reference's options
        c.update(phema_stds=opts.phema, phema_snap_kimg=opts.phema_snap)
    return c


def resolve_precision(opts, ctx, device):
    """Settle --precision and --fp16 (the reference's switch, kept: --fp16=1 means --precision=fp16)."""
    fp16_given = ctx.get_parameter_source('fp16') != click.core.ParameterSource.DEFAULT
    if opts.precision is None:
        opts.precision = 'fp16' if opts.fp16 else precision.default_precision(device, 'train')
    elif fp16_given and opts.fp16 != (opts.precision == 'fp16'):
        raise click.ClickException(f'--fp16={int(opts.fp16)} contradicts --precision={opts.precision}; '
                                   f'give one of them')
    opts.fp16 = opts.precision == 'fp16'


def check_aug_dim_without_pfgmpp(opts, ctx):
    """--aug_dim does nothing without --pfgmpp=1: refuse it when --pfgmpp was left out (the user surely meant
    PFGM++), note it when --pfgmpp=0 was given (the reference accepted and ignored it)."""
    if opts.pfgmpp or ctx.get_parameter_source('aug_dim') == click.core.ParameterSource.DEFAULT:
        return
    if ctx.get_parameter_source('pfgmpp') == click.core.ParameterSource.DEFAULT:
        raise click.ClickException(f'--aug_dim={opts.aug_dim:g} has no effect without --pfgmpp=1: add --pfgmpp=1 '
                                   f'to train PFGM++ with D={opts.aug_dim:g}, or drop --aug_dim to train EDM')
    distributed.print0(f'Note: --pfgmpp=0 trains EDM (D→∞); --aug_dim={opts.aug_dim:g} is ignored.')


def validate_dataset(c, opts):
    """Open the dataset once (all ranks) and record its resolution and size, as the reference does."""
    try:
        dataset_obj = training_loop.build_dataset(dict(c.dataset_kwargs, cache=False))
        resolution = dataset_obj.resolution
        size = len(dataset_obj)
        label_dim = dataset_obj.label_dim
        channels = dataset_obj.num_channels
        dataset_name = dataset_obj.name
        has_labels = dataset_obj.has_labels
    except Exception as err:  # ValueError/OSError/BadZipFile: any failure to open is a bad --data
        raise click.ClickException(f'--data: {dnnlib.util.error_summary(err)}') from None
    if opts.cond and not has_labels:
        raise click.ClickException('--cond=True requires labels specified in dataset.json')
    c.dataset_kwargs.resolution = resolution
    c.dataset_kwargs.max_size = size
    return dnnlib.EasyDict(name=dataset_name, resolution=resolution, channels=channels, label_dim=label_dim)


def expected_network(c, data):
    """The network this run trains, built on the meta device (no memory) when possible; ClickException if the
    architecture options do not make a network."""
    args = (c.network_kwargs, data.resolution, data.channels, data.label_dim, c.D)
    try:
        try:
            with torch.device('meta'):
                return training_loop.build_network(*args)
        except (NotImplementedError, RuntimeError):  # something in the constructor needs real values
            return training_loop.build_network(*args)
    except (ValueError, TypeError) as err:
        raise click.ClickException(f'network options (--arch/--cbase/--cres/--nblock) do not make a network: '
                                   f'{dnnlib.util.error_summary(err)}') from None


def choose_run_dir(opts, data, world_size):
    """(run_dir, latest training state in it or None). Numbered as the reference unless --nosubdir/--name."""
    if opts.nosubdir:
        return opts.outdir, None
    if opts.name is not None:
        if not opts.name or os.sep in opts.name or opts.name in ('.', '..'):
            raise click.ClickException(f'--name={opts.name!r}: use a plain directory name')
        run_dir = os.path.join(opts.outdir, opts.name)
        found = checkpoint.find_checkpoints(run_dir) if os.path.isdir(run_dir) else []
        return run_dir, (found[-1][1] if found else None)
    desc = (f'{data.name}-{"cond" if opts.cond else "uncond"}-{opts.arch}-{opts.precond}-gpus{world_size}'
            f'-batch{opts.batch}-{opts.precision}')
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    prev_ids = []
    if os.path.isdir(opts.outdir):
        for entry in os.listdir(opts.outdir):
            match = re.match(r'^\d+', entry)
            if match and os.path.isdir(os.path.join(opts.outdir, entry)):
                prev_ids.append(int(match.group()))
    run_id = max(prev_ids, default=-1) + 1
    return os.path.join(opts.outdir, f'{run_id:05d}-{desc}'), None


def check_resume(path, net, option='--resume'):
    """Load and check a training state for this run's network; returns it. ClickException on any problem."""
    if checkpoint.checkpoint_kimg(path) is None:
        raise click.ClickException(f'{option}={path}: must point to training-state-*.pt from a previous training run')
    try:
        state = checkpoint.load_training_state(path)
        training_loop.check_resume_compatible(state, net.config, path)
        expected = {name: tuple(t.shape) for name, t in net.state_dict().items()}
        saved = {name: tuple(t.shape) for name, t in state['net'].items()}
        if expected != saved:
            wrong = sorted(set(expected.items()) ^ set(saved.items()))[0][0]
            raise checkpoint.CheckpointError(f'{path}: tensor {wrong} does not match this run\'s network')
    except checkpoint.CheckpointError as err:
        raise click.ClickException(f'{option}: {dnnlib.util.error_summary(err)}') from None
    return state


def check_resume_phema(state, stds, path):
    """Post-hoc EMA tracks average from the run's start: a resume keeps exactly the state's tracks."""
    saved = state.get('phema')
    saved_stds = [float(std) for std in saved['stds']] if saved is not None else None
    if saved_stds != stds:
        if saved_stds is None:
            raise click.ClickException(f'--phema: {path} was trained without post-hoc EMA tracks; a track needs '
                                       f'the weights from the run\'s start, so start a new run to use --phema')
        given = f'--phema={",".join(f"{std:g}" for std in stds)}' if stds else 'no --phema'
        raise click.ClickException(f'--phema: {path} tracks σ_rel {",".join(f"{std:g}" for std in saved_stds)}, '
                                   f'this run has {given}; resume with --phema='
                                   f'{",".join(f"{std:g}" for std in saved_stds)}')


def check_transfer(path, net):
    try:
        source = checkpoint.load_network(path)
    except (checkpoint.CheckpointError, ValueError, OSError, ImportError) as err:
        raise click.ClickException(f'--transfer: {dnnlib.util.error_summary(err)}') from None
    source_shapes = {name: tuple(t.shape) for name, t in list(source.named_parameters()) + list(source.named_buffers())}
    for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
        if name in source_shapes and source_shapes[name] != tuple(tensor.shape):
            raise click.ClickException(f'--transfer: {path}: {name} has shape {list(source_shapes[name])}, this run '
                                       f'needs {list(tensor.shape)}')


def check_combinations(opts, world_size):
    """Options that are fine alone but not together; ClickException."""
    try:
        batch_gpu, _rounds = training_loop.batch_layout(opts.batch, opts.batch_gpu, world_size)
    except ValueError:
        raise click.ClickException(f'--batch={opts.batch} must be a multiple of {world_size} process(es) × '
                                   f'--batch-gpu={opts.batch_gpu or opts.batch // world_size}') from None
    if opts.stf and opts.rbatch < batch_gpu:
        raise click.ClickException(f'--rbatch={opts.rbatch} (per process) must be at least the per-process '
                                   f'micro-batch {batch_gpu}')
    if opts.cond_drop and not opts.cond:
        raise click.ClickException(f'--cond-drop={opts.cond_drop:g} drops class labels: it needs --cond=1')
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException('--transfer and --resume cannot be specified at the same time')


def plan_start(c, opts, net, resume, run_dir):
    """Record in c how the run starts: from the training state `resume` (its seed wins), from --transfer, or
    fresh with --seed (None: drawn later). False when `resume` has already reached --duration."""
    c.seed = opts.seed
    if resume is not None:
        state = check_resume(resume, net, option='--resume' if opts.resume is not None else
                             f'--name={opts.name} (continuing its latest state)')
        progress = state['progress']
        check_resume_phema(state, c.get('phema_stds'), resume)
        del state
        if progress['cur_nimg'] >= c.total_kimg * 1000:
            distributed.print0(f'{resume} is at {progress["cur_nimg"] / 1e3:.3f} kimg: training for '
                               f'{c.total_kimg} kimg is already complete. Raise --duration to continue.')
            return False
        if 'seed' in progress:
            if opts.seed is not None and opts.seed != progress['seed']:
                distributed.print0(f'Note: resuming with the checkpoint\'s seed {progress["seed"]}, not --seed='
                                   f'{opts.seed} (the data order depends on it).')
            c.seed = int(progress['seed'])
        if opts.transfer is not None:
            distributed.print0(f'Note: {run_dir} already holds training states; continuing, --transfer ignored.')
        c.resume_state_dump = resume
    elif opts.transfer is not None:
        check_transfer(opts.transfer, net)
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    return True


def print_summary(c, opts, resume, world_size):
    distributed.print0()
    distributed.print0('Training options:')
    distributed.print0(json.dumps(c, indent=2))
    distributed.print0()
    distributed.print0(f'Output directory:        {c.run_dir}')
    distributed.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    distributed.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    distributed.print0(f'Network architecture:    {opts.arch}')
    distributed.print0(f'Preconditioning & loss:  {opts.precond}')
    distributed.print0(f'PFGM++ D:                {c.D if c.D is not None else "none (diffusion, D→∞)"}')
    distributed.print0(f'Number of processes:     {world_size}')
    distributed.print0(f'Batch size:              {c.batch_size}')
    distributed.print0(f'Mixed-precision:         {c.network_kwargs.use_fp16}')
    distributed.print0(f'Precision:               {c.precision}{" + torch.compile" if c.compile else ""}'
                       f'{" + channels-last" if c.channels_last else ""}')
    if c.get('phema_stds'):
        distributed.print0(f'Post-hoc EMA tracks:     σ_rel {", ".join(f"{std:g}" for std in c.phema_stds)}, '
                           f'snapshots every {c.phema_snap_kimg} kimg')
    if resume is not None:
        distributed.print0(f'Resuming from:           {resume}')
    distributed.print0()


def launch(c, device):
    """Create the run directory with training_options.json and log.txt (rank 0), then train."""
    distributed.print0('Creating output directory...')
    logger = None
    if distributed.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'w') as f:
            json.dump(c, f, indent=2)
        logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
    distributed.barrier()
    try:
        training_loop.training_loop(**c, device=device)
    finally:
        if logger is not None:
            logger.close()
        distributed.shutdown()


def _random_seed(device):
    seed = torch.randint(1 << 31, size=[], device=device)  # a fresh process: the global RNG is unseeded
    if distributed.get_world_size() > 1:
        torch.distributed.broadcast(seed, src=0)
    return int(seed)


@click.command()
# Main options.
@click.option('--outdir', help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--data', help='Path to the dataset', metavar='ZIP|DIR', type=str, required=True)
@click.option('--name', help='Run directory name under --outdir; re-running continues from its latest state',
              metavar='STR', type=str, default=None)
@click.option('--cond', help='Train class-conditional model', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']),
              default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning & loss function', type=click.Choice(['vp', 've', 'edm']),
              default='edm', show_default=True)
@click.option('--pfgmpp', help='Train PFGM++ (augmentation dimension --aug_dim) instead of diffusion',
              metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--aug_dim', help='PFGM++ augmentation dimension D (any real D > 0; used with --pfgmpp=1)',
              metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=128, show_default=True)
@click.option('--stf', help='Stable target field: posterior-mean targets over a reference batch', metavar='BOOL',
              type=bool, default=False, show_default=True)
@click.option('--rbatch', help='STF reference batch size, PER PROCESS (GPU)', metavar='INT',
              type=click.IntRange(min=1), default=4096, show_default=True)
# Hyperparameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=click.FloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size (all processes together)', metavar='INT',
              type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU (gradient accumulation)', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=int)
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=str,
              callback=parse_int_list_option)
@click.option('--nblock', help='Residual blocks per resolution  [default: varies]', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=10e-4, show_default=True)
@click.option('--lr-rampup', help='Learning-rate warm-up length (not in the reference CLI, which fixes 10)',
              metavar='MIMG', type=click.FloatRange(min=0), default=10, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=click.FloatRange(min=0), default=0.5,
              show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--cond-drop', 'cond_drop', help='Label dropout: train on the null (zero) label with this probability, '
              'for classifier-free guidance (generate.py --guidance)', metavar='FLOAT',
              type=click.FloatRange(min=0, max=1, max_open=True), default=0, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--phema', help='Post-hoc EMA: power-function EMA tracks of these σ_rel, reconstructed to any EMA '
                               'length afterwards by reconstruct_ema.py (docs/ema.md). Each track keeps a copy of '
                               'the weights on every device and writes 4 bytes per parameter per snapshot  '
                               '[default: off]', metavar='LIST', type=str, callback=parse_phema_option)
@click.option('--phema-snap', help='Post-hoc EMA snapshot interval (and one at the end)', metavar='KIMG',
              type=click.IntRange(min=1), default=2500, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False, show_default=True)
# Performance-related.
@click.option('--fp16', help='Enable mixed-precision training', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--precision', help=f'Arithmetic: fp32 (TF32 off, the reference), tf32, bf16 (autocast), fp16 '
                                  f'(= --fp16=1) or bf16-native (bfloat16 activations, no autocast)  '
                                  f'[default: {precision.DEFAULT_HELP["train"]}]',
              type=click.Choice(precision.PRECISIONS))
@click.option('--compile', help='torch.compile the network (first steps are slower)', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--channels-last', help='Channels-last (NHWC) network memory layout; same maths', metavar='BOOL',
              type=bool, default=False, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1,
              show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=1), default=1,
              show_default=True)
# I/O-related.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--snap', help='Accepted for compatibility; no network pickles are written (see --dump)',
              metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump', help='How often to save training-state-*.pt', metavar='TICKS', type=click.IntRange(min=1),
              default=50, show_default=True)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=int)
@click.option('--transfer', help='Initialise from a network file (training-state .pt or reference snapshot)',
              metavar='PT|PKL', type=str)
@click.option('--resume', help='Resume from a previous training state', metavar='PT', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
@click.option('--lsun', help='LSUN 256x256 noise scale (EDM loss σ × 380/80)', metavar='BOOL', type=bool,
              default=False, show_default=True)
def main(**kwargs):
    """Train a diffusion (EDM) or PFGM++ model.

    \b
    # PFGM++ on CIFAR-10, D=128, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --name exp_name \\
        --data=datasets/cifar10-32x32.zip --cond=0 --arch=ddpmpp --pfgmpp=1 --batch 512 --aug_dim 128
    """
    opts = dnnlib.EasyDict(kwargs)
    device = distributed.init()
    resolve_precision(opts, click.get_current_context(), device)
    check_aug_dim_without_pfgmpp(opts, click.get_current_context())
    world_size = distributed.get_world_size()
    c = build_options(opts)
    data = validate_dataset(c, opts)
    check_combinations(opts, world_size)
    net = expected_network(c, data)
    run_dir, latest_state = choose_run_dir(opts, data, world_size)
    resume = opts.resume if opts.resume is not None else latest_state
    if not plan_start(c, opts, net, resume, run_dir):
        return
    del net
    if c.seed is None:
        c.seed = _random_seed(device)
    c.run_dir = run_dir
    c.opts = dict(opts)
    print_summary(c, opts, resume, world_size)
    if opts.dry_run:
        distributed.print0('Dry run; exiting.')
        return
    launch(c, device)


if __name__ == '__main__':
    main()
