"""A model folder is no attack surface: ``cbdtune.predict`` on a hostile folder gives one line,
exit 2, and reads nothing outside the folder (issue 22, item 6)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cbdtune import predict
from cbdtune.config import preset
from cbdtune.model import CBDClassifier, build_head, build_model
from cbdtune.serving import CONTRACT_FILE, CBDEnsemble, ModelError, save_model

CLASSES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid one-member model (smoke preset, 2 channels, 64 steps, 3 classes, untrained)."""
    cfg = preset("smoke").replace({"model.in_channels": 2, "model.seq_len": 64,
                                   "model.num_classes": 3})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    clf = CBDClassifier(model, build_head(cfg.model, model.num_tokens))
    return save_model(tmp_path_factory.mktemp("good") / "model", [(cfg, clf.state_dict(), {})],
                      class_names=CLASSES, dataset="toy")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("x") / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(4, 2, 64)).astype(np.float32))
    return path


def copy_of(good: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(good, tmp / "model"))


def edit_contract(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    contract = json.loads((folder / CONTRACT_FILE).read_text())
    change(contract)
    (folder / CONTRACT_FILE).write_text(json.dumps(contract))


def run_cli(folder: Path, series: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``cbdtune.predict`` on ``folder``: asserts exit 2, no output, one ``error:`` line."""
    code = predict.cli(["--model", str(folder), "--input", str(series)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and captured.out == "" and len(err) == 1, captured
    assert err[0].startswith("error: ")
    return err[0]


def test_good_folder_predicts(good: Path, series: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """The baseline every hostile case below is derived from works."""
    assert predict.cli(["--model", str(good), "--input", str(series)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5  # header + 4 rows


@pytest.mark.parametrize("name", ["../outside.pt", "/ABS/outside.pt", "sub/member_0.pt", "..",
                                  "", "member_0.pt\\..\\x"])
def test_member_file_outside_the_folder_refused(name: str, good: Path, series: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(good, tmp_path)
    outside = tmp_path / "outside.pt"
    shutil.copy(folder / "member_0.pt", outside)  # a valid weights file, but outside the folder
    (folder / "sub").mkdir()
    shutil.copy(folder / "member_0.pt", folder / "sub" / "member_0.pt")
    target = name.replace("/ABS", str(tmp_path))

    def point(c: dict[str, Any]) -> None:
        c["members"][0]["file"] = target

    edit_contract(folder, point)
    line = run_cli(folder, series, capsys)
    assert "is not a plain file name" in line, line


def test_member_file_symlink_refused(good: Path, series: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(good, tmp_path)
    real = tmp_path / "elsewhere.pt"
    os.replace(folder / "member_0.pt", real)
    (folder / "member_0.pt").symlink_to(real)  # would load fine if followed
    assert "is a symbolic link, not a regular file" in run_cli(folder, series, capsys)


def test_contract_symlink_refused(good: Path, series: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(good, tmp_path)
    os.replace(folder / CONTRACT_FILE, tmp_path / "c.json")
    (folder / CONTRACT_FILE).symlink_to(tmp_path / "c.json")
    assert "the contract is a symbolic link" in run_cli(folder, series, capsys)


def test_member_file_fifo_refused_without_opening_it(good: Path, series: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(good, tmp_path)
    (folder / "member_0.pt").unlink()
    os.mkfifo(folder / "member_0.pt")
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(run_cli(folder, series, capsys)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # unblock the reader so that the test run can end, then fail
        with open(folder / "member_0.pt", "wb"):
            pass
        pytest.fail("predict opened the FIFO and hung")
    assert "is a FIFO (named pipe), not a regular file" in result[0]


@pytest.mark.parametrize("key, value, message", [
    ("in_channels", 5, "its config has model.in_channels=2, but the contract says 5"),
    ("seq_len", 100, "its config has model.seq_len=64, but the contract says 100"),
    ("class_names", ["a", "b"], "its config has model.num_classes=3, but the contract says 2"),
    ("class_names", ["a", "b", "a"], "class_names repeats 'a'"),
    ("length_policy", "evil", "length_policy 'evil' is unknown"),
    ("seq_len", -3, "seq_len must be a positive integer"),
    ("seq_len", 10**9, "in_channels x seq_len = 2 x 1000000000 is more than"),
    ("members", [], "members must be a non-empty list"),
])
def test_contract_that_disagrees_refused(key: str, value: Any, message: str, good: Path,
                                         series: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(good, tmp_path)
    edit_contract(folder, lambda c: c.__setitem__(key, value))
    assert message in run_cli(folder, series, capsys)


@pytest.mark.parametrize("change", [{"model.d_model": 16384, "model.ff_dim": 1048576},
                                    {"model.encoder_layers": 4000}])
def test_absurd_member_config_refused_before_allocating(change: dict[str, int], good: Path,
                                                        series: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """d_model 16384 / ff_dim 1048576 is ~64 GB of weights: refused from the meta-device sizes
    and the file's size, before any real tensor of the model is created."""
    folder = copy_of(good, tmp_path)

    def grow(c: dict[str, Any]) -> None:
        c["members"][0]["config"].update(change)

    edit_contract(folder, grow)
    real_build = build_model
    built: list[Any] = []

    def spy(cfg: Any) -> Any:  # records the device every model is built on
        model = real_build(cfg)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr("cbdtune.model.build_model", spy)
    line = run_cli(folder, series, capsys)
    assert "member_0.pt holds" in line and "its config's model stores" in line, line
    assert set(built) <= {"meta"}, f"a real model was built: {built}"


def test_non_finite_weights_refused(good: Path, series: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(good, tmp_path)
    state = torch.load(folder / "member_0.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[key].view(-1)[3] = float("nan")
    torch.save(state, folder / "member_0.pt")
    line = run_cli(folder, series, capsys)
    assert f"{key} holds 1 NaN or infinite weight(s)" in line, line


def test_weights_of_another_shape_refused(good: Path, series: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(good, tmp_path)
    state = torch.load(folder / "member_0.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
    state[key] = state[key].T.contiguous()  # same size, wrong shape
    torch.save(state, folder / "member_0.pt")
    line = run_cli(folder, series, capsys)
    assert f"{key} has shape" in line and "but the config builds" in line, line


def test_mlmodel_artifact_path_outside_refused(good: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mlflow_model"
    folder.mkdir()
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n      cbd_model:\n"
        f"        path: ../{good.parent.name}\n")
    shutil.copytree(good.parent, tmp_path / good.parent.name)
    with pytest.raises(ModelError, match="outside the MLflow model folder"):
        CBDEnsemble.load(folder)


def test_save_model_refuses_non_finite_weights(tmp_path: Path) -> None:
    cfg = preset("smoke").replace({"model.in_channels": 2, "model.seq_len": 64,
                                   "model.num_classes": 3})
    model = build_model(cfg.model)
    state = CBDClassifier(model, build_head(cfg.model, model.num_tokens)).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key].view(-1)[0] = float("inf")
    with pytest.raises(ModelError, match=f"member 0: {key} holds 1 NaN or infinite"):
        save_model(tmp_path / "m", [(cfg, state, {})], class_names=CLASSES, dataset="toy")
    assert not (tmp_path / "m").exists()
