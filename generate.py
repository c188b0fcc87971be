"""Generate images with a trained EDM / PFGM++ network.

    python generate.py --network=training-runs/00000-.../training-state-000500.pt --outdir=out --seeds=0-63
    torchrun --standalone --nproc_per_node=8 generate.py --seeds=0-49999 --outdir=./training-runs/exp_name \\
        --pfgmpp=1 --aug_dim=128          # every checkpoint of the run → ckpt_XXXXXX/ folders

The prior (Gaussian or the PFGM++ kernel with the checkpoint's D) and the sampler live in training/; see
training/generation.py for the folder layout. The sweep scripts (generate_alpha.py, generate_steps.py,
generate_quant.py) are this script with a sweep axis: they take the options defined here (`common_options`) and
run through `run_script`, which calls the library's driver and turns its ValueError into one line.
"""

import click

from dnnlib.util import error_summary, parse_int_list
from torch_utils import distributed as dist
from torch_utils import precision as precision_mod
from training import generation
from training import guidance
from training import sampler as sampling


def _parse_seeds(ctx, param, value):
    try:
        seeds = parse_int_list(value)
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a list like "0-49999" or "1,2,5-10"') from None
    if not seeds:
        raise click.BadParameter(f'{value!r} gives no seeds (a range a-b needs a <= b)')
    if min(seeds) < 0:
        raise click.BadParameter(f'seeds must be >= 0, got {min(seeds)}')
    return seeds


def float_list(ctx, param, value):
    try:
        values = [float(v) for v in value.split(',')] if isinstance(value, str) else list(value)
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a comma-separated list of numbers') from None
    if not values:
        raise click.BadParameter('the list is empty')
    return values


def _parse_interval(ctx, param, value):
    if value is None:
        return None
    try:
        return guidance.parse_interval(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def int_list(minimum, optional=False):
    """A click callback for "10,12,14" or "5-9" with every value >= minimum; optional: None stays None."""
    def parse(ctx, param, value):
        if optional and value is None:
            return None
        try:
            values = parse_int_list(value)
        except ValueError:
            raise click.BadParameter(f'{value!r} is not a list like "10,12,14" or "5-9"') from None
        if not values or min(values) < minimum:
            raise click.BadParameter(f'{value!r}: need a non-empty list of integers >= {minimum}')
        return values
    return parse


_COMMON_OPTIONS = [
    click.option('--network', 'network_pkl', metavar='PATH', default=None,
                 help='One network file (our training-state-*.pt, or the reference codebases\' network-snapshot-*.pkl '
                      '/ training-state-*.pt). Without it, every checkpoint in --outdir is used.'),
    click.option('--outdir', metavar='DIR', required=True,
                 help='Where to save the images; without --network, also the training run directory to read.'),
    click.option('--seeds', metavar='LIST', default='0-63', show_default=True, callback=_parse_seeds,
                 help='Random seeds, e.g. 0-49999 or 1,2,5-10'),
    click.option('--subdirs', is_flag=True, help='With --network: one subdirectory per 1000 seeds (always on '
                                                 'in run-directory mode).'),
    click.option('--class', 'class_idx', metavar='INT', type=click.IntRange(min=0), default=None,
                 help='Class label  [default: random]'),
    click.option('--batch', 'max_batch_size', metavar='INT', type=click.IntRange(min=1), default=64,
                 show_default=True, help='Maximum batch size (per process)'),
    click.option('--grid', metavar='PNG', default=None,
                 help='Also write a grid of the first --batch images here (the folder name is appended when '
                      'several folders are written).'),
    click.option('--grid_scale', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True,
                 help='Enlarge the grid this many times (each pixel a block, tiles set apart by grey lines; e.g. 3 '
                      'for 16x16 images)'),
    click.option('--save_images', is_flag=True,
                 help='Reference option: write only the grids (to --grid, default <outdir>/grid.png), no image files.'),
    click.option('--steps', 'num_steps', metavar='INT', type=click.IntRange(min=2), default=18, show_default=True,
                 help='Number of noise levels from sigma_max to sigma_min (NFE = 2*steps - 1 for heun; for the '
                      'others steps - 1 with --ending=stop, steps with denoise, one fewer with --afs)'),
    click.option('--nfe', metavar='INT', type=click.IntRange(min=1), default=None,
                 help='Network evaluations per image: sets --steps for --solver (heun: odd NFE >= 3 only)'),
    click.option('--sigma_min', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
                 help='Lowest noise level  [default: varies]'),
    click.option('--sigma_max', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
                 help='Highest noise level; moves the prior radius with it  [default: varies]'),
    click.option('--rho', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True,
                 help='Time step exponent'),
    click.option('--S_churn', 'S_churn', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True,
                 help='Stochasticity strength'),
    click.option('--S_min', 'S_min', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True,
                 help='Stoch. min noise level'),
    click.option('--S_max', 'S_max', metavar='FLOAT', type=click.FloatRange(min=0), default=float('inf'),
                 show_default=True, help='Stoch. max noise level'),
    click.option('--S_noise', 'S_noise', metavar='FLOAT', type=float, default=1, show_default=True,
                 help='Stoch. noise inflation'),
    click.option('--solver', type=click.Choice(sampling.SOLVERS),
                 help='ODE solver: heun (EDM Alg. 2, 2 evaluations per step) or a one-evaluation-per-step solver '
                      f'({", ".join(sampling.MULTISTEP_SOLVERS)}; no --S_churn); with --disc/--schedule/--scaling '
                      'only euler or heun (docs/samplers.md)  [default: heun]'),
    click.option('--ending', type=click.Choice(sampling.ENDINGS), default=None,
                 help='One-evaluation solvers: stop at sigma_min (NFE = steps - 1) or end with D(x; sigma_min) '
                      f'(NFE = steps)  [default: {sampling.MULTISTEP_DEFAULTS["ending"]}]'),
    click.option('--sigma_grid', type=click.Choice(sampling.SIGMA_GRIDS), default=None,
                 help='One-evaluation solvers: noise levels on EDM\'s rho-polynomial grid or uniform in log sigma '
                      '(log-SNR); not the ablation --schedule  '
                      f'[default: {sampling.MULTISTEP_DEFAULTS["sigma_grid"]}]'),
    click.option('--lower_order_final', type=bool, default=None, metavar='BOOL',
                 help='Multistep solvers: lower the order on the last steps (last step first order)  '
                      f'[default: {int(sampling.MULTISTEP_DEFAULTS["lower_order_final"])}]'),
    click.option('--afs', type=bool, default=None, metavar='BOOL',
                 help='One-evaluation solvers: analytic first step, saving one NFE  '
                      f'[default: {int(sampling.MULTISTEP_DEFAULTS["afs"])}]'),
    click.option('--disc', 'discretization', type=click.Choice(['vp', 've', 'iddpm', 'edm']),
                 help='Ablate time step discretization'),
    click.option('--schedule', type=click.Choice(['vp', 've', 'linear']), help='Ablate noise schedule sigma(t)'),
    click.option('--scaling', type=click.Choice(['vp', 'none']), help='Ablate signal scaling s(t)'),
    click.option('--guidance', metavar='W', type=click.FloatRange(min=0), default=1, show_default=True,
                 help='Guidance weight: D = D_guide + W*(D - D_guide) at every network evaluation; 1: unguided, '
                      'the guide is never run. The guide is the network with the null label (classifier-free '
                      'guidance; train with --cond-drop) or --guide-network (docs/guidance.md)'),
    click.option('--guide-network', 'guide_network', metavar='PATH', default=None,
                 help='Autoguidance: guide with this network (e.g. an earlier checkpoint of the same run; same '
                      'resolution, channels, classes and D)'),
    click.option('--guidance-interval', 'guidance_interval', metavar='LO,HI', default=None, callback=_parse_interval,
                 help='Guide only at noise levels LO <= sigma <= HI (e.g. 0.3,5)  [default: every level]'),
    click.option('--precision', type=click.Choice(precision_mod.PRECISIONS), default=None,
                 help=f'Arithmetic of the network call: fp32 (TF32 off, the reference), tf32, bf16 (autocast), '
                      f'fp16 or bf16-native (bfloat16 activations, no autocast); the ODE state stays float64  '
                      f'[default: fp16 for a network trained with --fp16, '
                      f'else {precision_mod.DEFAULT_HELP["sample"]}]'),
    click.option('--compile', type=bool, default=False, show_default=True, metavar='BOOL',
                 help='torch.compile the network (pays off for many batches; one compile per batch shape)'),
    click.option('--channels-last', 'channels_last', type=bool, default=False, show_default=True, metavar='BOOL',
                 help='Channels-last (NHWC) network memory layout; same maths'),
    click.option('--bench', type=bool, default=False, show_default=True, metavar='BOOL',
                 help='cuDNN autotuning (faster; the kernels it picks may differ between runs, flipping a rare '
                      'uint8 value)'),
    click.option('--pfgmpp', type=bool, metavar='BOOL', default=None,
                 help='Compatibility: must agree with the checkpoint (D comes from the checkpoint).'),
    click.option('--aug_dim', metavar='D', type=click.FloatRange(min=0, min_open=True), default=None,
                 help='Compatibility: must equal the checkpoint\'s D.'),
    click.option('--align', type=bool, metavar='BOOL', default=False, show_default=True,
                 help='Scale sigma_min/sigma_max and the prior by sqrt(1+N/D) (reference option).'),
    click.option('--ckpt', metavar='KIMG', type=int, default=0, show_default=True,
                 help='Run-directory mode: first checkpoint (kimg) to use'),
    click.option('--end_ckpt', metavar='KIMG', type=int, default=100000000, show_default=True,
                 help='Run-directory mode: last checkpoint (kimg) to use'),
    click.option('--edm', type=bool, metavar='BOOL', default=False, show_default=True,
                 help='Run-directory mode: read network-snapshot-*.pkl (EDM pickles) instead, ignoring --ckpt range'),
    click.option('--use_pickle', type=bool, metavar='BOOL', default=False, show_default=True,
                 help='Run-directory mode: read training-state-*.pkl instead of *.pt'),
]


def common_options(function):
    for option in reversed(_COMMON_OPTIONS):
        function = option(function)
    return function


def given_on_command_line(name):
    """Whether the user typed the option (rather than getting its default)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def steps_for_nfe(opts, nfe, param_hint):
    """--nfe / --nfe_list → the step count for the solver and its --ending/--afs, or one clear usage error."""
    try:
        return sampling.steps_for_nfe(opts.get('solver'), nfe, opts.get('ending'), opts.get('afs'))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=param_hint) from None


def run_script(opts, axis=None, values=(None,), quant_filter='layers'):
    """--nfe → --steps, then the library's driver in this process's torchrun group; its errors as one line."""
    if opts.get('nfe') is not None and axis != 'steps':
        if given_on_command_line('num_steps'):
            raise click.BadParameter('give --steps or --nfe, not both', param_hint='--nfe')
        opts = dict(opts, num_steps=steps_for_nfe(opts, opts['nfe'], '--nfe'))
    device = dist.init()
    try:
        generation.run(opts, device, axis, values, quant_filter)
    except (ValueError, OSError) as err:  # OSError: a failed read or write (full disk)
        raise click.ClickException(error_summary(err)) from None
    finally:
        dist.shutdown()


@click.command()
@common_options
def main(**opts):
    """Generate images: from one --network file, or from every checkpoint of the run directory --outdir."""
    run_script(opts)


if __name__ == '__main__':
    main()
