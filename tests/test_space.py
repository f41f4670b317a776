"""Search-space files: every shipped space validates; malformed ones are refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbdtune.config import ConfigError
from cbdtune.space import load_space, shipped_spaces

REPO = Path(__file__).resolve().parent.parent
SPACES = shipped_spaces()


def test_every_search_space_yaml_ships() -> None:
    assert set(SPACES) >= {"default", "paper", "smoke"}


@pytest.mark.parametrize("name", SPACES)
def test_every_search_space_yaml_validates(name: str) -> None:
    space = load_space(name)
    assert len(space.sha256) == 64
    tune_space = space.to_tune()
    assert set(tune_space) == set(space.keys)


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
])
def test_space_malformed_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_space(str(path))
    assert str(path) in str(info.value)
