"""Pretrained encoders stored under their pretraining key, so that trials sharing one reuse it.

Masked pretraining (Eq. 14) is label-free and reads only the training inputs; the classifier
stages (linear probe, fine-tune) start from its result. Every config field therefore has one
role, declared once in :data:`NOT_IN_KEY` (everything else is in the key):

    data          the training inputs pretraining reads: they enter the key as a digest of the
                  arrays themselves (name, dtype, shape, bytes), so every data.* switch that
                  changes them (a cv_folds=0 carve by train.seed and val_fraction, the length
                  policy) changes the key, and none that leaves them alone does
    classifier    only shapes the classifier stages (the head, its optimiser, augmentation)
    probe         the fidelity probes: they read the encoder and report, and run under their
                  own RNG (pipeline._fidelity_probe), so the weights never depend on them
    numerics      where and how fast it runs (device, compile, threads): same weights up to
                  floating point
    pretraining   everything else: model.* (tokenizer, encoder, decoders, masking, CBD), loss.*,
                  train.{seed, batch_size, pretrain_epochs, pretrain_lr, weight_decay, beta1,
                  beta2, amp}; a field added later lands here until it is declared otherwise

Entries live under ``<root>/encoders/<key>/``: ``encoder.pt`` (the pretrained model's state_dict
and the RNG state after pretraining; tensors only, read with ``weights_only=True``) and
``meta.json`` (the key's inputs, the sha256 of ``encoder.pt``, the trial that made it, its
pretraining reports for replay, the time). ``meta.json`` is written last and is the commit mark:
an entry without it, with a checksum that does not match or with a file cut short is logged,
removed and rebuilt. Both files are written to a temporary name and renamed.

The root is a folder or a URI that ``pyarrow.fs.FileSystem.from_uri`` opens (s3://, gs://). On a
folder, :meth:`EncoderCache.claim` takes ``fcntl.flock`` on ``<key>.lock``: of two trials with one
key, the second waits and then finds the entry. On a URI the claim is a no-op: both may pretrain,
they write identical content, and the last rename wins.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cbdtune.config import ExperimentConfig, TrainConfig, valid_keys

FORMAT_VERSION = 1
# A trial's report key for the cache's warnings in that trial (an entry found broken and
# rebuilt): the worker adds them to its next report and the search prints them (callbacks.py),
# since a trial's own log lines stay in Ray's session folder.
NOTE_KEY = "encoder_cache_note"
ENCODERS = "encoders"  # the cache's folder under its root
ENCODER_FILE = "encoder.pt"
META_FILE = "meta.json"

log = logging.getLogger(__name__)

# Every config field that is *not* part of the pretraining key, with its role (module docstring).
NOT_IN_KEY: dict[str, str] = {
    # the digest of the training inputs stands for these (the pipeline fills the model's shape
    # from the data; CBDModel never reads num_classes)
    "model.in_channels": "data", "model.seq_len": "data", "model.num_classes": "data",
    # heads.build_head reads these; CBDModel does not
    "model.head": "classifier", "model.head_dropout": "classifier",
    "model.level_features": "classifier", "model.readout_segments": "classifier",
    **{f"train.{name}": "classifier" for name in (
        "classifier", "classifier_epochs", "classifier_lr", "plateau_patience", "plateau_factor",
        "early_stop_patience", "label_smoothing", "augment_jitter", "augment_scale",
        "augment_crop")},
    "train.probe_every": "probe", "train.probe_epochs": "probe", "train.probe": "probe",
    "train.probe_max_series": "probe",
    "train.device": "numerics", "train.compile": "numerics", "train.num_threads": "numerics",
}


def field_role(key: str) -> str:
    """``data``, ``classifier``, ``probe``, ``numerics`` or ``pretraining`` for a dotted key."""
    if key.startswith("data."):
        return "data"
    return NOT_IN_KEY.get(key, "pretraining")


def pretraining_fields() -> list[str]:
    """The dotted config keys that enter the pretraining key by value."""
    return [k for k in valid_keys() if field_role(k) == "pretraining"]


def determines_encoder(key: str) -> bool:
    """Whether a searched key can change the pretrained encoder (by value or through the data):
    what a reuse trial keeps fixed (:mod:`cbdtune.searcher`)."""
    return field_role(key) in ("pretraining", "data")


def inputs_digest(x: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256(f"{x.dtype.str}{tuple(x.shape)}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def key_inputs(cfg: ExperimentConfig, data: Any) -> dict[str, Any]:
    """What the pretrained encoder is a function of (see the module docstring)."""
    flat = cfg.to_dict()
    return {"format": FORMAT_VERSION,
            "data": {"name": data.name, "train_x": inputs_digest(data.train.x)},
            "config": {k: flat[k] for k in pretraining_fields()}}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def pretrain_key(cfg: ExperimentConfig, data: Any) -> str:
    """sha256 (hex) of the canonical JSON of :func:`key_inputs`."""
    return hashlib.sha256(_canonical(key_inputs(cfg, data))).hexdigest()


@dataclass
class Entry:
    """A cache hit: ``state`` as saved (``model`` state_dict, ``rng``), and its meta.json."""

    state: dict[str, Any]
    meta: dict[str, Any]


class EncoderCache:
    """Pretrained encoders under ``<root>/encoders/<key>/`` (a folder or an s3:// / gs:// URI)."""

    def __init__(self, root: str) -> None:
        import pyarrow.fs as pafs

        self.root = root
        self.local = "://" not in root or root.startswith("file://")
        self.fs, base = pafs.FileSystem.from_uri(root if "://" in root
                                                 else str(Path(root).expanduser().resolve()))
        self.base = f"{base.rstrip('/')}/{ENCODERS}"

    def _path(self, key: str, name: str = "") -> str:
        return f"{self.base}/{key}/{name}" if name else f"{self.base}/{key}"

    # ---- reading -----------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry for ``key``, or None (missing, or found broken: then logged and removed)."""
        import pyarrow.fs as pafs

        meta_info = self.fs.get_file_info(self._path(key, META_FILE))
        if meta_info.type == pafs.FileType.NotFound:
            if self.fs.get_file_info(self._path(key)).type != pafs.FileType.NotFound:
                self.discard(key, "no meta.json (a write that never finished)")
            return None
        try:
            meta = json.loads(self._read(self._path(key, META_FILE)))
            blob = self._read(self._path(key, ENCODER_FILE))
        except (OSError, ValueError) as exc:
            self.discard(key, f"unreadable ({exc})")
            return None
        problem = _problem(key, meta, blob)
        if problem:
            self.discard(key, problem)
            return None
        try:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 (torch raises several types on a bad archive)
            self.discard(key, f"{ENCODER_FILE} does not load ({type(exc).__name__})")
            return None
        return Entry(state, meta)

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def discard(self, key: str, reason: str) -> None:
        """Remove a broken entry, in one log line."""
        log.warning("encoder cache %s: entry %s %s; removed, it will be rebuilt",
                    self.root, key[:12], reason, extra={NOTE_KEY: True})
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self._path(key))

    # ---- writing -----------------------------------------------------------------------------

    def put(self, key: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Store ``state`` (tensors only) with ``meta``; meta.json gets the checksum, the key
        and the time, and is written last. ``meta`` holds ``inputs`` (:func:`key_inputs`, which
        must hash to ``key``), ``reports`` (the pretraining reports) and ``source`` (who made it)."""
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
        meta = {**meta, "format": FORMAT_VERSION, "key": key, "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.fs.create_dir(self._path(key), recursive=True)
        self._write(self._path(key, ENCODER_FILE), blob)
        self._write(self._path(key, META_FILE), json.dumps(meta, indent=1).encode())

    def _write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)  # a rename on a folder; on object stores the last write wins

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold ``key`` while pretraining it: an exclusive ``flock`` on a folder root (released
        by the kernel if the holder dies), nothing on a URI (module docstring)."""
        if not self.local:
            yield
            return
        self.fs.create_dir(self.base, recursive=True)
        with open(f"{self.base}/{key}.lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _problem(key: str, meta: dict[str, Any], blob: bytes) -> str:
    """What is wrong with an entry read back (``""`` when nothing is)."""
    if meta.get("format") != FORMAT_VERSION:
        return f"has format {meta.get('format')!r}, not {FORMAT_VERSION}"
    if meta.get("key") != key or hashlib.sha256(_canonical(meta.get("inputs"))).hexdigest() != key:
        return "meta.json names another key"
    if len(blob) != meta.get("bytes"):
        return f"{ENCODER_FILE} has {len(blob)} bytes, meta.json says {meta.get('bytes')}"
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        return f"{ENCODER_FILE} does not match its sha256"
    if not isinstance(meta.get("reports"), list):
        return "meta.json has no pretraining reports"
    return ""


# ---- what an entry holds, and how a trial uses it -------------------------------------------------


def encoder_state(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """What :meth:`EncoderCache.put` stores: the pretrained model's state_dict (on the CPU) and
    torch's RNG state after pretraining, so the classifier stages that follow draw the same
    dropout and augmentation as after pretraining in place."""
    state: dict[str, Any] = {"model": {k: v.detach().cpu().clone()
                                       for k, v in model.state_dict().items()},
                             "rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def mismatch(model: nn.Module, entry: Entry) -> str:
    """Why ``entry`` cannot be loaded into ``model`` (``""`` when it can)."""
    own, theirs = model.state_dict(), entry.state.get("model")
    if not isinstance(theirs, dict) or set(own) != set(theirs):
        return "holds other parameters than this model's"
    bad = [k for k in own if tuple(own[k].shape) != tuple(theirs[k].shape)]
    return f"holds {bad[0]} with another shape than this model's" if bad else ""


def restore(model: nn.Module, entry: Entry, device: torch.device) -> None:
    """Load the cached weights and RNG state (see :func:`encoder_state`)."""
    model.load_state_dict(entry.state["model"])
    torch.set_rng_state(entry.state["rng"])
    if device.type == "cuda" and "cuda_rng" in entry.state:
        torch.cuda.set_rng_state(entry.state["cuda_rng"], device)


def replay(reports: list[dict[str, Any]], tc: TrainConfig) -> list[dict[str, Any]]:
    """The pretraining reports a trial with ``tc`` would have made, from the cached ones.

    One per evaluation point of ``tc``'s own schedule (every ``probe_every`` epochs and the last,
    as in pipeline.pretrain), so ASHA counts the same iterations as for a trial that pretrains;
    each is the cached report of the latest epoch at or before it (its first one before that).
    Under one search the schedules match and the reports are the cached ones, unchanged.
    """
    if not reports:
        return []
    by_epoch = sorted(reports, key=lambda r: r["epoch"])
    out = []
    for epoch in range(1, tc.pretrain_epochs + 1):
        if epoch % tc.probe_every and epoch != tc.pretrain_epochs:
            continue
        before = [r for r in by_epoch if r["epoch"] <= epoch]
        out.append({**(before[-1] if before else by_epoch[0]), "epoch": epoch})
    return out
