"""The engine behind generate.py, generate_alpha.py, generate_steps.py and generate_quant.py.

One job = one network (+ one sweep value) → one folder of `{seed:06d}.png` files. The scripts differ only in the
sweep axis (none, α, steps, bits), so they share the command line (defined in generate.py, the only part that
knows click) and the driver here (`run`), which raises ValueError for bad input.

Two ways to name the networks:
- `--network=<file>`: one file (our training state, or a reference `network-snapshot-*.pkl` / `training-state-*.pt`)
  → images straight into `--outdir` (generate.py) or `--outdir/ckpt_{kimg:06d}_<axis>_<value>/` (sweeps).
- `--outdir=<run dir>` alone (the PFGM++ README's form): every checkpoint of the run, filtered by
  --ckpt/--end_ckpt, → `ckpt_{kimg:06d}[_<axis>_<value>]/{seed//1000*1000:06d}/{seed:06d}.png`; `ckpt_2_`/`ckpt_3_`
  when the smallest seed is ≥ 50000 / ≥ 100000. Complete folders are skipped, partial ones completed. A solver
  other than heun puts its name and settings before the axis (`folder_name`, read back by `parse_folder_name`).

Seeds are sharded over torchrun ranks as the reference does; every image depends only on its seed
(`sampler.SeedRandom`), so batch size and rank count never change the bytes of an image on the CPU. On CUDA the
latents and noise are identical too, but cuDNN may pick kernels that round differently per batch shape (measured
≤ 1e-5 on an H100), which can flip a rare uint8 value.

Speed: --precision, --compile, --channels-last and --bench change only how the network is called
(`prepare_network`); the ODE state stays float64. Large --batch values use the GPU best (docs/benchmarks.md).
"""

import math
import os
import re
import glob
import sys

import numpy as np
import PIL.Image
import torch
import tqdm

from dnnlib.util import atomic_write, check_choice
from torch_utils import distributed as dist
from torch_utils import precision as precision_mod
from training import guidance as guidance_mod
from training import phema
from training import sampler as sampling
from training.checkpoint import find_checkpoints, load_network
from training.quantize import FILTERS, quantize_weights

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

# ----------------------------------------------------------------------------------------------------------------
# Files and folders.


def image_path(folder, seed, subdirs):
    name = f'{seed:06d}.png'
    return os.path.join(folder, f'{seed - seed % 1000:06d}', name) if subdirs else os.path.join(folder, name)


def is_complete_png(path):
    """A cheap structural check: PNG signature at the start and the IEND chunk at the end (no truncation)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < 20:
                return False
            f.seek(-12, os.SEEK_END)
            tail = f.read(12)
    except OSError:
        return False
    return head == PNG_SIGNATURE and tail[4:8] == b'IEND'


def missing_seeds(folder, seeds, subdirs):
    return [seed for seed in seeds if not is_complete_png(image_path(folder, seed, subdirs))]


def to_uint8(images):
    """[-1, 1] NCHW float → NHWC uint8 numpy, the reference's rounding (x·127.5 + 128, clipped, truncated)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


GRID_GAP, GRID_GREY = 2, 80  # the lines between the tiles of an enlarged grid


def save_png(array, path):
    """Write one HWC uint8 image atomically ('L' for one channel, else 'RGB')."""
    image = PIL.Image.fromarray(array[:, :, 0], 'L') if array.shape[2] == 1 else PIL.Image.fromarray(array, 'RGB')
    with atomic_write(path, 'wb') as f:
        image.save(f, format='png')


def save_grid(arrays, path, scale=1):
    """Tile HWC uint8 images into a square-ish grid (ceil(√n) columns) and write it atomically. scale > 1 enlarges
    it for viewing: each pixel becomes a scale×scale block (small images stay sharp) and the tiles are set apart
    by grey lines of GRID_GAP pixels."""
    arrays = np.asarray(arrays)
    count, height, width, channels = arrays.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    gap = GRID_GAP if scale > 1 else 0
    tile_h, tile_w = height * scale + gap, width * scale + gap  # a tile and the line after it
    grid = np.full([rows * tile_h + gap, cols * tile_w + gap, channels], GRID_GREY if gap else 0, dtype=np.uint8)
    for i, image in enumerate(arrays):
        r, c = divmod(i, cols)
        y, x = gap + r * tile_h, gap + c * tile_w
        grid[y:y + height * scale, x:x + width * scale] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    save_png(grid, path)


def seed_set_prefix(seeds):
    """Folder prefix of the reference's three 50k seed sets: ckpt_, ckpt_2_ (≥ 50000), ckpt_3_ (≥ 100000)."""
    smallest = min(seeds)
    return 'ckpt_3_' if smallest >= 100000 else 'ckpt_2_' if smallest >= 50000 else 'ckpt_'


def sampler_fields(solver, sampler_kwargs):
    """The folder-name fields {key: value} of a solver's settings: for the multistep solvers every option of
    sampler.MULTISTEP_OPTIONS with its default filled in (`end-stop_grid-rho_lof-1_afs-0`), so a name never depends
    on what the defaults were when it was written; none for heun."""
    if solver in (None, 'heun'):
        return {}
    settings = sampling.multistep_settings(**sampler_kwargs)
    return {'end': settings['ending'], 'grid': settings['sigma_grid'], 'lof': int(settings['lower_order_final']),
            'afs': int(settings['afs'])}


def folder_name(kimg, seeds, axis=None, value=None, solver=None, fields=None, ema_std=None, guidance=''):
    """`ckpt_000100`, `ckpt_2_000100_alpha_0.1`, `ckpt_000100_steps_18`, `ckpt_000100_quant_8`, ...; a post-hoc EMA
    network (phema-*.pt) adds its σ_rel right after the kimg (`ckpt_000100_ema0.070`); a solver other than heun adds
    its name, then its settings as `_key-value` fields (`fields`, e.g. from sampler_fields), then the sweep axis:
    `ckpt_000100_dpm2m_end-stop_grid-rho_lof-1_afs-0_steps_9`. Guidance adds its tag (training.guidance.folder_tag)
    before the axis: `ckpt_000100_cfg2_gi0.3-5`, `ckpt_000100_ag1.5_steps_9`. parse_folder_name reads every part
    back; keys are lower-case words, values contain no `_`."""
    name = f'{seed_set_prefix(seeds)}{kimg:06d}'
    if ema_std is not None:
        name = f'{name}_ema{ema_std:.3f}'
    if solver not in (None, 'heun'):
        name = f'{name}_{solver}'
    for key, field in (fields or {}).items():
        field = f'{field:g}' if isinstance(field, float) else str(field)
        if not re.fullmatch(r'[a-z]+', key) or not field or '_' in field or '/' in field:
            raise ValueError(f'folder-name field {key}={field!r}: keys are lower-case words, values non-empty '
                             f'without "_" or "/"')
        name = f'{name}_{key}-{field}'
    if guidance:
        name = f'{name}_{guidance}'
    return name if axis is None else f'{name}_{axis}_{value:g}'


_NUMBER = r'\d+(?:\.\d*)?(?:[eE][-+]?\d+)?'
_FOLDER_RE = re.compile(r'ckpt_(?:(?P<seed_set>[23])_(?=\d))?(?P<kimg>\d+)(?:_ema(?P<ema_std>\d+\.\d+))?'
                        r'(?:_(?P<solver>' + '|'.join(sorted(sampling.MULTISTEP_SOLVERS, key=len, reverse=True)) +
                        r'))?(?P<fields>(?:_[a-z]+-[^_/]+)*)'
                        rf'(?:_(?P<guidance>(?:cfg|ag){_NUMBER}(?:_gi{_NUMBER}-(?:{_NUMBER}|inf))?))?'
                        rf'(?:_(?P<axis>alpha|steps|quant|prune)_(?P<value>{_NUMBER}))?')


def parse_folder_name(name):
    """The parts of a folder_name: dict(seed_set, kimg, solver, fields, guidance, axis, value, ema_std), or None when
    `name` is not one. fields: {key: value string}. A multistep solver's folder without its `end-` field was written
    before the solvers took their published forms (dpm2m, dpm3m and ipndm_v were other algorithms then): None."""
    match = _FOLDER_RE.fullmatch(name)
    if match is None:
        return None
    fields = dict(token.split('-', 1) for token in match['fields'].split('_')[1:])
    solver = match['solver'] or 'heun'
    if solver != 'heun' and 'end' not in fields:
        return None
    axis, value = match['axis'], match['value']
    if axis is not None:
        value = float(value) if axis in ('alpha', 'prune') else int(float(value))
    return dict(seed_set=int(match['seed_set'] or 1), kimg=int(match['kimg']), solver=solver, fields=fields,
                guidance=match['guidance'] or '', axis=axis, value=value,
                ema_std=float(match['ema_std']) if match['ema_std'] is not None else None)


def folder_nfe(solver, fields, num_steps):
    """Network evaluations per image of a steps folder, from its parsed solver and fields."""
    return sampling.nfe_for_steps(solver, num_steps, ending=fields.get('end'),
                                  afs=None if 'afs' not in fields else fields['afs'] == '1')


def grid_file(grid, folder):
    """The grid path for one output folder: `grid` itself, or with the folder name inserted when many folders."""
    if folder is None:
        return grid
    stem, ext = os.path.splitext(grid)
    return f'{stem}_{folder}{ext or ".png"}'


_SNAPSHOT_RE = re.compile(r'(?:network-snapshot|training-state)-(\d+)\.(?:pkl|pt)')


def network_kimg(path):
    """The kimg number in a checkpoint's file name, 0 when it has none."""
    match = _SNAPSHOT_RE.fullmatch(os.path.basename(path))
    if match is None and phema.output_file_kimg(path) is not None:
        return phema.output_file_kimg(path)
    return int(match.group(1)) if match else 0


def list_run_checkpoints(run_dir, ckpt=0, end_ckpt=100000000, edm=False, use_pickle=False):
    """[(kimg, path)] of a run directory, sorted by kimg. edm: `network-snapshot-*.pkl` (all of them, the
    reference's --edm=1); use_pickle: `training-state-*.pkl`; default: `training-state-*.pt` and the post-hoc EMA
    networks `phema-{kimg}-{std}.pt` (reconstruct_ema.py) within [ckpt, end_ckpt]."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f'{run_dir}: no such directory')
    if edm or use_pickle:
        pattern = 'network-snapshot-*.pkl' if edm else 'training-state-*.pkl'
        found = sorted((network_kimg(p), p) for p in glob.glob(os.path.join(glob.escape(run_dir), pattern)))
    else:
        found = find_checkpoints(run_dir) + [(phema.output_file_kimg(name), os.path.join(run_dir, name))
                                             for name in os.listdir(run_dir) if phema.output_file_kimg(name) is not None]
        found.sort(key=lambda item: (item[0], phema.output_file_std(item[1]) or 0))  # the training state first
    if not edm:
        found = [(kimg, path) for kimg, path in found if ckpt <= kimg <= end_ckpt]
    return found


# ----------------------------------------------------------------------------------------------------------------
# Checks of the command line against a loaded network.


def check_prior_options(net, pfgmpp, aug_dim, source):
    """--pfgmpp/--aug_dim only confirm what the checkpoint says; a contradiction is an error, never a silent prior."""
    D = getattr(net, 'D', None)
    kind = f'a PFGM++ network with D={D:g}' if D is not None else 'a diffusion (EDM, D=∞) network'
    if pfgmpp is True and D is None:
        raise ValueError(f'{source} is {kind}; --pfgmpp=1 contradicts it (drop --pfgmpp/--aug_dim)')
    if pfgmpp is False and D is not None:
        raise ValueError(f'{source} is {kind}; --pfgmpp=0 would sample the wrong prior (drop --pfgmpp)')
    if aug_dim is not None and (D is None or float(aug_dim) != D):
        raise ValueError(f'{source} is {kind}; --aug_dim={aug_dim:g} contradicts it (drop --aug_dim or use the '
                         f'matching checkpoint)')


def check_class(net, class_idx, source):
    if class_idx is None:
        return
    if net.label_dim == 0:
        raise ValueError(f'{source} is an unconditional network; drop --class')
    if not 0 <= class_idx < net.label_dim:
        raise ValueError(f'--class={class_idx} is out of range: {source} has classes 0..{net.label_dim - 1}')


def aligned_sampler_kwargs(net, sampler_kwargs, align):
    """The reference's --align: σ_min, σ_max (and so the prior radius) × √(1 + N/D) for a PFGM++ network."""
    D = getattr(net, 'D', None)
    if not align or D is None:
        return dict(sampler_kwargs)
    factor = math.sqrt(1 + net.img_channels * net.img_resolution ** 2 / D)
    kwargs = dict(sampler_kwargs)
    kwargs['sigma_min'] = (kwargs.get('sigma_min') or 0.002) * factor
    kwargs['sigma_max'] = (kwargs.get('sigma_max') or 80) * factor
    return kwargs


def check_guidance(net, opts, guide, source):
    """The guidance options against the main network: a guide network must fit it (same resolution, channels,
    label space, D), CFG needs a conditional network and warns when it was trained without label dropout."""
    weight = opts.get('guidance', 1)
    if guide is not None:
        guidance_mod.check_guide(net, guide, f'--guide-network={opts["guide_network"]}')
    elif weight != 1:
        if not net.label_dim:
            raise ValueError(f'{source} is an unconditional network: --guidance={weight:g} without '
                             f'--guide-network would be classifier-free guidance, which needs class labels; '
                             f'give --guide-network=PATH (autoguidance)')
        if not guidance_mod.label_dropout_of(net):
            dist.print0(f'Warning: {source} was trained without label dropout (train.py --cond-drop), so it never '
                        f'saw the null label that classifier-free guidance uses as its guide; expect poor images. '
                        f'Consider --guide-network=PATH (autoguidance).', file=sys.stderr)


def guidance_tag(opts):
    """Folder-name tag of the guidance options ('' when unguided)."""
    return guidance_mod.folder_tag(opts.get('guidance', 1), opts.get('guide_network') is not None,
                                   opts.get('guidance_interval'))


def load_guide(opts, device):
    """The --guide-network, prepared as the main network is (None without one)."""
    path = opts.get('guide_network')
    if path is None:
        return None
    dist.print0(f'Loading guide network from "{path}"...')
    try:
        guide = load_network(path).to(device)
    except ValueError as err:  # CheckpointError included
        raise ValueError(f'--guide-network: {err}') from None
    return prepare_network(guide, opts.get('precision'), opts.get('compile', False),
                           opts.get('channels_last', False), opts.get('bench', False))


def report_guidance(net_call):
    """One line saying how much of the sampling was guided, from the guided denoiser's own counts."""
    if not isinstance(net_call, guidance_mod.GuidedDenoiser) or not net_call.evaluations:
        return
    kind = 'autoguidance' if net_call.guide is not None else 'CFG (batched with the null label)'
    where = '' if net_call.interval is None else f' for sigma in [{net_call.interval[0]:g}, {net_call.interval[1]:g}]'
    dist.print0(f'Guidance W={net_call.weight:g}, {kind}{where}: the guide ran at {net_call.guided_evaluations} of '
                f'{net_call.evaluations} network evaluations ({net_call.guided_evaluations / net_call.evaluations:.0%})')
    net_call.evaluations = net_call.guided_evaluations = 0


# ----------------------------------------------------------------------------------------------------------------
# Sampling.


def prepare_network(net, precision=None, compile=False, channels_last=False, cudnn_benchmark=False):
    """The network as the samplers call it: a torch_utils.precision.NetworkCall under `precision`.

    precision None: fp16 for a network trained with --fp16 (its use_fp16, as the reference samples it), else
    the measured default for sampling on the network's device (tf32 on CUDA, fp32 on the CPU). fp16 sets the
    network's use_fp16 (float16 on CUDA); the other modes clear it. Sets the process-wide TF32 switches. The ODE
    state stays float64 (training/sampler.py): only the network call changes. compile: torch.compile with static
    shapes (one compile per batch shape; σ is a tensor, so the steps share it). channels_last: NHWC weights, same
    maths. cudnn_benchmark: let cuDNN time its kernels per shape (faster; off by default, as in the reference,
    because the kernels it picks may differ between runs and round differently).
    """
    if precision is None:
        device = next(net.parameters()).device
        precision = 'fp16' if getattr(net, 'use_fp16', False) else precision_mod.default_precision(device, 'sample')
    precision_mod.configure_backends(precision)
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if hasattr(net, 'use_fp16'):
        net.use_fp16 = precision == 'fp16'
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return precision_mod.NetworkCall(net, precision, compile=compile)


@torch.no_grad()
def generate_batch(net, seeds, sampler_kwargs, noise_alpha=0, class_idx=None, device=None, null_label=False):
    """Images (float64, NCHW, ~[-1, 1]) for `seeds`. Per seed: prior, then class index, then sampler noise.
    null_label: a conditional network gets the zero label (what label dropout trains it on) instead of a class."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    rnd = sampling.SeedRandom(seeds, device)
    sigma0 = sampling.prior_sigma(net, **sampler_kwargs)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    latents = rnd.prior(shape, sigma0, getattr(net, 'D', None))
    class_labels = None
    if net.label_dim:
        index = rnd.randint(net.label_dim)  # always drawn, so --class keeps the other draws of the seed unchanged
        if class_idx is not None:
            index[:] = class_idx
        class_labels = torch.eye(net.label_dim, device=device)[index]
        if null_label:
            class_labels = torch.zeros_like(class_labels)
    return sampling.sample(net, latents, class_labels, rnd.randn_like, noise_alpha=noise_alpha, **sampler_kwargs)


def _broadcast_from_rank0(value):
    if dist.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def generate_folder(net, seeds, folder, *, sampler_kwargs, noise_alpha=0, class_idx=None, batch_size=64,
                    subdirs=False, only_missing=True, grid=None, grid_scale=1, grid_only=False, device=None,
                    desc=None):
    """Write `{seed:06d}.png` for the seeds into `folder` (all ranks call this). only_missing: leave complete,
    valid images alone (what makes a crashed run resumable). grid: also write a grid of the first `batch_size`
    seeds to that path, enlarged grid_scale times; grid_only: write only the grid. Returns the number of images written by all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    grid_seeds = seeds[:batch_size]
    if grid_only:
        if rank == 0:
            save_grid(to_uint8(generate_batch(net, grid_seeds, sampler_kwargs, noise_alpha, class_idx, device)), grid,
                      grid_scale)
        dist.barrier()
        return 0
    todo = seeds
    if only_missing:
        todo = _broadcast_from_rank0(missing_seeds(folder, seeds, subdirs) if rank == 0 else None)
    if not todo:
        dist.print0(f'{desc or folder}: all {len(seeds)} images present, skipped')
    else:
        dist.print0(f'Generating {len(todo)} images to "{folder}"...')
    batches = dist.rank_batches(todo, batch_size, rank, world)
    with tqdm.tqdm(total=sum(map(len, batches)), unit='img', desc=desc, disable=rank != 0 or not todo) as bar:
        for batch_seeds in batches:
            images = to_uint8(generate_batch(net, batch_seeds, sampler_kwargs, noise_alpha, class_idx, device))
            for seed, image in zip(batch_seeds, images):
                save_png(image, image_path(folder, seed, subdirs))
            bar.update(len(batch_seeds))
    dist.barrier()
    if grid is not None and rank == 0:
        save_grid([np.asarray(PIL.Image.open(image_path(folder, s, subdirs))).reshape(
            net.img_resolution, net.img_resolution, net.img_channels) for s in grid_seeds], grid, grid_scale)
    return len(todo)


# ----------------------------------------------------------------------------------------------------------------
# The driver behind the scripts.

SAMPLER_OPTIONS = ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise', 'solver',
                   'discretization', 'schedule', 'scaling') + sampling.MULTISTEP_OPTIONS
SWEEP_AXES = (None, 'alpha', 'steps', 'quant')


def find_networks(opts):
    """[(kimg, path)]: the one --network file, or the run directory's checkpoints within --ckpt..--end_ckpt."""
    if opts['network_pkl'] is not None:
        if os.path.isdir(opts['network_pkl']):
            raise ValueError(f'--network={opts["network_pkl"]} is a folder, not a network file; to sample every '
                             f'checkpoint of a run directory, give it as --outdir without --network')
        return [(network_kimg(opts['network_pkl']), opts['network_pkl'])]
    try:
        networks = list_run_checkpoints(opts['outdir'], opts['ckpt'], opts['end_ckpt'], opts['edm'],
                                        opts['use_pickle'])
    except FileNotFoundError as err:
        raise ValueError(f'--outdir: {err}; pass --network=<file> or a training run directory') from None
    if not networks:
        raise ValueError(f'--outdir: no checkpoints in "{opts["outdir"]}" within --ckpt={opts["ckpt"]}'
                         f'..--end_ckpt={opts["end_ckpt"]}; pass --network=<file> or a run directory')
    return networks


def sweep_settings(net, opts, sampler_kwargs, axis, value):
    """(sampler kwargs, noise α) of one folder: --align applied, the sweep's step count or α set."""
    kwargs = aligned_sampler_kwargs(net, sampler_kwargs, opts['align'])
    if axis == 'steps':
        kwargs['num_steps'] = value
    return kwargs, (value if axis == 'alpha' else 0)


def load_checked_network(path, opts, sampler_kwargs, axis, values, guide=None):
    """The network of `path` (on the CPU), after checking the options and every sweep value against it."""
    net = load_network(path)
    check_prior_options(net, opts['pfgmpp'], opts['aug_dim'], path)
    check_class(net, opts['class_idx'], path)
    check_guidance(net, opts, guide, path)
    for value in values:
        sampling.prior_sigma(net, **sweep_settings(net, opts, sampler_kwargs, axis, value)[0])
    return net


def output_folder(opts, kimg, axis, value, ema_std=None):
    """(folder, name, subdirs, only_missing): generate.py --network writes straight into --outdir, as EDM's does;
    everything else into ckpt_* folders, completing partial ones."""
    if opts['network_pkl'] is not None and axis is None:
        return opts['outdir'], None, opts['subdirs'], False
    name = folder_name(kimg, opts['seeds'], axis, value, opts.get('solver'), sampler_fields(opts.get('solver'), opts),
                       ema_std=ema_std, guidance=guidance_tag(opts))
    return os.path.join(opts['outdir'], name), name, True, True


def sweep_network(net, kimg, opts, sampler_kwargs, axis, values, quant_filter, device, ema_std=None, guide=None):
    """Write one network's folders, one per sweep value (ema_std: a post-hoc EMA network's σ_rel, in the names;
    guide: the autoguidance network, prepared)."""
    original = {name: p.detach().clone() for name, p in net.named_parameters()} if axis == 'quant' else None
    # Quantisation below rewrites the weights in place, so the compiled call keeps working on them.
    net_call = prepare_network(net, opts.get('precision'), opts.get('compile', False),
                               opts.get('channels_last', False), opts.get('bench', False))
    net_call = guidance_mod.guided(net_call, opts.get('guidance', 1), guide, opts.get('guidance_interval'))
    grid = opts['grid']
    if opts['save_images'] and grid is None:
        grid = os.path.join(opts['outdir'], 'grid.png')
    for value in values:
        kwargs, noise_alpha = sweep_settings(net, opts, sampler_kwargs, axis, value)
        if axis == 'quant':
            net.load_state_dict(original, strict=False)
            names = quantize_weights(net, value, quant_filter)
            dist.print0(f'Quantised {len(names)} weight tensors to {value} bits ({quant_filter} filter)')
        folder, name, subdirs, only_missing = output_folder(opts, kimg, axis, value, ema_std)
        generate_folder(net_call, opts['seeds'], folder, sampler_kwargs=kwargs, noise_alpha=noise_alpha,
                        class_idx=opts['class_idx'], batch_size=opts['max_batch_size'], subdirs=subdirs,
                        only_missing=only_missing, grid=None if grid is None else grid_file(grid, name),
                        grid_scale=opts.get('grid_scale', 1),
                        grid_only=opts['save_images'], device=device, desc=name or 'images')
        report_guidance(net_call)


def run(opts, device, axis=None, values=(None,), quant_filter='layers'):
    """Drive one script: `opts` are its options by name (generate.py), `axis` None, 'alpha', 'steps' or 'quant'
    with its list of values. Raises ValueError (CheckpointError included) or FileNotFoundError before writing a
    network's folders when the network or an option does not fit: for the first network before anything is
    written. Each network is loaded once; with many checkpoints, one that fails to load stops the run after the
    earlier ones' folders are complete (a rerun skips them)."""
    if axis not in SWEEP_AXES:  # check_choice cannot list None among the choices
        raise ValueError(f'axis must be None or one of alpha, steps, quant, got {axis!r}')
    check_choice('quant_filter', quant_filter, FILTERS)
    sampler_kwargs = {key: opts[key] for key in SAMPLER_OPTIONS if opts.get(key) is not None}
    guide = load_guide(opts, device)
    for kimg, path in find_networks(opts):
        dist.print0(f'Loading network from "{path}"...')
        net = load_checked_network(path, opts, sampler_kwargs, axis, values, guide)
        sweep_network(net.to(device), kimg, opts, sampler_kwargs, axis, values, quant_filter, device,
                      ema_std=phema.output_file_std(path), guide=guide)
        del net
    dist.print0('Done.')
