"""Calibration files: the hardware key that names them, where they live, reading and writing.

One calibration per heads checkpoint and per machine (``hardware_key``), so one heads directory can
hold calibrations for several machines:

- made here: ``$CERBERUS_CACHE/calibration/<heads>-<hash of model.safetensors>/<hardware key>.json``
  (never in the heads directory, which may be the installed package; retrained heads have another
  hash and start uncalibrated);
- shipped with the heads: ``<heads dir>/calibration/<hardware key>.json``.

The user's own calibration wins over a shipped one. A file that does not parse, that was made for
another key or format version, or that predates a weight format this machine can run now (it could
not have measured it, so its "fastest" is not), is ignored with a warning (and recalibrated where
that is on).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

from ..heads import _atomic_write
from ..models import CerberusError, cache_root
from ..tree import build_tree

VERSION = 3  # 3: overheads per tree depth (a step runs only the heads its tree reaches)
SHIPPED_DIR = "calibration"
# the weight formats that existed before files listed them (``known_formats``, written since w4a8)
FORMATS_BEFORE_LISTED = ("float32", "bfloat16", "int8", "int4")


def hardware_key(machine: dict) -> str:
    """A readable, file-name-safe key for ``runtime.machine()``: its main fields plus a hash of all
    of them, e.g. ``cpu-amd-epyc-avx2-2t-torch2.13.0-1a2b3c4d``."""
    main = [machine["device"], machine["name"]]
    if machine["device"] == "cpu":  # a GPU's dict has no ISA or thread count
        main += [machine.get("isa", ""), f"{machine['threads']}t"]
    slug = re.sub(r"[^a-z0-9.]+", "-", "-".join(main + [f"torch{machine['torch'].split('+')[0]}"]).lower())
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug.strip('-')}-{digest}"


def heads_digest(heads_dir: Path) -> str:
    weights = heads_dir / "model.safetensors"
    digest = hashlib.sha256()
    if weights.is_file():
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(str(heads_dir.resolve()).encode())
    return digest.hexdigest()[:16]


def calibration_path(heads_dir: str | Path, key: str) -> Path:
    """Where a calibration made on this machine for these heads goes (and is looked for first)."""
    heads_dir = Path(heads_dir)
    return cache_root() / "calibration" / f"{heads_dir.name}-{heads_digest(heads_dir)}" / f"{key}.json"


def shipped_path(heads_dir: str | Path, key: str) -> Path:
    return Path(heads_dir) / SHIPPED_DIR / f"{key}.json"


def write_calibration(path: Path, data: dict) -> Path:
    """Atomically (temp file + rename): a reader, or a concurrent first run, never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=1)))
    return path


def _check(data: dict, key: str, formats: list[str] | None) -> None:
    """Raise on anything a decoder would trip over later, or on a file that predates one of ``formats``."""
    if data.get("version") != VERSION:
        raise ValueError(f"format version {data.get('version')}, expected {VERSION}")
    if data["hardware_key"] != key:
        raise ValueError(f"made for {data['hardware_key']}")
    known = {*data.get("known_formats", FORMATS_BEFORE_LISTED), *data["choices"]}
    newer = [f for f in formats or [] if f not in known]
    if newer:
        raise ValueError(f"made before the {', '.join(newer)} format, which this machine runs")
    for weights, choice in data["choices"].items():
        build_tree(choice["tree"])
        if math.isnan(float(choice["threshold"])):
            raise ValueError(f"{weights}: threshold is nan")
    if data["weights"] not in data["choices"]:
        raise ValueError(f"no choice for its best format {data['weights']}")


def read_calibration(heads_dir: str | Path, key: str, formats: list[str] | None = None) -> tuple[dict, Path] | None:
    """The calibration for these heads on the machine ``key``, and its path; None when there is none
    (or only unreadable or stale ones, each named in a warning on stderr). ``formats``: the weight
    formats this machine runs; a file made before one of them existed is stale."""
    for path in (calibration_path(heads_dir, key), shipped_path(heads_dir, key)):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            _check(data, key, formats)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, CerberusError) as e:
            print(f"warning: ignoring calibration {path}: {e}", file=sys.stderr)
            continue
        return data, path
    return None
