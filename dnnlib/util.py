"""Plain helpers with no torch dependency."""

import contextlib
import glob
import os
import re
import secrets
import stat
import sys


class EasyDict(dict):
    """A dict whose keys are also attributes: d.key == d['key']."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


def parse_int_list(value):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]; inclusive ranges, order and duplicates kept (reference rule)."""
    if isinstance(value, list):
        return value
    result = []
    for piece in value.split(','):
        match = re.fullmatch(r'(\d+)-(\d+)', piece)
        if match:
            result.extend(range(int(match.group(1)), int(match.group(2)) + 1))
        else:
            result.append(int(piece))
    return result


def check_choice(name, value, choices):
    """ValueError unless `value` is one of `choices`; the message names the option and the choices."""
    if value not in choices:
        raise ValueError(f'{name} must be one of {", ".join(choices)}, got {value!r}')


def plain_data(value):
    """`value` as plain data, safe for JSON and for torch.load(weights_only=True): dicts (str keys) and lists of
    str, int, float, bool and None. Tuples become lists, numpy and torch scalars Python numbers, anything else
    its str()."""
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, 'item') and getattr(value, 'ndim', None) == 0:  # numpy / torch scalar
        return value.item()
    return str(value)


def error_summary(error, last=False):
    """One line for a user: the first non-empty line of an exception's message, or its type name if it has none.
    last: the last non-empty line instead, where the message ends a traceback (a DataLoader worker's error)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1 if last else 0] if lines else type(error).__name__


def format_time(seconds):
    """12 -> '12s', 754 -> '12m 34s', 4000 -> '1h 06m 40s', 100000 -> '1d 03h 46m' (the reference tick format)."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


def create_temporary(directory, prefix, suffix, folder=False):
    """Create a new, uniquely named file (returns path, writable fd) or folder (returns path, None) in `directory`.

    Unlike tempfile.mkstemp/mkdtemp (always 0600/0700), the permissions are those a plain open()/mkdir() gives:
    0666/0777 less the umask (and any default ACL), applied by the kernel, so no process-wide os.umask() call and
    no race with other threads. Files renamed into place keep these permissions, so colleagues who may read what
    you write can read checkpoints, datasets and samples too.
    """
    for _ in range(100):
        path = os.path.join(directory, prefix + secrets.token_hex(6) + suffix)
        try:
            if folder:
                os.mkdir(path, 0o777)
                return path, None
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f'Cannot create a temporary name {prefix}*{suffix} in {directory}')


def name_the_file(error, path):
    """An OSError that names no file (a failed raw write) as one naming `path` ("[Errno 28] No space left on
    device: 'path'"); any other error as it is."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        return OSError(error.errno, error.strerror, path)
    return error


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Open a temporary file beside `path`; rename it over `path` only if the block finishes without error.

    The new file has the permissions of a plain open(): an existing `path`'s own, else 0666 less the umask.
    A writer killed outright (SIGKILL, SIGTERM, power loss) leaves `path` as it was plus a hidden temporary
    `.NAME.*.tmp`; the next successful write of the same path removes such leftovers (one writer per path).
    A write error (a full disk) removes the temporary and is raised as an OSError that names `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = '.' + os.path.basename(path) + '.'
    tmp, fd = create_temporary(directory, prefix, '.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            with contextlib.suppress(FileNotFoundError):  # overwriting keeps the file's mode, as open(path, 'w') does
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        named = name_the_file(error, path)
        if named is not error:
            raise named from error
        raise
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + '*.tmp')):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


class Logger:
    """Tee stdout and stderr into a file (append mode), flushing every write, until close()."""

    def __init__(self, file_name=None, file_mode='a', should_flush=True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = self
        sys.stderr = self

    def write(self, text):
        if not text:
            return
        if self.file is not None:
            self._to_file(self.file.write, text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self):
        if self.file is not None:
            self._to_file(self.file.flush)
        self.stdout.flush()

    def _to_file(self, method, *args):
        """A failed write (a full disk) ends the copy into the file, with one warning, rather than the program:
        the log is a copy of the terminal, and the program's own files report the disk themselves."""
        try:
            method(*args)
        except OSError as error:
            failed, self.file = self.file, None
            with contextlib.suppress(OSError):  # closing flushes again, and fails again
                failed.close()
            name = failed.name
            self.stderr.write(f'Warning: cannot write {name} ({error.strerror or error}); from now on the log goes '
                              f'to the terminal only.\n')

    def isatty(self):
        return False

    def close(self):
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self._to_file(self.file.close)
            self.file = None
