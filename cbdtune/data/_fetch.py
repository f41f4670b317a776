"""Where a dataset's files come from: a local folder, the per-user cache, or a download.

Order (first hit wins):

1. the local data folder: ``DataConfig.data_dir`` / ``--data-dir``, else ``$CBDTUNE_DATA_DIR``.
   Inside it, a dataset ``NAME`` is found as ``NAME/``, ``UEA_NAME/``, ``UCR_NAME/`` (the layout of
   ``../shared/data``), a folder named by an alias, or, for ``.ts``, flat ``NAME_TRAIN.ts`` files;
2. the cache: ``$CBDTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cbdtune``, else ``~/.cache/cbdtune``,
   laid out as ``<cache>/NAME/``;
3. a download into the cache: pinned single files where the registry has them (their sha256 is
   checked), else the UEA/UCR zip (``$CBDTUNE_ARCHIVE_URL`` overrides the archive, e.g. a mirror
   or a ``file://`` URL), checked for structure and for any sha256 the registry knows.

A download is written to a temporary folder inside the cache and renamed into place only after
every check passed, so a failed or interrupted download never leaves a half dataset behind, and
two workers fetching at once both end with one complete folder.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType

from cbdtune.data._dataset import DataError
from cbdtune.data._registry import DatasetInfo

logger = logging.getLogger(__name__)

# The opener every download goes through; tests replace it to forbid the network.
_urlopen = urllib.request.urlopen


class DownloadError(DataError):
    """The download itself failed (network, HTTP status, bad URL)."""


def cache_dir() -> Path:
    """The per-user cache: ``$CBDTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cbdtune``, else
    ``~/.cache/cbdtune``."""
    env = os.environ.get("CBDTUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cbdtune"


def local_data_dir(data_dir: str | Path | None) -> Path | None:
    """``data_dir`` if given, else ``$CBDTUNE_DATA_DIR``, else ``None``."""
    value = data_dir if data_dir is not None else os.environ.get("CBDTUNE_DATA_DIR")
    return Path(value).expanduser() if value else None


def find_in(info: DatasetInfo, root: Path) -> Path | None:
    """The folder under ``root`` holding all of ``info``'s files, or ``None``.

    Raises:
        DataError: a candidate folder holds some of the files but not all (an incomplete copy).
    """
    names = [info.name, f"UEA_{info.name}", f"UCR_{info.name}", *info.aliases]
    folders = [root / n for n in dict.fromkeys(names)]
    if info.format == "ts":
        folders.append(root)  # flat NAME_TRAIN.ts / NAME_TEST.ts
    required = info.required_files
    for folder in folders:
        present = [f for f in required if (folder / f).is_file()]
        if len(present) == len(required):
            return folder
        if present:
            missing = [f for f in required if f not in present]
            raise DataError(f"{folder} has {', '.join(present)} but not {', '.join(missing)}; "
                            f"copy the missing file(s) there, or re-fetch with "
                            f"`python -m cbdtune.data fetch {info.name} --force`")
    return None


def locate(info: DatasetInfo, data_dir: str | Path | None, *, download: bool = True) -> Path:
    """The folder to read ``info`` from: local folder, then cache, then a download.

    Args:
        info: a registry entry (not a folder given by path: that is read where it is).
        data_dir: the local data folder; ``None`` falls back to ``$CBDTUNE_DATA_DIR``.
        download: fetch into the cache when not found; ``False`` raises instead.

    Raises:
        DataError: the data folder does not exist; the files are in neither place and cannot or
            may not be downloaded (the message says where it looked and how to get them); or the
            download fails.
    """
    looked: list[str] = []
    root = local_data_dir(data_dir)
    if root is not None:
        if not root.is_dir():
            source = "--data-dir" if data_dir is not None else "$CBDTUNE_DATA_DIR"
            raise DataError(f"data folder {root} (from {source}) does not exist; fix the path, "
                            f"or unset it to use the cache {cache_dir()}")
        folder = find_in(info, root)
        if folder is not None:
            return folder
        looked.append(str(root))
    cache = cache_dir()
    folder = find_in(info, cache) if cache.is_dir() else None
    if folder is not None:
        return folder
    looked.append(str(cache))
    where = " and ".join(looked)
    files = ", ".join(info.required_files)
    if info.download == "none":
        raise DataError(f"{info.name}: files not found (looked in {where}); "
                        f"{info.how_to_get or f'put {files} in <data dir>/{info.name}/'}")
    if not download:
        raise DataError(f"{info.name}: files not found (looked in {where}); run "
                        f"`python -m cbdtune.data fetch {info.name}`, or put {files} in "
                        f"<data dir>/{info.name}/ and pass --data-dir <data dir>")
    try:
        return fetch(info)
    except DownloadError as exc:
        raise DataError(f"{info.name}: files not found (looked in {where}) and {exc}") from None


def fetch(info: DatasetInfo, *, dest_root: str | Path | None = None, force: bool = False) -> Path:
    """Download ``info``'s files into ``<dest_root or cache>/NAME/`` and check them.

    Args:
        info: a registry or archive entry.
        dest_root: folder to put ``NAME/`` in; ``None`` = :func:`cache_dir`.
        force: download again even when a complete copy is there (it is replaced only after the
            new one passed its checks).

    Returns:
        The dataset's folder.

    Raises:
        DataError: nothing to download (a local folder, or a dataset with no public download), a
            checksum mismatch, a zip without the expected files, or files that are not ``.ts`` /
            ``.pt``; :class:`DownloadError` when the transfer fails. Nothing is left in the
            cache in any of these cases.
    """
    if info.path is not None:
        raise DataError(f"{info.path} is a local folder; there is nothing to fetch")
    if info.download == "none":
        raise DataError(f"{info.name} cannot be downloaded automatically; {info.how_to_get}")
    root = Path(dest_root).expanduser() if dest_root is not None else cache_dir()
    target = root / info.name
    if not force and target.is_dir() and _complete(info, target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {root} ({exc.strerror}); set $CBDTUNE_CACHE_DIR to a "
                        f"writable folder") from None
    with tempfile.TemporaryDirectory(prefix=f".{info.name}.", dir=root) as tmp:
        staging = Path(tmp) / info.name
        staging.mkdir()
        mirror = os.environ.get("CBDTUNE_ARCHIVE_URL")
        if info.download == "files" and not (mirror and info.kind in ("uea", "ucr")):
            sources = {}
            for spec in info.files:
                assert spec.url is not None, f"registry: {info.name}/{spec.name} has no url"
                _download(spec.url, staging / spec.name, f"{info.name}/{spec.name}")
                sources[spec.name] = spec.url
        else:
            url = info.archive_url
            if url is None:
                raise DataError(f"{info.name} has no archive to download from; put its files in "
                                f"<data dir>/{info.name}/ and pass --data-dir")
            archive = Path(tmp) / f"{info.name}.zip"
            _download(url, archive, f"{info.name}.zip")
            _extract(archive, staging, info.required_files, url)
            sources = dict.fromkeys(info.required_files, url)
        _verify(info, staging, sources)
        _install(staging, target, Path(tmp), info, force=force)
    return target


# ---- helpers ------------------------------------------------------------------------------------


def _complete(info: DatasetInfo, folder: Path) -> bool:
    return all((folder / f).is_file() for f in info.required_files)


def _download(url: str, dest: Path, desc: str) -> None:
    logger.info("downloading %s -> %s", url, dest)
    try:
        with _urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            with _Progress(total, desc) as progress:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc  # URLError keeps the cause in .reason
        raise DownloadError(f"could not download {url} ({reason}); check the network, or put "
                            f"the files in a folder and pass --data-dir") from None


def _extract(archive: Path, staging: Path, required: Sequence[str], url: str) -> None:
    """Copy the required files out of the zip by base name (no paths from the zip are used)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members: dict[str, zipfile.ZipInfo] = {}
            for member in zf.infolist():
                if member.is_dir():
                    continue
                base = PurePosixPath(member.filename).name
                old = members.get(base)
                if old is None or member.filename.count("/") < old.filename.count("/"):
                    members[base] = member  # the shallowest copy wins
            missing = [f for f in required if f not in members]
            if missing:
                held = ", ".join(sorted(members)[:5]) or "nothing"
                raise DataError(f"{url}: the zip has no {missing[0]} (it holds {held}); check "
                                f"that the name is a UEA/UCR archive name")
            for name in required:
                with zf.open(members[name]) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        # The archive answers an unknown name with an HTML page and status 200 (aeon notes this).
        raise DataError(f"{url}: not a zip file; the name may not exist in the archive (see "
                        f"`python -m cbdtune.data list`), or the download was cut short: "
                        f"retry") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(info: DatasetInfo, staging: Path, sources: dict[str, str]) -> None:
    """sha256 where the registry knows it; otherwise (and also) the file's structure."""
    expected = {f.name: f.sha256 for f in info.files if f.sha256}
    for name in info.required_files:
        path = staging / name
        want = expected.get(name)
        if want is not None:
            got = _sha256(path)
            if got != want:
                raise DataError(f"{info.name}/{name}: checksum mismatch: sha256 {got[:16]}... "
                                f"but the registry expects {want[:16]}... (from "
                                f"{sources.get(name, '?')}); nothing was written to the cache; "
                                f"retry with `python -m cbdtune.data fetch {info.name} --force`, "
                                f"or put verified files in a folder and pass --data-dir")
        if name.endswith(".ts"):
            _check_ts_structure(path, sources.get(name, "?"))
        elif name.endswith(".pt") and not zipfile.is_zipfile(path):
            raise DataError(f"{info.name}/{name} from {sources.get(name, '?')} is not a torch.save "
                            f"file; the download may be an error page: retry later")


def _check_ts_structure(path: Path, url: str) -> None:
    """A ``.ts`` file has an ``@data`` line followed by at least one case (header only is read)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip().lower() == "@data":
                    if any(rest.strip() for rest in f):
                        return
                    break
    except UnicodeDecodeError:
        pass
    raise DataError(f"{path.name} from {url} is not a .ts file with data (no '@data' followed by "
                    f"cases); the download may be an error page: retry later")


def _install(staging: Path, target: Path, tmp: Path, info: DatasetInfo, *, force: bool) -> None:
    """Move the checked folder into place by rename (atomic on one file system)."""
    if target.exists():
        if not force and _complete(info, target):
            return  # another process finished first; keep its copy, which readers may hold open
        target.rename(tmp / "previous")  # replaced only now that the new copy passed its checks
    try:
        staging.rename(target)
    except OSError:
        # Another process installed it between our check and here: keep theirs if complete.
        if not (target.is_dir() and _complete(info, target)):
            raise DataError(f"cannot move the download into {target}; remove that folder and "
                            f"fetch again") from None


class _Progress:
    """A download progress bar: tqdm when installed, else a plain counter; drawn only on a TTY."""

    def __init__(self, total: int, desc: str) -> None:
        self._total, self._desc, self._done, self._last = total, desc, 0, 0.0
        self._tty = sys.stderr.isatty()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            # disable=None: tqdm draws only on a terminal, so logs and captured output stay clean.
            self._bar = tqdm(total=total or None, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, disable=None, leave=False)

    def __enter__(self) -> _Progress:
        return self

    def update(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._tty and time.monotonic() - self._last > 0.5:
            self._last = time.monotonic()
            of = f" of {self._total / 1e6:.1f}" if self._total else ""
            print(f"\r{self._desc}: {self._done / 1e6:.1f}{of} MB", end="", file=sys.stderr)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._tty and self._done:
            print(file=sys.stderr)
