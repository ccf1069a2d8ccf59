"""Build a Decoder for a method name: the one place that turns CLI/server/bench options into an engine."""

from __future__ import annotations

import math
from pathlib import Path

from .calibrate import calibrated_config
from .engine import Decoder
from .heads import load_heads, random_heads
from .lookup import LookupDrafter
from .models import CerberusError, LoadedModel
from .tree import DEFAULT_TREE, build_tree, load_tree

METHODS = ("ar", "medusa", "cerberus", "cerberus-nogate", "pld", "cerberus+lookup")
ASSETS = Path(__file__).parent / "assets" / "heads"


def default_heads_dir(lm: LoadedModel, head_type: str) -> Path:
    path = ASSETS / lm.name / head_type
    if not (path / "config.json").is_file():
        raise CerberusError(
            f"No shipped {head_type} heads for model {lm.name!r}. Train some with `cerberus train` and pass "
            "--heads DIR, or use --heads none (untrained heads: same output, slower)."
        )
    return path


def head_type_for(method: str) -> str | None:
    if method in ("ar", "pld"):
        return None
    if method == "medusa":
        return "medusa"
    if method in ("cerberus", "cerberus-nogate", "cerberus+lookup"):
        return "cerberus"
    raise CerberusError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")


def build_decoder(
    lm: LoadedModel,
    method: str = "ar",
    heads: str | None = "default",
    gate: str | None = None,
    threshold: float | None = None,
    tree: str | list | None = None,
    lookup: dict | None = None,
) -> Decoder:
    """``heads``: a checkpoint directory, ``default`` (shipped for the model) or ``none`` (untrained).

    Gate and threshold default to the checkpoint's values for ``cerberus`` and ``cerberus+lookup``,
    to off for ``medusa`` (pass --gate to measure the gate on Medusa heads) and always off for
    ``cerberus-nogate``. ``lookup``: LookupDrafter options for ``pld`` and ``cerberus+lookup``.
    """
    head_type = head_type_for(method)
    drafter = LookupDrafter(**(lookup or {})) if method in ("pld", "cerberus+lookup") else None
    if head_type is None:
        return Decoder(lm, method=method, drafter=drafter)
    if heads in (None, "none"):
        draft = random_heads(lm, head_type)
    else:
        path = default_heads_dir(lm, head_type) if heads == "default" else Path(heads)
        draft = load_heads(path, lm)
        if draft.config.head_type != head_type:
            raise CerberusError(
                f"--method {method} needs {head_type} heads, but {path} holds {draft.config.head_type} heads."
            )
    draft.pack_for(lm.weights)
    # a calibration.json next to the heads (for this device and dtype) supplies tree, gate and threshold
    cfg = draft.config if heads in (None, "none") else calibrated_config(path, lm, draft.config, gate)
    if method == "cerberus-nogate":
        gate = "off"
    elif gate is None:
        gate = cfg.gate if method in ("cerberus", "cerberus+lookup") else "off"
    if threshold is None:
        threshold = cfg.gate_threshold if gate != "off" else math.inf
    if isinstance(tree, str):
        choices = load_tree(tree)
    else:
        choices = tree or cfg.tree or DEFAULT_TREE
    built = build_tree(choices)
    if built.num_heads > cfg.num_heads:
        raise CerberusError(f"The tree is {built.num_heads} deep but the heads have only {cfg.num_heads} heads.")
    if built.top_k > draft.vocab_ids.numel():
        raise CerberusError(
            f"The tree asks for rank {built.top_k - 1}, but the heads choose among {draft.vocab_ids.numel()} tokens; "
            f"use ranks below {draft.vocab_ids.numel()}."
        )
    return Decoder(lm, draft, built, gate=gate, threshold=threshold, method=method, drafter=drafter)
