"""``cbdtune.handover``: what a search hands over. Distinct configurations refit once, ensemble
selection over the trials' out-of-fold store (``cbdtune.oof``) and a MiniRocket baseline, the
model's weights, and (Ray) the registered model's test accuracy equal to the summary's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cbdtune import handover, oof, refit
from cbdtune.config import CbdtuneError, preset
from cbdtune.data import stratified_folds

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")


def _rows(*params: dict[str, Any]) -> pd.DataFrame:
    """Trial rows, best first, with the given searched values."""
    rows = []
    for i, p in enumerate(params):
        rows.append({"trial_id": f"t{i}", "status": "completed", "val_accuracy": 0.9 - 0.01 * i,
                     "selected_stage": "ridge", "selected_epoch": 1, "temperature": 0.5,
                     **{f"param.{k}": v for k, v in p.items()}})
    return pd.DataFrame(rows)


# ---- the out-of-fold store ---------------------------------------------------------------------


def test_oof_round_trip_arrays_only(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1, 2, 2, 0, 1, 2, 0])
    folds = stratified_folds(y, 3, seed=7)
    fold = oof.fold_assignment(folds, len(y))
    proba = np.random.default_rng(0).dirichlet(np.ones(3), size=len(y))
    oof.write(str(tmp_path), "abc", proba=proba, y=y, index=np.arange(len(y)), fold=fold,
              meta={"config": {"train.seed": 7}, "encoder_key": "k" * 64, "seed": 7})
    with np.load(tmp_path / "abc.npz", allow_pickle=False) as npz:  # no object arrays
        assert sorted(npz.files) == ["fold", "index", "proba", "y"]
    [rec] = oof.read_all(str(tmp_path)).values()
    np.testing.assert_allclose(rec.proba, proba, atol=1e-7)
    assert rec.meta["encoder_key"] == "k" * 64 and rec.params == {"train.seed": 7}
    assert rec.meta["folds_digest"] == oof.digest(fold)
    assert oof.read_all(str(tmp_path), ["other"]) == {}


def test_oof_fold_assignment_differs_with_the_seed() -> None:
    """The digest tells whether two trials were scored on the same folds."""
    y = np.repeat(np.arange(4), 10)
    same = [oof.digest(oof.fold_assignment(stratified_folds(y, 5, seed=s), len(y)))
            for s in (0, 0, 1)]
    assert same[0] == same[1] != same[2]
    fold = oof.fold_assignment(stratified_folds(y, 5, seed=0, repeats=2), len(y))
    assert fold.shape == (2, 40) and set(np.unique(fold)) == set(range(5))


def test_oof_record_without_its_json_is_left_out(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1])
    oof.write(str(tmp_path), "a", proba=np.full((4, 2), 0.5), y=y, index=np.arange(4),
              fold=np.zeros((1, 4), dtype=int), meta={})
    (tmp_path / "a.json").unlink()
    assert oof.read_all(str(tmp_path)) == {}


def test_keep_oof_writes_for_a_completed_trial_only(tmp_path: Path) -> None:
    """The worker's record of a trial: written when the selected stage has out-of-fold
    probabilities, with the folds the search's seed draws; nothing when it has none."""
    import torch

    from cbdtune.classify import StageResult
    from cbdtune.worker import keep_oof

    y = np.repeat(np.arange(2), 6)
    data = SimpleNamespace(train=SimpleNamespace(x=np.zeros((12, 1, 16), np.float32), y=y),
                           val=SimpleNamespace(x=np.zeros((0, 1, 16), np.float32),
                                               y=np.zeros(0, int)),
                           n_channels=1, seq_len=16, n_classes=2, name="toy")
    cfg = preset("smoke").replace({"data.cv_folds": 3, "train.seed": 3})
    stage = StageResult("ridge", 1, {"accuracy": 0.5}, 3,
                        oof_proba=torch.full((12, 2), 0.5), temperature=2.0)
    result = SimpleNamespace(selected=stage, metrics={"encoder_key": "e" * 8})
    keep_oof(cfg, data, result, where=str(tmp_path), trial_id="done")
    keep_oof(cfg, data, SimpleNamespace(selected=None, metrics={}), where=str(tmp_path),
             trial_id="none")
    keep_oof(cfg, data, SimpleNamespace(selected=stage, metrics={}), where=str(tmp_path),
             trial_id="nocache")  # --no-reuse: the key is computed, not read from the cache
    records = oof.read_all(str(tmp_path))
    assert list(records) == ["done", "nocache"]
    assert re.fullmatch(r"[0-9a-f]{64}", records["nocache"].meta["encoder_key"])
    rec = records["done"]
    assert rec.meta["encoder_key"] == "e" * 8 and rec.meta["temperature"] == 2.0
    want = oof.digest(oof.fold_assignment(stratified_folds(y, 3, seed=3), 12))
    assert rec.meta["folds_digest"] == want


# ---- distinct configurations, the choice and the weights ---------------------------------------


def test_distinct_refits_a_repeated_configuration_once() -> None:
    rows = _rows({"model.mask_ratio": 0.3}, {"model.mask_ratio": 0.3},
                 {"model.mask_ratio": 0.5})
    assert list(refit.distinct(rows)["trial_id"]) == ["t0", "t2"]
    jobs = refit.plan(refit.distinct(rows), preset("smoke"), seeds=2)
    assert [(rank, row["trial_id"]) for rank, row, _ in jobs] == [
        (1, "t0"), (1, "t0"), (2, "t2"), (2, "t2")]


def test_choose_top_takes_distinct_configurations_with_equal_weights() -> None:
    rows = _rows({"model.mask_ratio": 0.3}, {"model.mask_ratio": 0.3},
                 {"model.mask_ratio": 0.5}, {"model.mask_ratio": 0.7})
    plan = SimpleNamespace(settings=SimpleNamespace(ensemble="top", refit_top=2))
    choice = handover.choose(plan, rows)  # type: ignore[arg-type]
    assert list(choice.rows["trial_id"]) == ["t0", "t2"]
    assert choice.weights == {"t0": 0.5, "t2": 0.5}


def _refit(trial_id: str, seed: int, rank: int = 1) -> refit.Refit:
    cfg = preset("smoke").replace({"model.in_channels": 1, "model.seq_len": 16,
                                   "model.num_classes": 2, "train.seed": seed})
    return refit.Refit(rank, trial_id, seed, {}, cfg.to_dict(), {},
                       np.array([[0.9, 0.1], [0.2, 0.8]]) if seed else np.array([[0.6, 0.4],
                                                                                 [0.7, 0.3]]))


def test_members_share_a_configuration_weight_over_its_seeds_and_sum_to_one() -> None:
    """Weights 0.6 (two seeds) / 0.4 (baseline): 0.3, 0.3, 0.4; a refit made for the CBD-only
    selection alone is not a member."""
    choice = handover.Choice(rows=None, weights={"a": 0.6, handover.BASELINE: 0.4},
                             cbd_weights={"a": 0.5, "b": 0.5}, baseline=object())
    members, weights = handover._members(choice, [_refit("a", 0), _refit("a", 1),
                                                  _refit("b", 0, rank=2)])
    assert weights == pytest.approx([0.3, 0.3, 0.4]) and sum(weights) == pytest.approx(1.0)
    assert [m[2]["source_trial"] for m in members[:2]] == ["a", "a"]
    assert type(members[2]).__name__ == "BaselineMember"


def test_cbd_only_test_accuracy_comes_from_the_refits_made() -> None:
    """The CBD-only ensemble's test accuracy: each configuration's seeds averaged, then
    weighted (a: [[.75,.25],[.45,.55]], b: [[.6,.4],[.7,.3]] at 0.5 each -> argmax 0, 0)."""
    choice = handover.Choice(rows=None, weights={"a": 1.0}, cbd_weights={"a": 0.5, "b": 0.5},
                             report={"cbd_only": {"weights": {"a": 0.5, "b": 0.5}}})
    report = handover._with_cbd_only_test(choice, [_refit("a", 0), _refit("a", 1),
                                                   _refit("b", 0, rank=2)], np.array([0, 1]))
    assert report is not None and report["cbd_only"]["test_accuracy"] == 0.5


def test_n_kernels_rule_by_training_size() -> None:
    """The paper's 10,000 features up to 1,000 series, fewer beyond (whole groups of 84)."""
    assert handover.n_kernels_for(120) == 10_000
    assert handover.n_kernels_for(1000) == 84 * 119
    big = handover.n_kernels_for(7494)
    assert big % 84 == 0 and 84 * 12 <= big < 1400


def test_selection_markdown_names_members_kinds_and_both_estimates() -> None:
    report = {"candidates": 3, "baseline": handover.BASELINE, "n_kernels": 840, "rounds": 25,
              "n_series": 120, "singles": {"t0": (0.9, 0.3), "t1": (0.8, 0.5),
                                           handover.BASELINE: (0.93, 0.2)},
              "full": {"weights": {"t0": 0.25, handover.BASELINE: 0.75}, "oof_accuracy": 0.95,
                       "oof_log_loss": 0.18},
              "cbd_only": {"weights": {"t0": 0.5, "t1": 0.5}, "oof_accuracy": 0.91,
                           "oof_log_loss": 0.28, "test_accuracy": 0.9}}
    text = handover.selection_markdown(report, 0.925)
    assert "| `minirocket` | baseline (MiniRocket) | 0.750 | 0.000 | 93.00 |" in text
    assert "| `t1` | CBD | 0.000 | 0.500 | 80.00 |" in text
    assert "| selected (the registered model) | 95.00 | 0.1800 | 92.50 |" in text
    assert "| CBD members only | 91.00 | 0.2800 | 90.00 |" in text


def test_select_refuses_a_space_that_searches_the_folds(tmp_path: Path) -> None:
    from cbdtune.plan import check_same_folds
    from cbdtune.settings import SearchSettings
    from cbdtune.space import load_space

    space = tmp_path / "s.yaml"
    space.write_text(Path(SMOKE).read_text() + "train.seed: {type: int, low: 0, high: 3}\n")
    with pytest.raises(CbdtuneError, match="train.seed.*--ensemble top"):
        check_same_folds(load_space(str(space)),
                         SearchSettings(datasets=("gesture",), space=str(space)))
    check_same_folds(load_space(str(space)),
                     SearchSettings(datasets=("gesture",), space=str(space), ensemble="top"))


# ---- the whole search (Ray) --------------------------------------------------------------------


@pytest.mark.ray
def test_search_select_registers_the_ensemble_summary_md_reports(tmp_path: Path) -> None:
    """A 2-trial smoke search with --ensemble select: out-of-fold records for the completed
    trials only; the saved model's weights sum to 1; ``cbdtune.predict`` on it (a fresh process)
    reads the test accuracy summary.md reports for the model and the parent run logged."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "cbdtune.search", "--dataset", "gesture", "--space", SMOKE,
           "--num-samples", "2", "--storage", str(tmp_path / "ray"), "--results-dir",
           str(tmp_path / "results"), "--mlflow-uri", uri, "--data-dir",
           os.environ["CBDTUNE_DATA_DIR"], "--refit-seeds", "1", "--ensemble", "select",
           "--name", "sel"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [out] = list((tmp_path / "results").glob("*/sel"))
    df = pd.read_parquet(out / "trials.parquet")
    completed = set(df.loc[df["status"] == "completed", "trial_id"])
    assert completed and set(oof.read_all(str(tmp_path / "ray" / "sel" / "oof"))) == completed
    contract = json.loads((out / "model" / "contract.json").read_text())
    assert sum(m["weight"] for m in contract["members"]) == pytest.approx(1.0, abs=1e-9)
    summary = (out / "summary.md").read_text()
    assert "## Ensemble selection" in summary and "CBD members only" in summary
    shown = re.search(r"\| selected \(the registered model\) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|",
                      summary)
    assert shown, summary[-2000:]
    pred = subprocess.run([sys.executable, "-m", "cbdtune.predict", "--model", str(out / "model"),
                           "--input", "gesture", "--output", str(tmp_path / "pred.csv")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert pred.returncode == 0, pred.stderr[-2000:]
    right, total = re.search(r"accuracy: [\d.]+ \((\d+)/(\d+)\)", pred.stderr).groups()  # type: ignore[union-attr]
    assert f"{100 * int(right) / int(total):.2f}" == shown.group(1)


def _toy_plan(tmp_path: Path, *, ensemble: str = "select") -> SimpleNamespace:
    """A plan of a 3-class toy dataset (30 series) whose trials stored under ``tmp_path``."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    split = SimpleNamespace(x=rng.normal(size=(30, 2, 16)).astype(np.float32), y=y)
    data = SimpleNamespace(train=split, val=SimpleNamespace(x=split.x[:0], y=y[:0]),
                           n_channels=2, seq_len=16, n_classes=3, name="toy")
    base = preset("smoke").replace({"data.cv_folds": 3, "train.seed": 5})
    return SimpleNamespace(settings=SimpleNamespace(ensemble=ensemble, refit_top=1),
                           experiment_path=str(tmp_path), data=data, base=base)


def test_select_picks_the_better_trial_on_the_searchs_folds_only(tmp_path: Path) -> None:
    """Three stored trials: a confident right one, a uniform one, and one on other folds (not
    a candidate). The selection (with the MiniRocket baseline among the candidates, here on
    noise) keeps the right one alone; the CBD-only selection too; only it is refit."""
    plan = _toy_plan(tmp_path)
    y = plan.data.train.y
    right = np.full((30, 3), 0.05)
    right[np.arange(30), y] = 0.9
    fold = oof.fold_assignment(stratified_folds(y, 3, seed=5), 30)
    other = oof.fold_assignment(stratified_folds(y, 3, seed=6), 30)
    for name, proba, f in (("good", right, fold), ("flat", np.full((30, 3), 1 / 3), fold),
                           ("other", right, other)):
        oof.write(oof.folder(str(tmp_path)), name, proba=proba, y=y, index=np.arange(30),
                  fold=f, meta={})
    rows = _rows({"model.mask_ratio": 0.3}, {"model.mask_ratio": 0.5},
                 {"model.mask_ratio": 0.7})
    rows["trial_id"] = ["flat", "good", "other"]
    choice = handover.choose(plan, rows)  # type: ignore[arg-type]
    assert choice.report is not None and choice.report["candidates"] == 3  # good, flat, baseline
    assert choice.weights == {"good": 1.0} and choice.cbd_weights == {"good": 1.0}
    assert list(choice.rows["trial_id"]) == ["good"] and choice.baseline is None
    assert sum(choice.report["full"]["weights"].values()) == pytest.approx(1.0)


def test_select_without_stored_trials_hands_over_the_top(tmp_path: Path) -> None:
    plan = _toy_plan(tmp_path)
    rows = _rows({"model.mask_ratio": 0.3}, {"model.mask_ratio": 0.5})
    choice = handover.choose(plan, rows)  # type: ignore[arg-type]
    assert choice.report is None and choice.weights == {"t0": 1.0}
