"""The registry of named datasets and the name -> :class:`DatasetInfo` resolver.

Named here: ``gesture`` (UEA UWaveGestureLibrary), the ten datasets of the paper (Han et al.,
AAAI 2025, arXiv 2412.13232), and the two TF-C folders kept in ``../shared/data``. Any
other UEA/UCR archive name resolves too (names from aeon's archive lists), and so does a folder
path holding TF-C style ``train.pt``/``val.pt``/``test.pt`` or ``NAME_TRAIN.ts``/``NAME_TEST.ts``.

Shape facts are the published ones (UEA: Bagnall et al. 2018, arXiv 1811.00075; UCR: Dau et al.
2019, arXiv 1810.07758; HAR: TS-TCC, Eldele et al. IJCAI 2021; TF-C: Zhang et al. NeurIPS 2022).
They are for ``list`` and for tests, and loading checks the series counts of the entries whose
files are pinned by sha256 (their facts were checked against those files, :func:`check_loaded`).

sha256 values are those of the files in ``../shared/data`` (see each SOURCE.md). Those files come
from pinned commits of public repositories, so the registry downloads exactly those files from
those commits. It does not use the timeseriesclassification.com zip for them: that zip's copies
differ from these in comment-line whitespace (SOURCE.md of UWaveGestureLibrary), so their hashes
could not match.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

from cbdtune.data._dataset import DataError
from cbdtune.data._readers import whole_copy_hint

Kind = Literal["uea", "ucr", "ts-tcc", "tf-c", "folder"]

# The public UEA/UCR zip, as aeon 1.6.0 downloads it (aeon.datasets._data_loaders.download_dataset).
# ``$CBDTUNE_ARCHIVE_URL`` replaces it, e.g. for a local mirror: a template with ``{name}``, or a
# base URL that ``/NAME.zip`` is appended to.
ARCHIVE_URL = "https://timeseriesclassification.com/aeon-toolkit/{name}.zip"

_MAT_ANALYSIS = (  # UEA .ts copies, mat-analysis/datasets at the commit SOURCE.md names
    "https://raw.githubusercontent.com/mat-analysis/datasets/"
    "f50572553419e667e0bd89173a3e9cbe5b32a99d/mts"
)
_TFC_GESTURE = (  # the TF-C "Gesture" files, soham2312/TimeSeries at the commit SOURCE.md names
    "https://raw.githubusercontent.com/soham2312/TimeSeries/"
    "a196f18aa24fb037c7b424b35806d0e831aca686/Gesture"
)
_TFC_EPILEPSY = (  # the official TF-C repository at the commit SOURCE.md names
    "https://raw.githubusercontent.com/mims-harvard/TFC-pretraining/"
    "96675826e9ef234a9b01cc63d484c66cb0441bc0/datasets/Epilepsy"
)
_UEA_CITE = "UEA multivariate archive (Bagnall et al. 2018, arXiv:1811.00075)"
_UCR_CITE = "UCR archive 2018 (Dau et al. 2019, arXiv:1810.07758)"
_TFC_CITE = "TF-C (Zhang et al., NeurIPS 2022), github.com/mims-harvard/TFC-pretraining"


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset folder.

    Args:
        name: file name inside the dataset's folder, e.g. ``"FingerMovements_TRAIN.ts"``.
        sha256: hex digest checked after a download; ``None`` = structure check only.
        url: a pinned single-file download; ``None`` = the file comes from the archive zip.
    """

    name: str
    sha256: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: what a dataset is and where it comes from (nothing is read).

    Shape facts (``n_channels`` ... ``n_test``) are the published numbers, ``None`` when unknown;
    ``seq_len`` is the longest length for a variable-length dataset.
    """

    name: str
    kind: Kind
    format: Literal["ts", "pt"] = "ts"
    aliases: tuple[str, ...] = ()
    n_channels: int | None = None
    seq_len: int | None = None
    n_classes: int | None = None
    n_train: int | None = None
    n_val: int | None = None  # the archive's own validation split (HAR, TF-C), else None
    n_test: int | None = None
    variable_length: bool = False
    source: str = ""
    files: tuple[FileSpec, ...] = ()
    download: Literal["archive", "files", "none"] = "archive"
    how_to_get: str = ""  # for download="none": where the files come from
    path: str | None = None  # set for a folder given by path

    @property
    def required_files(self) -> tuple[str, ...]:
        """The files a complete folder holds (``test.pt`` may be absent from a TF-C folder)."""
        if self.files:
            return tuple(f.name for f in self.files)
        if self.format == "ts":
            return (f"{self.name}_TRAIN.ts", f"{self.name}_TEST.ts")
        return ("train.pt",)

    @property
    def archive_url(self) -> str | None:
        if self.kind not in ("uea", "ucr"):
            return None
        template = os.environ.get("CBDTUNE_ARCHIVE_URL") or ARCHIVE_URL
        if "{name}" not in template:  # a bare base URL: <base>/NAME.zip
            return f"{template.rstrip('/')}/{self.name}.zip"
        return template.replace("{name}", self.name)  # not .format: other braces stay as typed

    @property
    def shape_text(self) -> str:
        """``"3 x 315"``; ``"?"`` for unknown facts, ``<=`` for variable length."""
        c = "?" if self.n_channels is None else str(self.n_channels)
        length = "?" if self.seq_len is None else str(self.seq_len)
        return f"{c} x {'<=' if self.variable_length else ''}{length}"


def _ts_files(name: str, train_sha: str, test_sha: str) -> tuple[FileSpec, ...]:
    return (
        FileSpec(f"{name}_TRAIN.ts", train_sha, f"{_MAT_ANALYSIS}/{name}/{name}_TRAIN.ts"),
        FileSpec(f"{name}_TEST.ts", test_sha, f"{_MAT_ANALYSIS}/{name}/{name}_TEST.ts"),
    )


def _uea(name: str, aliases: tuple[str, ...], c: int, length: int, k: int, n_train: int,
         n_test: int, *, files: tuple[FileSpec, ...] = (), variable_length: bool = False
         ) -> DatasetInfo:
    # Files with a pinned URL are fetched one by one (their sha256 is known); others by the zip.
    return DatasetInfo(name=name, kind="uea", aliases=aliases, n_channels=c, seq_len=length,
                       n_classes=k, n_train=n_train, n_test=n_test,
                       variable_length=variable_length,
                       source=f"{_UEA_CITE}, {ARCHIVE_URL.format(name=name)}", files=files,
                       download="files" if files else "archive")


def _ucr(name: str, aliases: tuple[str, ...], length: int, k: int, n_train: int,
         n_test: int) -> DatasetInfo:
    return DatasetInfo(name=name, kind="ucr", aliases=aliases, n_channels=1, seq_len=length,
                       n_classes=k, n_train=n_train, n_test=n_test,
                       source=f"{_UCR_CITE}, {ARCHIVE_URL.format(name=name)}")


_ENTRIES: tuple[DatasetInfo, ...] = (
    _uea("UWaveGestureLibrary", ("gesture", "uwave"), 3, 315, 8, 120, 320,
         files=_ts_files("UWaveGestureLibrary",
                         "cb7cd8cb995775d30dacbfd5c2a9cb3a80dfbd186fd444294bae70c9162dead1",
                         "517dbc817c3f181c64727a84ee8bd0cedd3554346042898b9107010b690c331a")),
    # ---- the paper's ten (Han et al., AAAI 2025) ----
    # TODO: the facts of those not in ../shared/data are the archives' published numbers, not yet
    # checked against the files (no copy here and no network in tests).
    DatasetInfo(
        name="HAR", kind="ts-tcc", format="pt", aliases=("uci_har", "uci-har"), n_channels=9,
        seq_len=128, n_classes=6, n_train=5881, n_val=1471, n_test=2947,
        source="UCI HAR (Anguita et al., ESANN 2013) as split by TS-TCC (Eldele et al., IJCAI "
               "2021), github.com/emadeldeen24/TS-TCC",
        files=(FileSpec("train.pt"), FileSpec("val.pt"), FileSpec("test.pt")),
        download="none",
        how_to_get="HAR has no direct download: build train.pt/val.pt/test.pt with TS-TCC's "
                   "data_preprocessing/uci_har (github.com/emadeldeen24/TS-TCC) and put them in "
                   "<data dir>/HAR/",
    ),
    _uea("PhonemeSpectra", ("phoneme",), 11, 217, 39, 3315, 3353),
    _uea("SelfRegulationSCP1", ("scp1",), 6, 896, 2, 268, 293),
    _uea("MotorImagery", ("motor",), 64, 3000, 2, 278, 100),
    _uea("FingerMovements", ("fingers", "fm"), 28, 50, 2, 316, 100,
         files=_ts_files("FingerMovements",
                         "947608221dbeea7c260a18c9c0b3d53bd8708d3d56886b40504d489355cd1f45",
                         "1314ea4caaa744eda77a1f5f13e0390cfec4d950da78f58b140580fa7d0518ef")),
    _uea("ArticularyWordRecognition", ("awr", "articulary"), 9, 144, 25, 275, 300,
         files=_ts_files("ArticularyWordRecognition",
                         "40c54640f20aa094115a47ad1f4745f5adcc08a65085659a4a042aee1c32a6d5",
                         "b4431c96e04310c55b8f50b6f93b0e20cfa019a2d25ab2a5c844e5e0b1375995")),
    _uea("SpokenArabicDigits", ("arabic", "sad", "arabicdigits"), 13, 93, 10, 6599, 2199,
         variable_length=True),
    _ucr("ECG5000", ("ecg",), 140, 5, 500, 4500),
    _ucr("FordB", ("ford",), 500, 2, 3636, 810),
    _ucr("UWaveGestureLibraryAll", ("uwaveall", "gesture_all"), 945, 8, 896, 3582),
    # ---- TF-C folders held in ../shared/data (also loadable by path) ----
    DatasetInfo(
        name="TFC_Gesture", kind="tf-c", format="pt", aliases=("tfc-gesture",), n_channels=3,
        seq_len=206, n_classes=8, n_train=320, n_val=120, n_test=120,
        source=f"{_TFC_CITE}; Gesture files from github.com/soham2312/TimeSeries@a196f18",
        files=(
            FileSpec("train.pt", "567359643b63127f3b13d510b0a7c6fcb574c53885de3c87dbef4cbe81aa824d",
                     f"{_TFC_GESTURE}/train.pt"),
            FileSpec("val.pt", "0db6aa343168758b7b2cc5b706072bcc23e265a6012fd59c46550b283d6d1e41",
                     f"{_TFC_GESTURE}/val.pt"),
            FileSpec("test.pt", "7dae734f6df24bbeab988026e99b9daddd479088cbac9f658d0f1d139418c634",
                     f"{_TFC_GESTURE}/test.pt"),
        ),
        download="files",
    ),
    DatasetInfo(
        name="Epilepsy_TFC", kind="tf-c", format="pt", aliases=("epilepsy",), n_channels=1,
        seq_len=178, n_classes=2, n_train=60, n_val=20, n_test=None,
        source=f"{_TFC_CITE}; Epilepsy (Andrzejak et al., Phys. Rev. E 2001), train/val only",
        files=(
            FileSpec("train.pt", "8fa3a8838148a0c4bcd068a08347e8b21dda076b9d0d73b107ffb0e237c89a13",
                     f"{_TFC_EPILEPSY}/train.pt"),
            FileSpec("val.pt", "8074a0b89f798e6bae07306ea0cf6d5b1b2387f5f0c62d28f861c99c2bea9845",
                     f"{_TFC_EPILEPSY}/val.pt"),
        ),
        download="files",
    ),
)

# Keyed by canonical name. Tests add entries with ``monkeypatch.setitem``; lookups read it live.
REGISTRY: dict[str, DatasetInfo] = {info.name: info for info in _ENTRIES}


def check_loaded(info: DatasetInfo, splits: Mapping[str, Any], class_names: list[str], *,
                 fetch_name: str | None = None) -> None:
    """Fail loudly on a dataset that read without error but is not whole.

    A ``.ts`` file cut at a line boundary parses cleanly: its header still lists every class,
    the missing cases are simply absent (gesture's train file cut in half loses 4 of its 8
    classes). So every class must have a training series, and a registry entry whose files are
    pinned by sha256 must hold its published number of series in each split.

    Args:
        info: the resolved entry (a folder given by path has no facts to check).
        splits: ``"train"``, ``"val"``, ``"test"`` -> what was read (``len``, ``labels``, ``path``).
        class_names: the classes the labels index.
        fetch_name: the registry name, when the files came from the cache (the message then says
            to re-fetch; otherwise, to put a whole copy where the file was read).

    Raises:
        DataError: a class with no training series, or a split of the wrong size; the message
            names the file and says how to get it whole again.
    """
    train = splits["train"]
    present = set(int(v) for v in train.labels)
    missing = [name for i, name in enumerate(class_names) if i not in present]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise DataError(f"{train.path}: no training series of class(es) {shown} ({len(missing)} "
                        f"of {len(class_names)}); the file is cut short or not the dataset's "
                        f"own: {whole_copy_hint(train.path, fetch_name)}")
    if info.path is not None or not any(f.sha256 for f in info.files):
        return
    published = {"train": info.n_train, "val": info.n_val, "test": info.n_test}
    for name, part in splits.items():
        expected = published.get(name)
        if expected is not None and len(part) != expected:
            raise DataError(f"{part.path}: {len(part)} series, but {info.name}'s {name} split "
                            f"has {expected}; the file is cut short or not the published one: "
                            f"{whole_copy_hint(part.path, fetch_name)}")


def list_datasets() -> list[DatasetInfo]:
    """The registered datasets, in registry order (gesture, the paper's ten, the TF-C folders)."""
    return list(REGISTRY.values())


@cache
def archive_names() -> dict[str, Kind]:
    """Every UEA/UCR archive name aeon knows, mapped to ``"uea"`` or ``"ucr"``.

    aeon's ``tsc_datasets.py`` holds only name lists, but importing it through
    ``aeon.datasets`` imports every loader (about 2 s); so that one file is loaded on its own.
    Without aeon the registry's names still resolve.
    """
    names: dict[str, Kind] = {}
    try:
        spec = importlib.util.find_spec("aeon")
        if spec is None or not spec.submodule_search_locations:
            return names
        path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "tsc_datasets.py"
        module_spec = importlib.util.spec_from_file_location("_cbdtune_aeon_tsc_names", path)
        if module_spec is None or module_spec.loader is None:
            return names
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (ImportError, OSError, SyntaxError):  # aeon absent or moved the file: registry only
        return names
    for name in getattr(module, "univariate", []):
        names[name] = "ucr"
    for name in getattr(module, "multivariate", []):
        names[name] = "uea"
    return names


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~"))


def resolve(name: str) -> DatasetInfo:
    """Turn a registry name, alias, archive name or folder path into a :class:`DatasetInfo`.

    Names match case-insensitively. A bare word that is no known name but is an existing folder
    is read as a path. Nothing is downloaded or read beyond a folder listing.

    Args:
        name: ``"gesture"``, ``"FingerMovements"``, ``"BasicMotions"``, ``"../data/Epilepsy"``...

    Returns:
        The registry entry, a synthesized entry for another archive name, or a ``kind="folder"``
        entry with ``path`` set.

    Raises:
        DataError: an unknown name (with the closest names), or a folder that is missing or holds
            neither ``train.pt`` nor ``*_TRAIN.ts``.
    """
    if not name or not name.strip():
        raise DataError("dataset name is empty; give a name such as 'gesture' (see `list`)")
    name = name.strip()
    if _looks_like_path(name):
        return _folder_info(Path(name).expanduser())
    key = name.lower()
    for info in REGISTRY.values():
        if key == info.name.lower() or key in (a.lower() for a in info.aliases):
            return info
    for archive_name, kind in archive_names().items():
        if key == archive_name.lower():
            cite = _UEA_CITE if kind == "uea" else _UCR_CITE
            return DatasetInfo(name=archive_name, kind=kind,
                               n_channels=1 if kind == "ucr" else None,
                               source=f"{cite}, {ARCHIVE_URL.format(name=archive_name)}")
    if Path(name).is_dir():
        return _folder_info(Path(name))
    raise DataError(f"unknown dataset {name!r}{_suggest(name)}; see `python -m cbdtune.data "
                    f"list` for names, or give a folder path")


def _suggest(name: str) -> str:
    """`` (did you mean a, b?)``: the closest names, one per dataset; ``""`` if none is close."""
    spelled: dict[str, tuple[str, str]] = {}  # lower-case spelling -> (spelling, canonical name)
    for info in REGISTRY.values():
        spelled[info.name.lower()] = (info.name, info.name)
        spelled.update({a.lower(): (a, info.name) for a in info.aliases})
    for archive_name in archive_names():
        spelled.setdefault(archive_name.lower(), (archive_name, archive_name))
    shown: dict[str, str] = {}  # canonical -> the closest spelling of it
    for close in difflib.get_close_matches(name.lower(), list(spelled), n=8, cutoff=0.6):
        spelling, canonical = spelled[close]
        shown.setdefault(canonical, spelling)
    names = list(shown.values())[:3]
    return f" (did you mean {', '.join(names)}?)" if names else ""


def _folder_info(path: Path) -> DatasetInfo:
    """Describe a folder given by path: TF-C style ``*.pt`` splits or a ``NAME_TRAIN.ts`` pair."""
    if not path.is_dir():
        raise DataError(f"dataset folder {path} does not exist; give an existing folder, "
                        f"or a registry name (see `python -m cbdtune.data list`)")
    known = {i.name.lower(): i for i in REGISTRY.values() if i.format == "pt"}
    if (path / "train.pt").is_file():
        files = tuple(FileSpec(f) for f in ("train.pt", "val.pt", "test.pt")
                      if (path / f).is_file())
        base = known.get(path.resolve().name.lower())
        source = base.source if base is not None else f"TF-C style folder {path}"
        return DatasetInfo(name=path.resolve().name, kind="folder", format="pt", files=files,
                           source=source, download="none", path=str(path))
    trains = sorted(path.glob("*_TRAIN.ts"))
    if len(trains) == 1:
        ts_name = trains[0].name[: -len("_TRAIN.ts")]
        if not (path / f"{ts_name}_TEST.ts").is_file():
            raise DataError(f"{path} has {trains[0].name} but not {ts_name}_TEST.ts; copy the "
                            f"test file there (UEA/UCR datasets come as a TRAIN/TEST pair)")
        base = REGISTRY.get(ts_name)
        return replace(base, kind="folder", path=str(path)) if base is not None else DatasetInfo(
            name=ts_name, kind="folder", source=f"local folder {path}", download="none",
            path=str(path))
    if len(trains) > 1:
        listed = ", ".join(t.name for t in trains)
        raise DataError(f"{path} holds several *_TRAIN.ts files ({listed}); "
                        f"pass this folder as --data-dir and the dataset by name")
    raise DataError(f"{path} holds neither train.pt (TF-C style) nor NAME_TRAIN.ts (UEA/UCR); "
                    f"point to the folder that holds the split files")
