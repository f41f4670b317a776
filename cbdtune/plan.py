"""A search's plan: everything that can be checked before Ray starts, frozen in one object.

:func:`make_plan` reads the space, builds the base config, loads the datasets, checks the MLflow
store, the Ray storage, the encoder cache and the results folder, and names the search. A bad
input fails here in one line (:class:`~cbdtune.config.CbdtuneError`) and costs nothing; the
phases of :func:`cbdtune.search.run_search` (tuning, the MLflow parent run, refit and register)
only read the :class:`SearchPlan` it returns.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from cbdtune import _cli, results, tracking
from cbdtune.config import CbdtuneError, ExperimentConfig
from cbdtune.data import load_dataset
from cbdtune.settings import SearchSettings
from cbdtune.space import SearchSpace, load_space

DEFAULT_STORAGE = "~/ray_results"  # Ray Tune's own default storage root


@dataclass(frozen=True)
class SearchPlan:
    """One search, decided before Ray starts (:func:`make_plan`).

    Attributes:
        settings: what was asked (validated when it was built).
        space: the search space.
        base: the config every trial's values are applied to.
        datasets: slug -> loaded dataset, in the order of ``--dataset`` (read-only).
        uri: the MLflow tracking URI (checked).
        root: the Ray storage root, a folder or a URI.
        name: the search's name: Tune experiment, results folder, Optuna study, parent run.
        argv: the command line as typed (the summary, the ``--resume`` hint).
    """

    settings: SearchSettings
    space: SearchSpace
    base: ExperimentConfig
    datasets: Mapping[str, Any]
    uri: str
    root: str
    name: str
    argv: tuple[str, ...]

    @property
    def metric(self) -> str:
        """The metric trials are ranked, stopped and refit by (the first objective)."""
        return self.settings.metrics[0]

    @property
    def mode(self) -> str:
        return self.settings.modes[0]

    @property
    def command(self) -> str:
        return " ".join([_cli.prog("cbdtune.search"), *map(shlex.quote, self.argv)])

    @property
    def multi(self) -> bool:
        """A multi-dataset search (``--dataset a,b``)."""
        return len(self.datasets) > 1

    @property
    def data(self) -> Any:
        """The dataset of a single-dataset search."""
        [data] = self.datasets.values()
        return data

    @property
    def label(self) -> str:
        """The dataset's name (gesture's is UWaveGestureLibrary); for several, their slugs
        joined by ``+``: the results folder and the default experiment name."""
        return dataset_label(self.datasets)

    @property
    def slugs(self) -> tuple[str, ...]:
        """The datasets' slugs of a multi-dataset search (their metrics' prefixes); () for one."""
        return tuple(self.datasets) if self.multi else ()

    @property
    def out_dir(self) -> Path:
        return Path(self.settings.results_dir) / self.label / self.name

    @property
    def experiment_path(self) -> str:
        """Tune's experiment folder (or URI): ``{storage root}/{name}``."""
        return f"{self.root}/{self.name}"


def make_plan(settings: SearchSettings, argv: list[str] | None = None) -> SearchPlan:
    """Check every input and name the search; nothing of Ray is started.

    Args:
        settings: the search.
        argv: the command line as typed; default: the flags that give ``settings``
            (:meth:`SearchSettings.to_argv`).

    Raises:
        CbdtuneError: one line for the first input that fails (space, dataset, MLflow store,
            storage, encoder cache, results folder, ``--resume`` of an unknown search).
    """
    space = load_space(settings.space)
    if settings.sampler == "grid":
        space.grid()  # a space with no grid fails here, in one line
    base = space.base.replace(_late_values(settings), where="command line")
    check_same_folds(space, settings)
    results.check_results_dir(Path(settings.results_dir))
    check_storage(settings.storage)
    if settings.reuse and settings.encoder_cache:
        check_storage(settings.encoder_cache, option="--encoder-cache")
    check_encoder_cache(settings)
    datasets = load_datasets(settings, base)
    check_cv_folds(base, datasets, given=settings.cv_folds is not None, space=settings.space)
    uri = tracking.resolve_tracking_uri(settings.mlflow_uri)
    tracking.check_tracking_uri(uri, writable=True)
    root = storage_root(settings)
    name = search_name(settings, root, Path(space.path).stem,
                       results_dir=Path(settings.results_dir) / dataset_label(datasets))
    return SearchPlan(settings=settings, space=space, base=base,
                      datasets=MappingProxyType(datasets), uri=uri,
                      root=root, name=name,
                      argv=tuple(settings.to_argv() if argv is None else argv))


FOLD_KEYS = ("train.seed", "data.cv_folds", "data.cv_repeats")  # what draws a trial's folds


def check_same_folds(space: SearchSpace, settings: SearchSettings) -> None:
    """Ensemble selection compares trials' out-of-fold predictions, so every trial must hold
    out the same series: the folds come from ``train.seed`` and ``data.cv_*``, fixed by the
    search (``--seed``, ``--cv-folds``), never searched.

    Raises:
        CbdtuneError: ``--ensemble select`` over a space that searches one of them.
    """
    searched = sorted({p.key for p in space.params} & set(FOLD_KEYS))
    if settings.ensemble == "select" and searched:
        raise CbdtuneError(f"space {settings.space} searches {', '.join(searched)}: trials "
                           "would be scored on different folds, which --ensemble select "
                           "compares; fix them in the space's base or pass --ensemble top")


def _late_values(settings: SearchSettings) -> dict[str, Any]:
    """The config keys the settings fix on top of the space's base."""
    late: dict[str, Any] = {"data.dataset": ",".join(settings.datasets)}
    if settings.data_dir:
        late["data.data_dir"] = shown_path(settings.data_dir)
    if settings.seed is not None:
        late["train.seed"] = settings.seed
    if settings.cv_folds is not None:
        late["data.cv_folds"] = settings.cv_folds
    if settings.cv_repeats is not None:
        late["data.cv_repeats"] = settings.cv_repeats
    return late


def dataset_label(datasets: Mapping[str, Any]) -> str:
    """One dataset's name; several datasets' slugs joined by ``+``."""
    if len(datasets) > 1:
        return "+".join(datasets)
    [data] = datasets.values()
    return str(data.name)


def load_datasets(settings: SearchSettings, base: ExperimentConfig) -> dict[str, Any]:
    """Each dataset of ``--dataset`` loaded, by slug (:func:`dataset_slug`).

    Raises:
        CbdtuneError: a name that does not load (the loader's line), or two names of one
            dataset (gesture,uwave).
    """
    out: dict[str, Any] = {}
    for name in settings.datasets:
        data = load_dataset(base.replace({"data.dataset": name}, where="--dataset").data,
                            seed=base.train.seed)
        same = [s for s, d in out.items() if d.name == data.name]
        if same:
            raise CbdtuneError(f"--dataset {','.join(settings.datasets)}: {same[0]} and {name} "
                               f"are one dataset ({data.name}); name it once")
        out[dataset_slug(name, data.name)] = data
    return out


def dataset_slug(arg: str, name: str) -> str:
    """``gesture`` stays ``gesture``; a folder path becomes its dataset's name."""
    slug = name if ("/" in arg or "\\" in arg) else arg
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in slug)


def check_storage(storage: str | None, *, option: str = "--storage") -> None:
    """Fail before Ray starts when Tune could not write under a local ``--storage`` folder (or
    the trials under ``option``'s, e.g. ``--encoder-cache``).

    Raises:
        CbdtuneError: the nearest existing folder on the way is a file or is read-only.
    """
    if storage and "://" in storage:
        return  # a cloud URI: Ray's pyarrow filesystem reports its own errors
    flag = f"{option} {storage}" if storage else f"the Ray storage {DEFAULT_STORAGE}"
    path = Path(storage or DEFAULT_STORAGE).expanduser()
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CbdtuneError(f"{flag}: {existing} is a file, not a folder; pass a folder path")
    if not tracking.is_writable(existing):
        raise CbdtuneError(f"{flag}: {existing} is read-only; pass a writable folder")


def check_encoder_cache(settings: SearchSettings) -> None:
    """Fail before Ray starts when the trials could not store encoders: a local cache folder
    (``<root>/encoders``, :func:`encoder_root`) that exists read-only, or is a file.

    Raises:
        CbdtuneError: one line naming the folder and the ways out.
    """
    root = encoder_root(settings)
    if root is None or "://" in root:
        return
    from cbdtune.encoder_cache import ENCODERS

    folder = Path(root) / ENCODERS
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if existing.is_dir() and tracking.is_writable(existing):
        return
    what = "is a file, not a folder" if not existing.is_dir() else "is read-only"
    raise CbdtuneError(f"encoder cache {shown_path(str(folder))}: {shown_path(str(existing))} "
                       f"{what}; make it a writable folder, pass --encoder-cache with another "
                       "folder, or --no-reuse")


def check_cv_folds(base: ExperimentConfig, datasets: Mapping[str, Any], *, given: bool,
                   space: str) -> None:
    """Fail before Ray starts when ``data.cv_folds`` asks for more folds than a dataset can
    give: stratified k-fold (``data.stratified_folds``) would run only as many folds as its
    largest class has training series, while the summary and MLflow record the k asked.

    Args:
        base: the search's base config (``data.cv_folds`` from ``--cv-folds`` or the space).
        datasets: the loaded datasets, by slug.
        given: whether ``--cv-folds`` set it (else the space did).
        space: the space, for the message.

    Raises:
        CbdtuneError: one line naming the dataset, the most folds it allows and the fix.
    """
    k = base.data.cv_folds
    if not k:
        return
    for data in datasets.values():
        most = int(np.bincount(np.asarray(data.train.y, dtype=np.int64)).max())
        if k > most:
            where = f"--cv-folds {k}" if given else f"data.cv_folds {k} (space {space})"
            raise CbdtuneError(
                f"{where}: {data.name} has at most {most} training series in a class, so "
                f"stratified cross-validation runs at most {most} folds; pass --cv-folds "
                f"{most} or fewer (0 = one validation split)")


def shown_path(given: str, resolved: str | Path | None = None) -> str:
    """A path for summaries and MLflow params: relative to the working directory when it lies
    inside it, else as the user gave it (no absolute path of this machine by default)."""
    target = Path(resolved if resolved is not None else given).expanduser()
    cwd = Path.cwd()
    for candidate in (target.absolute(), target.resolve()):
        if candidate.is_relative_to(cwd):
            return candidate.relative_to(cwd).as_posix()
    return given


def storage_root(settings: SearchSettings) -> str:
    """The Ray storage root: ``--storage`` (a URI as given, a folder resolved), else
    ``~/ray_results``."""
    if settings.storage:
        storage = settings.storage
        return storage if "://" in storage else str(Path(storage).resolve())
    return str(Path(DEFAULT_STORAGE).expanduser())


def encoder_root(settings: SearchSettings) -> str | None:
    """The encoder cache's root (``--encoder-cache``, else the Ray storage root: the entries go
    to ``<root>/encoders``, next to the searches of that storage, which share them); None with
    ``--no-reuse``."""
    if not settings.reuse:
        return None
    given = settings.encoder_cache
    if given:
        return given if "://" in given else str(Path(given).expanduser().resolve())
    return storage_root(settings)


def search_name(settings: SearchSettings, root: str, stem: str, *, results_dir: Path) -> str:
    """The search's name, decided once for its Ray storage and its results folder.

    ``--name``, else ``<dataset>-<space>``. A name is taken when ``{root}/{name}`` holds a Tune
    experiment or ``{results_dir}/{name}`` is a non-empty folder. A fresh search takes the first
    free one of ``name``, ``name-2``, ``name-3``...; ``--resume`` the latest taken one that Tune
    can restore; ``--overwrite`` (ignored with ``--resume``) ``name`` itself, taken or not.
    Tune reads an experiment's files without a running Ray.

    Args:
        settings: the search's ``name``, ``datasets``, ``resume`` and ``overwrite``.
        root: the Ray storage root (a folder or a URI).
        stem: the space file's stem, for the default name.
        results_dir: the dataset's results folder, ``<--results-dir>/<dataset name>``.

    Raises:
        CbdtuneError: ``--resume`` with no restorable search of this name.
    """
    from ray import tune

    base = settings.name or f"{'+'.join(settings.datasets)}-{stem}"
    names = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    taken: list[str] = []
    restorable: list[str] = []
    for name in names:
        if tune.Tuner.can_restore(f"{root}/{name}"):
            restorable.append(name)
        elif not _has_results(results_dir / name):
            break
        taken.append(name)
    if settings.resume:
        if not restorable:
            raise CbdtuneError(f"--resume: no search named {base} in {root}; run it without "
                               "--resume first, or pass --name/--storage")
        return restorable[-1]
    if settings.overwrite:
        return base
    return names[len(taken)]


def _has_results(folder: Path) -> bool:
    """True when ``folder`` exists and is not an empty folder (a file there counts too)."""
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
