"""Convert an image source into a dataset ZIP or folder for train.py and fid.py.

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz --dest=datasets/mnist-32x32.zip
    python dataset_tool.py --source=path/to/images --dest=datasets/mine-64x64.zip --resolution=64x64 --transform=center-crop
    python dataset_tool.py --source=sklearn-digits --dest=datasets/digits-32x32.zip      # no download needed

Output: PNG files `00000/img00000000.png`, ... and `dataset.json` with `{"labels": [[name, class], ...]}` or
`{"labels": null}`. The destination is written to a temporary name and renamed at the end, so an error or Ctrl-C
never leaves a half-written dataset behind.
"""

import gzip
import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile
import zipfile

import click
import numpy as np
import PIL.Image
import tqdm

import dnnlib.util

DIGITS_SOURCE = 'sklearn-digits'
DIGITS_DEFAULT_RESOLUTION = (32, 32)

# ---------------------------------------------------------------------------------------------- pixels


def to_array(image):
    """uint8 HW (grayscale) or HWC RGB array from any PIL image; transparency is composited onto black."""
    if image.mode == 'P':
        image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
    if image.mode in ('1', 'L', 'RGB'):
        return np.array(image.convert('L') if image.mode == '1' else image, dtype=np.uint8)
    if image.mode in ('LA', 'La', 'RGBA', 'RGBa', 'PA'):
        rgba = np.array(image.convert('RGBA'), dtype=np.float64)
        composite = np.rint(rgba[:, :, :3] * rgba[:, :, 3:] / 255).astype(np.uint8)
        return composite[:, :, 0] if image.mode in ('LA', 'La') else composite
    if image.mode.startswith('I'):  # 16-bit grayscale
        return np.rint(np.clip(np.array(image, dtype=np.float64), 0, 65535) * (255 / 65535)).astype(np.uint8)
    if image.mode == 'F':
        return np.rint(np.clip(np.array(image, dtype=np.float64), 0, 255)).astype(np.uint8)
    return np.array(image.convert('RGB'), dtype=np.uint8)  # CMYK, YCbCr, LAB, HSV


def decode_image(data, name):
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return to_array(image)
    except (OSError, ValueError, PIL.UnidentifiedImageError) as error:
        raise click.ClickException(f'Cannot read image {name}: {error}') from None


def is_image_name(name):
    PIL.Image.init()
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION

# ---------------------------------------------------------------------------------------------- sources
# Each source returns (number of images, iterator of (uint8 array, label or None)).


def open_image_folder(source_dir, max_images):
    paths = sorted(str(p.relative_to(source_dir)).replace('\\', '/')
                   for p in _walk(source_dir) if is_image_name(p.name))
    labels = _read_labels_json(os.path.join(source_dir, 'dataset.json'), source_dir)
    if labels is None:  # class names from top-level sub-folders, when there are at least two
        tops = [p.split('/')[0] if '/' in p else '' for p in paths]
        classes = sorted(set(tops))
        if len(classes) >= 2:
            labels = {p: classes.index(top) for p, top in zip(paths, tops)}
    paths = paths[:max_images]

    def iterate():
        for path in paths:
            with open(os.path.join(source_dir, path), 'rb') as f:
                yield decode_image(f.read(), path), (labels or {}).get(path)
    return len(paths), iterate()


def _walk(folder):
    import pathlib
    return (p for p in pathlib.Path(folder).rglob('*') if p.is_file())


def _read_labels_json(path, where, data=None):
    """{name: label} from a dataset.json (file path or bytes); None when absent or null."""
    if data is None:
        if not os.path.isfile(path):
            return None
        with open(path, 'rb') as f:
            data = f.read()
    try:
        labels = json.loads(data)['labels']
        return None if labels is None else {str(name).replace('\\', '/'): label for name, label in labels}
    except (ValueError, KeyError, TypeError) as error:
        raise click.ClickException(f'Malformed dataset.json in {where}: {error!r}') from None


def open_image_zip(source, max_images):
    try:
        archive = zipfile.ZipFile(source)
        names = sorted(name for name in archive.namelist() if is_image_name(name))
        labels = (_read_labels_json(None, source, archive.read('dataset.json'))
                  if 'dataset.json' in archive.namelist() else None)
    except (zipfile.BadZipFile, OSError) as error:
        raise click.ClickException(f'Cannot read ZIP archive {source}: {error}') from None
    names = names[:max_images]

    def iterate():
        with archive:
            for name in names:
                yield decode_image(archive.read(name), name), (labels or {}).get(name)
    return len(names), iterate()


def open_cifar10(tarball, max_images):
    """The 50000 training images of the CIFAR-10 python tarball (data_batch_1..5), 32x32 RGB, classes 0..9."""
    images, labels = [], []
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for batch in range(1, 6):
                member = tar.extractfile(f'cifar-10-batches-py/data_batch_{batch}')
                data = pickle.load(member, encoding='bytes')
                images.append(np.asarray(data[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(data[b'labels'], dtype=np.int64))
    except (tarfile.TarError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as error:
        raise click.ClickException(f'Not a valid CIFAR-10 python tarball: {tarball} ({error})') from None
    images, labels = np.concatenate(images), np.concatenate(labels)
    if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() > 9:
        raise click.ClickException(f'Not a valid CIFAR-10 python tarball: {tarball} (labels out of range)')
    count = min(len(images), max_images)
    return count, ((images[i], int(labels[i])) for i in range(count))


def _read_idx(path, expected_magic):
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
        magic, count = struct.unpack('>II', data[:8])
        if magic != expected_magic:
            raise ValueError(f'magic number {magic}, expected {expected_magic}')
        dims = struct.unpack('>' + 'I' * (magic & 0xFF), data[4:4 + 4 * (magic & 0xFF)])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims))
        return array.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as error:
        raise click.ClickException(f'Not a valid MNIST idx file: {path} ({error})') from None


def open_mnist(images_gz, max_images):
    """MNIST images (zero-padded 28 -> 32, grayscale) with labels from the matching *-labels-idx1-ubyte.gz."""
    labels_gz = images_gz.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    if not os.path.isfile(labels_gz):
        raise click.ClickException(f'Missing MNIST labels file next to the images: {labels_gz}')
    images = _read_idx(images_gz, 0x803)
    labels = _read_idx(labels_gz, 0x801)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1] or labels.max(initial=0) > 9:
        raise click.ClickException(f'MNIST files do not match: images {images.shape}, labels {labels.shape}')
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)], mode='constant', constant_values=0)
    count = min(len(images), max_images)
    return count, ((images[i], int(labels[i])) for i in range(count))


def open_lmdb(lmdb_dir, max_images):
    """LSUN-style LMDB of encoded images (keys ignored, no labels); undecodable records are reported and skipped."""
    try:
        import lmdb
    except ImportError:
        raise click.ClickException('Reading LMDB sources needs the lmdb package: pip install lmdb') from None
    try:
        env = lmdb.open(lmdb_dir, max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
        count = min(env.stat()['entries'], max_images)
    except lmdb.Error as error:
        raise click.ClickException(f'Cannot open LMDB {lmdb_dir}: {error}') from None

    def iterate():
        with env.begin(write=False) as transaction:
            for index, (_key, value) in enumerate(transaction.cursor()):
                if index >= count:
                    break
                try:
                    with PIL.Image.open(io.BytesIO(value)) as image:
                        yield to_array(image), None
                except (OSError, ValueError) as error:
                    tqdm.tqdm.write(f'Skipping LMDB record {index}: {error}')
    return count, iterate()


def open_sklearn_digits(max_images):
    """scikit-learn's bundled handwritten digits: 1797 real 8x8 images, classes 0..9, 17 gray levels -> 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise click.ClickException(f'--source={DIGITS_SOURCE} needs scikit-learn: pip install scikit-learn') from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    count = min(len(images), max_images)
    return count, ((images[i], int(digits.target[i])) for i in range(count))


def open_source(source, max_images):
    max_images = max_images if max_images is not None else np.iinfo(np.int64).max
    if source == DIGITS_SOURCE and not os.path.exists(source):
        return open_sklearn_digits(max_images)
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb'):
            return open_lmdb(source, max_images)
        return open_image_folder(source, max_images)
    if os.path.isfile(source):
        name = os.path.basename(source)
        if name == 'cifar-10-python.tar.gz':
            return open_cifar10(source, max_images)
        if name.endswith('-images-idx3-ubyte.gz'):
            return open_mnist(source, max_images)
        if name.lower().endswith('.zip'):
            return open_image_zip(source, max_images)
        raise click.ClickException(f'Unknown source type: {source}; expected a folder, a .zip, a *_lmdb folder, '
                                   f'cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or {DIGITS_SOURCE}')
    raise click.ClickException(f'Missing input file or directory: {source}')

# ---------------------------------------------------------------------------------------------- transforms


def _resize(array, width, height):
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return np.array(PIL.Image.fromarray(array).resize((width, height), PIL.Image.Resampling.LANCZOS))


def make_transform(transform, output_width, output_height):
    """array -> array (or None to skip the image), per the reference transforms."""
    if transform is None:
        if output_width is None:
            return lambda array: array
        return lambda array: _resize(array, output_width, output_height)
    if output_width is None:
        raise click.ClickException(f'must specify --resolution=WxH when using {transform} transform')

    def center_crop(array):
        side = min(array.shape[0], array.shape[1])
        top, left = (array.shape[0] - side) // 2, (array.shape[1] - side) // 2
        return _resize(array[top:top + side, left:left + side], output_width, output_height)

    def center_crop_wide(array):
        crop_height = int(np.round(output_width * array.shape[0] / array.shape[1]))
        if array.shape[1] < output_width or crop_height < output_height:
            return None
        top = (array.shape[0] - crop_height) // 2
        resized = _resize(array[top:top + crop_height], output_width, output_height)
        canvas = np.zeros((output_width, output_width) + resized.shape[2:], dtype=np.uint8)
        offset = (output_width - output_height) // 2
        canvas[offset:offset + output_height] = resized
        return canvas

    return {'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]


def parse_resolution(value):
    if value is None:
        return None, None
    match = re.fullmatch(r'(\d+)[x,](\d+)', value)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise click.BadParameter(f'cannot parse {value!r}; use WxH, e.g. 32x32', param_hint='--resolution')
    return int(match[1]), int(match[2])

# ---------------------------------------------------------------------------------------------- destination


class DatasetWriter:
    """Writes into a temporary ZIP or folder beside --dest; commit() renames it into place, abort() deletes it."""

    def __init__(self, dest):
        self.dest = dest
        self.is_zip = dest.lower().endswith('.zip')
        parent = os.path.dirname(os.path.abspath(dest))
        if not self.is_zip and os.path.isdir(dest) and os.listdir(dest):
            raise click.ClickException(f'--dest folder must be empty: {dest}')
        if os.path.exists(dest) and not self.is_zip and not os.path.isdir(dest):
            raise click.ClickException(f'--dest exists and is not a folder: {dest}')
        os.makedirs(parent, exist_ok=True)
        prefix = '.' + os.path.basename(os.path.normpath(dest)) + '.'
        # Permissions as a plain open()/mkdir() would give them (tempfile's are owner-only).
        self.tmp, fd = dnnlib.util.create_temporary(parent, prefix, '.tmp', folder=not self.is_zip)
        if self.is_zip:
            self.file = os.fdopen(fd, 'wb')  # ZipFile leaves a file object it was given open
            self.archive = zipfile.ZipFile(self.file, 'w', compression=zipfile.ZIP_STORED)

    def write(self, name, data):
        if self.is_zip:
            self.archive.writestr(name, data)
        else:
            path = os.path.join(self.tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)

    def commit(self):
        if self.is_zip:
            self.archive.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.dest)
        else:
            if os.path.isdir(self.dest):
                os.rmdir(self.dest)  # checked empty at the start
            os.rename(self.tmp, self.dest)

    def abort(self):
        if self.is_zip:
            self.archive.close()
            self.file.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

# ---------------------------------------------------------------------------------------------- main


def check_image(array, reference, index):
    """The first image fixes the dataset's shape: square, power-of-two side, 1 or 3 channels; the rest must match."""
    height, width = array.shape[:2]
    channels = array.shape[2] if array.ndim == 3 else 1
    if reference is None:
        if width != height:
            raise click.ClickException(f'Image dimensions after scale and crop are required to be square. '
                                       f'Got {width}x{height}; use --resolution and --transform')
        if channels not in (1, 3):
            raise click.ClickException('Input images must be stored as RGB or grayscale')
        if width & (width - 1):
            raise click.ClickException(f'Image width/height after scale and crop are required to be a power of two. '
                                       f'Got {width}; use --resolution')
        return (width, height, channels)
    if (width, height, channels) != reference:
        raise click.ClickException(f'Image {index} is {width}x{height} with {channels} channels, but the dataset is '
                                   f'{reference[0]}x{reference[1]} with {reference[2]} channels; '
                                   f'use --resolution and --transform to make them match')
    return reference


@click.command()
@click.option('--source', help='Input folder, .zip, *_lmdb folder, CIFAR-10/MNIST archive, or sklearn-digits',
              metavar='PATH', required=True)
@click.option('--dest', help='Output folder or .zip', metavar='PATH', required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--transform', help='Input crop/resize mode', type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--resolution', help='Output resolution (e.g., 32x32)', metavar='WxH')
def main(source, dest, max_images, transform, resolution):
    """Convert an image dataset into the dataset format of train.py and fid.py (PNG files + dataset.json)."""
    if dest == '':
        raise click.ClickException('--dest output filename or directory must not be an empty string')
    output_width, output_height = parse_resolution(resolution)
    if source == DIGITS_SOURCE and output_width is None:
        output_width, output_height = DIGITS_DEFAULT_RESOLUTION  # 8x8 is too small for the default networks
    transform_image = make_transform(transform, output_width, output_height)
    num_images, images = open_source(source, max_images)
    if num_images == 0:
        raise click.ClickException(f'No images found in {source}')

    writer = DatasetWriter(dest)
    try:
        labels, shape = [], None
        for array, label in tqdm.tqdm(images, total=num_images, unit='img', desc='Converting'):
            array = transform_image(array)
            if array is None:  # center-crop-wide: too small; numbering stays contiguous
                continue
            shape = check_image(array, shape, len(labels))
            name = f'{len(labels) // 1000:05d}/img{len(labels):08d}.png'
            buffer = io.BytesIO()
            PIL.Image.fromarray(array).save(buffer, format='png', compress_level=0, optimize=False)
            writer.write(name, buffer.getvalue())
            labels.append([name, label])
        if not labels:
            raise click.ClickException('No image survived the transform; check --resolution and --transform')
        has_all_labels = all(label is not None for _name, label in labels)
        writer.write('dataset.json', json.dumps({'labels': labels if has_all_labels else None}).encode('utf8'))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    print(f'Wrote {len(labels)} images ({shape[0]}x{shape[1]}, {shape[2]} channels) to {dest}')


if __name__ == '__main__':
    main()
