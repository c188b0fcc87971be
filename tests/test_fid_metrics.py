"""fid.py beyond FID: the feature cache, KID and precision/recall through the CLI, reference features, FD-DINOv2.

A tiny TorchScript stand-in for the Inception network (the --detector convention: 3x299x299 input in [-1, 1],
[B, 2048] output) keeps these tests fast; tests/test_fid.py covers the real detector."""

import csv
import json
import os
import textwrap
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from data_helpers import make_image_zip, random_images
from training import features, fid_stats, metrics


class TinyInception(torch.nn.Module):
    """Pool to 3x4x4, a fixed random projection to 2048 features and a nonlinearity."""

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(48, fid_stats.FEATURE_DIM)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.tanh(self.projection(pooled * 3))


@pytest.fixture(scope='module')
def tiny_detector(tmp_path_factory):
    path = tmp_path_factory.mktemp('detector') / 'tiny.pt'
    torch.jit.script(TinyInception()).save(str(path))
    return str(path)


def write_folder(path, num, seed):
    """generate.py's layout: 000000/000123.png."""
    os.makedirs(os.path.join(path, '000000'), exist_ok=True)
    for i, image in enumerate(random_images(num, resolution=8, seed=seed)):
        PIL.Image.fromarray(image).save(os.path.join(path, '000000', f'{i:06d}.png'))
    return str(path)


class CountingDetector(torch.nn.Module):
    """Wraps a detector and counts the images it sees."""

    def __init__(self, inner, sha1='0' * 40):
        super().__init__()
        self.inner, self.sha1, self.feature_dim, self.images = inner, sha1, inner.feature_dim, 0

    def forward(self, images):
        self.images += images.shape[0]
        return self.inner(images)


def invoke(*args):
    result = CliRunner().invoke(fid.main, list(args))
    return result, result.stdout.strip().splitlines()

# ---------------------------------------------------------------------------------------------- feature cache


def test_feature_cache_reuses_unchanged_files_only(tmp_path, tiny_detector):
    # Catches a cache that recomputes everything, serves stale features after a file changed, ignores the detector,
    # or breaks on a corrupt cache file.
    folder = write_folder(tmp_path / 'images', num=7, seed=1)
    inner = fid_stats.load_detector(tiny_detector, device='cpu', verbose=False)
    detector = CountingDetector(inner)
    args = dict(num_workers=0, device='cpu', progress=False, max_batch_size=3)
    plain = features.calculate_features(folder, detector, **args)
    assert detector.images == 7 and not os.path.exists(features.cache_path(folder, detector.sha1))
    first = features.calculate_features(folder, detector, cache=True, **args)
    np.testing.assert_array_equal(first, plain)
    assert detector.images == 14
    assert os.listdir(tmp_path) == ['images', os.path.basename(features.cache_path(folder, detector.sha1))]
    again = features.calculate_features(folder, detector, cache=True, **args)
    np.testing.assert_array_equal(again, plain)
    assert detector.images == 14                               # no network call
    subset = features.calculate_features(folder, detector, cache=True, num_expected=4, seed=2, **args)
    dataset = fid_stats.open_image_set(folder, num_expected=4, seed=2)
    index = [sorted(os.listdir(os.path.join(folder, '000000'))).index(name.split('/')[1])
             for name in dataset.image_fnames]
    np.testing.assert_array_equal(subset, plain[index])
    assert detector.images == 14
    # A changed file (new content, new mtime) is recomputed, alone.
    changed = os.path.join(folder, '000000', '000003.png')
    PIL.Image.fromarray(random_images(1, resolution=8, seed=99)[0]).save(changed)
    os.utime(changed, ns=(time.time_ns() + 10**9,) * 2)
    updated = features.calculate_features(folder, detector, cache=True, **args)
    assert detector.images == 15
    assert not np.array_equal(updated[3], plain[3]) and np.array_equal(np.delete(updated, 3, 0), np.delete(plain, 3, 0))
    # Another detector (another SHA-1) has its own cache; a corrupt cache file is recomputed and rewritten.
    other = CountingDetector(inner, sha1='1' * 40)
    features.calculate_features(folder, other, cache=True, **args)
    assert other.images == 7
    with open(features.cache_path(folder, other.sha1), 'wb') as f:
        f.write(b'junk')
    recomputed = features.calculate_features(folder, other, cache=True, **args)
    np.testing.assert_allclose(recomputed, updated, atol=1e-5)     # row 3 was computed alone, in another batch
    assert other.images == 14
    features.calculate_features(folder, other, cache=True, **args)
    assert other.images == 14


def test_statistics_from_features_match_the_accumulated_ones(tmp_path, tiny_detector):
    # The FID of --metrics/--cache runs comes from stats_from_features; catches a ddof or mean slip against the
    # statistics plain FID accumulates batch by batch.
    data = make_image_zip(tmp_path / 'd.zip', num=9, resolution=8, seed=3)
    detector = fid_stats.load_detector(tiny_detector, device='cpu', verbose=False)
    mu, sigma = fid_stats.calculate_inception_stats(data, detector=detector, max_batch_size=4, num_workers=0,
                                                    device='cpu', progress=False)
    rows = features.calculate_features(data, detector, max_batch_size=4, num_workers=0, device='cpu', progress=False)
    mu2, sigma2 = fid_stats.stats_from_features(rows)
    np.testing.assert_allclose(mu2, mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-8, atol=1e-12)

# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tiny_detector):
    folder = tmp_path_factory.mktemp('ref')
    data = make_image_zip(folder / 'data.zip', num=12, resolution=8, seed=7)
    dest = folder / 'data.npz'
    result, _ = invoke('ref', f'--data={data}', f'--dest={dest}', '--workers=0', f'--detector={tiny_detector}',
                       '--features=1')
    assert result.exit_code == 0, result.output
    plain = folder / 'plain.npz'
    result, _ = invoke('ref', f'--data={data}', f'--dest={plain}', '--workers=0', f'--detector={tiny_detector}')
    assert result.exit_code == 0, result.output
    return str(data), str(dest), str(plain)


def test_ref_features_keep_the_npz_readable_as_edm_reads_it(reference):
    # EDM's fid.py reads dict(np.load(f)) and takes 'mu' and 'sigma'; catches features that displace or distort them.
    _data, with_features, plain = reference
    ref = dict(np.load(with_features))
    assert sorted(ref) == ['features', 'mu', 'sigma'] and ref['features'].shape == (12, fid_stats.FEATURE_DIM)
    mu, sigma = fid_stats.stats_from_features(ref['features'])
    np.testing.assert_allclose(ref['mu'], mu, rtol=1e-12)
    np.testing.assert_allclose(ref['sigma'], sigma, rtol=1e-12)
    old = dict(np.load(plain))
    assert sorted(old) == ['mu', 'sigma']
    np.testing.assert_allclose(ref['mu'], old['mu'], rtol=1e-9)


def test_calc_kid_and_pr_on_one_set_match_the_library(reference, tiny_detector, tmp_path):
    # Catches the CLI passing features in the wrong order, a wrong reference array, or mislabelled output.
    data, ref, _plain = reference
    images = write_folder(tmp_path / 'gen', num=12, seed=11)
    table = tmp_path / 'one.json'
    result, lines = invoke('calc', f'--images={images}', f'--ref={ref}', '--num=12', '--workers=0',
                           f'--detector={tiny_detector}', '--metrics=kid,pr', '--cache=1', f'--table={table}')
    assert result.exit_code == 0, result.output
    [row] = json.loads(table.read_text())
    detector = fid_stats.load_detector(tiny_detector, device='cpu', verbose=False)
    gen = features.calculate_features(images, detector, num_workers=0, device='cpu', progress=False)
    ref_features = np.load(ref)['features']
    kid = metrics.kid(gen, ref_features, seed=0)
    pr = metrics.precision_recall(gen, ref_features)
    assert (row['kid'], row['kid_std'], row['kid_spread']) == pytest.approx((kid.mean, kid.std, kid.spread), rel=1e-9)
    assert (row['precision'], row['recall'], row['pr_images']) == (pr.precision, pr.recall, 12)
    text = '\n'.join(lines)
    assert f'KID: {kid.mean:.6g} ± ' in text and 'spread over generated images' in text
    assert 'Inception features' in text and 'FID' not in text and 'fid' not in row     # only what was asked
    # Default output is the bare FID number, as before, and writes no cache beside the images.
    result, plain_lines = invoke('calc', f'--images={data}', f'--ref={ref}', '--num=12', '--workers=0',
                                 f'--detector={tiny_detector}')
    assert result.exit_code == 0 and abs(float(plain_lines[-1])) < 1e-6
    assert not os.path.exists(features.cache_path(data, detector.sha1))


def test_calc_metric_errors_are_one_line(reference, tiny_detector, tmp_path):
    data, ref, plain = reference
    base = ['calc', f'--images={data}', '--num=12', '--workers=0', f'--detector={tiny_detector}']
    cases = [([f'--ref={plain}', '--metrics=kid'], 'hold no features; make the reference with'),
             ([f'--ref={ref}', '--metrics=fid,bogus'], 'unknown bogus; choose from fid,kid,pr,fd_dinov2'),
             ([f'--ref={ref}', '--metrics=fd_dinov2'], 'FD-DINOv2 needs the DINOv2 ViT-L/14 model')]
    for extra, message in cases:
        result, _ = invoke(*base, *extra)
        assert result.exit_code == 1 and message in result.output and 'Traceback' not in result.output, extra
        assert len(result.output.strip().splitlines()) <= 2, result.output      # the loading line, the error
    result, _ = invoke('ref', f'--data={data}', f'--dest={tmp_path / "r.npz"}', f'--dinov2={tmp_path}')
    assert result.exit_code == 1 and 'no hubconf.py' in result.output and 'FD-DINOv2 needs' in result.output
    assert os.listdir(tmp_path) == []                                             # nothing half-written


def test_run_dir_mode_tabulates_and_plots_every_metric_from_cached_features(reference, tiny_detector, tmp_path,
                                                                           monkeypatch):
    # One CSV with every metric per folder, one plot per metric, and rescoring with another metric from the cache
    # costs no detector call. Catches metric columns missing or shifted, FID changed by the features path, a plot
    # per metric missing, or the cache not used by the CLI.
    _data, ref, _plain = reference
    names = ['ckpt_000010_alpha_0', 'ckpt_000010_alpha_0.2']       # few folders: each FID costs two 2048² eighs
    for seed, name in enumerate(names):
        write_folder(tmp_path / 'run' / name, num=6, seed=seed)
    calls = []
    original = fid_stats.InceptionDetector.forward
    monkeypatch.setattr(fid_stats.InceptionDetector, 'forward',
                        lambda self, images: calls.append(images.shape[0]) or original(self, images))
    common = [f'--images={tmp_path / "run"}', f'--ref={ref}', '--num=6', '--workers=0', f'--detector={tiny_detector}']
    result, _ = invoke('calc', *common, f'--table={tmp_path / "plain.csv"}', f'--plot={tmp_path / "plain.png"}')
    assert result.exit_code == 0, result.output
    assert sum(calls) == 12
    result, lines = invoke('calc', *common, '--metrics=fid,kid,pr', '--cache=1')
    assert result.exit_code == 0, result.output
    assert sum(calls) == 24
    with open(tmp_path / 'run' / 'fid.csv') as f:
        rows = {row['folder']: row for row in csv.DictReader(f)}
    with open(tmp_path / 'plain.csv') as f:
        plain_rows = {row['folder']: row for row in csv.DictReader(f)}
    plain_columns = list(next(iter(plain_rows.values())))
    assert plain_columns[:10] == ['folder', 'seed_set', 'kimg', 'solver', 'axis', 'value', 'nfe', 'fid',
                                  'min_fid_over_seed_sets', 'seed_sets']
    assert not {'kid', 'precision'} & set(plain_columns)                     # a plain FID table is unchanged
    assert list(next(iter(rows.values()))) == plain_columns + ['kid', 'kid_std', 'kid_spread', 'precision', 'recall',
                                                               'pr_images']
    for name in names:
        assert float(rows[name]['fid']) == pytest.approx(float(plain_rows[name]['fid']), rel=1e-9)
        assert 0 <= float(rows[name]['precision']) <= 1 and rows[name]['pr_images'] == '6'
    for metric in ('fid', 'kid', 'precision', 'recall'):
        path = tmp_path / 'run' / ('fid.png' if metric == 'fid' else f'fid-{metric}.png')
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', metric
    # Rescore: KID alone, from the cache: no detector call, the same KID values.
    result, _ = invoke('calc', *common, '--metrics=kid', '--cache=1', f'--table={tmp_path / "kid.json"}')
    assert result.exit_code == 0, result.output
    assert sum(calls) == 24
    kid_rows = {row['folder']: row for row in json.loads((tmp_path / 'kid.json').read_text())['folders']}
    assert all(kid_rows[name]['kid'] == pytest.approx(float(rows[name]['kid']), rel=1e-12) for name in names)
    assert all(kid_rows[name]['fid'] is None for name in names)

# ---------------------------------------------------------------------------------------------- FD-DINOv2

HUBCONF = textwrap.dedent('''
    import torch

    class TinyViT(torch.nn.Module):
        """DINOv2's interface: forward(x [B, 3, 224, 224]) -> [B, embed_dim] class-token embedding."""
        def __init__(self):
            super().__init__()
            self.embed_dim = 16
            self.patch_embed = torch.nn.Conv2d(3, 16, kernel_size=14, stride=14)
            self.head = torch.nn.Linear(16, 16)
            self.last_input = None

        def forward(self, x):
            self.last_input = x
            return self.head(torch.tanh(self.patch_embed(x)).mean((2, 3)))

    def dinov2_vitl14(pretrained=True, **kwargs):
        torch.manual_seed(0)
        return TinyViT()
''')


@pytest.fixture(scope='module')
def hub_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('dinov2_hub')
    (folder / 'hubconf.py').write_text(HUBCONF)
    return str(folder)


def test_dinov2_preprocessing_is_edm2s(hub_dir):
    # A flat gray image stays flat through the resize: the model must see ((v / 255) − mean) / std per channel at
    # 224x224. Catches a missing /255, the mean and std swapped, a wrong size or a grayscale image not repeated.
    detector = features.load_dinov2(hub_dir, device='cpu')
    assert detector.feature_dim == 16 and len(detector.sha1) == 40
    out = detector(torch.full((2, 1, 8, 8), 100, dtype=torch.uint8))
    assert out.shape == (2, 16) and out.dtype == torch.float32
    seen = detector.model.last_input
    expected = (100 / 255 - torch.tensor(features.IMAGENET_MEAN)) / torch.tensor(features.IMAGENET_STD)
    assert seen.shape == (2, 3, 224, 224)
    torch.testing.assert_close(seen, expected.reshape(1, 3, 1, 1).expand_as(seen), rtol=0, atol=1e-5)


def test_fd_dinov2_pipeline_with_a_tiny_network(hub_dir, tiny_detector, tmp_path):
    # ref --dinov2 stores dinov2_mu/sigma beside mu/sigma; calc --metrics=fd_dinov2 of the same set is 0 and of
    # another set positive. Catches reference and generated statistics from different detectors or crossed keys.
    data = make_image_zip(tmp_path / 'data.zip', num=8, resolution=8, seed=5)
    ref = tmp_path / 'ref.npz'
    result, _ = invoke('ref', f'--data={data}', f'--dest={ref}', '--workers=0', f'--detector={tiny_detector}',
                       f'--dinov2={hub_dir}')
    assert result.exit_code == 0, result.output
    arrays = dict(np.load(ref))
    assert sorted(arrays) == ['dinov2_mu', 'dinov2_sigma', 'mu', 'sigma'] and arrays['dinov2_mu'].shape == (16,)
    common = [f'--ref={ref}', '--num=8', '--workers=0', f'--detector={tiny_detector}', f'--dinov2={hub_dir}']
    result, lines = invoke('calc', f'--images={data}', *common, '--metrics=fd_dinov2')
    assert result.exit_code == 0, result.output
    assert abs(float(lines[-1].split(': ')[1])) < 1e-6 and lines[-1].startswith('FD-DINOv2: ')
    other = write_folder(tmp_path / 'gen', num=8, seed=12)
    result, lines = invoke('calc', f'--images={other}', *common, '--metrics=fd_dinov2')
    assert result.exit_code == 0, result.output
    assert float(lines[-1].split(': ')[1]) > 1e-3


def test_torchrun_two_processes_give_the_same_metrics_and_one_cache(reference, tiny_detector, tmp_path, repo_root):
    # Catches features gathered wrongly across ranks (rows lost or summed twice), ranks disagreeing on what the
    # cache holds (a hang), or two ranks writing the cache.
    import subprocess
    import sys
    _data, ref, _plain = reference
    images = write_folder(tmp_path / 'gen', num=7, seed=21)
    args = lambda table: ['calc', f'--images={images}', f'--ref={ref}', '--num-images=7', '--batch=2', '--workers=0',
                          f'--detector={tiny_detector}', '--metrics=kid,pr', f'--table={table}']
    result, _ = invoke(*args(tmp_path / 'one.json'))
    assert result.exit_code == 0, result.output
    env = dict(os.environ, PFGMPP_DEVICE='cpu', OMP_NUM_THREADS='1')
    for _ in range(2):    # computes and writes the cache, then reads it on both ranks
        process = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                  os.path.join(repo_root, 'fid.py'), *args(tmp_path / 'two.json'), '--cache=1'],
                                 cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
        assert process.returncode == 0, process.stderr[-2000:]
        [one], [two] = json.loads((tmp_path / 'one.json').read_text()), json.loads((tmp_path / 'two.json').read_text())
        assert {key: two[key] for key in one if key != 'images'} == pytest.approx(
            {key: one[key] for key in one if key != 'images'}, rel=1e-5, abs=1e-7)
    assert sorted(os.listdir(tmp_path)) == sorted(['gen', 'one.json', 'two.json', os.path.basename(
        features.cache_path(images, fid_stats.file_sha1(tiny_detector)))])
