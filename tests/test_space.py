"""Search-space files: every shipped space validates; malformed ones are refused up front;
conditional (``when``) parameters are sampled define-by-run and ranked only where sampled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from cbdtune import results
from cbdtune.config import ConfigError
from cbdtune.space import OPTUNA_PREFIX, SearchSpace, load_space, shipped_spaces

REPO = Path(__file__).resolve().parent.parent
SPACES = shipped_spaces()


def test_every_search_space_yaml_ships() -> None:
    assert set(SPACES) >= {"default", "paper", "smoke"}


@pytest.mark.parametrize("name", SPACES)
def test_every_search_space_yaml_validates(name: str) -> None:
    space = load_space(name)
    assert len(space.sha256) == 64
    # what the search samples (define_by_run, every parameter whose `when` holds): searched keys
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    assert space.define_by_run(trial) is None
    sampled = {k.removeprefix(OPTUNA_PREFIX) for k in trial.params}
    assert sampled <= set(space.keys) and bool(sampled) == bool(space.params)


def test_space_repo_folder_is_a_link_to_the_shipped_spaces(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented layout (README, cluster/) and `--space search_spaces/smoke.yaml` still work.
    link = REPO / "search_spaces"
    assert link.is_symlink() and link.resolve() == (REPO / "cbdtune" / "search_spaces").resolve()
    assert sorted(p.stem for p in link.glob("*.yaml")) == SPACES
    monkeypatch.chdir(REPO)
    by_path = load_space("search_spaces/smoke.yaml")
    assert by_path.path == "search_spaces/smoke.yaml"
    assert by_path.sha256 == load_space("smoke").sha256


def test_space_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="--space nonexistent: file not found") as info:
        load_space("nonexistent")
    assert "default, " in str(info.value) and "smoke" in str(info.value)


def test_space_paper_is_fixed_and_smoke_searches_the_papers_knobs() -> None:
    assert load_space("paper").params == ()
    assert set(load_space("smoke").keys) >= {"model.mask_ratio", "model.bernstein_order",
                                             "loss.gamma"}
    default = load_space("default")
    assert {"model.use_cbd", "loss.freq_loss", "model.cim_activation"} <= set(default.keys)


def test_space_name_resolves_to_shipped_file() -> None:
    assert load_space("smoke").path.endswith("smoke.yaml")


@pytest.mark.parametrize(("text", "message"), [
    ("model.mask_ratoi: {type: float, low: 0.1, high: 0.5}", "unknown key"),
    ("model.mask_ratio: {type: float, low: 0.8, high: 0.2}", "low \\(0.8\\) must not exceed high"),
    ("model.mask_ratio: {type: float, low: 0.5, high: 1.0}",
     "model.mask_ratio: expected a float in \\(0, 1\\), but got 1.0"),
    ("model.bernstein_order: {type: int, low: 0, high: 4}", "must be >= 1, but got 0"),
    ("loss.w_time_rec: {type: float, low: -1.0, high: 1.0}", "must be a finite number >= 0"),
    ("model.mask_ratio: {type: float, low: 0.1, high: [", "invalid YAML"),
    ("model.mask_ratio: {type: normal, low: 0.1, high: 0.5}", "type must be one of"),
    ("model.tokenizer: {type: categorical, choices: [conv, lstm]}", "expected one of"),
    ("model.mask_ratio: {type: float, low: 0.1, hi: 0.5}", "unknown field 'hi'"),
    ("model.bernstein_order: {type: int, low: 1.5, high: 4}", "must be an integer"),
    ("model.tokenizer: {type: float, low: 0.1, high: 0.5}", "non-numeric field"),
    ("model.bernstein_order: {type: float, low: 1, high: 4}",
     "model.bernstein_order: an integer key needs type: int"),
])
def test_space_malformed_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_space(str(path))
    assert str(path) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


# ---- conditional spaces: `when` ------------------------------------------------------------------

_USE_CBD = "model.use_cbd: {type: categorical, choices: [true, false]}\n"
_GAMMA = "loss.gamma: {type: float, low: 0.1, high: 1.0, when: %s}\n"


@pytest.mark.parametrize(("text", "message"), [
    (_USE_CBD + _GAMMA % "{model.use_cdb: true}",
     "loss.gamma: when: unknown key 'model.use_cdb'; did you mean model.use_cbd"),
    (_GAMMA % "{model.use_cbd: true}" + _USE_CBD,
     "loss.gamma: when: model.use_cbd is searched later in the file; move it above loss.gamma"),
    (_GAMMA % "{loss.gamma: 0.5}", "loss.gamma: when: loss.gamma: a parameter cannot depend on"),
    ("model.use_cbd: {type: categorical, choices: [true]}\n" + _GAMMA % "{model.use_cbd: false}",
     "loss.gamma: when: model.use_cbd: False is never sampled; its choices are \\[True\\]"),
    (_USE_CBD + _GAMMA % "{model.use_cbd: 1}", "model.use_cbd: 1 is never sampled"),
    ("model.bernstein_order: {type: int, low: 1, high: 8}\n"
     + _GAMMA % "{model.bernstein_order: [2, 9]}",
     "model.bernstein_order: 9 is never sampled; it is outside its range \\[1, 8\\]"),
    ("model.bernstein_order: {type: int, low: 1, high: 8}\n"
     + _GAMMA % "{model.bernstein_order: 2.5}", "2.5 is never sampled; it takes integers"),
    (_GAMMA % "{model.use_cim: 'yes'}",
     "loss.gamma: when: model.use_cim: expected true or false, but got 'yes' \\(fixed at True"),
    (_GAMMA % "{train.classifier: finetune}",
     "when: train.classifier: expected one of .*, but got 'finetune'"),
    (_GAMMA % "[model.use_cbd]", "loss.gamma: when: expected a mapping of keys"),
    (_USE_CBD + _GAMMA % "{model.use_cbd: []}", "expected a value or a non-empty list"),
])
def test_space_when_malformed_is_refused_with_one_line(tmp_path: Path, text: str,
                                                       message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_space(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert len(str(info.value).splitlines()) == 1


def test_space_when_reads_earlier_and_fixed_keys(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("train.classifier: fine_tune\n" + _USE_CBD
                    + _GAMMA % "{model.use_cbd: true, train.classifier: [fine_tune, both]}")
    [_, gamma] = load_space(str(path)).params
    assert gamma.when == (("model.use_cbd", (True,)), ("train.classifier", ("fine_tune", "both")))


_CBD_KNOBS = {"model.bernstein_order", "model.ser_norm", "loss.gamma", "loss.w_freq_rec",
              "loss.w_time_dual", "model.cim_activation"}
_AUGMENT = {"train.augment_jitter", "train.augment_scale", "train.augment_crop"}
_HEAD = {"train.classifier_lr", "model.head", "model.head_dropout", "train.label_smoothing"}


def _sampled(space: SearchSpace, fixed: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """One define-by-run trial on a real study, ``fixed`` enqueued; its params, prefix removed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.enqueue_trial({OPTUNA_PREFIX + k: v for k, v in fixed.items()})
    trial = study.ask()
    assert space.define_by_run(trial) is None
    assert all(name.startswith(OPTUNA_PREFIX) for name in trial.params)
    return {name.removeprefix(OPTUNA_PREFIX): v for name, v in trial.params.items()}


def test_define_by_run_without_cbd_skips_the_cbd_knobs() -> None:
    space = load_space("trained_heads")
    off = _sampled(space, {"model.use_cbd": False, "train.classifier": "fine_tune"})
    assert off["model.use_cbd"] is False and not _CBD_KNOBS & set(off)
    assert {"model.mask_ratio", "loss.freq_loss"} | _AUGMENT <= set(off)
    on = _sampled(space, {"model.use_cbd": True})
    assert _CBD_KNOBS <= set(on)


def test_define_by_run_linear_probe_skips_augmentation() -> None:
    space = load_space("trained_heads")
    probe = _sampled(space, {"train.classifier": "linear_probe", "model.use_cbd": True})
    assert not _AUGMENT & set(probe) and _CBD_KNOBS <= set(probe)
    assert _AUGMENT <= set(_sampled(space, {"train.classifier": "fine_tune"}))


def test_default_space_is_the_ridge_readout_and_trained_heads_have_their_own() -> None:
    """One probe and one classifier kind per space: ASHA compares like with like."""
    default, heads = load_space("default"), load_space("trained_heads")
    assert (default.base.train.classifier, default.base.train.probe) == ("ridge", "ridge")
    assert "model.readout_segments" in _sampled(default, {"model.use_cbd": True})
    assert not (_HEAD | _AUGMENT | {"train.classifier"}) & set(default.keys)
    assert heads.base.train.probe == "linear" and _HEAD | _AUGMENT <= set(heads.keys)
    assert "model.readout_segments" not in heads.keys


def test_define_by_run_condition_on_a_fixed_key_follows_the_base(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("model.use_ser: false\n" + _USE_CBD
                    + "model.bernstein_order: {type: int, low: 1, high: 8, "
                      "when: {model.use_cbd: true, model.use_ser: true}}\n")
    assert _sampled(load_space(str(path)), {"model.use_cbd": True}) == {"model.use_cbd": True}


def test_define_by_run_every_sampled_config_is_valid() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("trained_heads")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: set[frozenset[str]] = set()
    for _ in range(30):
        trial = study.ask()
        space.define_by_run(trial)
        params = {k.removeprefix(OPTUNA_PREFIX): v for k, v in trial.params.items()}
        assert space.active({**space.base.to_dict(), **params}) == params
        cfg = space.base.replace(params, where="sampled trial")
        assert cfg.model.use_cbd == params["model.use_cbd"]
        seen.add(frozenset(params))
        study.tell(trial, 0.5)
    assert len(seen) == 4, "30 random trials should cover all four branches"


def test_define_by_run_trial_config_is_nested_for_the_driver() -> None:
    """Ray's OptunaSearch unflattens the names: the trial config the driver reads."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import SearchGenerator

    from cbdtune import search, tuning
    from cbdtune.config import ExperimentConfig
    from cbdtune.session import TrialSettings
    from cbdtune.worker import train_driver_fn

    space = load_space("default")
    args = search.parser().parse_args(["--dataset", "gesture", "--workers-per-trial", "2"])
    settings = tuning.param_space(search.SearchSettings.from_args(args), "/nonexistent/storage")
    searcher = tuning.make_searcher(space, sampler="tpe", seed=0, metric="val_accuracy",
                                    mode="max", max_concurrent=4)
    generator = SearchGenerator(searcher)
    generator.add_configurations([Experiment("t", run=train_driver_fn, config=settings,
                                             num_samples=3)])
    baseline = {k.removeprefix(OPTUNA_PREFIX): v
                for k, v in tuning.baseline_point(space).items()}
    for i in range(3):
        config = generator.next_trial().config
        assert config["workers"] == 2 and config["storage_path"] == "/nonexistent/storage"
        # the worker reads the run settings back as the search set them: no default of its own
        # (max_failures was 2 in the CLI and 0 in the worker)
        run = TrialSettings.from_config(config)
        assert run.max_failures == search.SearchSettings.defaults()["max_failures"] == 2
        assert run.workers == 2 and run.cpus_per_worker == 1.0
        loop = config["train_loop_config"]
        assert loop and set(loop) <= set(space.keys)
        if i == 0:
            assert loop == baseline
        # the two lines train_driver_fn starts with
        cfg = ExperimentConfig.from_dict(space.base.to_dict()).replace(loop, where="trial")
        assert cfg.model.use_cbd == loop["model.use_cbd"]


def test_baseline_point_has_exactly_the_keys_whose_conditions_hold(tmp_path: Path) -> None:
    from cbdtune import tuning

    default = load_space("default")
    point = tuning.baseline_point(default)
    # paper: CBD on, so every key is active
    assert set(point) == {OPTUNA_PREFIX + k for k in default.keys}
    assert point[OPTUNA_PREFIX + "model.use_cbd"] is True
    path = tmp_path / "s.yaml"
    # paper's fine_tune is not a choice: the baseline takes the smoke preset's linear_probe
    path.write_text("preset: smoke\ntrain.classifier: {type: categorical, choices: "
                    "[linear_probe, both]}\n" + _USE_CBD
                    + "train.augment_jitter: {type: float, low: 0.0, high: 0.1, "
                      "when: {train.classifier: both}}\n" + _GAMMA % "{model.use_cbd: true}")
    space = load_space(str(path))
    point = tuning.baseline_point(space)
    assert point == {OPTUNA_PREFIX + "train.classifier": "linear_probe",
                     OPTUNA_PREFIX + "model.use_cbd": True, OPTUNA_PREFIX + "loss.gamma": 0.5}
    # enqueued, it fixes every parameter trial 0 samples: Optuna draws nothing else there
    fixed = {k.removeprefix(OPTUNA_PREFIX): v for k, v in point.items()}
    assert _sampled(space, fixed) == fixed


# ---- importance with conditional parameters -----------------------------------------------------


def _conditional_frame(n: int, *, rare: int) -> pd.DataFrame:
    """``n`` completed trials; gamma sampled when use_cbd (even i), w_freq_rec in ``rare`` only."""
    rows = []
    for i in range(n):
        params: dict[str, Any] = {"model.mask_ratio": 0.3 + 0.05 * i, "model.use_cbd": i % 2 == 0}
        if i % 2 == 0:
            params["loss.gamma"] = 0.1 + 0.07 * i
        if i < 2 * rare and i % 2 == 0:
            params["loss.w_freq_rec"] = 0.5 + 0.1 * i
        value = 0.6 + 0.2 * (i % 2 == 0) + 0.01 * i
        rows.append(results.trial_row(f"t{i:02d}", params, {"val_accuracy": value},
                                      "completed", ""))
    rows.append(results.trial_row("zz", {"model.mask_ratio": 0.5, "model.use_cbd": True,
                                         "loss.gamma": 0.2, "loss.w_freq_rec": 1.0,
                                         "loss.w_time_dual": 1.0}, {}, "stopped", "ASHA"))
    return results.trials_frame(rows)


def _importance_space(tmp_path: Path) -> SearchSpace:
    path = tmp_path / "s.yaml"
    path.write_text("model.mask_ratio: {type: float, low: 0.3, high: 0.9}\n" + _USE_CBD
                    + _GAMMA % "{model.use_cbd: true}"
                    + "loss.w_freq_rec: {type: float, low: 0.25, high: 2.0, "
                      "when: {model.use_cbd: true}}\n"
                    + "loss.w_time_dual: {type: float, low: 0.25, high: 2.0, "
                      "when: {model.use_cbd: false}}\n")
    return load_space(str(path))


def test_importances_with_conditional_nan_rank_only_params_in_3_completed_trials(
        tmp_path: Path) -> None:
    df = _conditional_frame(10, rare=2)
    assert df["param.loss.gamma"].isna().sum() == 5
    imp = results.importances(df, _importance_space(tmp_path), "val_accuracy", "max")
    assert isinstance(imp, dict), imp
    # w_freq_rec: 2 completed trials (and one stopped); w_time_dual: never sampled complete
    assert set(imp) == {"model.mask_ratio", "model.use_cbd", "loss.gamma"}
    assert all(v >= 0 for v in imp.values())
    # the switch explains the 0.2 jump, and is ranked on every trial, not only one branch
    assert max(imp, key=imp.__getitem__) == "model.use_cbd"


def test_importances_rank_a_conditional_param_from_3_trials(tmp_path: Path) -> None:
    imp = results.importances(_conditional_frame(10, rare=3), _importance_space(tmp_path),
                              "val_accuracy", "max")
    assert isinstance(imp, dict) and "loss.w_freq_rec" in imp


@pytest.mark.ray
def test_search_conditional_space_skips_params_whose_condition_fails(tmp_path: Path) -> None:
    """2-trial search: the baseline probes (paper's fine_tune is not a choice), so it has no
    augmentation; trials.parquet holds NaN there."""
    import ray

    from cbdtune import search
    from cbdtune.session import TRAIN_POLL_ENV

    path = tmp_path / "cond.yaml"
    path.write_text("preset: smoke\ntrain.pretrain_epochs: 2\ntrain.classifier_epochs: 3\n"
                    "data.cv_folds: 2\n"
                    "train.classifier: {type: categorical, choices: [linear_probe, both]}\n"
                    "train.augment_jitter: {type: float, low: 0.0, high: 0.1, "
                    "when: {train.classifier: both}}\n"
                    "model.mask_ratio: {type: float, low: 0.4, high: 0.9}\n")
    # a private Ray: never join another one running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": TRAIN_POLL_ENV})
    try:
        code = search.cli(["--dataset", "gesture", "--space", str(path), "--num-samples", "2",
                           "--refit-top", "0", "--scheduler", "none",
                           "--storage", str(tmp_path / "ray"),
                           "--results-dir", str(tmp_path / "results"),
                           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    finally:
        ray.shutdown()
    assert code == 0
    [out] = list((tmp_path / "results").glob("*/*/trials.parquet"))
    df = pd.read_parquet(out)
    assert len(df) == 2 and df["param.model.mask_ratio"].notna().all()
    probe = df[df["param.train.classifier"] == "linear_probe"]
    assert len(probe) >= 1 and probe["param.train.augment_jitter"].isna().all()
    both = df[df["param.train.classifier"] == "both"]
    assert both["param.train.augment_jitter"].notna().all()


def test_grid_lists_every_point_of_a_categorical_space_and_refuses_ranges() -> None:
    grid = load_space("k_ablation").grid()
    assert grid == {OPTUNA_PREFIX + "model.bernstein_order": [1, 2, 4, 8, 12, 16],
                    OPTUNA_PREFIX + "model.ser_norm": ["softmax", "tempered"]}
    with pytest.raises(ConfigError, match="model.mask_ratio: --sampler grid needs"):
        load_space("smoke").grid()  # a float range has no grid
    with pytest.raises(ConfigError, match="--sampler grid needs"):
        load_space("default").grid()


def test_grid_sampler_visits_every_point_once() -> None:
    import optuna

    space = load_space("k_ablation")
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(space.grid(), seed=0))
    study.optimize(lambda trial: space.define_by_run(trial) or 0.5, n_trials=20)
    points = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(points) == len(set(points)) == 12  # the sampler stops the study when done


def test_default_space_searches_the_token_rate_around_the_preset() -> None:
    """model.min_tokens is searched on every trial, and its choices hold the preset's value."""
    space = load_space("default")
    assert "model.min_tokens" in _sampled(space, {"model.use_cbd": False})
    choices = next(p.choices for p in space.params if p.key == "model.min_tokens")
    assert space.base.model.min_tokens in choices and 1 in choices and len(choices) >= 3
