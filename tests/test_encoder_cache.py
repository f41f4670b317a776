"""Pretrained-encoder reuse: the key, the cache, the pipeline's hook and the searcher's reuse trials.

Smoke preset on a tiny synthetic dataset (24 training series of 2 x 64), two pretraining epochs,
so each trial takes seconds; no Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args, get_origin, get_type_hints

import numpy as np
import optuna
import pytest
import torch

from cbdtune import encoder_cache as ec
from cbdtune import pipeline
from cbdtune.config import ConfigError, ExperimentConfig, field_type, preset, valid_keys
from cbdtune.data import Dataset
from cbdtune.data._dataset import Split
from cbdtune.runtime import Runtime
from cbdtune.searcher import REUSE_ATTR, FullFidelityOptunaSearch, split_params
from cbdtune.space import OPTUNA_PREFIX


def _split(rng: np.random.Generator, n: int) -> Split:
    y = np.arange(n) % 2
    return Split(rng.normal(size=(n, 2, 64)).astype(np.float32) + y[:, None, None], y)


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(0)
    empty = Split(np.empty((0, 2, 64), np.float32), np.empty(0, np.int64))
    return Dataset("synthetic", _split(rng, 24), empty, _split(rng, 8), ["a", "b"], "test",
                   "memory", "none")


def _cfg(**overrides: Any) -> ExperimentConfig:
    base = {"train.pretrain_epochs": 2, "train.probe_every": 1, "train.probe_epochs": 1,
            "train.classifier_epochs": 2, "train.classifier": "linear_probe",
            "data.cv_folds": 2, "train.num_threads": 1, "model.head_dropout": 0.1}
    return preset("smoke").replace({**base, **overrides})


def _trial(cfg: ExperimentConfig, data: Dataset, root: Path | None, name: str = "s/t0"
           ) -> tuple[pipeline.TrialResult, list[dict[str, Any]]]:
    reports: list[dict[str, Any]] = []
    rt = Runtime(encoder_cache=str(root) if root else None, trial=name)
    result = pipeline.run_trial(cfg, data, lambda m, _s: reports.append(m), rt=rt)
    return result, reports


def _counting_pretrain(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count pretraining epochs run (pipeline.pretrain_epoch)."""
    calls: list[int] = []
    original = pipeline.pretrain_epoch

    def counted(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "pretrain_epoch", counted)
    return calls


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---- the key ----------------------------------------------------------------------------------


def test_the_declared_split_of_fields() -> None:
    assert set(ec.NOT_IN_KEY) <= set(valid_keys()), "NOT_IN_KEY names a key the config lacks"
    train = {k for k in ec.pretraining_fields() if k.startswith("train.")}
    assert train == {f"train.{n}" for n in (
        "seed", "batch_size", "pretrain_epochs", "pretrain_steps", "pretrain_max_steps",
        "pretrain_augment", "drop_last", "pretrain_lr", "weight_decay", "beta1", "beta2", "amp")}
    model = {k for k in valid_keys() if k.startswith("model.")}
    assert model - set(ec.pretraining_fields()) == {
        "model.head", "model.head_dropout", "model.level_features",  # the classifier's
        "model.readout_segments", "model.in_channels", "model.seq_len", "model.num_classes"}  # the data's
    assert {k for k in valid_keys() if k.startswith("loss.")} <= set(ec.pretraining_fields())
    assert not any(k.startswith("data.") for k in ec.pretraining_fields())


def _another(cfg: ExperimentConfig, key: str) -> ExperimentConfig:
    """``cfg`` with ``key`` set to some other valid value."""
    value, tp = cfg.to_dict()[key], field_type(key)
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is type(None) or (args and value is None):
        tp = args[0]
    if get_origin(tp) is not None and get_args(tp) and all(isinstance(a, str) for a in
                                                             get_args(tp)):
        candidates: list[Any] = [c for c in get_args(tp) if c != value]
    elif isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, int):
        candidates = [value + 1, value * 2, value + 2, max(value - 1, 0)]
    elif isinstance(value, float):
        candidates = [value * 0.5, value + 0.05, value * 1.5]
    else:
        candidates = ["somewhere-else", "other"]
    for candidate in candidates:
        try:
            other = cfg.replace({key: candidate})
        except ConfigError:
            continue
        if other.to_dict()[key] != value:
            return other
    raise AssertionError(f"no other valid value for {key} (from {value!r})")


def test_the_key_changes_when_and_only_when_a_pretraining_field_changes(data: Dataset) -> None:
    cfg = _cfg()
    key = ec.pretrain_key(cfg, data)
    assert key == ec.pretrain_key(ExperimentConfig.from_dict(cfg.to_dict()), data)  # canonical
    for name in valid_keys():
        changed = ec.pretrain_key(_another(cfg, name), data) != key
        expected = ec.field_role(name) == "pretraining"
        assert changed == expected, f"{name}: key changed={changed}, role {ec.field_role(name)}"


def test_the_key_follows_the_training_inputs_only(data: Dataset) -> None:
    cfg = _cfg()
    key = ec.pretrain_key(cfg, data)
    x = data.train.x.copy()
    x[3, 1, 7] += 1e-3
    moved = dataclasses.replace(data, train=Split(x, data.train.y))
    assert ec.pretrain_key(cfg, moved) != key
    # labels and the test split never reach pretraining (Eq. 14 is label-free)
    relabelled = dataclasses.replace(data, train=Split(data.train.x, 1 - data.train.y),
                                     test=Split(data.test.x[:4], data.test.y[:4]))
    assert ec.pretrain_key(cfg, relabelled) == key
    # the same bytes in another shape are other inputs
    same = SimpleNamespace(name=data.name, train=SimpleNamespace(x=data.train.x))
    assert ec.pretrain_key(cfg, same) == key  # the key reads the name and train.x, nothing else
    reshaped = SimpleNamespace(name=data.name, train=SimpleNamespace(x=data.train.x.reshape(
        24, 1, 128)))
    assert ec.pretrain_key(cfg, reshaped) != key
    renamed = SimpleNamespace(name="other", train=SimpleNamespace(x=data.train.x))
    assert ec.pretrain_key(cfg, renamed) != key


def test_the_model_config_fields_are_all_classified() -> None:
    # every ModelConfig field either enters the key or has a declared reason not to
    from cbdtune.config import ModelConfig

    for name in get_type_hints(ModelConfig):
        key = f"model.{name}"
        assert ec.field_role(key) == "pretraining" or key in ec.NOT_IN_KEY


# ---- the pipeline's hook ------------------------------------------------------------------------


def test_pretraining_does_not_depend_on_the_probes_or_the_head(data: Dataset) -> None:
    """Why train.probe_* and the head are out of the key: the probes run on a fork of the RNG."""
    def weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
        cfg, model = pipeline.build_for(data, cfg)
        pipeline.pretrain(model, data, cfg, Runtime(), lambda _m, _s: None)
        return model.state_dict()

    a = weights(_cfg(**{"train.probe_every": 1, "model.head": "flatten"}))
    b = weights(_cfg(**{"train.probe_every": 2, "train.probe_epochs": 2, "model.head": "mean",
                        "model.head_dropout": 0.3}))
    assert _same(a, b)


def test_a_second_trial_with_the_key_skips_pretraining_and_gets_the_same_encoder(
        data: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, first_reports = _trial(_cfg(), data, tmp_path, "s/first")
    assert first.metrics["encoder_reused"] == 0
    key = first.metrics["encoder_key"]
    assert key == ec.pretrain_key(_cfg(), data)
    epochs = _counting_pretrain(monkeypatch)
    # a classifier-only knob differs: the same encoder
    second, second_reports = _trial(_cfg(**{"train.classifier_lr": 1e-2}), data, tmp_path,
                                    "s/second")
    assert epochs == [], "the second trial pretrained"
    assert second.metrics["encoder_reused"] == 1
    assert second.metrics["encoder_key"] == key
    assert second.metrics["encoder_source_run"] == "s/first"
    assert first.classifier is not None and second.classifier is not None
    # the probe's classifier holds the pretrained model itself (frozen), bit for bit
    assert _same(first.classifier.model.state_dict(), second.classifier.model.state_dict())
    entry = ec.EncoderCache(str(tmp_path)).get(key)
    assert entry is not None and _same(entry.state["model"], first.classifier.model.state_dict())
    # the pretraining reports are replayed: as many, with the same metrics
    pre = [[r for r in reps if r["stage"] == "pretrain"] for reps in (first_reports,
                                                                       second_reports)]
    assert len(pre[0]) == len(pre[1]) == 2
    provenance = {k: second.metrics[k] for k in ("encoder_reused", "encoder_key",
                                                  "encoder_source_run")}
    assert [{**r, **provenance} for r in pre[0]] == pre[1]  # and they name the encoder
    assert all(r["encoder_reused"] == 1 for r in second_reports)


def test_the_whole_trial_is_the_same_with_a_reused_encoder(data: Dataset, tmp_path: Path) -> None:
    """Fine-tuning draws dropout after pretraining: the cached RNG state keeps it identical."""
    cfg = _cfg(**{"train.classifier": "fine_tune"})
    alone, _ = _trial(cfg, data, None)
    _trial(cfg, data, tmp_path, "s/a")
    reused, _ = _trial(cfg, data, tmp_path, "s/b")
    assert reused.metrics["encoder_reused"] == 1
    for k in ("val_accuracy", "val_loss", "test_accuracy"):
        assert reused.metrics[k] == alone.metrics[k], k
    assert alone.classifier is not None and reused.classifier is not None
    assert _same(alone.classifier.state_dict(), reused.classifier.state_dict())


def test_two_concurrent_trials_with_one_key_pretrain_once(
        data: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    original = pipeline.pretrain

    def slow(model: Any, *args: Any, **kwargs: Any) -> Any:
        started.append(threading.current_thread().name)
        threading.Event().wait(1.0)  # the other trial reaches its claim meanwhile
        return original(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "pretrain", slow)
    results: dict[str, pipeline.TrialResult] = {}

    def run(name: str) -> None:
        results[name] = _trial(_cfg(), data, tmp_path, f"s/{name}")[0]

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {"a", "b"}
    assert len(started) == 1, f"pretrained {len(started)} times"
    reused = sorted(r.metrics["encoder_reused"] for r in results.values())
    assert reused == [0, 1]
    a, b = (results[n].classifier for n in ("a", "b"))
    assert a is not None and b is not None
    assert _same(a.model.state_dict(), b.model.state_dict())


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta"])
def test_a_damaged_entry_is_detected_removed_and_rebuilt(
        data: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, damage: str) -> None:
    first, _ = _trial(_cfg(), data, tmp_path, "s/first")
    key = first.metrics["encoder_key"]
    folder = tmp_path / ec.ENCODERS / key
    blob = (folder / ec.ENCODER_FILE).read_bytes()
    if damage == "truncate":
        (folder / ec.ENCODER_FILE).write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        (folder / ec.ENCODER_FILE).write_bytes(blob[:-9] + bytes([blob[-9] ^ 1]) + blob[-8:])
    else:
        (folder / ec.META_FILE).unlink()
    epochs = _counting_pretrain(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=ec.__name__):
        again, _ = _trial(_cfg(), data, tmp_path, "s/again")
    assert len(epochs) == 2, "the damaged entry was not rebuilt by pretraining"
    assert again.metrics["encoder_reused"] == 0
    [line] = [r.getMessage() for r in caplog.records if r.name == ec.__name__]
    assert key[:12] in line and "removed" in line and "\n" not in line
    entry = ec.EncoderCache(str(tmp_path)).get(key)  # rebuilt whole
    assert entry is not None and entry.meta["source"] == "s/again"
    assert first.classifier is not None
    assert _same(entry.state["model"], first.classifier.model.state_dict())


def test_replay_follows_the_trials_own_probe_schedule() -> None:
    cached = [{"stage": "pretrain", "epoch": 2, "val_accuracy": 0.5},
              {"stage": "pretrain", "epoch": 4, "val_accuracy": 0.7}]
    tc = _cfg(**{"train.pretrain_epochs": 4, "train.probe_every": 1}).train
    out = ec.replay(cached, tc)
    assert [(r["epoch"], r["val_accuracy"]) for r in out] == [(1, 0.5), (2, 0.5), (3, 0.5),
                                                              (4, 0.7)]
    same = _cfg(**{"train.pretrain_epochs": 4, "train.probe_every": 2}).train
    assert ec.replay(cached, same) == cached


# ---- the searcher -------------------------------------------------------------------------------


def _space(trial: Any) -> None:
    trial.suggest_float(OPTUNA_PREFIX + "model.mask_ratio", 0.3, 0.9)
    trial.suggest_float(OPTUNA_PREFIX + "train.classifier_lr", 1e-4, 1e-2, log=True)


def _searcher(space: Any = _space, **kwargs: Any) -> FullFidelityOptunaSearch:
    return FullFidelityOptunaSearch(space=space, metric="val_accuracy", mode="max",
                                    sampler=optuna.samplers.TPESampler(seed=0), **kwargs)


def test_the_searcher_splits_params_by_the_encoder_cache() -> None:
    fixed, free = split_params({OPTUNA_PREFIX + "model.mask_ratio": 0.5,
                                OPTUNA_PREFIX + "loss.gamma": 0.1,
                                OPTUNA_PREFIX + "data.val_fraction": 0.2,
                                OPTUNA_PREFIX + "model.head": "mean",
                                OPTUNA_PREFIX + "train.label_smoothing": 0.1})
    assert {k.removeprefix(OPTUNA_PREFIX) for k in fixed} == {"model.mask_ratio", "loss.gamma",
                                                               "data.val_fraction"}
    assert {k.removeprefix(OPTUNA_PREFIX) for k in free} == {"model.head",
                                                              "train.label_smoothing"}


def test_the_searcher_enqueues_a_reuse_trial_with_the_parents_pretraining_params() -> None:
    s = _searcher(reuse_share=0.5)
    parent = s.suggest("a")["train_loop_config"]
    s.suggest("b")
    s.on_trial_complete("a", {"val_accuracy": 0.9, "final": 1})
    child = s.suggest("c")["train_loop_config"]
    assert child["model.mask_ratio"] == parent["model.mask_ratio"]
    assert child["train.classifier_lr"] != parent["train.classifier_lr"]  # sampled by TPE
    trials = s._ot_study.get_trials(deepcopy=False)
    assert trials[2].user_attrs == {REUSE_ATTR: trials[0].number}
    # the next one is an ordinary trial again
    nxt = s.suggest("d")["train_loop_config"]
    assert nxt["model.mask_ratio"] != parent["model.mask_ratio"]


@pytest.mark.parametrize("case", ["pruned", "share_zero", "not_top", "no_classifier_knobs",
                                  "share_spent"])
def test_the_searcher_enqueues_no_reuse_trial_when_it_should_not(case: str) -> None:
    def encoder_only(trial: Any) -> None:
        trial.suggest_float(OPTUNA_PREFIX + "model.mask_ratio", 0.3, 0.9)

    s = _searcher(encoder_only if case == "no_classifier_knobs" else _space,
                  reuse_share=0.0 if case == "share_zero" else 0.5, reuse_top=1)
    for t in ("a", "b"):
        s.suggest(t)
    if case == "not_top":
        s.on_trial_complete("a", {"val_accuracy": 0.9, "final": 1})
        s.suggest("a2")  # takes a's reuse trial
        s.on_trial_complete("b", {"val_accuracy": 0.1, "final": 1})  # ranks 2nd, top is 1
        expected_waiting = 0
    elif case == "share_spent":
        s.on_trial_complete("a", {"val_accuracy": 0.9, "final": 1})  # reuse 1 of 3: enqueued
        s.suggest("a2")  # takes it
        s.on_trial_complete("a2", {"val_accuracy": 0.95, "final": 1})  # 2 of 4: enqueued
        s.on_trial_complete("b", {"val_accuracy": 0.97, "final": 1})  # 3 of 4 > 0.5: not
        expected_waiting = 1
    else:
        s.on_trial_complete("a", {"val_accuracy": 0.9, **({} if case == "pruned"
                                                          else {"final": 1})})
        expected_waiting = 0
    waiting = [t for t in s._ot_study.get_trials(deepcopy=False)
               if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == expected_waiting


# ---- the search's switches ------------------------------------------------------------------------


def test_the_search_decides_the_cache_root_and_no_reuse_turns_it_off(tmp_path: Path,
                                                                    monkeypatch: Any) -> None:
    from cbdtune import search
    from cbdtune.settings import SearchSettings

    monkeypatch.chdir(tmp_path)
    p = search.parser()
    default = SearchSettings.from_args(p.parse_args(["--dataset", "gesture", "--storage", "ray"]))
    assert search.encoder_root(default) == str(tmp_path / "ray")  # entries in ray/encoders
    given = SearchSettings.from_args(p.parse_args(["--dataset", "gesture",
                                                   "--encoder-cache", "enc"]))
    assert search.encoder_root(given) == str(tmp_path / "enc")
    assert search.encoder_root(SearchSettings(datasets=("g",), encoder_cache="s3://b/c")) == "s3://b/c"
    off = SearchSettings.from_args(p.parse_args(["--dataset", "gesture", "--no-reuse",
                                                 "--encoder-cache", "enc"]))
    assert off.reuse is False and search.encoder_root(off) is None
    assert search.trial_settings(off, "x").encoder_cache is None
    assert search.trial_settings(given, "x").encoder_cache == str(tmp_path / "enc")
    assert "--no-reuse" in off.to_argv()


@pytest.mark.parametrize("share", ["1.5", "-0.1", "nan"])
def test_a_reuse_share_outside_0_1_is_one_line_exit_2(share: str, capsys: Any) -> None:
    from cbdtune import search

    code = search.cli(["--dataset", "gesture", "--space", "smoke", "--reuse-share", share])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "reuse_share (--reuse-share)" in err


def test_the_searcher_gets_the_reuse_share_unless_reuse_is_off() -> None:
    from cbdtune import search
    from cbdtune.space import load_space

    space = load_space("smoke")
    kwargs = {"sampler": "tpe", "seed": 0, "metric": "val_accuracy", "mode": "max",
              "max_concurrent": 1}
    assert search.make_searcher(space, reuse_share=0.25, **kwargs).searcher.reuse_share == 0.25
    assert search.make_searcher(space, **kwargs).searcher.reuse_share == 0.0


def test_mlflow_tags_name_the_encoder_and_the_run_that_pretrained_it() -> None:
    from cbdtune.callbacks import MLflowTrialCallback

    cb = MLflowTrialCallback("sqlite:///unused.db", "0", "parent", _cfg())
    cb._runs = {"abc12_00000": "run-of-the-source"}
    tags = cb._encoder_tags({"encoder_reused": 1, "encoder_key": "k" * 64,
                             "encoder_source_run": "gesture-smoke/abc12_00000"})
    assert tags == {"cbdtune.encoder_key": "k" * 64,
                    "cbdtune.encoder_source": "gesture-smoke/abc12_00000",
                    "cbdtune.encoder_source_run": "run-of-the-source"}
    assert cb._encoder_tags({"encoder_key": ""}) == {}  # no cache: nothing to say
