"""YAML loading, ``--set`` overrides, and validation failures turned into one :class:`ConfigError`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from raycv.config.annotate import AnnotateConfig
from raycv.config.train import TrainConfig
from raycv.errors import ConfigError

# ---------------------------------------------------------------------------------------------- loading


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    if "=" not in assignment:
        raise ConfigError(
            "--set", assignment, "Write overrides as key.path=value, e.g. --set train.epochs=3."
        )
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError("--set", assignment, "The key before '=' is empty; e.g. --set train.epochs=3.")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key, child, f"'{part}' is not a section, so '{key}' cannot be set.")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("CONFIG", str(path), "Pass the path of an existing YAML config file.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("CONFIG", str(path), f"Fix the YAML syntax: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("CONFIG", type(data).__name__, "The file must hold a mapping of keys (YAML dict).")
    return data


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if (isinstance(data, dict) and part in data) or (
            isinstance(data, list | tuple) and isinstance(part, int) and part < len(data)
        ):
            data = data[part]
        else:
            return None
    return data


def _fix_for(err: Any, model_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        section: Any = model_cls
        for part in loc[:-1]:
            field = getattr(section, "model_fields", {}).get(part)
            ann = getattr(field, "annotation", None)
            section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        allowed = sorted(getattr(section, "model_fields", {}))
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"Did you mean '{close[0]}'? " if close else ""
        return f"Unknown key. {hint}Allowed keys here: {', '.join(allowed)}."
    if kind == "missing":
        return "This key is required; add it to the config or pass --set " + ".".join(map(str, loc)) + "=..."
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return msg[0].upper() + msg[1:] + ("" if msg.endswith(".") else ".")


def _to_config_error(exc: ValidationError, model_cls: type[BaseModel], data: dict[str, Any]) -> ConfigError:
    err = exc.errors()[0]
    # Union members add their own names to the location (e.g. 'int' / 'tuple[int, int]'); keep config keys.
    tags = {"int", "str", "float", "bool", "constrained-int", "constrained-float"}
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in tags)))
    if not loc:  # a cross-field check: its message starts with the field it is about ("model.arch ...")
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        head = msg.split(" ", 1)[0]
        if "." in head:
            loc = tuple(head.split("."))
            err = {**err, "msg": msg}
    field = ".".join(str(p) for p in loc) or "CONFIG"
    value = _lookup(data, loc) if err["type"] != "missing" else None
    return ConfigError(field, value, _fix_for(err, model_cls, loc))


def build_config(model_cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate ``data`` into ``model_cls``; the first problem becomes a :class:`ConfigError`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _to_config_error(exc, model_cls, data) from None


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, kind: Literal["train", "annotate"] = "train"
) -> TrainConfig | AnnotateConfig:
    """Read a YAML config, apply ``--set`` overrides and validate it.

    Raises:
        ConfigError: naming the field, the value and the fix for the first problem found.
    """
    data = _read_yaml(path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return build_config(TrainConfig if kind == "train" else AnnotateConfig, data)  # type: ignore[no-any-return]


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict of a config (for model cards and summaries)."""
    return cfg.model_dump(mode="json")
