"""Per-image detector features of an image set, computed once, and the DINOv2 detector of FD-DINOv2.

The feature cache of an image set (folder or zip) is one npz beside it, `<set>.features-<detector SHA-1[:12]>.npz`:
the features of every image scored so far, with each image file's name and fingerprint (size and modification time;
for a zip member its size and CRC plus the archive's modification time). Features are reused only for files whose
fingerprint still matches, under the same detector; the rest are computed and the cache rewritten atomically.
"""

import hashlib
import os
import zipfile

import numpy as np
import torch
import tqdm

from dnnlib.util import atomic_write, error_summary
from torch_utils import distributed as dist
from training import fid_stats

# ---------------------------------------------------------------------------------------------- feature cache


def file_fingerprints(image_path, names):
    """int64 [len(names), 2]: (size, modification time in ns) of each file of a folder; for a zip, (member size,
    CRC32 + archive mtime in ns)."""
    if os.path.isdir(image_path):
        stats = [os.stat(os.path.join(image_path, name)) for name in names]
        return np.array([(s.st_size, s.st_mtime_ns) for s in stats], dtype=np.int64).reshape(-1, 2)
    archive_mtime = os.stat(image_path).st_mtime_ns
    with zipfile.ZipFile(image_path) as archive:
        infos = [archive.getinfo(name) for name in names]
    return np.array([(info.file_size, info.CRC + archive_mtime) for info in infos], dtype=np.int64).reshape(-1, 2)


def cache_path(image_path, detector_sha1):
    return os.path.normpath(image_path) + f'.features-{detector_sha1[:12]}.npz'


def read_cache(path, detector_sha1):
    """{name: (fingerprint row, feature row)} from a cache file; {} when absent, unreadable or of another detector."""
    try:
        with np.load(path) as data:
            if str(data['detector_sha1']) != detector_sha1:
                return {}
            return {str(name): (tuple(fingerprint), feature) for name, fingerprint, feature in
                    zip(data['names'], data['fingerprints'], data['features'])}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return {}


def write_cache(path, detector_sha1, entries):
    """Write {name: (fingerprint, feature)} atomically."""
    names = sorted(entries)
    with atomic_write(path) as f:
        np.savez(f, detector_sha1=np.array(detector_sha1), names=np.array(names, dtype=str),
                 fingerprints=np.array([entries[n][0] for n in names], dtype=np.int64).reshape(-1, 2),
                 features=np.stack([entries[n][1] for n in names]).astype(np.float32))


def calculate_features(image_path, detector, num_expected=None, seed=0, max_batch_size=64, num_workers=3,
                       device=None, progress=True, cache=False):
    """float32 [n, detector.feature_dim] features of the images fid_stats.open_image_set selects, in its order, all
    ranks together (every rank gets all of them). cache: reuse and update the feature cache beside the set
    (the detector needs a `sha1` attribute)."""
    device = torch.device(device) if device is not None else dist.device()
    dataset = fid_stats.open_image_set(image_path, num_expected=num_expected, seed=seed)
    names = dataset.image_fnames
    entries, path, fingerprints = {}, None, None
    if cache:
        if getattr(detector, 'sha1', None) is None:
            raise ValueError('The feature cache needs a detector with a known SHA-1')
        path = cache_path(image_path, detector.sha1)
        fingerprints = [tuple(row) for row in file_fingerprints(image_path, names).tolist()]
        entries = read_cache(path, detector.sha1)
    missing = [i for i, name in enumerate(names) if not cache or entries.get(name, (None,))[0] != fingerprints[i]]
    features = torch.zeros(len(names), detector.feature_dim, dtype=torch.float32, device=device)
    if missing:
        subset = torch.utils.data.Subset(dataset, missing)
        batches = dist.rank_batches(range(len(missing)), max_batch_size)
        loader_kwargs = dict(prefetch_factor=2, persistent_workers=False) if num_workers > 0 else {}
        loader = torch.utils.data.DataLoader(subset, batch_sampler=batches, num_workers=num_workers, **loader_kwargs)
        rows = iter(batches)
        for images, _labels in tqdm.tqdm(loader, unit='batch', disable=not progress or dist.get_rank() != 0,
                                         desc=f'{type(detector).__name__} features ({len(missing)} images)'):
            index = torch.as_tensor([missing[i] for i in next(rows)], device=device)
            features[index] = detector(images.to(device)).to(device=device, dtype=torch.float32)
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(features)      # each row is filled on exactly one rank
    result = features.cpu().numpy()
    computed = set(missing)
    for i, name in enumerate(names):
        if i not in computed:
            result[i] = entries[name][1]
    if cache and missing:
        if dist.get_rank() == 0:
            entries.update({name: (fingerprints[i], result[i]) for i, name in enumerate(names)})
            write_cache(path, detector.sha1, entries)
        dist.barrier()   # the other ranks read the new cache next time, so all ranks agree on what is missing
    return result

# ---------------------------------------------------------------------------------------------- DINOv2


DINOV2_HUB_REPO = 'facebookresearch/dinov2'
DINOV2_MODEL = 'dinov2_vitl14'
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_HINT = (f'FD-DINOv2 needs the DINOv2 ViT-L/14 model: pass --dinov2=<local torch.hub directory of '
               f'{DINOV2_HUB_REPO} (with hubconf.py; the weights in torch.hub\'s cache)> or --dinov2=github '
               f'(downloads through torch.hub)')


def module_sha1(module):
    """SHA-1 of a module's state (names, shapes, dtypes and values), the cache key of a hub model."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f'{name}:{list(value.shape)}:{value.dtype};'.encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b'')
    return digest.hexdigest()


class DINOv2Detector(torch.nn.Module):
    """`detector(uint8 NCHW images) -> float32 [B, embed_dim]`, EDM2's FD-DINOv2 preprocessing: bicubic resize to
    224x224 (antialiased), scale to [0, 1], ImageNet mean and std, then the model's class-token embedding."""

    def __init__(self, model, sha1):
        super().__init__()
        self.model = model
        self.sha1 = sha1
        self.feature_dim = int(model.embed_dim)

    @torch.no_grad()
    def forward(self, images):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'DINOv2 needs 1- or 3-channel NCHW images, got shape {list(images.shape)}')
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = torch.nn.functional.interpolate(x, size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION), mode='bicubic',
                                            antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
        return self.model((x / 255 - mean) / std).float()


def load_dinov2(source, device=None):
    """DINOv2Detector from a local torch.hub directory (a copy of the dinov2 repository) or, for 'github', from
    torch.hub over the internet; FileNotFoundError with one line when it cannot be had."""
    device = torch.device(device) if device is not None else dist.device()
    try:
        if source == 'github':
            model = torch.hub.load(DINOV2_HUB_REPO, DINOV2_MODEL, trust_repo=True, skip_validation=True,
                                   verbose=False)
        elif os.path.isfile(os.path.join(str(source), 'hubconf.py')):
            model = torch.hub.load(str(source), DINOV2_MODEL, source='local', verbose=False)
        else:
            raise FileNotFoundError(f'{source} is not a torch.hub directory (no hubconf.py)')
    except Exception as error:  # torch.hub raises whatever the hub code and the download raise
        raise FileNotFoundError(f'Cannot load DINOv2 from {source} ({error_summary(error)}); {DINOV2_HINT}') from None
    model = model.to(device).eval().requires_grad_(False)
    return DINOv2Detector(model, sha1=module_sha1(model))
