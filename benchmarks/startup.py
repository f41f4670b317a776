"""What a trial's fixed cost is made of: a TorchTrainer's start-up and teardown, phase by phase.

Every trial of a search is a Tune trial actor that builds a ``TorchTrainer`` and calls ``fit()``:
Ray Train V2 starts a controller actor, which places and starts the worker actor, which unpickles
the train function (importing its modules), sets up torch's process group and runs it. This
script times the parts of that a trial pays before and after its own work:

1. imports, each in a fresh interpreter (what each new Ray worker process pays to unpickle what it
   runs): ``torch``, ``ray.train.torch``, ``cbdtune.worker`` (which pulls in the pipeline and the
   model), each the median of ``--repeats``;
2. ``TorchTrainer.fit()`` of 1 worker with 1 CPU, split by timestamps taken in the driver and in
   the worker (one machine, one clock):

       scheduling     fit() called -> the worker's process created (the controller actor starts,
                      reserves a placement group and starts the worker actor)
       worker setup   process created -> the train function entered (Ray Train's worker set-up,
                      unpickling the function, torch's process group)
       imports        cbdtune.worker imported inside the train function (0 for the bare one)
       data + model   the dataset from the object store, the config read (the model is built
                      at the start of the trial work; cbdtune only)
       trial work     the model built and the trial run (one linear-probe epoch)
       teardown       the train function returned -> fit() returned

   for a bare train function (it reports once and returns) and for cbdtune's worker on a trial
   with no epochs (``train.pretrain_epochs=0``, one linear-probe epoch), in alternation;
3. the same no-epoch trial as a Tune search runs it (``worker.train_driver_fn`` in a Tune trial
   actor that builds the TorchTrainer), ``--trials`` of them one after another: seconds per
   trial, the fixed cost a search pays per trial. (Tune's ``reuse_actors`` would keep the trial
   actor's process for the next trial, but Ray 2.60's function trainables have no
   ``reset_config``: the next trial hangs.)

    python benchmarks/startup.py                 # 3 repeats (~3 min)
    python benchmarks/startup.py --repeats 5

Writes results/startup.md with the command, machine, versions and date at the top.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import load_average, provenance  # benchmarks/ is on sys.path when a script runs
from overhead import make_tuner

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ("torch", "ray.train.torch", "cbdtune.worker")
PHASES = ("scheduling", "worker setup", "imports", "data + model", "trial work", "teardown")


def import_seconds(module: str) -> float:
    """Wall time of ``python -c "import module"`` in a fresh interpreter, minus a bare one's."""
    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        return time.perf_counter() - t0
    return run(f"import {module}") - run("pass")


# ---- the two train functions (pickled by value: they live in __main__) -------------------------


def bare_fn(loop_config: dict[str, Any]) -> dict[str, float]:
    import time

    import psutil
    import ray.train

    entered = time.time()
    ray.train.report({"x": 1.0})
    return {"spawned": psutil.Process().create_time(), "entered": entered,
            "imported": entered, "built": entered, "returned": time.time()}


def cbdtune_fn(loop_config: dict[str, Any]) -> dict[str, float]:
    import time

    import psutil

    entered = time.time()
    from cbdtune import worker  # what unpickling cbdtune's own train function imports

    imported = time.time()
    stamps: dict[str, float] = {}
    real_run_trial = worker.run_trial

    def timed(cfg: Any, data: Any, report: Any, **kw: Any) -> Any:
        stamps["built"] = time.time()  # data fetched, config parsed, runtime made
        return real_run_trial(cfg, data, report, **kw)

    worker.run_trial = timed
    worker.train_fn_per_worker(loop_config)
    return {"spawned": psutil.Process().create_time(), "entered": entered, "imported": imported,
            "built": stamps["built"], "returned": time.time()}


def fit_phases(fn: Any, cfg: Any, data_ref: Any, storage: str, name: str) -> dict[str, float]:
    from cbdtune.worker import make_trainer

    trainer = make_trainer(cfg, data_ref=data_ref, name=name, storage_path=storage,
                           train_fn=fn)
    called = time.time()
    result = trainer.fit()
    ended = time.time()
    if result.error is not None:
        raise RuntimeError(f"{name} failed: {result.error}")
    t = result.return_value
    return {"scheduling": t["spawned"] - called, "worker setup": t["entered"] - t["spawned"],
            "imports": t["imported"] - t["entered"], "data + model": t["built"] - t["imported"],
            "trial work": t["returned"] - t["built"], "teardown": ended - t["returned"],
            "total": ended - called}


def tune_seconds_per_trial(cfg: Any, data_ref: Any, storage: str, trials: int) -> float:
    """Wall time of ``trials`` no-epoch trials run one at a time by Tune, per trial."""
    tuner = make_tuner(cfg, data_ref, storage, name=f"startup-tune-{time.time_ns()}",
                       trials=trials)
    t0 = time.perf_counter()
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"Tune trial failed: {grid.errors[0]}")
    return (time.perf_counter() - t0) / trials


# ---- main --------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from cbdtune import session
    from cbdtune.config import preset
    from cbdtune.data import load_dataset

    imports = {m: statistics.median(import_seconds(m) for _ in range(args.repeats))
               for m in IMPORTS}
    cfg = preset("smoke").replace({"data.dataset": "gesture", "train.pretrain_epochs": 0,
                                   "train.classifier_epochs": 1, "train.num_threads": 1})
    session.connect()
    data_ref = ray.put(load_dataset(cfg.data, seed=cfg.train.seed))
    fns = {"bare train function": bare_fn, "cbdtune worker, no epochs": cbdtune_fn}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in fns}
    tune_runs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cbdtune-startup-") as storage:
        for i in range(args.repeats):  # alternated, so load drifts hit both alike
            for label, fn in fns.items():
                runs[label].append(fit_phases(fn, cfg, data_ref, storage, f"startup-{i}-{fn.__name__}"))
                print(f"{label} #{i + 1}: {runs[label][-1]['total']:.1f} s", flush=True)
            tune_runs.append(tune_seconds_per_trial(cfg, data_ref, storage, args.trials))
            print(f"Tune #{i + 1}: {tune_runs[-1]:.1f} s per trial", flush=True)
    ray.shutdown()
    phases = {label: {k: statistics.median(r[k] for r in rs) for k in (*PHASES, "total")}
              for label, rs in runs.items()}
    return {"imports": imports, "phases": phases,
            "tune": statistics.median(tune_runs)}


def report(args: argparse.Namespace, argv: list[str], load_start: str,
           found: dict[str, Any]) -> list[str]:
    lines = [
        "# A trial's fixed cost: TorchTrainer start-up and teardown", "",
        *provenance(__file__, argv, packages=("torch", "ray"), load_start=load_start),
        f"- medians of {args.repeats} runs; TorchTrainer: 1 worker, 1 CPU, local Ray, "
        f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S')}",
        "", "Imports in a fresh interpreter (minus the interpreter's own start):", "",
        "| module | s |", "|---|---|",
        *[f"| `{m}` | {s:.2f} |" for m, s in found["imports"].items()],
        "", "`TorchTrainer.fit()` by phase, s:", "",
        "| train function | " + " | ".join(PHASES) + " | total |",
        "|---|" + "---|" * (len(PHASES) + 1)]
    for label, m in found["phases"].items():
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.2f}" for k in (*PHASES, "total")) + " |")
    fit = found["phases"]["cbdtune worker, no epochs"]["total"]
    lines += ["", f"A Tune run of {args.trials} such trials one at a time (`worker.train_driver_fn` "
              f"as `cbdtune.search` wires it): {found['tune']:.2f} s per trial, of which the "
              f"TorchTrainer's fit above is {fit:.2f} s and Tune's trial actor and bookkeeping "
              f"the other {found['tune'] - fit:.2f} s."]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trials", type=int, default=3, help="trials per Tune run (default 3)")
    p.add_argument("--out", default=str(ROOT / "results" / "startup.md"))
    args = p.parse_args(argv)
    from cbdtune.session import TRAIN_POLL_ENV

    for k, v in TRAIN_POLL_ENV.items():  # as a search sets it for its trials
        os.environ.setdefault(k, v)
    load_start = load_average()
    lines = report(args, argv, load_start, measure(args))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
