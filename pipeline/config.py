"""The workflow's config before it is validated: command-line overrides read with their schema's types.

Snakemake reads a nested ``--config`` value with YAML's base loader, which keeps every scalar a string:
``--config train='{epochs: 2, seeds: [0, 1]}'`` arrives as ``{"epochs": "2", "seeds": ["0", "1"]}``
and the schema refuses ``'2'`` as an integer. :func:`coerce_to_schema` reads such strings again as YAML
wherever the schema asks for a number, a boolean or null (and nowhere it asks for a string), and turns
a bare number into a string where only a string fits (``--config results=2024``).
"""

from __future__ import annotations

from pathlib import Path

_NON_STRING = {"integer", "number", "boolean", "null"}


def _types(schema: dict) -> set[str]:
    """The JSON types a (sub)schema allows, looking into ``oneOf``/``anyOf``; empty when it says none."""
    found: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        found.add(declared)
    elif isinstance(declared, list):
        found.update(declared)
    for key in ("oneOf", "anyOf"):
        for branch in schema.get(key, []):
            found |= _types(branch)
    return found


def _fits(value, types: set[str]) -> bool:
    if isinstance(value, bool):
        return "boolean" in types
    if isinstance(value, int):
        return bool(types & {"integer", "number"})
    if isinstance(value, float):
        return "number" in types
    return value is None and "null" in types


def _reread(text: str, types: set[str]):
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if _fits(value, types) else text


def coerce_to_schema(value, schema: dict):
    """``value`` with the strings that the schema wants as numbers, booleans or null read as YAML.

    Objects and arrays are walked along ``properties``, ``additionalProperties`` and ``items``; a part
    the schema does not describe (e.g. a head's own options) has its strings read as YAML too.
    """
    types = _types(schema)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return {key: coerce_to_schema(item, properties.get(key, extra)) for key, item in value.items()}
    if isinstance(value, list):
        items = schema.get("items")
        return [coerce_to_schema(item, items if isinstance(items, dict) else {}) for item in value]
    if isinstance(value, str):
        if not types:  # undescribed (free-form options): read it as YAML would
            return _reread(value, _NON_STRING)
        if "string" not in types and types & _NON_STRING:
            return _reread(value, types)
        return value
    if types == {"string"} and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def coerce_config(config: dict, schema_path: str | Path) -> None:
    """Coerce ``config`` (Snakemake's, in place) to the types of the schema at ``schema_path``."""
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    coerced = coerce_to_schema(dict(config), schema)
    config.clear()
    config.update(coerced)
