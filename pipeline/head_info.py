"""What the viewer and the report show of a head: its label, description, display order, and whether it
is the baseline every other head is compared against.

Each head class declares these (``pipeline.models.heads.Head``: ``label``, ``description``, ``order``,
``baseline``); training writes them into the run's ``model.json`` and MLflow tags, heatmaps into their
JSON, so the viewer and the report read them from there and need neither torch nor the registry: a
head added in one class shows up everywhere with its own words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HeadInfo:
    name: str  # the registered name: gap, cbam, ...
    label: str = ""  # shown in tables and legends, e.g. "GAP"; the name when empty
    description: str = ""  # one line: what the head does
    order: int = 1000  # display order, smaller first; heads with equal order sort by name
    baseline: bool = False  # the head the report pairs every other head with

    @property
    def shown(self) -> str:
        return self.label or self.name

    def sort_key(self) -> tuple:
        return (self.order, self.name)

    def to_dict(self) -> dict:
        return asdict(self)

    def at_slide_level(self) -> "HeadInfo":
        """The same head as a slide-level model (over a slide's tile grid, trained from slide labels): its heatmap
        layer's name (``{name}_slide``), label and order, after every tile-level head, so one viewer page shows
        both sets of layers side by side."""
        return HeadInfo(f"{self.name}_slide", f"{self.shown} · slide level",
                        f"{self.description} — over the slide's tile grid, trained from slide labels alone",
                        self.order + 10_000, False)

    @classmethod
    def from_dict(cls, data: dict | None, name: str | None = None) -> "HeadInfo":
        """From :meth:`to_dict`'s form; unknown keys are ignored, missing ones take the defaults."""
        data = dict(data or {})
        if name is not None:
            data.setdefault("name", name)
        known = {k: data[k] for k in ("name", "label", "description", "order", "baseline") if k in data}
        known["order"] = int(known.get("order", 1000))
        known["baseline"] = bool(known.get("baseline", False)) and str(known.get("baseline")).lower() != "false"
        return cls(**known)


def registered_heads() -> dict[str, HeadInfo]:
    """Every registered head's ``HeadInfo`` (``pipeline.models.head_catalog``), without importing torch
    when nothing changed: the catalogue is cached under ``$XDG_CACHE_HOME/gapless`` (``~/.cache``),
    keyed by the size and modification time of each file of ``pipeline/models``. Parsing the workflow
    uses it to check head names (importing torch and timm costs seconds)."""
    import hashlib
    import json
    import os
    from pathlib import Path

    models = Path(__file__).with_name("models")
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(models.glob("*.py"))]
    key = hashlib.sha256(json.dumps([str(models), stamp]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gapless" / f"heads-{key}.json"
    try:
        return {name: HeadInfo.from_dict(info) for name, info in json.loads(cache.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, TypeError):
        pass
    from pipeline.models import head_catalog

    catalog = head_catalog()
    try:
        from pipeline.files import atomic_write_text

        atomic_write_text(cache, json.dumps({name: info.to_dict() for name, info in catalog.items()}))
    except OSError:
        pass  # the cache only saves time
    return catalog
