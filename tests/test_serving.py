"""``cbdtune.serving``: the model directory, the ensemble, input checks and MLflow logging."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cbdtune.config import DataConfig, ExperimentConfig, preset
from cbdtune.data import Dataset, load_dataset
from cbdtune.data._lengths import pad_series, resample_series
from cbdtune.model import CBDClassifier, build_head, build_model
from cbdtune.serving import (
    CONTRACT_FILE,
    CBDEnsemble,
    InputError,
    ModelError,
    log_model,
    save_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_member(ds: Dataset, seed: int, *, steps: int = 4,
                policy: str = "pad") -> tuple[ExperimentConfig, CBDClassifier]:
    """The smoke preset's classifier for ``ds``, trained a few steps so outputs vary by input."""
    cfg = preset("smoke").replace({
        "model.in_channels": ds.n_channels, "model.seq_len": ds.seq_len,
        "model.num_classes": ds.n_classes, "train.seed": seed, "data.length_policy": policy})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    clf = CBDClassifier(model, build_head(cfg.model, model.num_tokens))
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    x, y = torch.from_numpy(ds.train.x), torch.from_numpy(ds.train.y)
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(x)
        loss = torch.nn.functional.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, clf.eval()


def softmax(clf: CBDClassifier, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return clf(torch.from_numpy(x)).float().softmax(dim=-1).double().numpy()


@pytest.fixture(scope="module")
def gesture(shared_data_dir: Path) -> Dataset:
    return load_dataset(DataConfig(dataset="gesture", data_dir=str(shared_data_dir)), seed=0)


@pytest.fixture(scope="module")
def members(gesture: Dataset) -> list[tuple[ExperimentConfig, CBDClassifier]]:
    return [tiny_member(gesture, seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def x_test(gesture: Dataset) -> np.ndarray:
    return gesture.test.x[::8]  # 40 series, 5 per class


def save(path: Path, gesture: Dataset, members: list[tuple[ExperimentConfig, CBDClassifier]],
         **kw: Any) -> Path:
    return save_model(path, [(cfg, clf.state_dict(), {"source": f"seed{cfg.train.seed}"})
                             for cfg, clf in members],
                      class_names=gesture.class_names, dataset=gesture.name, **kw)


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory: pytest.TempPathFactory, gesture: Dataset,
               members: list[tuple[ExperimentConfig, CBDClassifier]]) -> Path:
    return save(tmp_path_factory.mktemp("single") / "model", gesture, members[:1])


@pytest.fixture(scope="module")
def single(single_dir: Path) -> CBDEnsemble:
    return CBDEnsemble.load(single_dir)


# ---- the directory format -----------------------------------------------------------------------


def test_save_load_round_trip_identical_probabilities(single: CBDEnsemble, members: list,
                                                      x_test: np.ndarray) -> None:
    expected = softmax(members[0][1], x_test)
    got = single.predict_proba(x_test)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert got.shape == (40, 8)
    assert len(set(got.argmax(axis=1))) > 1, "the trained member should not predict one class"


def test_ensemble_averages_member_softmaxes(tmp_path: Path, gesture: Dataset, members: list,
                                            x_test: np.ndarray) -> None:
    ensemble = CBDEnsemble.load(save(tmp_path / "pair", gesture, members))
    p0, p1 = (softmax(clf, x_test) for _, clf in members)
    got = ensemble.predict_proba(x_test)
    np.testing.assert_allclose(got, (p0 + p1) / 2, rtol=0, atol=1e-7)
    assert np.abs(p0 - p1).max() > 1e-3, "members must differ for the mean to be tested"
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    assert ensemble.predict(x_test) == [gesture.class_names[k] for k in got.argmax(axis=1)]


def test_contract_records_shape_policy_classes_and_members(tmp_path: Path, gesture: Dataset,
                                                           members: list) -> None:
    path = save(tmp_path / "pair", gesture, members)
    contract = json.loads((path / CONTRACT_FILE).read_text())
    assert contract["dataset"] == "UWaveGestureLibrary"
    assert (contract["in_channels"], contract["seq_len"]) == (3, 315)
    assert contract["length_policy"] == "pad" and "raw series" in contract["normalisation"]
    assert contract["class_names"] == gesture.class_names
    assert contract["cbdtune_version"]
    assert [m["file"] for m in contract["members"]] == ["member_0.pt", "member_1.pt"]
    for entry, (cfg, _) in zip(contract["members"], members, strict=True):
        assert ExperimentConfig.from_dict(entry["config"]) == cfg
        assert entry["seed"] == cfg.train.seed
        assert entry["metadata"] == {"source": f"seed{cfg.train.seed}"}
    assert sorted(p.name for p in path.iterdir()) == [CONTRACT_FILE, "member_0.pt", "member_1.pt"]


def test_load_refuses_a_member_file_holding_python_objects(tmp_path: Path, gesture: Dataset,
                                                            members: list) -> None:
    path = save(tmp_path / "m", gesture, members[:1])
    # weights_only=True refuses to unpickle anything but tensors and plain containers (the
    # real weights stay in, so that the file has the size its config implies)
    state = torch.load(path / "member_0.pt", weights_only=True)
    torch.save({**state, "weights": Path("not a tensor")}, path / "member_0.pt")
    with pytest.raises(ModelError, match=r"member_0\.pt does not load as a tensor dict"):
        CBDEnsemble.load(path)


def test_load_refuses_an_unusable_device(single_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"^device 'bogus' cannot be used here"):
        CBDEnsemble.load(single_dir, device="bogus")


def test_save_model_failure_leaves_no_directory(tmp_path: Path, gesture: Dataset,
                                                members: list) -> None:
    cfg, clf = members[0]
    state = dict(clf.state_dict())
    state.pop(next(k for k in state if not k.endswith("temperature")))  # a required key
    with pytest.raises(ModelError, match="member 1: the weights do not fit"):
        save_model(tmp_path / "m", [(cfg, clf.state_dict(), {}), (cfg, state, {})],
                   class_names=gesture.class_names, dataset=gesture.name)
    assert list(tmp_path.iterdir()) == [], "a failed save must leave nothing behind"


def test_save_model_refuses_existing_path_unless_overwrite(tmp_path: Path, gesture: Dataset,
                                                           members: list) -> None:
    path = save(tmp_path / "m", gesture, members[:1])
    with pytest.raises(ModelError, match="already exists"):
        save(path, gesture, members)
    save(path, gesture, members, overwrite=True)
    assert len(CBDEnsemble.load(path).members) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_save_model_rejects_class_names_of_another_length(tmp_path: Path, members: list) -> None:
    cfg, clf = members[0]
    with pytest.raises(ModelError, match="3 class names"):
        save_model(tmp_path / "m", [(cfg, clf.state_dict(), {})], class_names=["a", "b", "c"],
                   dataset="x")


# ---- input checks -------------------------------------------------------------------------------


def test_check_input_rejects_wrong_channel_count(single: CBDEnsemble) -> None:
    with pytest.raises(InputError, match=r"^input: 2 channels, but the model takes 3"):
        single.check_input(np.zeros((4, 2, 315), dtype=np.float32))


def test_check_input_rejects_nan_with_count_and_position(single: CBDEnsemble,
                                                          x_test: np.ndarray) -> None:
    x = x_test[:5].copy()
    x[1, 2, 7] = np.nan
    x[1, 0, 100] = np.inf
    x[4, 1, 0] = np.nan
    with pytest.raises(InputError) as info:
        single.check_input(x)
    msg = str(info.value)
    assert msg.startswith("series 1: channel 0, step 100 (0-based) is NaN or infinite")
    assert "(the first of 3 such values, in 2 series)" in msg and "\n" not in msg


def test_check_input_rejects_non_3d_and_empty(single: CBDEnsemble) -> None:
    with pytest.raises(InputError, match=r"shape \[3, 315\].*x\[None\]"):
        single.check_input(np.zeros((3, 315)))
    with pytest.raises(InputError, match="no series"):
        single.check_input(np.zeros((0, 3, 315)))
    with pytest.raises(InputError, match="not an array of numbers"):
        single.check_input({"a": 1})


def test_check_input_pad_cuts_longer_and_pads_shorter(single: CBDEnsemble,
                                                      x_test: np.ndarray) -> None:
    long = np.concatenate([x_test[:2], np.ones((2, 3, 85))], axis=2)  # 400 steps
    np.testing.assert_array_equal(single.check_input(long), x_test[:2])  # the first 315 kept
    short = x_test[:3, :, :200]
    fitted = single.check_input(short)
    np.testing.assert_array_equal(fitted[1], pad_series(short[1].astype(np.float64), 315))
    assert (fitted[:, :, 200:] == short[:, :, -1:]).all()  # the last value, repeated
    ragged = [x_test[0], x_test[1, :, :200]]  # series of different lengths
    np.testing.assert_array_equal(single.check_input(ragged)[1], fitted[1])


def test_check_input_resample_fits_any_length_of_two_or_more(tmp_path: Path, gesture: Dataset,
                                                             x_test: np.ndarray) -> None:
    cfg, clf = tiny_member(gesture, 0, steps=0, policy="resample")
    path = save_model(tmp_path / "m", [(cfg, clf.state_dict(), {})],
                      class_names=gesture.class_names, dataset=gesture.name)
    ensemble = CBDEnsemble.load(path)
    long = np.repeat(x_test[:2], 2, axis=2)  # 630 steps
    fitted = ensemble.check_input(long)
    np.testing.assert_allclose(fitted[0], resample_series(long[0].astype(np.float64), 315),
                               rtol=1e-6)
    assert ensemble.check_input(x_test[:2, :, :2]).shape == (2, 3, 315)
    with pytest.raises(InputError, match="1 time step"):
        ensemble.check_input(x_test[:2, :, :1])


# ---- MLflow -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, single_dir: Path,
           x_test: np.ndarray) -> dict[str, Any]:
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serving", artifact_location=str(tmp / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id, "FINISHED")
    version = log_model(uri, run_id, single_dir, registered_name="cbdtune-test",
                        input_example=x_test[:2])
    return {"uri": uri, "run_id": run_id, "version": version, "client": client,
            "artifacts": tmp / "artifacts"}


def test_log_model_registers_a_version_and_leaves_global_state(logged: dict[str, Any]) -> None:
    import mlflow

    client = logged["client"]
    assert logged["version"] == "1"
    [mv] = client.search_model_versions("name='cbdtune-test'")
    assert mv.run_id == logged["run_id"]
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED", "logging a model must not reopen the run"
    [output] = run.outputs.model_outputs  # the run lists the logged model ...
    assert mv.source == f"models:/{output.model_id}"  # ... that the version was made from
    model = client.get_logged_model(output.model_id)
    assert (model.status, model.experiment_id) == ("READY", run.info.experiment_id)
    assert mlflow.get_tracking_uri() != logged["uri"], "the global tracking URI was left changed"


def test_log_model_writes_no_pickle_and_a_tensor_signature(logged: dict[str, Any]) -> None:
    import yaml

    files = {p.name: p for p in logged["artifacts"].rglob("*")}  # everything log_model wrote
    assert not any(name.endswith(".pkl") for name in files), sorted(files)
    assert {"MLmodel", "_pyfunc_model.py", CONTRACT_FILE, "member_0.pt"} <= set(files)
    mlmodel = yaml.safe_load(files["MLmodel"].read_text())
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("_pyfunc_model.py")
    [tensor] = json.loads(mlmodel["signature"]["inputs"])
    assert tensor["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3, -1]}  # any length
    outputs = [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])]
    assert outputs == ["label"] + [f"prob_{c}.0" for c in range(1, 9)]
    # the MLflow model folder loads directly too (what predict does after a download)
    ensemble = CBDEnsemble.load(files["MLmodel"].parent)
    assert ensemble.predict_proba(np.zeros((1, 3, 315))).shape == (1, 8)


def test_pyfunc_load_model_predicts_the_ensemble_labels(logged: dict[str, Any],
                                                        single: CBDEnsemble, x_test: np.ndarray,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])  # what a user's shell would set
    model = mlflow.pyfunc.load_model("models:/cbdtune-test/1")
    frame = model.predict(x_test)
    labels = single.predict(x_test)
    assert list(frame["label"]) == labels
    np.testing.assert_allclose(frame.drop(columns="label").to_numpy(),
                               single.predict_proba(x_test), atol=1e-7)


def test_log_model_twice_gives_version_two_and_unknown_run_is_one_line(
        logged: dict[str, Any], single_dir: Path, x_test: np.ndarray) -> None:
    version = log_model(logged["uri"], logged["run_id"], single_dir,
                        registered_name="cbdtune-test", input_example=x_test[:1])
    assert version == "2"
    with pytest.raises(ModelError, match=r"^log_model: MLflow at .* refused \(Run .*not found"):
        log_model(logged["uri"], "0" * 32, single_dir, registered_name="cbdtune-test",
                  input_example=x_test[:1])
    with pytest.raises(InputError, match=r"input_example has shape \[1, 3, 300\]"):
        log_model(logged["uri"], logged["run_id"], single_dir, registered_name="cbdtune-test",
                  input_example=x_test[:1, :, :300])


# ---- weighted members and the MiniRocket baseline member ---------------------------------------


@pytest.fixture(scope="module")
def rocket(gesture: Dataset) -> Any:
    """A small MiniRocket member fitted on gesture's training series (840 features)."""
    from cbdtune import baselines

    return baselines.refit(gesture.train.x, gesture.train.y, gesture.n_classes, alpha=1.0,
                           temperature=0.5, seed=0, n_kernels=840)


def test_minirocket_member_round_trips_through_the_model_folder_without_pickle(
        tmp_path: Path, gesture: Dataset, members: list, rocket: Any, x_test: np.ndarray,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CBD member and a MiniRocket member, weighted 0.3/0.7: the folder holds the baseline's
    arrays (no pickle is read: pickle.load is made to fail), and the loaded ensemble's
    probabilities are the weighted average of the two members'."""
    import pickle

    from cbdtune.serving import BaselineMember

    cfg, clf = members[0]
    path = save_model(tmp_path / "m", [(cfg, clf.state_dict(), {}),
                                       BaselineMember(rocket, {"kind": "minirocket"})],
                      class_names=gesture.class_names, dataset=gesture.name, weights=[0.3, 0.7])
    contract = json.loads((path / CONTRACT_FILE).read_text())
    assert [m.get("kind") for m in contract["members"]] == ["cbd", "minirocket"]
    assert sum(m["weight"] for m in contract["members"]) == pytest.approx(1.0, abs=1e-12)
    assert sorted(p.name for p in (path / "member_1").iterdir()) == ["minirocket.json",
                                                                     "minirocket.npz"]

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle was used to load a model member")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    ensemble = CBDEnsemble.load(path)
    assert ensemble.weights == [0.3, 0.7] and ensemble.configs[1] is None
    want = 0.3 * softmax(clf, x_test) + 0.7 * rocket.predict_proba(x_test)
    np.testing.assert_allclose(ensemble.predict_proba(x_test), want, atol=1e-6)


def test_minirocket_member_behind_a_link_is_refused(tmp_path: Path, gesture: Dataset,
                                                    rocket: Any) -> None:
    """A baseline member's file replaced by a symbolic link to a file outside the folder is
    refused before it is opened; so is a member folder that is a link."""
    from cbdtune.serving import BaselineMember

    path = save_model(tmp_path / "m", [BaselineMember(rocket)], class_names=gesture.class_names,
                      dataset=gesture.name, layout=(gesture.n_channels, gesture.seq_len, "pad"))
    assert CBDEnsemble.load(path).members[0].n_kernels == rocket.n_kernels
    outside = tmp_path / "outside.npz"
    (path / "member_0" / "minirocket.npz").rename(outside)
    (path / "member_0" / "minirocket.npz").symlink_to(outside)
    with pytest.raises(ModelError, match="symbolic link"):
        CBDEnsemble.load(path)
    (path / "member_0" / "minirocket.npz").unlink()
    outside.rename(path / "member_0" / "minirocket.npz")
    (path / "member_0").rename(tmp_path / "elsewhere")
    (path / "member_0").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ModelError, match="not a folder"):
        CBDEnsemble.load(path)


@pytest.mark.parametrize(("weights", "message"), [([0.5, 0.6], "sum to 1"),
                                                  ([1.0, 0.0], "> 0"), ([1.0], "1 weights")])
def test_save_model_refuses_weights_that_do_not_sum_to_one(tmp_path: Path, gesture: Dataset,
                                                           members: list, weights: list,
                                                           message: str) -> None:
    with pytest.raises(ModelError, match=message):
        save(tmp_path / "m", gesture, members, weights=weights)
    assert not (tmp_path / "m").exists()


def test_contract_with_weights_off_one_is_refused_at_load(tmp_path: Path, gesture: Dataset,
                                                          members: list) -> None:
    path = save(tmp_path / "m", gesture, members, weights=[0.25, 0.75])
    contract = json.loads((path / CONTRACT_FILE).read_text())
    contract["members"][1]["weight"] = 0.5
    (path / CONTRACT_FILE).write_text(json.dumps(contract))
    with pytest.raises(ModelError, match="sum to 1"):
        CBDEnsemble.load(path)
