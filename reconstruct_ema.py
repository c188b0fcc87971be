"""Post-hoc EMA: networks of any EMA length σ_rel from the snapshots a run trained with --phema wrote.

    python reconstruct_ema.py --indir=training-runs/00000-... --outdir=training-runs/00000-... \\
        --outstd=0.01,0.02,...,0.25
    python generate.py --outdir=training-runs/00000-... --seeds=0-9999   # ckpt_XXXXXX_ema0.070/ per σ_rel

Each output `phema-{kimg:06d}-{std:.3f}.pt` is the least-squares combination (training/phema.py) of every
snapshot up to --outkimg; generate.py, the sweeps and fid.py read it like any checkpoint. The method and its
costs: docs/ema.md.
"""

import click

from dnnlib.util import error_summary
from training import phema


def parse_std_list(value):
    """'0.01,0.02,...,0.05' → [0.01, 0.02, 0.03, 0.04, 0.05]: '...' continues the step of the two numbers before it
    up to the number after it (inclusive)."""
    pieces = [piece.strip() for piece in value.split(',')]
    result = []
    for index, piece in enumerate(pieces):
        if piece != '...':
            result.append(float(piece))
            continue
        if len(result) < 2 or index + 1 >= len(pieces) or pieces[index + 1] == '...':
            raise ValueError('"..." needs two numbers before it and one after it')
        step, end = result[-1] - result[-2], float(pieces[index + 1])
        if step <= 0 or end < result[-1]:
            raise ValueError('a "..." range must increase')
        count = int(round((end - result[-1]) / step))
        if abs(result[-1] + count * step - end) > 1e-6 * max(abs(step), 1e-12) * max(count, 1) + 1e-12:
            raise ValueError(f'{end:g} is not reached in steps of {step:g} from {result[-1]:g}')
        start = result[-1]
        result.extend(round(start + k * step, 12) for k in range(1, count))  # the end follows as the next piece
    return result


def _std_list(ctx, param, value):
    if value is None:
        return None
    try:
        stds = parse_std_list(value)
        for std in stds:
            phema.check_std(std)
    except ValueError as err:
        raise click.BadParameter(f'{value!r}: {err}') from None
    if not stds:
        raise click.BadParameter(f'{value!r} gives no σ_rel values')
    return stds


@click.command()
@click.option('--indir', metavar='DIR', required=True, help='Run directory holding the phema-track-*.pt snapshots')
@click.option('--outdir', metavar='DIR', required=True,
              help='Where to write phema-{kimg}-{std}.pt (the run directory lets generate.py and fid.py find them)')
@click.option('--outstd', metavar='LIST', required=True, callback=_std_list,
              help='EMA lengths σ_rel to reconstruct, in (0, 0.2887), e.g. 0.05,0.10 or 0.01,0.02,...,0.25')
@click.option('--outkimg', metavar='KIMG', type=click.IntRange(min=0), default=None,
              help='Training time of the outputs: a snapshot time  [default: the latest snapshot]')
@click.option('--instd', metavar='LIST', callback=_std_list, default=None,
              help='Use only the snapshots of these tracks  [default: all]')
@click.option('--skip', is_flag=True, help='Skip outputs that already exist')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True,
              help='Outputs combined per pass over the snapshots (each holds a float64 copy of the weights)')
def main(indir, outdir, outstd, outkimg, instd, skip, batch):
    """Reconstruct post-hoc EMA networks of the given lengths from a run's power-function EMA snapshots.

    \b
    python reconstruct_ema.py --indir=training-runs/00000-run --outdir=training-runs/00000-run \\
        --outstd=0.01,0.02,...,0.25
    """
    try:
        results = phema.reconstruct(indir, outdir, outstd, out_kimg=outkimg, in_stds=instd, skip=skip, batch=batch,
                                    log=click.echo)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        raise click.ClickException(error_summary(err)) from None
    large = [std for _path, std, sum_abs in results if sum_abs > phema.LARGE_COEFFICIENTS]
    if large:
        click.echo(f'Warning: σ_rel {", ".join(f"{std:.3f}" for std in large)} need coefficients with Σ|c| > '
                   f'{phema.LARGE_COEFFICIENTS} (outside the tracked lengths); their weights carry amplified '
                   f'rounding and approximation error', err=True)
    click.echo('Done.')


if __name__ == '__main__':
    main()
