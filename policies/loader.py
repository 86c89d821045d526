"""Load and validate policy YAML files.

Errors name the file, the key path (``tenants.acme.default_tier``) and what was expected,
and every mistake in a file is reported at once.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .schema import BackendSpec, Policy

#: The embedded policy ``joulegate serve`` uses when given none.
DEFAULT_POLICY_PATH = Path(__file__).with_name("default.yaml")


@dataclass(frozen=True)
class PolicyIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<top level>'}: {self.message}"


class PolicyError(Exception):
    """A policy file that cannot be used; ``issues`` holds each mistake with its key path."""

    def __init__(self, source: str, issues: list[PolicyIssue]):
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {i}" for i in issues)
        super().__init__(f"invalid policy {source}:\n{lines}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _walk(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, str]:
    """Follow an error location through the Policy schema.

    Returns the model class validating the mapping at ``loc`` (None where ``loc`` ends
    elsewhere) and the key path as a user wrote it, without pydantic's union tags.
    """
    current: Any = Policy
    path = ""
    parts = list(loc)
    while parts:
        origin, args = typing.get_origin(current), typing.get_args(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            name = str(parts.pop(0))
            path += f".{name}" if path else name
            field = current.model_fields.get(name)
            current = field.annotation if field else None
        elif origin is typing.Annotated:
            current = args[0]
        elif origin in (dict, list):
            key = parts.pop(0)
            path += f"[{key}]" if isinstance(key, int) else f".{key}"
            current = args[-1]
        elif origin in (typing.Union, types.UnionType):
            present = [a for a in args if a is not type(None)]
            if len(present) == 1:  # `X | None`: pydantic adds no tag for the optional
                current = present[0]
                continue
            tag = parts.pop(0)  # pydantic puts the discriminator value in loc
            current = next((a for a in args if _literal_kind(a) == tag), None)
        else:
            path += "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
            current, parts = None, []
    while typing.get_origin(current) is typing.Annotated:
        current = typing.get_args(current)[0]
    model = current if isinstance(current, type) and issubclass(current, BaseModel) else None
    return model, path


def _literal_kind(model: Any) -> str | None:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    field = model.model_fields.get("kind")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if args else None


_BACKEND_KINDS = ", ".join(
    repr(_literal_kind(a)) for a in typing.get_args(typing.get_args(BackendSpec)[0]))


def _issue_from_error(err: dict[str, Any]) -> PolicyIssue:
    loc = tuple(err["loc"])
    _, path = _walk(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, _ = _walk(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the policy reference"
        return PolicyIssue(path, f"unknown key; expected one of: {allowed}")
    if kind == "missing":
        return PolicyIssue(path, "required key is missing")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        got = err["input"].get("kind") if isinstance(err["input"], dict) else None
        what = f"unknown backend kind {got!r}" if got else "missing key 'kind'"
        return PolicyIssue(path, f"{what}; expected one of: {_BACKEND_KINDS}")
    message = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or kind == "value_error" else f" (got {got!r})"
    return PolicyIssue(path, f"{message}{shown}")


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate already-parsed YAML/JSON data as a :class:`Policy`."""
    if not isinstance(data, dict):
        raise PolicyError(source, [PolicyIssue("", "the policy must be a YAML mapping")])
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(source, [_issue_from_error(e) for e in exc.errors()]) from None
    issues = [PolicyIssue(p, m) for p, m in policy.reference_issues()]
    if issues:
        raise PolicyError(source, issues)
    return policy


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate a policy file. Raises :class:`PolicyError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), [PolicyIssue("", f"cannot read file: {exc.strerror}")]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(str(path), [PolicyIssue(where, f"not valid YAML: {problem}")]) from None
    return parse_policy(data, str(path))
