"""Where CIFAR-10 is, and getting it there: find the batches, or download and unpack them.

Where the data is looked for: an explicit ``data_dir`` (``--data-dir``), else the
``KLAYER_DATA`` environment variable, else the user cache (``$XDG_CACHE_HOME/klayer`` or
``~/.cache/klayer``). The first of these that is given decides; the others are not
consulted, so a mistyped path never silently picks up other data, and a folder given
explicitly must exist (only the cache folder is created). That folder may be
``cifar-10-batches-py`` (or ``-bin``) itself or contain it.

A download is all or nothing: the tarball is streamed into a temporary folder beside the
target, its md5 checked, unpacked there and only then renamed into place; a lock on the
parent folder serialises concurrent downloads and lets the next one remove what a killed
one left behind. So no run ever trusts a partial file.

Test-only fault injection: with ``KLAYER_FAULT=download:BYTES`` the process kills itself
(SIGKILL) once BYTES bytes of the tarball are written; with ``KLAYER_FAULT=unpack:FILES``
once FILES members are unpacked. Tests use it to check that a killed download leaves
nothing a later run would trust. It has no other use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from klayer.data.batches import BIN_FOLDER, PY_FOLDER, DataError, batches_folder, missing_batches

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ENV_VAR = "KLAYER_DATA"
FAULT_VAR = "KLAYER_FAULT"
_WORK_PREFIX = ".cifar-10-download-"
_SOURCE_FLAGS = {"data_dir": "--data-dir", ENV_VAR: f"${ENV_VAR}"}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/klayer`` if that variable is set, else ``~/.cache/klayer``."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "klayer"


def data_root(data_dir=None) -> tuple[Path, str]:
    """The folder to look in (and download into), and where that choice came from:
    ``"data_dir"`` (explicit argument), ``"KLAYER_DATA"`` or ``"cache"``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "data_dir"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), ENV_VAR
    return default_cache_dir(), "cache"


def find_data_dir(data_dir=None) -> Path | None:
    """The folder holding the CIFAR-10 batch files, or None if there is none where
    :func:`data_root` points."""
    return batches_folder(data_root(data_dir)[0])


def download_target(data_dir=None) -> Path:
    """Where :func:`ensure_cifar10` unpacks the python version if it is absent: the
    ``cifar-10-batches-py`` folder inside :func:`data_root`, or that root itself if it is
    named so."""
    root = data_root(data_dir)[0]
    return root if root.name in (PY_FOLDER, BIN_FOLDER) else root / PY_FOLDER


def manual_instructions(root: Path, url: str = OFFICIAL_URL) -> str:
    return (
        f"To install CIFAR-10 by hand, download {url} on any machine, unpack it "
        f"(tar xzf cifar-10-python.tar.gz) and put the folder so that "
        f"{root / PY_FOLDER / 'data_batch_1'} exists; or point --data-dir or "
        f"${ENV_VAR} at a folder that holds (or is) {PY_FOLDER}."
    )


def ensure_cifar10(
    data_dir=None,
    download: bool = True,
    url: str = OFFICIAL_URL,
    md5: str = OFFICIAL_MD5,
    progress=True,
) -> Path:
    """The folder holding the CIFAR-10 batches; downloads and unpacks it if absent.

    The one function to call to locate the data: its result, passed on as ``data_dir``,
    is found again at once without any download. DataError if a ``data_dir`` (or
    ``$KLAYER_DATA``) that does not exist is given, if the data is absent and ``download``
    is off, or if the download fails (nothing is kept then).
    progress: True for a tqdm bar on stderr, False for none, or a callable
    ``progress(bytes_done, bytes_total_or_None)``.
    """
    root, source = data_root(data_dir)
    found = batches_folder(root)
    if found is not None:
        return found
    if source != "cache" and not root.is_dir():
        flag = _SOURCE_FLAGS[source]
        raise DataError(
            f"{root} (from {flag}) does not exist: create it first (mkdir -p {root}) to "
            f"download CIFAR-10 into it, or leave out {flag} to use the cache "
            f"{default_cache_dir()}"
        )
    if not download:
        raise DataError(
            f"CIFAR-10 not found in {root} and downloading is switched off: run `klayer data"
            f"{'' if source == 'cache' else ' --data-dir ' + str(root)}` to download it "
            f"(about 170 MB) to {download_target(data_dir)}. " + manual_instructions(root, url)
        )
    target = download_target(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)  # the cache folder, on first use
    with _download_lock(target.parent):
        found = batches_folder(root)  # another process may have finished meanwhile
        if found is not None:
            return found
        for stale in target.parent.glob(_WORK_PREFIX + "*"):  # left by a killed download
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=target.parent))
        try:
            tarball = work / "cifar-10-python.tar.gz"
            _download(url, tarball, md5, progress, root)
            unpacked = _unpack(tarball, work / "unpacked")
            if target == root / PY_FOLDER:  # name it after what the archive held (-py or -bin)
                target = root / unpacked.name
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()  # an empty folder of the right name: replace it
            try:
                os.rename(unpacked, target)
            except OSError as exc:
                raise DataError(f"cannot move the unpacked data to {target} ({exc}); "
                                "remove what is there and run again") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


@contextmanager
def _download_lock(folder: Path):
    """An exclusive lock on ``folder`` itself (no lock file is left behind)."""
    import fcntl  # POSIX; imported here so that reading data needs no more than pathlib

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- fault hook


def _fault_limit(stage: str) -> int | None:
    """The count after which the test-only fault hook kills this process at ``stage``."""
    spec = os.environ.get(FAULT_VAR, "")
    name, _, count = spec.partition(":")
    if name != stage:
        return None
    if not count.isdigit():
        raise ValueError(f"${FAULT_VAR} must be download:BYTES or unpack:FILES, got {spec!r}")
    return int(count)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- download


def _download(url: str, path: Path, md5: str, progress, root: Path) -> None:
    """Stream ``url`` into ``path``, checking the length and the md5 on the way."""
    import http.client
    import urllib.request

    digest = hashlib.md5()
    received = 0
    limit = _fault_limit("download")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(path, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            report = _progress_reporter(progress, total, Path(url).name or "download")
            try:
                while chunk := response.read(1 << 20):
                    if limit is not None and received + len(chunk) >= limit:
                        out.write(chunk[: limit - received])
                        out.flush()
                        _die()
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    report(len(chunk), received)
            finally:
                report(None, received)
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(
            f"could not download {url}: {exc}. " + manual_instructions(root, url)
        ) from exc
    if total is not None and received != total:
        raise DataError(
            f"download of {url} was interrupted: received {received} of {total} bytes. "
            "Nothing was kept; run again to retry."
        )
    if digest.hexdigest() != md5.lower():
        raise DataError(
            f"md5 of the file downloaded from {url} is {digest.hexdigest()}, expected "
            f"{md5}: the file is corrupt or not CIFAR-10, and was discarded. "
            + manual_instructions(root, url)
        )


def _progress_reporter(progress, total, name):
    """A function ``report(step, done)``; ``step=None`` closes the report."""
    if callable(progress):
        return lambda step, done: progress(done, total) if step is not None else None
    if not progress:
        return lambda step, done: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
    return lambda step, done: bar.update(step) if step is not None else bar.close()


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Extract one member safely (the "data" filter: no absolute paths, no links out of
    ``dest``, no special files)."""
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, dest, filter="data")
        return
    name = Path(member.name)  # a Python without extraction filters: refuse anything unusual
    if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
        raise DataError(f"refusing tar member {member.name!r}")
    tar.extract(member, dest)


def _unpack(tarball: Path, dest: Path) -> Path:
    """Extract ``tarball`` into ``dest`` safely; return the batches folder inside it."""
    limit = _fault_limit("unpack")
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for count, member in enumerate(tar, 1):
                _extract(tar, member, dest)
                if limit is not None and count >= limit:
                    _die()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot unpack the downloaded archive: {exc}") from exc
    for folder in (dest / PY_FOLDER, dest / BIN_FOLDER):
        if folder.is_dir() and not missing_batches(folder):
            return folder
    raise DataError(
        f"the downloaded archive holds no complete {PY_FOLDER} or {BIN_FOLDER} folder"
    )
