"""The typed search API (SearchSettings, TrialSettings) and the pipeline's report format
(cbdtune.reports, the worker's Reporter); none of it starts Ray."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from cbdtune import reports, search
from cbdtune.config import ConfigError, DataConfig, preset
from cbdtune.settings import SearchSettings


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seed": -1}, "seed (--seed): must be >= 0, but got -1"),
    ({"cpus_per_worker": math.nan}, "cpus_per_worker (--cpus-per-worker): must be a finite"),
    ({"cpus_per_worker": 0}, "cpus_per_worker (--cpus-per-worker): must be a finite number > 0"),
    ({"gpus_per_worker": math.inf}, "gpus_per_worker (--gpus-per-worker): must be a finite"),
    ({"gpus_per_worker": 1.5}, "fractions must be < 1"),
    ({"num_samples": 0}, "num_samples (--num-samples): must be >= 1, but got 0"),
    ({"workers_per_trial": 0}, "workers_per_trial (--workers-per-trial): must be >= 1"),
    ({"max_failures": -1}, "max_failures (--max-failures): must be >= 0"),
    ({"refit_seeds": 0}, "refit_seeds (--refit-seeds): must be >= 1"),
    ({"cv_folds": 1}, "cv_folds (--cv-folds): must be 0 (one validation split) or >= 2"),
    ({"metrics": ("test_accuracy",)}, "never selects on a test metric"),
    ({"metrics": ("val_acc",)}, "not a metric the pipeline reports for selection"),
    ({"sampler": "anneal"}, "sampler (--sampler): expected one of"),
    ({"modes": ("up",)}, "modes (--mode): expected one of"),
    ({"metrics": ("time_total_s",)}, "time_total_s only as the second"),
    ({"metrics": ("val_accuracy", "val_loss", "val_f1")}, "expected one metric or two"),
    ({"metrics": ("val_accuracy", "")}, "expected one metric or two"),
    ({"metrics": ()}, "expected one metric or two"),
    ({"metrics": ("val_accuracy", "test_f1")}, "never selects on a test metric"),
    ({"metrics": ("val_loss", "val_loss")}, "the two objectives are the same metric"),
    ({"metrics": ("val_accuracy", "epochs")}, "not a metric the pipeline reports for selection or a"),
    ({"metrics": ("val_accuracy", "time_total_s"), "modes": ("max",)}, "give one per metric"),
    ({"modes": ("max", "min")}, "2 direction(s) for 1 metric(s)"),
    ({"metrics": ("val_accuracy", "time_total_s"), "sampler": "cmaes"}, "CMA-ES is single-objective"),
    ({"num_samples": "16"}, "num_samples (--num-samples): expected an integer"),
    ({"time_budget": "2 hours"}, "expected a positive duration"),
    ({"datasets": (" ",)}, "datasets (--dataset): must not be empty"),
    ({"metrics": "val_accuracy,val_loss"}, "metrics (--metric) 'val_accuracy,val_loss': one name per item"),
])
def test_settings_reject_each_bad_value_with_one_line(kwargs: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(ConfigError) as err:
        SearchSettings(**{"datasets": ("gesture",), **kwargs})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_settings_two_objectives_each_with_its_own_direction() -> None:
    two = SearchSettings(datasets=("gesture",), metrics=(" val_accuracy ", "time_total_s"))
    assert (two.metrics, two.modes) == (("val_accuracy", "time_total_s"), ("max", "min"))
    assert two.to_argv() == ["--dataset", "gesture", "--metric", "val_accuracy,time_total_s"]
    given = SearchSettings(datasets=("gesture",), metrics=("val_f1", "val_loss"),
                           modes=("max", "max"))
    assert given.modes == ("max", "max") and given.to_argv()[-2:] == ["--mode", "max,max"]
    assert SearchSettings(datasets=("gesture",), metrics=("val_loss",)).modes == ("min",)
    cli = search.parser().parse_args(["--dataset", "gesture", "--metric", "val_f1, val_loss",
                                      "--mode", "max,max"])
    assert SearchSettings.from_args(cli) == given  # only the command line splits commas


def test_settings_resolve_mode_and_budget() -> None:
    assert SearchSettings(datasets=("gesture",)).modes == ("max",)
    assert SearchSettings(datasets=("gesture",), metrics=("val_loss",)).modes == ("min",)
    assert SearchSettings(datasets=("gesture",), time_budget="90m").time_budget_s == 5400
    assert SearchSettings(datasets=("gesture",), cpus_per_worker=2).cpus_per_worker == 2.0
    with pytest.raises(AttributeError):  # frozen
        SearchSettings(datasets=("gesture",)).seed = 3  # type: ignore[misc]


def test_cli_defaults_are_the_settings_defaults_and_round_trip() -> None:
    p = search.parser()
    assert SearchSettings.from_args(p.parse_args(["--dataset", "gesture"])) == SearchSettings(
        datasets=("gesture",))
    settings = SearchSettings(datasets=("gesture",), space="smoke", num_samples=4, seed=3,
                              cpus_per_worker=0.5, baseline=False, resume=True,
                              metrics=("val_loss",), time_budget="2h", address="auto")
    argv = settings.to_argv()
    assert "--no-baseline" in argv and "--mode" not in argv  # min is val_loss's own direction
    assert SearchSettings.from_args(p.parse_args(argv)) == settings


def test_trial_settings_come_from_the_search_settings_only() -> None:
    from cbdtune.session import TrialSettings

    settings = SearchSettings(datasets=("gesture",), workers_per_trial=2, gpus_per_worker=0.25)
    space = search.param_space(settings, "/s/train")
    assert space["train_loop_config"] == {}
    run = TrialSettings.from_config({**space, "train_loop_config": {"model.mask_ratio": 0.5}})
    assert run == TrialSettings(workers=2, cpus_per_worker=1.0, gpus_per_worker=0.25,
                                max_failures=2, storage_path="/s/train",
                                encoder_cache=str(Path("~/ray_results").expanduser()))
    with pytest.raises(ConfigError, match="trial config: no max_failures"):
        TrialSettings.from_config({k: v for k, v in space.items() if k != "max_failures"})


# ---- the report format and the worker's reporter ----------------------------------------------


class _Sent:
    """Stands in for ``ray.train.report``: what each report sent, and its checkpoint's state."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.state: dict[str, Any] | None = None

    def __call__(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        import torch

        from cbdtune.session import CHECKPOINT_FILE

        self.metrics.append(metrics)
        if checkpoint is not None:  # read it while its temporary folder exists
            self.state = torch.load(Path(checkpoint.path) / CHECKPOINT_FILE, weights_only=True)


def test_reporter_restored_from_a_checkpoint_continues_the_iteration() -> None:
    """A trial resumed from its checkpoint reports training_iteration after the checkpoint's,
    so ASHA does not judge it again at its first rung (it restarted at 1 before)."""
    from cbdtune.session import Reporter

    sent = _Sent()
    first = Reporter([], {"worker_node": "a"}, rank=0, send=sent)
    for epoch in (2, 4):
        first({reports.STAGE: reports.PRETRAIN, reports.EPOCH: epoch, "val_accuracy": 0.5},
              {"stage": "pretrain", "epoch": epoch})
    first({reports.STAGE: "linear_probe", reports.EPOCH: 1, "val_accuracy": 0.6}, None)
    assert [m[reports.ITERATION] for m in sent.metrics] == [1, 2, 3]
    assert sent.state is not None and len(sent.state["history"]) == 2  # the last checkpoint's
    # the retry: the pipeline repeats the reports after the checkpoint, counted on from it
    again = _Sent()
    resumed = Reporter(sent.state["history"], {"worker_node": "b"}, rank=0, send=again)
    resumed({reports.STAGE: "linear_probe", reports.EPOCH: 1, "val_accuracy": 0.6}, None)
    assert again.metrics[0][reports.ITERATION] == 3
    assert again.metrics[0]["worker_node"] == "b"
    other_rank = Reporter([], {}, rank=1, send=again)
    other_rank({reports.STAGE: reports.PRETRAIN}, {"model": {}})  # rank 1 never checkpoints
    assert again.state is None


def test_reporter_checkpoints_at_most_every_interval(monkeypatch) -> None:
    """Fast reports carry no checkpoint until the interval has passed since the last one (each
    forced one of Tune's experiment snapshots); every report is still sent and counted."""
    from cbdtune import session

    clock = iter([0.0, 0.0, 10.0, 29.0, 31.0, 31.0])
    monkeypatch.setattr(session.time, "monotonic", lambda: next(clock))
    sent, checkpointed = _Sent(), []

    def send(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        checkpointed.append(checkpoint is not None)
        sent(metrics, checkpoint)

    report = session.Reporter([], {}, rank=0, send=send, checkpoint_every_s=30.0)
    for epoch in (2, 4, 6, 8):
        report({reports.STAGE: reports.PRETRAIN, reports.EPOCH: epoch}, {"epoch": epoch})
    assert checkpointed == [True, False, False, True]  # at 0 s, then 31 s (10 and 29 too soon)
    assert [m[reports.ITERATION] for m in sent.metrics] == [1, 2, 3, 4]
    assert sent.state is not None and len(sent.state["history"]) == 4


@pytest.mark.parametrize(("classifier", "budget"), [("both", 2 + 2 * 3 + 1),
                                                    ("ridge", 2 + 2 + 1)])
def test_report_budget_is_the_count_a_trial_reports(gesture_small, classifier: str,
                                                   budget: int) -> None:
    """reports.report_budget (ASHA's max_t) is exactly what run_trial reports, read by name:
    2 probes, per stage one report per epoch (the ridge path: one) and its close, the final."""
    from cbdtune.pipeline import run_trial

    cfg = preset("smoke").replace({"train.pretrain_epochs": 3, "train.probe_every": 2,
                                   "train.probe_epochs": 1, "train.classifier": classifier,
                                   "train.classifier_epochs": 2, "data.cv_folds": 2,
                                   "train.num_threads": 1})
    history: list[dict[str, Any]] = []
    run_trial(cfg, gesture_small, lambda m, _p: history.append(m))
    assert len(history) == reports.report_budget(cfg) == budget
    assert [h[reports.STAGE] for h in history if reports.is_stage_done(h)] == list(
        reports.stages(cfg.train))
    assert reports.is_final(history[-1]) and not reports.is_diverged(history[-1])
    assert not any(reports.is_final(h) for h in history[:-1])
    assert history[-1][reports.SELECTED_STAGE] in reports.STAGES


@pytest.fixture(scope="module")
def gesture_small():
    from cbdtune.data import load_dataset

    return load_dataset(DataConfig(dataset="gesture"), seed=0)


def test_connect_starts_a_ray_of_its_own_unless_an_address_is_given(monkeypatch) -> None:
    """It joined any Ray running on the machine (address="auto") before falling back."""
    from cbdtune import session

    calls: list[str] = []
    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "init", lambda **kw: calls.append(kw["address"]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert session.connect() == "local"
    assert session.connect("auto") == "cluster"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what `ray job submit` sets
    assert session.connect() == "cluster"
    assert calls == ["local", "auto", "http://127.0.0.1:8265"]


def test_connect_tells_a_local_rays_workers_where_its_state_api_is(monkeypatch) -> None:
    """Ray Train's placement-group cleaner looks the state API up from its worker; with two Rays
    on one machine that fails unless RAY_API_SERVER_ADDRESS names this one's dashboard."""
    from cbdtune import session

    calls: list[dict] = []
    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    session.connect()
    local = calls[-1]
    port = local["dashboard_port"]
    assert local["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    session.connect("auto")  # a cluster's own dashboard: nothing chosen here
    assert "dashboard_port" not in calls[-1]
    assert "RAY_API_SERVER_ADDRESS" not in (calls[-1]["runtime_env"] or {}).get("env_vars", {})
