"""``cbdtune-data`` (``python -m cbdtune.data``) ``list | info NAME | fetch NAME``: look at and
fetch datasets.

Every data problem ends as one ``error: ...`` line on stderr and exit code 2 (the traceback only
with ``--debug``), as in Optuna's ``cli.py``.
"""

from __future__ import annotations

import argparse
import sys

from cbdtune import _cli
from cbdtune.config import CbdtuneError, DataConfig
from cbdtune.data._dataset import Dataset
from cbdtune.data._fetch import cache_dir, fetch, find_in, local_data_dir
from cbdtune.data._load import load_dataset
from cbdtune.data._registry import DatasetInfo, list_datasets, resolve

EXIT_DATA_ERROR = 2  # the same code argparse uses for a bad command line


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 for a data or usage error)."""
    args = _parser().parse_args(argv)
    # Options given neither before nor after the subcommand are absent (SUPPRESS, see _parser).
    args.data_dir = getattr(args, "data_dir", None)
    args.debug = getattr(args, "debug", False)
    try:
        return args.run(args)
    except CbdtuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA_ERROR


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS, so that a value given before the subcommand is not reset by the subparser's
    # default (parents share these actions, so a plain default would apply at both levels).
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="local data folder (default: $CBDTUNE_DATA_DIR, then the cache)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog=_cli.prog("cbdtune.data"), parents=[common],
                                     description="List, inspect and fetch cbdtune datasets.")
    _cli.add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", parents=[common], help="the registered datasets")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("info", parents=[common], help="load a dataset and describe it")
    p.add_argument("name", help="registry name, alias, UEA/UCR archive name or folder path")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction)
    p.add_argument("--length-policy", choices=["pad", "resample"], default="pad")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("fetch", parents=[common], help="download a dataset into the cache",
                       description="Download a dataset into the cache (into --data-dir if given).")
    p.add_argument("name", help="registry name, alias or UEA/UCR archive name")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(run=_cmd_fetch)
    return parser


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [("name", "aliases", "kind", "C x L", "classes", "train/val/test", "available")]
    for info in list_datasets():
        sizes = "/".join("-" if n is None else str(n) for n in (info.n_train, info.n_val,
                                                               info.n_test))
        rows.append((info.name, ", ".join(info.aliases) or "-", info.kind, info.shape_text,
                     str(info.n_classes or "?"), sizes, _availability(info, args.data_dir)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("\nAny other UEA/UCR archive name works too (downloaded on first use), and so does a "
          "folder path\nholding TF-C style train.pt/val.pt/test.pt or NAME_TRAIN.ts/NAME_TEST.ts.")
    return 0


def _availability(info: DatasetInfo, data_dir: str | None) -> str:
    """Where the files are now: a local folder, the cache, or how they would be obtained."""
    root = local_data_dir(data_dir)
    for place, base in (("local", root), ("cached", cache_dir())):
        if base is not None and base.is_dir():
            try:
                if find_in(info, base) is not None:
                    return place
            except CbdtuneError:
                return f"{place} (incomplete)"
    return "download" if info.download != "none" else "manual"


def _cmd_info(args: argparse.Namespace) -> int:
    # The splits as the paper's protocol (cv_folds 0) sees them; cross-validation, the default,
    # folds the whole archive train split.
    cfg = DataConfig(dataset=args.name, data_dir=args.data_dir, val_fraction=args.val_fraction,
                     length_policy=args.length_policy, cv_folds=0)
    info = resolve(cfg.dataset)
    ds = load_dataset(cfg, seed=args.seed, download=not args.no_download)
    _print_info(ds, info, args)
    return 0


def _print_info(ds: Dataset, info: DatasetInfo, args: argparse.Namespace) -> None:
    aliases = f"; aliases: {', '.join(info.aliases)}" if info.aliases else ""
    shown = ", ".join(ds.class_names[:12]) + (", ..." if ds.n_classes > 12 else "")
    print(f"{ds.name} ({info.kind}{aliases})")
    print(f"  source:    {ds.source}")
    print(f"  location:  {ds.location}")
    print(f"  channels:  {ds.n_channels}")
    print(f"  length:    {ds.seq_len}")
    print(f"  classes:   {ds.n_classes} ({shown})")
    test = f" / {len(ds.test)} test" if ds.test is not None else " (no test split)"
    if ds.val_origin == "carved":
        print(f"  splits:    archive {len(ds.train) + len(ds.val)} train{test}")
        print(f"             with --cv-folds 0, carved from train (seed {args.seed}, "
              f"val_fraction {args.val_fraction}): {len(ds.train)} train / {len(ds.val)} val")
    else:
        print(f"  splits:    archive {len(ds.train)} train / {len(ds.val)} val{test}")
    splits = ds.splits()
    counts = {name: split.class_counts(ds.n_classes) for name, split in splits.items()}
    width = max(5, *(len(c) for c in ds.class_names))
    print("  class counts:")
    print("    " + "class".ljust(width) + "".join(f"{name:>7}" for name in splits))
    for k, class_name in enumerate(ds.class_names):
        print("    " + class_name.ljust(width) + "".join(f"{counts[n][k]:>7}" for n in splits))


def _cmd_fetch(args: argparse.Namespace) -> int:
    info = resolve(args.name)
    folder = fetch(info, dest_root=args.data_dir, force=args.force)
    print(f"{info.name}: {', '.join(info.required_files)} in {folder}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``cbdtune-data`` console script."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
