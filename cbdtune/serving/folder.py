"""Reading a model folder safely: its own plain files, of bounded size, and nothing else.

Every file of a model directory is opened through :func:`open_regular`: ``lstat`` before
``open`` (a link, FIFO, device or folder is refused before it could block or lead elsewhere),
then ``fstat`` on the descriptor, with a size limit per file. A member's file name must be a
plain name in the folder (:func:`member_file`), and its weights ``torch.save``'s uncompressed
zip (:func:`check_zip`). :func:`find_model_dir` finds the model directory, also inside the
MLflow model folder :func:`cbdtune.serving.log_model` wrote.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from cbdtune.config import CbdtuneError

CONTRACT_FILE = "contract.json"
ARTIFACT_KEY = "cbd_model"  # the model directory's name among the pyfunc model's artifacts


class ModelError(CbdtuneError):
    """A model directory or URI that cannot be read or used."""


def open_regular(path: Path, what: str, max_bytes: int) -> Any:
    """Open ``path`` for reading only if it is a regular file of at most ``max_bytes``.

    A symbolic link, a FIFO, a device or a folder is refused from ``os.lstat`` before any
    ``open`` (opening a FIFO would block); the descriptor is opened with ``O_NOFOLLOW`` and
    ``O_NONBLOCK`` and checked again with ``fstat``, so a file swapped in between is refused too.

    Raises:
        ModelError: not there, not a regular file, or larger than ``max_bytes``.
    """
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ModelError(f"{path}: {what} cannot be read ({first_line(exc)}); save the model "
                         f"again") from None
    kind = file_kind(info.st_mode)
    if kind:
        raise ModelError(f"{path}: {what} is {kind}, not a regular file; a model folder holds "
                         f"its own plain files (copy the real file in its place)")
    if info.st_size > max_bytes:
        raise ModelError(f"{path}: {what} holds {info.st_size} bytes, more than the "
                         f"{max_bytes} it can hold; save the model again")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ModelError(f"{path}: {what} cannot be opened ({first_line(exc)})") from None
    handle = os.fdopen(fd, "rb")
    if file_kind(os.fstat(fd).st_mode):
        handle.close()
        raise ModelError(f"{path}: {what} changed into something else than a regular file "
                         f"while being opened; check who writes to the model folder")
    return handle


def file_kind(mode: int) -> str:
    """"" for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return ""
    kinds = [(stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "a device or special file")


def member_file(model_dir: Path, name: str, where: str) -> Path:
    """``model_dir / name`` for a plain file name; a path, ``..`` or an absolute name is refused."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name \
            or Path(name).is_absolute() or Path(name).name != name:
        raise ModelError(f"{where}: file {name!r} is not a plain file name; a member's weights "
                         f"are a file in the model folder itself (e.g. member_0.pt)")
    return model_dir / name


def check_zip(handle: Any, file: Path, where: str) -> None:
    """``torch.save``'s format: a zip of stored (uncompressed) entries, so that what is read
    into memory is never more than the file holds."""
    try:
        entries = zipfile.ZipFile(handle).infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelError(f"{where}: {file.name} is not a torch.save file ({first_line(exc)}); "
                         f"save the model again") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise ModelError(f"{where}: {file.name} holds compressed entries, which torch.save "
                         f"never writes; save the model again")
    handle.seek(0)


def find_model_dir(path: str | Path) -> Path:
    """The model directory itself, or the one inside an MLflow pyfunc directory (``MLmodel``).

    Raises:
        ModelError: neither ``contract.json`` nor an ``MLmodel`` naming the model's artifacts.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path}: no such directory; give a model directory or a models:/ or "
                         f"runs:/ URI")
    if (path / CONTRACT_FILE).is_file() or not (path / "MLmodel").is_file():
        return path  # ModelContract.read reports a folder that is neither
    try:
        mlmodel = yaml.safe_load((path / "MLmodel").read_text()) or {}
        rel = mlmodel["flavors"]["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise ModelError(f"{path}: an MLflow model, but not one cbdtune logged (no "
                         f"'{ARTIFACT_KEY}' artifact); give a model logged by "
                         f"cbdtune.serving.log_model") from None
    inside = (path / str(rel)).resolve()
    if not inside.is_relative_to(path.resolve()):
        raise ModelError(f"{path}: MLmodel names {rel!r} as the model's artifacts, outside the "
                         f"MLflow model folder; give a model logged by cbdtune.serving.log_model")
    return path / str(rel)


def first_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
