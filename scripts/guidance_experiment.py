"""Guidance on class-conditional digits: FID and class accuracy against the guidance weight W, for classifier-free
guidance and autoguidance (guide: the run's checkpoint at a quarter of training), each with and without a
guidance interval, for D = 128 and EDM trained with the same recipe. Writes the measurement into docs/guidance.md.

    python scripts/guidance_experiment.py --out=guidance-run --report=docs/guidance.md    # hours on 2 CPU cores
    python scripts/guidance_experiment.py --out=guidance-run --report=docs/guidance.md --report-only

Everything runs through the public CLIs as a user types them (one subprocess per command, logs in <out>/logs/):
dataset_tool.py (scikit-learn's digits with their labels), train.py --cond=1 --cond-drop, generate.py in
run-directory mode (guided folders are named by their guidance), fid.py calc per folder. Class accuracy: a
scikit-learn SVM trained on the real digits at the samples' resolution classifies every sample; the class each
seed was asked for is drawn exactly as generate.py draws it. Re-running resumes: finished trainings, folders and
scores are skipped; the report says what is not measured yet.
"""

import glob
import json
import os
import subprocess
import sys
import time
import zipfile

import click
import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dnnlib.util import atomic_write                                                # noqa: E402
from training import sampler as sampling                                            # noqa: E402
from training.checkpoint import load_network                                        # noqa: E402
from training.generation import folder_name, image_path, missing_seeds, network_kimg  # noqa: E402
from training.guidance import folder_tag                                            # noqa: E402

RESOLUTION = 16
KIMG = 60
COND_DROP = 0.1
NETWORK = ('--arch=ddpmpp', '--cbase=32', '--cres=1,2', '--nblock=2', '--batch=64', '--lr=2e-3', '--lr-rampup=0.005',
           '--ema=0.005', '--dropout=0', '--augment=0', '--seed=0')
MODELS = (('D=128', 128), ('EDM', None))
KINDS = ('cfg', 'ag')
MARK_BEGIN, MARK_END = '<!-- measurement: begin -->', '<!-- measurement: end -->'


def slug(label):
    return 'edm' if label == 'EDM' else 'd' + label.split('=')[1]


def seed_class_indices(net, seeds, sampler_kwargs=None):
    """The class generate.py gives each seed without --class, drawn as training.generation.generate_batch draws
    it on the CPU: the prior first, then one integer from the seed's own generator."""
    rnd = sampling.SeedRandom(seeds, 'cpu')
    sigma0 = sampling.prior_sigma(net, **(sampler_kwargs or {}))
    rnd.prior((net.img_channels, net.img_resolution, net.img_resolution), sigma0, getattr(net, 'D', None))
    return rnd.randint(net.label_dim).numpy()


def read_labelled_zip(path):
    """(images [n, H*W] float in [0, 1], labels [n]) of a dataset_tool.py ZIP with labels."""
    with zipfile.ZipFile(path) as archive:
        labels = dict(json.loads(archive.read('dataset.json'))['labels'])
        names = sorted(labels)
        images = np.stack([np.asarray(PIL.Image.open(archive.open(name))).reshape(-1) for name in names])
    return images / 255.0, np.array([labels[name] for name in names])


def train_classifier(dataset_zip):
    """An SVM on the real digits (80 %); returns (classifier, its accuracy on the held-out 20 %)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC
    x, y = read_labelled_zip(dataset_zip)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    classifier = SVC(gamma='scale', C=10).fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


class Experiment:
    def __init__(self, out, num_images, weights, interval, ref):
        self.out, self.num_images, self.weights, self.interval = os.path.abspath(out), num_images, weights, interval
        self.dataset = os.path.join(self.out, 'datasets', f'digits-{RESOLUTION}x{RESOLUTION}.zip')
        self.ref = ref or os.path.join(self.out, 'fid-refs', f'digits-{RESOLUTION}x{RESOLUTION}.npz')
        self.results_path = os.path.join(self.out, 'results.json')
        self.results = json.load(open(self.results_path)) if os.path.exists(self.results_path) else {}
        self.results.setdefault('folders', {})
        self.results.setdefault('seconds', {})
        self.classifier = None

    def run_dir(self, label):
        return os.path.join(self.out, 'runs', slug(label))

    def checkpoints(self, label):
        return sorted((network_kimg(p), p) for p in glob.glob(os.path.join(self.run_dir(label), 'training-state-*.pt')))

    def final_and_guide(self, label):
        """(final checkpoint, guide = the checkpoint nearest a quarter of training)."""
        found = self.checkpoints(label)
        final = found[-1]
        guide = min(found, key=lambda item: abs(item[0] - final[0] / 4))
        return final, guide

    def settings(self):
        """(kind, W, interval) in the order they are run: the unguided W = 1 first, then per kind and interval."""
        yield 'cfg', 1.0, None
        for interval in (None, self.interval):
            for kind in KINDS:
                for weight in self.weights:
                    if weight != 1:
                        yield kind, weight, interval

    def folder(self, label, kind, weight, interval):
        (kimg, _), _ = self.final_and_guide(label)
        tag = folder_tag(weight, kind == 'ag', interval)
        return os.path.join(self.run_dir(label), folder_name(kimg, range(self.num_images), guidance=tag))

    # --- commands ------------------------------------------------------------------------------------------------

    def command(self, log_name, script, *args):
        log_path = os.path.join(self.out, 'logs', f'{log_name}.log')
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        argv = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
        start = time.time()
        with open(log_path, 'a') as log:
            log.write('$ ' + ' '.join(argv[1:]) + '\n')
            log.flush()
            result = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise RuntimeError(f'{script} failed (exit {result.returncode}); see {log_path}')
        self.results['seconds'][log_name] = self.results['seconds'].get(log_name, 0) + round(time.time() - start, 1)
        self.save()
        return open(log_path).read().strip().splitlines()[-1]

    def save(self):
        with atomic_write(self.results_path, 'w') as f:
            json.dump(self.results, f, indent=1, sort_keys=True)

    def prepare(self):
        if not os.path.exists(self.dataset):
            self.command('dataset', 'dataset_tool.py', '--source=sklearn-digits', f'--dest={self.dataset}',
                         f'--resolution={RESOLUTION}x{RESOLUTION}')
        if not os.path.exists(self.ref):
            self.command('fid-ref', 'fid.py', 'ref', f'--data={self.dataset}', f'--dest={self.ref}', '--workers=1')
        for label, D in MODELS:
            if not any(kimg >= KIMG for kimg, _ in self.checkpoints(label)):
                prior = ['--pfgmpp=0'] if D is None else ['--pfgmpp=1', f'--aug_dim={D}']
                # Checkpoints every 15 kimg: the one at a quarter of training is the autoguidance guide.
                self.command(f'train-{slug(label)}', 'train.py', f'--outdir={os.path.join(self.out, "runs")}',
                             f'--name={slug(label)}', f'--data={self.dataset}', '--cond=1', f'--cond-drop={COND_DROP}',
                             *prior, *NETWORK, f'--duration={KIMG / 1000}', '--tick=5', '--dump=3')

    def sample(self, label, kind, weight, interval):
        (kimg, _), (_, guide) = self.final_and_guide(label)
        args = [f'--outdir={self.run_dir(label)}', f'--seeds=0-{self.num_images - 1}', f'--ckpt={kimg}',
                f'--end_ckpt={kimg}', f'--guidance={weight:g}', '--batch=100']
        if kind == 'ag':
            args.append(f'--guide-network={guide}')
        if interval is not None:
            args.append(f'--guidance-interval={interval[0]:g},{interval[1]:g}')
        self.command(f'sample-{os.path.basename(self.folder(label, kind, weight, interval))}-{slug(label)}',
                     'generate.py', *args)

    def accuracy(self, label, folder):
        if self.classifier is None:
            self.classifier, self.results['classifier_real_accuracy'] = train_classifier(self.dataset)
        net = load_network(self.final_and_guide(label)[0][1])
        seeds = list(range(self.num_images))
        wanted = seed_class_indices(net, seeds)
        images = np.stack([np.asarray(PIL.Image.open(image_path(folder, s, True))).reshape(-1) for s in seeds])
        return float((self.classifier.predict(images / 255.0) == wanted).mean())

    def run(self):
        """Every folder sampled and classified first (cheap), then the FIDs (an Inception pass per image)."""
        self.prepare()
        jobs = [(label, setting) for setting in self.settings() for label, _ in MODELS]
        keys = []
        for index, (label, (kind, weight, interval)) in enumerate(jobs):
            folder = self.folder(label, kind, weight, interval)
            key = os.path.relpath(folder, self.out)
            entry = self.results['folders'].get(key, {})
            if missing_seeds(folder, range(self.num_images), subdirs=True):
                print(f'[{index + 1}/{len(jobs)}] sampling {key}', flush=True)
                self.sample(label, kind, weight, interval)
                entry = {}
            entry.update(model=label, kind=kind, weight=weight, interval=interval)
            if 'accuracy' not in entry:
                entry['accuracy'] = self.accuracy(label, folder)
                print(f'    {key}: class accuracy {entry["accuracy"]:.3f}', flush=True)
            self.results['folders'][key] = entry
            self.save()
            keys.append((key, folder))
        for index, (key, folder) in enumerate(keys):
            entry = self.results['folders'][key]
            if 'fid' not in entry:
                print(f'[{index + 1}/{len(keys)}] FID {key}', flush=True)
                entry['fid'] = float(self.command(f'fid-{slug(entry["model"])}', 'fid.py', 'calc',
                                                  f'--images={folder}', f'--ref={self.ref}',
                                                  f'--num={self.num_images}', '--workers=1'))
                self.save()
                print(f'    {key}: FID {entry["fid"]:.2f}', flush=True)


# --- the report ------------------------------------------------------------------------------------------------

def curve_label(kind, interval):
    name = 'CFG' if kind == 'cfg' else 'autoguidance'
    return name if interval is None else f'{name}, σ ∈ [{interval[0]:g}, {interval[1]:g}]'


def curves(results, model):
    """{curve label: [(W, accuracy, FID or None)]}, the unguided W = 1 folder at the start of every curve."""
    entries = [dict(e, fid=e.get('fid')) for e in results['folders'].values() if e['model'] == model]
    base = [e for e in entries if e['weight'] == 1]
    lines = {}
    for e in entries:
        if e['weight'] != 1:
            lines.setdefault((e['kind'], tuple(e['interval']) if e['interval'] else None), []).append(e)
    return {curve_label(kind, interval): sorted((e['weight'], e['accuracy'], e['fid']) for e in base + members)
            for (kind, interval), members in sorted(lines.items(), key=lambda item: (item[0][1] is not None, item[0][0]))}


def write_plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, panels = plt.subplots(2, len(MODELS), figsize=(5 * len(MODELS), 7), squeeze=False)
    for column, (model, _) in enumerate(MODELS):
        for label, points in curves(results, model).items():
            style = '--' if 'σ' in label else '-'
            scored = [p for p in points if p[2] is not None]
            panels[0][column].plot([p[0] for p in scored], [p[2] for p in scored], style, marker='o', label=label)
            panels[1][column].plot([p[0] for p in points], [p[1] for p in points], style, marker='o', label=label)
        panels[0][column].set_title(model)
        panels[0][column].set_ylabel('FID')
        panels[1][column].set_ylabel('class accuracy')
        for panel in panels[:, column]:
            panel.set_xlabel('guidance weight W')
            panel.grid(alpha=0.3)
        if panels[0][column].lines:
            panels[0][column].legend(fontsize='small')
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format='png', dpi=100)
    plt.close(figure)


def report_text(results, experiment, plot_name):
    weights = experiment.weights
    lines = [MARK_BEGIN, '',
             f'Written by `python scripts/guidance_experiment.py --out=<dir> --report=docs/guidance.md` from its '
             f'`results.json`; every number is measured by that run.', '',
             f'- Data: scikit-learn\'s 1,797 digits with their labels, {RESOLUTION}×{RESOLUTION} grayscale '
             f'(`dataset_tool.py --source=sklearn-digits --resolution={RESOLUTION}x{RESOLUTION}`).',
             f'- Models: D=128 and EDM, `train.py --cond=1 --cond-drop={COND_DROP} {" ".join(NETWORK)} '
             f'--duration={KIMG / 1000} --tick=5 --dump=3` (checkpoints every 15 kimg); sampled at the last '
             f'checkpoint; the autoguidance guide is the checkpoint at a quarter of training.',
             f'- Sampling: `generate.py` (Heun, 18 steps = 35 NFE) on seeds 0–{experiment.num_images - 1}, random '
             f'classes, `--guidance=W` with W ∈ {{{", ".join(f"{w:g}" for w in weights)}}}, CFG or '
             f'`--guide-network`, without and with `--guidance-interval={experiment.interval[0]:g},'
             f'{experiment.interval[1]:g}`.',
             f'- FID: `fid.py calc --num={experiment.num_images}` against all 1,797 images: with so few images it '
             f'is biased upwards and only comparable within this table.',
             f'- Class accuracy: an SVM (scikit-learn `SVC`) trained on 80 % of the real digits at '
             f'{RESOLUTION}×{RESOLUTION}; on the other 20 % it scores '
             f'{results.get("classifier_real_accuracy", float("nan")):.3f}. A sample counts as correct when it '
             f'classifies as the class it was generated for.', '']
    if results['folders']:
        lines += [f'![FID and class accuracy against W]({plot_name})', '']
    for model, _ in MODELS:
        table = curves(results, model)
        if not table:
            lines += [f'{model}: not measured yet.', '']
            continue
        lines += [f'**{model}** (accuracy / FID)', '', '| guide | ' + ' | '.join(f'W={w:g}' for w in weights) + ' |',
                  '|---|' + '---:|' * len(weights)]
        for label, points in table.items():
            cells = {w: f'{acc:.3f} / ' + ('FID pending' if fid is None else f'{fid:.1f}') for w, acc, fid in points}
            lines.append(f'| {label} | ' + ' | '.join(cells.get(w, 'not measured') for w in weights) + ' |')
        lines.append('')
    seconds = sum(results.get('seconds', {}).values())
    lines += [f'Compute: {seconds / 3600:.2f} h of work on 2 shared CPU cores (sum of the commands\' wall times).',
              '', MARK_END]
    return '\n'.join(lines)


def write_report(results, experiment, report_path):
    plot_name = 'guidance.png'
    if results['folders']:
        write_plot(results, os.path.join(os.path.dirname(report_path), plot_name))
    text = open(report_path).read() if os.path.exists(report_path) else ''
    section = report_text(results, experiment, plot_name)
    if MARK_BEGIN in text and MARK_END in text:
        text = text[:text.index(MARK_BEGIN)] + section + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text + '\n' + section + '\n'
    with atomic_write(report_path, 'w') as f:
        f.write(text)


@click.command()
@click.option('--out', 'out_dir', metavar='DIR', default='guidance-run', show_default=True,
              help='Working folder: dataset, runs, images, results.json, logs')
@click.option('--images', 'num_images', metavar='INT', type=click.IntRange(min=10), default=200, show_default=True,
              help='Images per folder')
@click.option('--weights', metavar='LIST', default='1,1.5,2,3,4', show_default=True, help='Guidance weights W')
@click.option('--interval', metavar='LO,HI', default='0.3,5', show_default=True, help='The guidance interval')
@click.option('--ref', metavar='NPZ', default=None, help='Existing FID statistics of the same dataset to reuse')
@click.option('--report', 'report_path', metavar='MD', default=None, help='Write the measurement into this file')
@click.option('--report-only', is_flag=True, help='Only rewrite the report from results.json')
def main(out_dir, num_images, weights, interval, ref, report_path, report_only):
    """Measure guidance on class-conditional digits (resumable)."""
    weights = [float(w) for w in weights.split(',')]
    interval = tuple(float(v) for v in interval.split(','))
    experiment = Experiment(out_dir, num_images, weights, interval, ref)
    if not report_only:
        experiment.run()
    if report_path is not None:
        write_report(experiment.results, experiment, report_path)
        print(f'Report written to {report_path}')


if __name__ == '__main__':
    main()
