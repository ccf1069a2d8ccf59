"""Build a Decoder for a method name: the one place that turns CLI/server/bench options into an engine.

``effective_config`` decides every setting (weights, tree, gate, threshold) and says why; the CLI,
the server, the bench and ``--json`` output report it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .engine import Decoder
from .heads import HeadsConfig, load_heads, random_heads
from .lookup import MAX_LEN as LOOKUP_MAX_LEN
from .lookup import LookupDrafter
from .models import CerberusError, LoadedModel
from .tree import DEFAULT_TREE, build_tree, load_tree

METHODS = ("ar", "medusa", "cerberus", "cerberus-nogate", "pld", "cerberus+lookup")
LOOKUP_METHODS = ("pld", "cerberus+lookup")  # the methods that draft prompt-lookup chains
LLAMA_CPP = "llama.cpp"  # the peer, not our engine: bench/llamacpp.py
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


@dataclass
class EffectiveConfig:
    """The configuration a decoder runs with, and where each setting came from."""

    method: str
    weights: str
    tree: list | None  # None: no heads (ar, pld)
    gate: str
    threshold: float
    calibration: str  # "quick calibration made on this machine, 2026-11-26" or "defaults: ..."
    source: dict[str, str] = field(default_factory=dict)  # setting -> why
    lookup: int | None = None  # longest prompt-lookup chain (LOOKUP_METHODS; 0: none), else None
    lookup_merge: bool | None = None  # cerberus+lookup: chain merged into the tree, or verified instead of it
    min_confidence: float = 0.0  # verify only tree nodes the heads give at least this chance (0: all)

    def why(self) -> str:
        settings = [f"weights {self.weights} ({self.source['weights']})"]
        if self.tree is not None:
            settings.append(f"{len(self.tree)}-node tree ({self.source['tree']})")
            gate = f"gate {self.gate} < {self.threshold:.3g}"
            if self.gate == "off":
                gate = "gate off"
            elif math.isinf(self.threshold):
                gate = "always speculates" if self.threshold > 0 else "never speculates"
                if self.threshold < 0 and self.lookup:  # cerberus+lookup: the chains still do
                    gate = "heads never draft"
            settings.append(f"{gate} ({self.source['threshold' if self.gate != 'off' else 'gate']})")
            if self.min_confidence > 0:
                settings.append(
                    f"verifies nodes of confidence >= {self.min_confidence:g} ({self.source['min_confidence']})"
                )
        if self.lookup is not None:
            chains = f"lookup chains of {self.lookup} tokens" if self.lookup else "no lookup chains"
            settings.append(f"{chains} ({self.source['lookup']})")
        if self.lookup and self.lookup_merge is not None:
            how = "merged into the tree" if self.lookup_merge else "verified instead of the tree where one matches"
            settings.append(f"{how} ({self.source['lookup_merge']})")
        return f"{self.method}: " + ", ".join(settings) + f"; {self.calibration}"

    def to_json(self) -> dict:
        return asdict(self) | {"threshold": str(self.threshold) if math.isinf(self.threshold) else self.threshold}


def effective_config(
    method: str,
    weights: str,
    weights_why: str,
    checkpoint: HeadsConfig | None,
    calibration: tuple[dict, bool] | None,
    gate: str | None = None,
    threshold: float | None = None,
    tree: list | None = None,
    lookup: int | None = None,
    merge: bool | None = None,
    min_confidence: float | None = None,
) -> EffectiveConfig:
    """Every setting from, in rising precedence: the method's defaults, the checkpoint's defaults,
    the calibration for this machine and weight format, and the caller's flags (None: not given).

    Two settings are part of a method's definition rather than defaults: ``cerberus-nogate`` never
    gates, and ``medusa`` (the baseline) runs ungated and verifies its whole tree unless a gate or
    a ``min_confidence`` is asked for.
    ``calibration``: (the calibration file's content, whether it shipped with the heads; for a method
    without heads, the Cerberus heads' calibration, which also measures lookup chains alone).
    ``lookup``: the longest prompt-lookup chain (LOOKUP_METHODS only); ``merge``: whether
    ``cerberus+lookup`` merges it into the tree or verifies it instead of the tree."""
    from .calibration.run import describe

    head_type = head_type_for(method)
    eff = EffectiveConfig(method, weights, None, "off", math.inf, "no heads", {"weights": weights_why})
    choice = calibration[0]["choices"].get(weights) if calibration else None
    kind = None
    if method in LOOKUP_METHODS:
        kind, calibrated = calibrated_lookup((choice or {}).get("lookup", {}), head_type is not None)
        eff.lookup, eff.source["lookup"] = LOOKUP_MAX_LEN, "method default"
        if calibrated is not None:
            eff.lookup, eff.source["lookup"] = calibrated["max_len"], "calibrated"
        if lookup is not None:
            eff.lookup, eff.source["lookup"] = lookup, "flag"
        if head_type is not None and kind != "solo":  # "solo" next to the heads: they never draft
            eff.lookup_merge, eff.source["lookup_merge"] = True, "method default"
            if calibrated is not None:
                eff.lookup_merge, eff.source["lookup_merge"] = kind == "merged", "calibrated"
        if head_type is not None and merge is not None:
            eff.lookup_merge, eff.source["lookup_merge"] = merge, "flag"
    if head_type is None:
        return eff
    eff.tree, eff.gate = DEFAULT_TREE, "logits"
    eff.source |= dict.fromkeys(("tree", "gate", "threshold", "min_confidence"), "method default")
    eff.calibration = "defaults: no calibration"
    if checkpoint is not None:
        eff.gate, eff.threshold = checkpoint.gate, checkpoint.gate_threshold
        eff.source |= {"gate": "checkpoint", "threshold": "checkpoint"}
        if checkpoint.tree:
            eff.tree, eff.source["tree"] = checkpoint.tree, "checkpoint"
    thresholds = {}
    if choice is not None:
        eff.calibration = describe(*calibration)
        eff.tree, eff.gate, eff.threshold = choice["tree"], choice["gate"], float(choice["threshold"])
        eff.source |= dict.fromkeys(("tree", "gate", "threshold"), "calibrated")
        thresholds = {g: float(th) for g, th in choice["thresholds"].items()}
        if method != "medusa" and "min_confidence" in choice:
            eff.min_confidence, eff.source["min_confidence"] = float(choice["min_confidence"]), "calibrated"
    elif calibration:
        eff.calibration = f"defaults: the calibration has no {weights} choice"
    if head_type is not None and kind == "solo":  # raced: lookup chains ran faster without the heads
        eff.threshold, eff.source["threshold"] = -math.inf, "calibrated: lookup chains alone ran faster"
    if tree is not None:
        eff.tree, eff.source["tree"] = tree, "flag"
    if gate is not None:
        eff.gate, eff.source["gate"] = gate, "flag"
        if gate in thresholds:  # the two entropies live on different scales
            eff.threshold = thresholds[gate]
    elif method == "medusa":
        eff.gate, eff.source["gate"] = "off", "the Medusa baseline runs ungated (--gate to gate it)"
    if method == "cerberus-nogate":
        eff.gate, eff.source["gate"] = "off", "cerberus-nogate never gates"
    if threshold is not None:
        eff.threshold, eff.source["threshold"] = threshold, "flag"
    if min_confidence is not None:
        eff.min_confidence, eff.source["min_confidence"] = min_confidence, "flag"
    if eff.gate == "off":
        eff.threshold = math.inf
    return eff


def calibrated_lookup(lookups: dict, with_heads: bool) -> tuple[str, dict | None]:
    """The calibrated lookup chains a method runs: (kind, {"max_len", "tokens_per_s"} or None).
    Alone: "solo". Next to the heads: "merged" into their tree or verified "instead" of it where a
    chain matches, whichever calibration predicts faster (ties: merged; calibrations made before
    2026-11-27 have no "instead"); or "solo" where the calibration raced that against chains alone
    and the heads did not pay (``calibration.run.race_lookup``): then the heads never draft."""
    if not with_heads or lookups.get("raced", {}).get("winner") == "alone":
        return "solo", lookups.get("solo")
    kinds = [k for k in ("merged", "instead") if k in lookups]
    if not kinds:
        return "merged", None
    kind = max(kinds, key=lambda k: lookups[k]["tokens_per_s"])  # max keeps the first of equals
    return kind, lookups[kind]


def heads_path(lm: LoadedModel, method: str, heads: str | None) -> Path | None:
    """The heads directory a method reads (None: no heads, or untrained ones)."""
    head_type = head_type_for(method)
    if head_type is None or heads in (None, "none"):
        return None
    return default_heads_dir(lm, head_type) if heads == "default" else Path(heads)


def calibration_heads(lm: LoadedModel, method: str, heads: str | None) -> Path | None:
    """The heads whose calibration ``method`` reads: its own, or for a method without heads the
    shipped Cerberus heads' (their calibration holds the weight format and lookup chains for those
    too); None when there are none."""
    try:
        return heads_path(lm, method if head_type_for(method) else "cerberus", heads)
    except CerberusError:  # no shipped heads for this model
        return None


def machine_calibration(lm: LoadedModel, path: Path | None, calibrate: bool | None) -> tuple[dict, bool] | None:
    """The calibration of ``path`` for this machine (running a quick one when none exists and
    auto-calibration is on), and whether it shipped with the heads."""
    from .calibration.run import auto_calibration_enabled, ensure_calibration

    if path is None:
        return None
    found = ensure_calibration(lm, path, run=auto_calibration_enabled(calibrate))
    if found is None:
        return None
    data, file = found
    return data, file.resolve().is_relative_to(path.resolve())


def choose_weights(
    lm: LoadedModel,
    requested: str,
    method: str = "cerberus",
    heads: str | None = "default",
    calibrate: bool | None = None,
) -> LoadedModel:
    """The model in the format to run: ``requested`` unless ``auto``; ``auto`` takes the calibrated
    fastest format of ``method``'s heads on this machine (cerberus heads for methods without heads),
    else the device's default (``runtime.resolve_weights``). ``lm`` was loaded with ``requested``."""
    if requested != "auto":
        return lm.with_weights(lm.weights, "flag")
    if lm.runtime.name != "lean":
        return lm.with_weights(lm.weights, f"auto: the {lm.runtime.name} runtime's format")
    found = machine_calibration(lm, calibration_heads(lm, method, heads), calibrate)
    if found is None:
        return lm.with_weights(lm.weights, "auto: default for the device, no calibration")
    return lm.with_weights(found[0]["weights"], "auto: calibrated fastest on this machine")


def build_decoder(
    lm: LoadedModel,
    method: str = "ar",
    heads: str | None = "default",
    gate: str | None = None,
    threshold: float | None = None,
    tree: str | list | None = None,
    lookup: dict | None = None,
    calibrate: bool | None = None,
    min_confidence: float | None = None,
) -> Decoder:
    """``heads``: a checkpoint directory, ``default`` (shipped for the model) or ``none`` (untrained).
    ``gate`` / ``threshold`` / ``tree`` / ``min_confidence``: flags (None: not given; see ``effective_config``).
    ``lookup``: LookupDrafter options for ``pld`` and ``cerberus+lookup`` (its ``max_len`` and
    ``merge`` override the calibrated chain length and mode). ``calibrate``: run a quick calibration
    when the heads have none for this machine (None: unless $CERBERUS_NO_CALIBRATE). The decoder's
    ``config`` says what it runs with and why."""
    head_type = head_type_for(method)
    lookup = dict(lookup or {})

    def drafter(eff: EffectiveConfig) -> LookupDrafter | None:
        if method not in LOOKUP_METHODS:
            return None
        merge = {} if eff.lookup_merge is None else {"merge": eff.lookup_merge}
        return LookupDrafter(**(lookup | {"max_len": eff.lookup} | merge))

    if head_type is None:  # ar, pld (the Cerberus heads' calibration holds pld's chain length)
        path = calibration_heads(lm, method, heads) if method in LOOKUP_METHODS else None
        calibration = machine_calibration(lm, path, calibrate)
        eff = effective_config(method, lm.weights, lm.weights_why, None, calibration, lookup=lookup.get("max_len"))
        decoder = Decoder(lm, method=method, drafter=drafter(eff))
        decoder.config = eff
        return decoder
    path = heads_path(lm, method, heads)
    if path is None:
        draft = random_heads(lm, head_type)
    else:
        draft = load_heads(path, lm)
        if draft.config.head_type != head_type:
            raise CerberusError(
                f"--method {method} needs {head_type} heads, but {path} holds {draft.config.head_type} heads."
            )
    draft.pack_for(lm.weights)
    calibration = machine_calibration(lm, path, calibrate)
    choices = load_tree(tree) if isinstance(tree, str) else tree
    eff = effective_config(
        method,
        lm.weights,
        lm.weights_why,
        draft.config,
        calibration,
        gate,
        threshold,
        choices,
        lookup.get("max_len"),
        lookup.get("merge"),
        min_confidence,
    )
    built = build_tree(eff.tree)
    if built.num_heads > draft.config.num_heads:
        raise CerberusError(
            f"The tree is {built.num_heads} deep but the heads have only {draft.config.num_heads} heads."
        )
    if built.top_k > draft.vocab_ids.numel():
        raise CerberusError(
            f"The tree asks for rank {built.top_k - 1}, but the heads choose among {draft.vocab_ids.numel()} tokens; "
            f"use ranks below {draft.vocab_ids.numel()}."
        )
    decoder = Decoder(
        lm,
        draft,
        built,
        gate=eff.gate,
        threshold=eff.threshold,
        method=method,
        drafter=drafter(eff),
        min_confidence=eff.min_confidence,
    )
    decoder.config = eff
    return decoder
