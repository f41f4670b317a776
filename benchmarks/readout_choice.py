"""What the ridge readout chose in finished searches: the encoder's tokens, the level features, or
both (issue 23: what does CBD's representation earn?).

Every completed trial of a search keeps its selected point in its out-of-fold store
(``<storage>/<search>/oof/<trial>.json``, :mod:`cbdtune.oof`): the ridge stage's ``epoch`` is the
1-based index of a (blend, alpha) point of :func:`cbdtune.ridge.path`, blends in the order of
:func:`cbdtune.ridge.blends` (tokens alone; tokens and levels alike; tokens and levels at equal
block variance; levels alone). A trial whose readout chose "levels alone" classifies with the
per-channel mean and spread of the raw series: its encoder, pretrained or not, adds nothing.

    python benchmarks/readout_choice.py results/search_vs_preset_runs/work  # every search under it

Reads only; writes ``results/readout_choice.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLENDS = ("tokens", "tokens + levels", "tokens + levels, equal variance", "levels alone")


def choice(meta: dict[str, Any]) -> str:
    """The blend a trial's ridge readout selected, from its OOF metadata."""
    from cbdtune.ridge import ALPHAS

    if meta["stage"] != "ridge":
        return meta["stage"]
    if not meta["config"].get("model.level_features"):
        return BLENDS[0]
    return BLENDS[(int(meta["epoch"]) - 1) // len(ALPHAS)]


def trials(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every OOF metadata file under ``root``, by dataset."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(root.rglob("oof/*.json")):
        meta = json.loads(path.read_text())
        out[str(meta["config"]["data.dataset"])].append(meta)
    return out


def table(by_dataset: dict[str, list[dict[str, Any]]]) -> list[str]:
    head = ["dataset", "completed trials", *BLENDS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for ds, metas in sorted(by_dataset.items()):
        cells = []
        for blend in BLENDS:
            cv = [m["val_accuracy"] for m in metas if choice(m) == blend]
            cells.append(f"{len(cv)} (best {100 * max(cv):.2f})" if cv else "0")
        lines.append(f"| {ds} | {len(metas)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path, help="folders holding searches' oof/ stores")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "readout_choice.md")
    args = p.parse_args(argv)
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for root in args.roots:
        for ds, metas in trials(root).items():
            by_dataset[ds].extend(metas)
    lines = ["# What the ridge readout chose in the searches' completed trials", "",
             f"- command: `{shlex.join(['python', 'benchmarks/readout_choice.py', *argv])}`",
             "- one row per dataset, every completed trial of every search found (all seeds): how "
             "many selected each blend, and the best CV accuracy (%) among them", "", *table(by_dataset)]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
