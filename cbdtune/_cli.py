"""What every cbdtune command shares: one-line errors (Optuna's ``cli.py``), the usage line's
program name, ``--version`` and the config flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from importlib import metadata

from cbdtune.config import CbdtuneError, ExperimentConfig, load_yaml, parse_overrides, preset

EXIT_USAGE = 2


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: list[str] | None) -> int:
    """Parse, run, and turn a :class:`CbdtuneError` into ``error: ...`` on stderr and exit 2.

    The traceback appears only with ``--debug``. Ctrl-C exits 130 without a traceback.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(message)s")
    try:
        return main(args)
    except CbdtuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def prog(module: str) -> str:
    """The program name for a usage line, as the command was invoked.

    ``python -m cbdtune.search`` runs with ``sys.argv[0]`` set to the module's file
    (``.../search.py``, or ``.../__main__.py`` for a package), and gets ``python -m <module>``.
    Anything else (the console script, a test runner, ``python -c``) gets the console script's
    name, ``cbdtune-<last part of module>``, as declared in pyproject.toml.
    """
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if invoked.endswith(".py"):
        return f"python -m {module}"
    return "cbdtune-" + module.rsplit(".", 1)[-1]


def version() -> str:
    """The installed distribution's version; ``cbdtune.__version__`` from a bare checkout."""
    try:
        return metadata.version("cbdtune")
    except metadata.PackageNotFoundError:  # on PYTHONPATH without pip install
        from cbdtune import __version__

        return __version__


def add_version_flag(p: argparse.ArgumentParser) -> None:
    """``--version``: print ``cbdtune <version>`` and exit 0."""
    p.add_argument("--version", action="version", version=f"cbdtune {version()}")


def add_config_flags(p: argparse.ArgumentParser, *, dataset_help: str | None = None) -> None:
    p.add_argument("--dataset", required=True,
                   help=dataset_help or "registry name (gesture, awr, ...), UEA/UCR archive "
                                        "name, or a folder")
    p.add_argument("--data-dir", help="local dataset folder (default: $CBDTUNE_DATA_DIR, cache)")
    p.add_argument("--seed", type=int, default=None, help="train.seed (default 0)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_worker_flags(p: argparse.ArgumentParser, *, gpus_default: str) -> None:
    """``--cpus-per-worker`` and ``--gpus-per-worker`` of the Ray Train workers, and
    ``--address`` of the cluster: the same flags in ``cbdtune.train`` and ``cbdtune.search``.

    Args:
        gpus_default: what ``--gpus-per-worker`` defaults to, for its help.
    """
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default %(default)s)")
    p.add_argument("--gpus-per-worker", type=float,
                   help=f"GPUs per worker; fractions (0.25) let trials share a GPU (default: "
                        f"{gpus_default})")
    p.add_argument("--address",
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)")


def add_mlflow_flags(p: argparse.ArgumentParser) -> None:
    """``--mlflow-uri`` and ``--experiment``: where a run or a search is logged."""
    p.add_argument("--mlflow-uri", help="tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: cbdtune-<dataset>)")


def build_config(args: argparse.Namespace, *, preset_name: str = "default",
                 config_file: str | None = None, overrides: list[str] | None = None
                 ) -> ExperimentConfig:
    """Preset -> YAML file -> ``--set`` overrides -> ``--dataset/--data-dir/--seed``."""
    cfg = preset(preset_name)
    if config_file:
        cfg = cfg.replace(load_yaml(config_file), where=config_file)
    if overrides:
        cfg = cfg.replace(parse_overrides(overrides), where="--set")
    late: dict[str, object] = {"data.dataset": args.dataset}
    if args.data_dir:
        late["data.data_dir"] = args.data_dir
    if args.seed is not None:
        late["train.seed"] = args.seed
    return cfg.replace(late, where="command line")


__all__ = ["CbdtuneError", "EXIT_USAGE", "add_config_flags", "add_mlflow_flags",
           "add_version_flag", "add_worker_flags", "build_config", "prog", "run", "version"]
