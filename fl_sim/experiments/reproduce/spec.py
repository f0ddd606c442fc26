"""Paper reproductions' specs: the experiment YAMLs in configs/papers/, their reduced/full settings, the kind registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ProgressFn = Callable[[str], None]

EXPERIMENT_KINDS: dict[str, Callable[..., dict[str, Any]]] = {}

FLOAT_BITS = 32

def register_kind(name: str):
    """Decorator: ``@register_kind("runs")`` makes a runner ``fn(spec, settings, out, progress=...)`` available."""

    def deco(fn):
        EXPERIMENT_KINDS[name] = fn
        return fn

    return deco

# ---------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------
def papers_dir() -> Path:
    """configs/papers/ of the working directory if present, else the shipped one (fl_sim/configs/papers)."""
    from fl_sim.config import config_dir

    local = Path("configs") / "papers"
    if local.is_dir():
        return local
    return config_dir() / "papers"

def list_experiments() -> list[tuple[str, str, str]]:
    """(name, kind, title) of every experiment in :func:`papers_dir`."""
    out = []
    for p in sorted(papers_dir().glob("*.yaml")):
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            raw = {}
        out.append((p.stem, str(raw.get("kind", "?")), str(raw.get("title", ""))))
    return out

def _spec_path(name: str | Path) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    from fl_sim.config import config_dir

    for base in (papers_dir(), config_dir() / "papers"):
        cand = base / f"{stem}.yaml"
        if cand.is_file():
            return cand
    known = ", ".join(n for n, _, _ in list_experiments()) or "none"
    raise FileNotFoundError(f"no experiment {str(name)!r} in {papers_dir()} (known: {known}); or give a YAML path")

def load_spec(name: str | Path) -> dict[str, Any]:
    """The experiment's YAML as a dict, checked (name, kind registered, reduced/full mappings)."""
    path = _spec_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with name, kind, reduced, full")
    kind = raw.get("kind")
    if kind not in EXPERIMENT_KINDS:
        raise ValueError(f"{path}: kind={kind!r} is not one of {', '.join(sorted(EXPERIMENT_KINDS))}")
    for key in ("reduced", "full"):
        if not isinstance(raw.get(key) or {}, dict):
            raise ValueError(f"{path}: '{key}' must be a mapping of settings")
    raw.setdefault("name", path.stem)
    raw["_path"] = str(path)
    return raw

def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if k == "set" and isinstance(out.get(k), list) and isinstance(v, list):
            out[k] = list(out[k]) + list(v)  # later overrides win
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out

def merged_settings(spec: dict[str, Any], full: bool) -> dict[str, Any]:
    """``reduced`` settings, with ``full`` merged over them when ``full`` (``set`` lists appended)."""
    base = dict(spec.get("reduced") or {})
    return _merge(base, dict(spec.get("full") or {})) if full else base
