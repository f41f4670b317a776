"""The CBD model: shapes, masking, gradients, probe mode, determinism, switches, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from cbdtune.config import ConfigError, LossConfig, ModelConfig
from cbdtune.losses import dual_constraint_loss
from cbdtune.model import (
    CBDClassifier,
    CBDModel,
    ClassifierHead,
    ModelOutput,
    build_head,
    build_model,
    num_tokens,
    random_masking,
    series_stats,
)
from cbdtune.model.diagnostics import diagnose
from cbdtune.model.encoder import dropout_, dropout_keep_mask, fast_dropout_supported
from cbdtune.model.pos_encoding import sinusoidal_encoding
from cbdtune.model.tokenizer import (
    CONV_BLOCKS,
    MaxPool2,
    conv_detokenized_len,
    conv_num_tokens,
    conv_pools,
    normalize_series,
    patch_window,
)

TINY = dict(d_model=16, n_heads=2, decoder_heads=2, ff_dim=32, encoder_layers=2,
            decoder_layers=1, cbd_blocks=1, cbd_ff_dim=8, bernstein_order=4)


def tiny(C: int = 3, L: int = 50, **kw: object) -> ModelConfig:
    return ModelConfig(in_channels=C, seq_len=L, **{**TINY, **kw})


def make(cfg: ModelConfig, seed: int = 0) -> CBDModel:
    torch.manual_seed(seed)
    return build_model(cfg)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 3, 9, 28])
@pytest.mark.parametrize("L", [50, 144, 206, 315])
def test_model_forward_shapes(C: int, L: int) -> None:
    model = make(tiny(C, L))
    x = torch.randn(2, C, L)
    out = model(x, generator=gen())
    T = model.num_tokens
    assert isinstance(out, ModelOutput)
    assert out.recon.shape == (2, C, L) and out.recon.dtype == torch.float32
    assert out.spectrum.shape == (2, C, L // 2 + 1) and out.spectrum.is_complex()
    assert out.mask.shape == (2, T) and out.mask.dtype == torch.bool
    assert model.encode(x).shape == (2, T, 16)
    assert torch.isfinite(out.recon).all() and torch.isfinite(torch.view_as_real(out.spectrum)).all()


@pytest.mark.parametrize(("tokenizer", "L", "T"), [
    ("conv", 100, 15), ("conv", 128, 18), ("conv", 315, 42), ("conv", 1, 2),
    ("patch", 50, 7), ("patch", 315, 40), ("patch", 48, 6),
])
def test_model_odd_and_even_token_counts(tokenizer: str, L: int, T: int) -> None:
    """Token counts from L exactly (HAR 128 -> 18 as in [C]); odd T runs through the CBD."""
    model = make(tiny(2, L, tokenizer=tokenizer))
    assert model.num_tokens == T == num_tokens(model.cfg)
    out = model(torch.randn(2, 2, L), generator=gen())
    assert out.recon.shape == (2, 2, L) and out.mask.shape == (2, T)


@pytest.mark.parametrize("L", [1, 2, 7, 8, 9, 31, 64, 127, 206, 316])
def test_conv_tokenizer_token_count_formula(L: int) -> None:
    model = make(tiny(1, L))
    assert model.tokenizer(torch.randn(2, 1, L)).shape == (2, model.num_tokens, 16)


def test_build_model_requires_channels_and_length() -> None:
    with pytest.raises(ConfigError, match="model.in_channels"):
        build_model(ModelConfig(seq_len=50))
    with pytest.raises(ConfigError, match="model.seq_len"):
        build_model(ModelConfig(in_channels=3))


def test_model_rejects_wrong_input_shape() -> None:
    with pytest.raises(ValueError, match="3 x 50"):
        make(tiny(3, 50))(torch.randn(2, 3, 51))


def test_recon_is_in_the_units_of_x() -> None:
    """Normalisation in, de-normalisation out: recon(a x + b) == a recon(x) + b."""
    model = make(tiny(2, 50)).eval()
    x = torch.randn(2, 2, 50)
    r1 = model(x, generator=gen()).recon
    r2 = model(100 * x + 7, generator=gen()).recon
    torch.testing.assert_close(r2, 100 * r1 + 7, rtol=1e-4, atol=1e-3)


# ---- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_masking_masks_exactly_int_t_times_ratio(ratio: float) -> None:
    model = make(tiny(3, 315, mask_ratio=ratio))
    out = model(torch.randn(4, 3, 315), generator=gen())
    assert (out.mask.sum(1) == int(model.num_tokens * ratio)).all()


def test_masking_per_sample_differs_between_samples() -> None:
    _, _, mask = random_masking(8, 42, 31, per_sample=True, generator=gen())
    assert len({tuple(m.tolist()) for m in mask}) > 1


def test_masking_per_batch_is_shared() -> None:
    keep, restore, mask = random_masking(8, 42, 31, per_sample=False, generator=gen())
    assert keep.shape == (8, 11) and (mask == mask[0]).all() and (restore == restore[0]).all()


def test_masking_restore_inverts_shuffle() -> None:
    """[visible, mask tokens] gathered with ids_restore: visible tokens back in place."""
    keep, restore, mask = random_masking(3, 10, 7, generator=gen())
    tokens = torch.arange(10).expand(3, 10)
    shuffled = torch.cat([tokens.gather(1, keep), torch.full((3, 7), -1)], dim=1)
    restored = shuffled.gather(1, restore)
    assert (restored[~mask] == tokens[~mask]).all()
    assert (restored[mask] == -1).all()


def test_encoder_sees_only_visible_tokens() -> None:
    model = make(tiny(3, 144))
    seen = []
    model.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    model(torch.randn(2, 3, 144), generator=gen())
    T = model.num_tokens
    assert seen == [(2, T - int(T * 0.75), 16)]


def test_mask_ratio_changes_output() -> None:
    x = torch.randn(2, 3, 144)
    a = make(tiny(3, 144, mask_ratio=0.5)).eval()(x, generator=gen())
    b = make(tiny(3, 144, mask_ratio=0.75)).eval()(x, generator=gen())
    assert a.mask.sum() != b.mask.sum()
    assert not torch.allclose(a.recon, b.recon)


def test_generator_drives_the_mask() -> None:
    model = make(tiny(3, 315))
    x = torch.randn(2, 3, 315)
    assert (model(x, generator=gen(1)).mask == model(x, generator=gen(1)).mask).all()
    assert not (model(x, generator=gen(1)).mask == model(x, generator=gen(2)).mask).all()


# ---- gradients and training modes --------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"tokenizer": "patch"}, {"use_cbd": False},
                                {"pos_encoding": "learned"}])
def test_model_backward_every_param_gets_grad(kw: dict[str, object]) -> None:
    model = make(tiny(3, 100, **kw))
    x = torch.randn(4, 3, 100)
    dual_constraint_loss(x, model(x, generator=gen()), LossConfig())["total"].backward()
    names = [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"Non-finite gradient for {name}"
    assert len([p for p in model.parameters() if p.grad is not None]) == len(names)


def test_probe_mode_trains_only_the_head() -> None:
    model = make(tiny(3, 100))
    head = ClassifierHead(model.num_tokens, 16, 5)
    x, y = torch.randn(4, 3, 100), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        features = model.encode(x)
    torch.nn.functional.cross_entropy(head(features), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is None, f"Frozen parameter {name} got a gradient"
    assert all(p.grad is not None for p in head.parameters())


def test_fine_tune_mode_trains_encoder_not_decoders() -> None:
    model = make(tiny(3, 100))
    head = ClassifierHead(model.num_tokens, 16, 5)
    x, y = torch.randn(4, 3, 100), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(head(model.encode(x)), y).backward()
    trained = {id(p) for p in model.encoder_parameters()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name
    assert not any(n.startswith(("temporal_decoder", "cbd_decoder", "mask_token"))
                   for n, p in model.named_parameters() if id(p) in trained)


def test_classifier_head_shapes() -> None:
    head = ClassifierHead(num_tokens=7, d_model=16, num_classes=3)
    assert head.fc1.in_features == 112 and head.fc1.out_features == 56
    assert head(torch.randn(5, 7, 16)).shape == (5, 3)


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_no_nan_on_constant_series(value: float) -> None:
    model = make(tiny(3, 100))
    x = torch.full((4, 3, 100), value)
    out = model(x, generator=gen())
    terms = dual_constraint_loss(x, out, LossConfig())
    terms["total"].backward()
    assert all(torch.isfinite(t) for t in terms.values())
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), f"Non-finite gradient for {name}"


# ---- determinism and switches --------------------------------------------------------------------


def test_same_seed_same_output() -> None:
    x = torch.randn(2, 3, 144)
    outs = []
    for _ in range(2):
        model = make(tiny(3, 144), seed=3)  # train mode: dropout on, seeded by torch.manual_seed
        outs.append(model(x, generator=gen(5)))
    torch.testing.assert_close(outs[0].recon, outs[1].recon)
    torch.testing.assert_close(outs[0].spectrum, outs[1].spectrum)
    assert (outs[0].mask == outs[1].mask).all()


@pytest.mark.parametrize("switch", [
    {"cim_activation": "relu_softshrink"}, {"ser_energy": "before_cim"},
    {"ser_coefficients": "sigmoid"}, {"bernstein_terms": "0..K-1"}, {"bernstein_order": 8},
    {"mask_sharing": "per_batch"}, {"use_cim": False}, {"use_ser": False},
    {"tokenizer": "patch"}, {"ser_norm": "fraction"}, {"ser_norm": "tempered"},
    {"pos_encoding": "learned"}, {"pos_encoding": "sinusoidal"},
])
def test_switches_change_output(switch: dict[str, object]) -> None:
    x = torch.randn(4, 3, 144)
    base = make(tiny(3, 144)).eval()(x, generator=gen())
    other_model = make(tiny(3, 144, **switch)).eval()
    other = other_model(x, generator=gen())
    assert not torch.allclose(base.spectrum, other.spectrum, atol=1e-6)


def test_use_cbd_false_gives_no_spectrum_and_zero_cbd_loss() -> None:
    model = make(tiny(3, 100, use_cbd=False))
    assert model.cbd_decoder is None
    x = torch.randn(2, 3, 100)
    out = model(x, generator=gen())
    assert out.spectrum is None
    terms = dual_constraint_loss(x, out, LossConfig())
    assert terms["freq_rec"].item() == 0.0 and terms["time_dual"].item() == 0.0
    torch.testing.assert_close(terms["total"], terms["time_rec"] + terms["freq_dual"])


# ---- classifier heads (model.head, head_dropout, level_features) --------------------------------

HEADS = ["flatten", "mean", "attention"]


def head_for(kind: str, level: bool = False, T: int = 7, **kw: object) -> ClassifierHead:
    torch.manual_seed(0)
    return build_head(tiny(3, 50, num_classes=5, head=kind, level_features=level, **kw), T)


@pytest.mark.parametrize("level", [False, True])
@pytest.mark.parametrize("kind", HEADS)
def test_head_output_shapes_and_stats_width(kind: str, level: bool) -> None:
    head = head_for(kind, level)
    assert head.n_stats == (6 if level else 0)  # 2 * in_channels
    stats = torch.randn(4, 6) if level else None
    logits = head(torch.randn(4, 7, 16), stats)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["mean", "attention"])
def test_head_pooled_heads_are_small(kind: str) -> None:
    """LayerNorm(D) + Linear(D + 2C -> D) + Linear(D -> classes) [+ query D]: no T*D weights."""
    D, n = 16, 6
    expected = 2 * D + (D + n) * D + D + D * 5 + 5 + (D if kind == "attention" else 0)
    assert sum(p.numel() for p in head_for(kind, True, T=42).parameters()) == expected


def test_head_attention_starts_as_mean_pooling() -> None:
    """q = 0 gives uniform weights; a trained q weighs the tokens differently."""
    mean, attention = head_for("mean", True), head_for("attention", True)
    attention.load_state_dict(mean.state_dict(), strict=False)  # all but the query
    features, stats = torch.randn(4, 7, 16), torch.randn(4, 6)
    torch.testing.assert_close(attention(features, stats), mean(features, stats))
    with torch.no_grad():
        attention.query.normal_()
    assert not torch.allclose(attention(features, stats), mean(features, stats), atol=1e-4)


@pytest.mark.parametrize("kind", HEADS)
def test_head_fit_stats_standardises(kind: str) -> None:
    """After fit_stats the head reads (s - mean) / std of the training split's statistics, so an
    affine change of the statistics, refitted, leaves the logits unchanged."""
    head = head_for(kind, True).eval()
    train = torch.randn(50, 6, generator=gen(0)) * torch.arange(1.0, 7.0) + 3.0
    head.fit_stats(train)
    torch.testing.assert_close(head.stats_mean, train.mean(0))
    torch.testing.assert_close(head.stats_std, train.std(0, correction=0))
    z = (train - head.stats_mean) / head.stats_std
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(6))
    features = torch.randn(4, 7, 16)
    before = head(features, train[:4])
    scale, shift = torch.tensor([2.0, 0.5, 10.0, 1.0, 3.0, 7.0]), torch.arange(6.0) - 2
    head.fit_stats(train * scale + shift)
    torch.testing.assert_close(head(features, train[:4] * scale + shift), before)


def test_head_fit_stats_are_saved_and_reloaded() -> None:
    head = head_for("mean", True)
    head.fit_stats(torch.randn(20, 6) * 4 + 1)
    fresh = head_for("mean", True)
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh.stats_mean, head.stats_mean)
    assert torch.equal(fresh.stats_std, head.stats_std)
    assert not any(k.startswith("stats_") for k in head_for("mean", False).state_dict())


def test_head_fit_stats_constant_statistic_is_dropped() -> None:
    """A z-normalised archive has the same mean (0) and log-std (0) for every series, up to
    rounding (spread ~3e-6): such a column gets std 0 and the head reads 0 there, whatever the
    value, so a 1e-3 shift of a test series' level cannot move the logits."""
    head = head_for("mean", True).eval()
    train = torch.cat([3e-6 * torch.randn(10, 3, generator=gen(1)),
                       torch.randn(10, 3, generator=gen(2))], dim=1)
    head.fit_stats(train)
    assert torch.equal(head.stats_std[:3], torch.zeros(3))
    assert head.stats_std[3:].min() > 0.1
    features, moved = torch.randn(2, 7, 16), train[:2].clone()
    moved[:, :3] += torch.tensor([1e-3, -5.0, 1e3])
    assert torch.equal(head(features, moved), head(features, train[:2]))
    moved[:, 3] += 1.0  # a column that varies over training is read
    assert not torch.allclose(head(features, moved), head(features, train[:2]))


def test_head_fit_stats_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected \\(N >= 1, 6\\)"):
        head_for("mean", True).fit_stats(torch.randn(10, 4))
    with pytest.raises(ValueError, match="NaN"):
        head_for("mean", True).fit_stats(torch.full((3, 6), float("nan")))
    with pytest.raises(ValueError, match="n_stats = 0"):
        head_for("mean", False).fit_stats(torch.randn(10, 6))


def test_head_stats_required_exactly_when_built_for_them() -> None:
    with pytest.raises(AssertionError, match="reads 6 series statistics, got None"):
        head_for("flatten", True)(torch.randn(2, 7, 16))
    with pytest.raises(AssertionError, match="reads 0 series statistics"):
        head_for("flatten", False)(torch.randn(2, 7, 16), torch.randn(2, 6))


@pytest.mark.parametrize("kind", HEADS)
def test_head_dropout_only_in_training(kind: str) -> None:
    head = head_for(kind, True, head_dropout=0.5)
    features, stats = torch.randn(4, 7, 16), torch.randn(4, 6)
    assert not torch.allclose(head(features, stats), head(features, stats))
    head.eval()
    assert torch.equal(head(features, stats), head(features, stats))
    no_drop = head_for(kind, True)  # head_dropout = 0 [C]: deterministic in training too
    assert torch.equal(no_drop(features, stats), no_drop(features, stats))


@pytest.mark.parametrize("level", [False, True])
@pytest.mark.parametrize("kind", HEADS)
def test_head_backward_every_param_gets_grad(kind: str, level: bool) -> None:
    head = head_for(kind, level)
    loss = head(torch.randn(4, 7, 16), torch.randn(4, 6) if level else None).square().sum()
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"No gradient for {name}"


@pytest.mark.parametrize("kind", HEADS)
def test_classifier_level_features_see_the_series_level(kind: str) -> None:
    """The instance norm makes the encoder blind to a * x + b; level features give it back."""
    x = torch.randn(3, 3, 50, generator=gen(0))
    for level in (False, True):
        cfg = tiny(3, 50, num_classes=5, head=kind, level_features=level)
        model = make(cfg)
        clf = CBDClassifier(model, build_head(cfg, model.num_tokens)).eval()
        if level:
            clf.head.fit_stats(series_stats(torch.randn(20, 3, 50)))
        with torch.no_grad():
            same = torch.allclose(clf(x), clf(4 * x + 3), atol=1e-4)
        assert same != level, (kind, level)


def test_build_head_requires_classes_and_channels() -> None:
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_head(ModelConfig(in_channels=3, seq_len=50), 7)
    with pytest.raises(ConfigError, match="model.in_channels"):
        build_head(ModelConfig(seq_len=50, num_classes=3, level_features=True), 7)
    assert build_head(ModelConfig(seq_len=50, num_classes=3), 7).n_stats == 0


# ---- the paper model is unchanged by the switches ------------------------------------------------

# Switch values that are the paper's ([P]) or its authors' code ([C]): the ModelConfig defaults.
PAPER_SWITCHES = dict(ser_norm="softmax", pos_encoding="none", head="flatten", head_dropout=0.0,
                      level_features=False)


def _paper_classifier(**switches: object) -> CBDClassifier:
    cfg = tiny(3, 100, num_classes=4, **switches)
    torch.manual_seed(0)
    model = build_model(cfg)
    return CBDClassifier(model, build_head(cfg, model.num_tokens)).eval()


def test_paper_model_unchanged_bit_for_bit_by_the_switches() -> None:
    """Switches at their paper values give the same parameters and outputs as no switches at all,
    and both match numbers recorded before the switches existed (commit 79d1c8b)."""
    x = torch.randn(4, 3, 100, generator=gen(1))
    runs = []
    for clf in (_paper_classifier(), _paper_classifier(**PAPER_SWITCHES)):
        with torch.no_grad():
            out, logits = clf.model(x, generator=gen(2)), clf(x)
        names = [n for n, _ in clf.named_parameters()]
        runs.append((names, clf.state_dict(), out, logits))
    (names, state, out, logits), (names2, state2, out2, logits2) = runs
    assert names == names2 and state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(out.recon, out2.recon) and torch.equal(out.spectrum, out2.spectrum)
    assert torch.equal(logits, logits2)
    # recorded at 79d1c8b with the same seeds (torch 2.13, CPU); the tolerance is for other BLAS
    n_params = sum(p.numel() for p in _paper_classifier().parameters())
    # 117 entries then, and the classifier's temperature buffer since ac22cae
    assert (len(names), n_params, len(state)) == (90, 114525, 117 + 1)
    golden = [out.recon.double().sum(), out.recon.double().abs().sum(),
              out.spectrum.abs().double().sum(), logits.double().sum()]
    torch.testing.assert_close(torch.stack(golden), torch.tensor(
        [-52.27654326148331, 147.4599564280361, 22.769172959553543, -0.40548370871692896],
        dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], torch.tensor(
        [0.1440848857164383, 0.02190224826335907, -0.3917909264564514, 0.09523075819015503]),
        rtol=1e-5, atol=1e-6)


# ---- positional encoding (model.pos_encoding) ----------------------------------------------------


POS_KINDS = ["learned", "sinusoidal"]


def test_pos_encoding_none_adds_no_module_or_state() -> None:
    model = make(tiny(3, 144))
    assert model.pos_embed is None and model.decoder_pos_embed is None
    assert not any("pos_embed" in k for k in model.state_dict())


@pytest.mark.parametrize("kind", POS_KINDS)
def test_pos_encoding_is_added_after_the_tokenizer(kind: str) -> None:
    """tokenize (what encode and the masked encoder read) = tokenizer output + PE, only when on."""
    x = torch.randn(2, 3, 144)
    for pos, added in (("none", False), (kind, True)):
        model = make(tiny(3, 144, pos_encoding=pos)).eval()
        raw = model.tokenizer(normalize_series(x)[0])  # (B, T, D)
        tokens = model.tokenize(x)[0]
        if added:
            torch.testing.assert_close(tokens, raw + model.pos_embed.weight)
        else:
            assert torch.equal(tokens, raw)


@pytest.mark.parametrize("kind", POS_KINDS)
def test_pos_encoding_changes_encode_only_when_on(kind: str) -> None:
    """Built last, so with the same seed every other weight is the same as without it."""
    x = torch.randn(2, 3, 144)
    base = make(tiny(3, 144)).eval()
    on = make(tiny(3, 144, pos_encoding=kind)).eval()
    missing, unexpected = on.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == ({"pos_embed.weight", "decoder_pos_embed.weight"}
                            if kind == "learned" else set())  # sinusoidal: fixed, not saved
    assert torch.equal(make(tiny(3, 144, pos_encoding="none")).eval().encode(x), base.encode(x))
    assert not torch.allclose(on.encode(x), base.encode(x), atol=1e-4)


@pytest.mark.parametrize("kind", POS_KINDS)
def test_pos_encoding_encoder_sees_visible_tokens_with_their_position(kind: str) -> None:
    model = make(tiny(3, 144, pos_encoding=kind)).eval()
    x = torch.randn(2, 3, 144)
    seen = []
    model.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(x, generator=gen(4))
    ids_keep, _, _ = random_masking(2, model.num_tokens, model.num_masked, generator=gen(4))
    tokens = model.tokenize(x)[0]  # (B, T, D) with position
    expected = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("kind", ["none", *POS_KINDS])
def test_pos_encoding_tells_mask_tokens_apart_in_the_decoders(kind: str) -> None:
    """Without it every mask token enters both decoders as the same vector ([C]); with it, not."""
    model = make(tiny(3, 144, pos_encoding=kind)).eval()
    seen = []
    for decoder in (model.temporal_decoder, model.cbd_decoder):
        decoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    out = model(torch.randn(2, 3, 144), generator=gen())
    assert torch.equal(seen[0], seen[1])  # both decoders read the same restored sequence
    masked = seen[0][out.mask]  # (B * num_masked, D)
    assert torch.equal(masked, masked[:1].expand_as(masked)) == (kind == "none")


def test_pos_encoding_learned_is_fine_tuned_with_the_encoder_not_the_decoder_one() -> None:
    model = make(tiny(3, 144, pos_encoding="learned"))
    trained = {id(p) for p in model.encoder_parameters()}
    assert id(model.pos_embed.weight) in trained
    assert id(model.decoder_pos_embed.weight) not in trained


@pytest.mark.parametrize(("T", "D"), [(5, 8), (7, 5), (1, 2)])
def test_sinusoidal_encoding_matches_vaswani(T: int, D: int) -> None:
    pe = sinusoidal_encoding(T, D)
    assert pe.shape == (T, D)
    for t in range(T):
        for i in range(D):
            angle = t / 10000 ** (2 * (i // 2) / D)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert pe[t, i].item() == pytest.approx(expected, abs=1e-6)


# ---- tokenizer pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 2, 7, 50, 315])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maxpool2_matches_max_pool1d_values_and_gradients(L: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # after a ReLU, as in the tokenizer: many windows tie at 0, where the first step gets the grad
    x = torch.randn(4, 3, L).relu().to(dtype).requires_grad_()
    ref = torch.nn.MaxPool1d(kernel_size=2, stride=2, padding=1)(x)
    out = MaxPool2()(x)
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(MaxPool2()(x), ref)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    (g_out,) = torch.autograd.grad(out, x, g)
    assert torch.equal(g_out, g_ref)


def test_normalize_series_zero_mean_unit_std_and_constant_series() -> None:
    x = torch.randn(2, 3, 50) * 5 + 3
    xn, mean, std = normalize_series(x)
    torch.testing.assert_close(xn.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(xn.std(-1, unbiased=False), torch.ones(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(xn * std + mean, x)
    xc, _, _ = normalize_series(torch.full((1, 2, 9), 4.0))
    assert torch.equal(xc, torch.zeros(1, 2, 9))


# ---- dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_keep_mask_rate_values_and_seed(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    keep = dropout_keep_mask((200, 1000), 0.1, dtype)
    assert keep.dtype == dtype and keep.shape == (200, 1000)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(1 - keep.float().mean().item() - 0.1) < 0.0034  # 200k draws: 5 sigma
    torch.manual_seed(0)
    assert torch.equal(dropout_keep_mask((200, 1000), 0.1, dtype), keep)  # torch's seed drives it
    assert not torch.equal(dropout_keep_mask((200, 1000), 0.1, dtype), keep)


def test_dropout_scale_and_fallbacks() -> None:
    torch.manual_seed(0)
    x = torch.ones(200, 1000)
    y = dropout_(x.clone(), 0.1, True)
    torch.testing.assert_close(y.unique(), torch.tensor([0.0, 1 / 0.9]))
    # p below one quantum of the 16-bit field (or float64) takes F.dropout
    assert not fast_dropout_supported(torch.bfloat16, 1e-6)
    assert not fast_dropout_supported(torch.float32, 1 - 1e-6)
    assert not fast_dropout_supported(torch.float64, 0.1)
    assert fast_dropout_supported(torch.float32, 1e-4)
    assert torch.equal(dropout_(torch.ones(10, 10, dtype=torch.float64), 0.5, True).unique(),
                       torch.tensor([0.0, 2.0], dtype=torch.float64))
    xb = torch.ones(100, 1000, dtype=torch.bfloat16)
    yb = dropout_(xb.clone(), 0.5, True)
    assert yb.dtype == torch.bfloat16 and abs((yb == 0).float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("relu", [False, True])
def test_dropout_gradient_matches_mask(relu: bool) -> None:
    """d out / d x is scale where the output kept x (and x > 0 with ReLU), else 0."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout_(x * 1.0, 0.3, True, relu=relu)  # x * 1.0: a fresh tensor, as after a linear
    y.sum().backward()
    kept = y != 0
    expected = kept.float() / 0.7
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(y[kept], (x * 1 / 0.7)[kept])
    assert (not relu) or (x[kept] > 0).all()


# ---- diagnostics --------------------------------------------------------------------------------


def test_diagnostics_ranges_and_keys() -> None:
    model = make(tiny(3, 144))
    model.train()
    diag = diagnose(model, torch.randn(4, 3, 144))
    assert model.training
    layers = ["tok", "layer0", "layer1"]
    assert set(diag) == {f"diag.{k}.{n}" for k in ("energy_low", "energy_mid", "energy_high",
                                                   "erank") for n in layers}
    for name in layers:
        bands = [diag[f"diag.energy_{b}.{name}"] for b in ("low", "mid", "high")]
        assert all(0.0 <= b <= 1.0 for b in bands)
        assert sum(bands) == pytest.approx(1.0, abs=1e-5)
        assert 1.0 <= diag[f"diag.erank.{name}"] <= 16.0
    assert all(isinstance(v, float) for v in diag.values())


def test_diagnostics_erank_extremes() -> None:
    from cbdtune.model.diagnostics import effective_rank
    same = torch.randn(1, 1, 8).expand(2, 6, 8)  # identical tokens: rank 1
    assert effective_rank(same).item() == pytest.approx(1.0, abs=1e-4)
    eye = torch.eye(8).expand(2, 8, 8)  # orthonormal tokens: full rank
    assert effective_rank(eye).item() == pytest.approx(8.0, abs=1e-4)


# ---- scale and offset: the units of the input do not decide the label --------------------------


def test_normalize_series_ignores_the_units_of_the_input() -> None:
    """The eps is relative to the series' scale: x * 1e-3, x * 1e3 and x + 1e-3 normalise to x's
    series (an absolute eps of 1e-5 flattened x * 1e-3, whose variance is 1e-6)."""
    x = torch.randn(4, 3, 60, generator=gen(0)) * torch.tensor([1.0, 0.1, 3.0])[:, None] + 2.0
    ref = normalize_series(x)[0]
    for moved in (x * 1e-3, x * 1e3, x + 1e-3):
        torch.testing.assert_close(normalize_series(moved)[0], ref, atol=1e-4, rtol=0)


def test_normalize_series_constant_and_zero_series_give_zero() -> None:
    """Every channel constant (0.1: a float32 sum of its copies is inexact), or all zeros: 0,
    finite, whatever the relative eps sees."""
    for value in (0.1, 4.0, 0.0, -3e5):
        xc, mean, std = normalize_series(torch.full((2, 3, 37), value))
        assert torch.equal(xc, torch.zeros(2, 3, 37)), value
        assert torch.isfinite(std).all() and (std > 0).all()
    x = torch.randn(1, 2, 37, generator=gen(1))
    x[:, 1] = 0.1  # a constant channel beside a varying one
    assert torch.equal(normalize_series(x)[0][:, 1], torch.zeros(1, 37))


def test_series_stats_are_scale_invariant_and_a_shift_moves_only_the_means() -> None:
    x = torch.randn(5, 3, 40, generator=gen(2)) * torch.tensor([2.0, 0.5, 1.0])[:, None] + 1.0
    s = series_stats(x)
    assert s.shape == (5, 6)
    for k in (1e-3, 1e3):
        torch.testing.assert_close(series_stats(x * k), s, atol=1e-5, rtol=1e-5)
    shifted = series_stats(x + 1e-3)
    torch.testing.assert_close(shifted[:, 3:], s[:, 3:], atol=1e-5, rtol=0)  # log-stds
    scale = s.new_tensor([[4.0, 0.25, 1.0]]).mean().sqrt()  # sqrt(mean channel variance)
    moved = shifted[:, :3] - s[:, :3]
    assert moved.min() > 0 and moved.max() < 3e-3 / scale  # 1e-3 in units of the scale
    zero = series_stats(torch.zeros(2, 3, 40))
    assert torch.equal(zero, torch.zeros(2, 6))  # finite: level 0, every std equal to S


# ---- token rate by rule (model.min_tokens) -------------------------------------------------------

LENGTHS = (1, 2, 5, 8, 9, 13, 26, 29, 50, 64, 144, 315)
MIN_TOKENS = (1, 4, 8, 16, 32, 64)


def _most_tokens(tokenizer: str, L: int) -> int:
    """The most tokens a tokenizer can make from L steps: no pooling, or windows of 1."""
    return L + CONV_BLOCKS if tokenizer == "conv" else L


@pytest.mark.parametrize("tokenizer", ["conv", "patch"])
@pytest.mark.parametrize("L", LENGTHS)
def test_token_count_reaches_min_tokens_when_the_length_allows(tokenizer: str, L: int) -> None:
    counts = [num_tokens(ModelConfig(seq_len=L, tokenizer=tokenizer, min_tokens=m))
              for m in MIN_TOKENS]
    assert counts == sorted(counts)  # monotone in min_tokens
    for m, T in zip(MIN_TOKENS, counts, strict=True):
        if m <= _most_tokens(tokenizer, L):
            assert T >= m, (L, m, T)
        else:  # too short: the most tokens the tokenizer can make
            assert T == _most_tokens(tokenizer, L), (L, m, T)
    # min_tokens = 1 is [C]'s fixed rate (conv ~L/8, patch ceil(L / 8))
    assert counts[0] == (conv_num_tokens(L) if tokenizer == "conv" else -(-L // 8))


@pytest.mark.parametrize("L", LENGTHS)
def test_token_rule_takes_the_coarsest_rate_that_reaches_min_tokens(L: int) -> None:
    """No more tokens than needed: one more pooling block (or a wider window) falls short."""
    for m in MIN_TOKENS:
        pools = conv_pools(L, m)
        if pools < CONV_BLOCKS:
            assert conv_num_tokens(L, pools + 1) < m
        p = patch_window(L, 8, m)
        if p < 8:
            assert -(-L // (p + 1)) < m


def test_default_min_tokens_keeps_the_long_series_token_counts() -> None:
    """gesture (315 steps) and ArticularyWordRecognition (144) keep [C]'s 42 and 20 tokens."""
    assert num_tokens(ModelConfig(seq_len=315)) == conv_num_tokens(315) == 42
    assert num_tokens(ModelConfig(seq_len=144)) == conv_num_tokens(144) == 20


@pytest.mark.parametrize("pools", range(CONV_BLOCKS + 1))
def test_deconv_stack_covers_every_length(pools: int) -> None:
    for L in range(1, 400):
        assert conv_detokenized_len(conv_num_tokens(L, pools), pools) >= L


@pytest.mark.parametrize("tokenizer", ["conv", "patch"])
@pytest.mark.parametrize(("L", "m"), [(8, 1), (8, 16), (26, 16), (50, 16), (50, 64), (13, 32)])
def test_model_shapes_under_the_token_rule(tokenizer: str, L: int, m: int) -> None:
    cfg = tiny(2, L, tokenizer=tokenizer, min_tokens=m)
    model = make(cfg)
    x = torch.randn(3, 2, L)
    T = num_tokens(cfg)
    out = model(x, generator=gen())
    assert model.num_tokens == T and out.mask.shape == (3, T)
    assert out.recon.shape == (3, 2, L) and out.spectrum.shape == (3, 2, L // 2 + 1)
    assert model.encode(x).shape == (3, T, 16)
    assert model.tokenizer(x).shape == (3, T, 16)
    assert torch.isfinite(out.recon).all()


def test_token_rule_keeps_the_parameter_shapes_of_the_conv_stacks() -> None:
    """Pooling and upsampling carry no parameters: the tokenizer and the temporal decoder's
    deconv stack hold the same tensors whatever the rate (a saved encoder's weights fit)."""
    def shapes(m: int) -> dict[str, tuple[int, ...]]:
        model = make(tiny(2, 26, min_tokens=m))
        return {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k.startswith(("tokenizer.", "temporal_decoder.detokenizer."))}

    assert conv_pools(26, 1) == 3 and conv_pools(26, 16) == 1
    assert shapes(1) == shapes(16)


@pytest.mark.parametrize("min_tokens", [1, 16])
def test_a_length_8_series_pretrains_and_reads_out(min_tokens: int) -> None:
    """PenDigits-short series (8 steps) run end to end: pretraining (both decoders rebuild 8
    steps) and the ridge readout with CV + refit; two classes told apart by their slope."""
    import numpy as np

    from cbdtune import pipeline
    from cbdtune.config import preset
    from cbdtune.data import Dataset, Split

    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        y = np.arange(n) % 2
        ramp = np.linspace(-1.0, 1.0, 8) * (2.0 * y - 1.0)[:, None]  # up or down
        x = np.stack([ramp, -ramp], axis=1) + 0.3 * rng.standard_normal((n, 2, 8))
        return Split(x.astype(np.float32), y.astype(np.int64))

    data = Dataset(name="Ramps", train=split(48), val=split(0), test=split(32),
                   class_names=["down", "up"], source="synthetic", location="memory")
    cfg = preset("default").replace({
        **{f"model.{k}": v for k, v in TINY.items()}, "model.min_tokens": min_tokens,
        "train.pretrain_epochs": 2, "train.batch_size": 16, "train.num_threads": 1,
        "data.cv_folds": 3})
    built, model = pipeline.build_for(data, cfg)
    # [C]'s rate gives 3 tokens; asking for 16, no block pools: 8 + 3, the most there are
    assert model.num_tokens == num_tokens(built.model) == (3 if min_tokens == 1 else 11)
    losses: list[float] = []
    result = pipeline.run_trial(cfg, data, lambda m, _s: losses.append(m.get("loss.total", 0.0)))
    assert result.status == "completed"
    assert all(math.isfinite(v) for v in losses) and any(v > 0 for v in losses)
    assert result.metrics["selected_stage"] == "ridge"
    assert result.metrics["test_accuracy"] >= 0.9
