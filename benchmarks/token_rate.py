"""The token-rate table: selection.py runs at several ``model.min_tokens``, with their random-encoder
controls and MiniRocket, gathered into one table (results/token_rate.md and .csv).

Each variant is one ``benchmarks/selection.py --protocols br`` run (its NAME.csv in results/); this
script reads them and writes, per dataset and variant: the token count, the test accuracy of the
pretrained (b) and random (r) encoders (mean ± sample std over seeds), the gain of pretraining
paired by seed, which block of the ridge readout CV chose (the path's blends: tokens, both, both at
equal variance, levels alone), and MiniRocket on the same series.

    python benchmarks/token_rate.py --variant "min_tokens 1 ([C])=token_rate_m1" \\
        --variant "min_tokens 16=token_rate_m16" --command "..." --command "..."
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _cells import fmt_ms, mean_std  # benchmarks/ is on sys.path when a script runs
from selection import CV_REFIT, MR_ALL, RANDOM

ROOT = Path(__file__).resolve().parents[1]
BLENDS = ("tokens", "both", "both, equal variance", "levels alone")  # cbdtune.ridge.blends order


def _blend_counts(rows: Any) -> str:
    """Which block of the readout CV chose, over seeds: the path index is (epoch - 1)."""
    from cbdtune.ridge import ALPHAS

    picked = [BLENDS[(int(e) - 1) // len(ALPHAS)] for e in rows["epoch"]]
    return ", ".join(f"{b} {picked.count(b)}" for b in BLENDS if b in picked)


def _tokens(dataset: str, min_tokens: int) -> tuple[int, int]:
    """(steps, tokens) of a dataset's series under the conv tokenizer at ``min_tokens``."""
    from cbdtune.config import DataConfig, ModelConfig
    from cbdtune.data import load_dataset
    from cbdtune.model import num_tokens

    steps = load_dataset(DataConfig(dataset=dataset), seed=0).seq_len
    return steps, num_tokens(ModelConfig(seq_len=steps, min_tokens=min_tokens))


def variant_rows(label: str, df: Any, min_tokens: int,
                 randoms: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per dataset of a run. A run without (r) rows (a change to pretraining alone,
    which an encoder that is not pretrained does not see) is paired with ``randoms[dataset]``:
    the (r) rows of an earlier variant, same seeds and folds."""
    out = []
    for dataset, g in df.groupby("dataset", sort=False):
        b = g[g["protocol"] == CV_REFIT].set_index("seed")
        r = g[g["protocol"] == RANDOM].set_index("seed")
        if r.empty and randoms and dataset in randoms:
            r = randoms[dataset]
        seeds = sorted(set(b.index) & set(r.index))
        steps, tokens = _tokens(dataset, min_tokens)
        gain = mean_std([b.loc[s, "test_accuracy"] - r.loc[s, "test_accuracy"] for s in seeds])
        out.append({"dataset": dataset, "steps": steps, "variant": label, "tokens": tokens,
                    "seeds": len(seeds),
                    "pretrained": fmt_ms(*mean_std(list(b.loc[seeds, "test_accuracy"]))),
                    "random": fmt_ms(*mean_std(list(r.loc[seeds, "test_accuracy"]))),
                    "gain": f"{gain[0]:+.2f}" + (f" ± {gain[1]:.2f}" if len(seeds) > 1 else ""),
                    "gain_mean": gain[0],
                    "pretrained_mean": mean_std(list(b.loc[seeds, "test_accuracy"]))[0],
                    "readout_pretrained": _blend_counts(b.loc[seeds]),
                    "readout_random": _blend_counts(r.loc[seeds]),
                    "time_pretrained_s": float(b.loc[seeds, "time_s"].mean()),
                    "time_random_s": float(r.loc[seeds, "time_s"].mean()),
                    "by_seed": dict(b["test_accuracy"])})
    return out


def paired_change(rows: list[dict[str, Any]]) -> None:
    """Each row's pretrained accuracy minus its dataset's first row's, paired by seed (points,
    mean ± std): ``vs_first`` (empty on the first row itself)."""
    first: dict[str, dict[int, float]] = {}
    for r in rows:
        base = first.setdefault(r["dataset"], r["by_seed"])
        seeds = sorted(set(base) & set(r["by_seed"]))
        if base is r["by_seed"] or not seeds:
            r["vs_first"] = ""
            continue
        m, sd = mean_std([r["by_seed"][s] - base[s] for s in seeds])
        r["vs_first"] = f"{m:+.2f}" + (f" ± {sd:.2f}" if len(seeds) > 1 else "")


def minirocket(frames: list[Any]) -> dict[str, tuple[float, float, int]]:
    """MiniRocket fit on all training series, per dataset, from the first run that has it."""
    out: dict[str, tuple[float, float, int]] = {}
    for df in frames:
        for dataset, g in df[df["protocol"] == MR_ALL].groupby("dataset", sort=False):
            out.setdefault(dataset, (*mean_std(list(g["test_accuracy"])), len(g)))
    return out


def _read(p: argparse.ArgumentParser, folder: Path, name: str, what: str) -> Any:
    import pandas as pd

    path = folder / f"{name}.csv"
    if not path.is_file():
        p.error(f"{what}: {path} not found; run selection.py first")
    return pd.read_csv(path)


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=NAME[@M]",
                   help="a label and a selection.py run name (results/NAME.csv); @M: its "
                        "model.min_tokens (default 1)")
    p.add_argument("--command", action="append", default=[], help="a command to state")
    p.add_argument("--note", action="append", default=[], help="a line for the header")
    p.add_argument("--name", default="token_rate")
    p.add_argument("--results-dir", type=Path, default=ROOT / "results",
                   help="where the runs' NAME.csv are and the table is written")
    p.add_argument("--title", default="Token rate and the random-encoder control")
    p.add_argument("--minirocket", action="append", default=[], metavar="NAME",
                   help="a selection.py run to take MiniRocket from when no variant has it")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    frames, randoms = [], {}
    for spec in args.variant:
        label, _, name = spec.rpartition("=")
        name, _, m = name.partition("@")
        frames.append(_read(p, args.results_dir, name, f"--variant {spec}"))
        rows += variant_rows(label, frames[-1], int(m or 1), randoms)
        for dataset, g in frames[-1][frames[-1]["protocol"] == RANDOM].groupby("dataset"):
            randoms.setdefault(dataset, g.set_index("seed"))
    mr = minirocket(frames + [_read(p, args.results_dir, n, f"--minirocket {n}")
                              for n in args.minirocket])
    lines = [f"# {args.title} ({args.name})", "",
             *[f"- command: `{c}`" for c in args.command], *args.note, "",
             "| dataset (steps) | variant | tokens | seeds | CBD pretrained % | random encoder % "
             "| gain, points (paired) | vs the dataset's first row, points (paired) "
             "| readout CV chose: pretrained / random "
             "| MiniRocket % | pretrained − MiniRocket | time s: pretrained / random |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["dataset"] for r in rows))
    rows.sort(key=lambda r: order.index(r["dataset"]))  # stable: variants in the given order
    paired_change(rows)
    for r in rows:
        m = mr.get(r["dataset"])
        r["minirocket"] = fmt_ms(m[0], m[1]) if m else "-"
        r["minus_minirocket"] = r["pretrained_mean"] - m[0] if m else float("nan")
        lines.append(f"| {r['dataset']} ({r['steps']}) | {r['variant']} | {r['tokens']} "
                     f"| {r['seeds']} | {r['pretrained']} | {r['random']} | {r['gain']} | {r['vs_first']} "
                     f"| {r['readout_pretrained']} / {r['readout_random']} | {r['minirocket']} "
                     f"| {r['minus_minirocket']:+.2f} "
                     f"| {r['time_pretrained_s']:.0f} / {r['time_random_s']:.0f} |")
    (args.results_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    pd.DataFrame([{k: v for k, v in r.items() if k != "by_seed"} for r in rows]).to_csv(args.results_dir / f"{args.name}.csv", index=False)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
