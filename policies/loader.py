"""Load and validate policy YAML files.

Errors name the file, the line and column, the key path (``tenants.acme.default_tier``) and
what was expected, with a did-you-mean for misspelt names, and every mistake in a file is
reported at once: duplicate keys, schema mistakes, cross references and any checks a
caller adds (:func:`inspect_policy`).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from .schema import BackendSpec, Policy, did_you_mean, reference_issues

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

#: The embedded policy ``joulegate serve`` uses when given none.
DEFAULT_POLICY_PATH = Path(__file__).with_name("default.yaml")


@dataclass(frozen=True)
class PolicyIssue:
    path: str
    message: str
    #: 1-based line and column in the YAML file, where known.
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        return f"{self.path or '<top level>'}: {self.message}"

    def format(self, source: str) -> str:
        """``file:line:column: key.path: message`` (the position where known)."""
        where = f"{source}:{self.line}:{self.column}" if self.line is not None else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(Exception):
    """A policy file that cannot be used; ``issues`` holds each mistake with its key path."""

    def __init__(self, source: str, issues: list[PolicyIssue]):
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {i.format(source)}" for i in issues)
        super().__init__(f"invalid policy {source}:\n{lines}")


#: A check over the parsed YAML mapping: ``(key path, message)`` for each mistake.
Check = Callable[[Mapping[str, Any]], Iterable[tuple[str, str]]]

_LAST_PART = re.compile(r"(\.[^.\[]*|\[\d+\])$")


@dataclass
class PolicyReport:
    """Everything known about one policy file after a single pass over it."""

    source: str
    #: The parsed YAML (None where the file could not be read or parsed).
    data: Any = None
    #: The validated policy; None when there are issues.
    policy: Policy | None = None
    issues: list[PolicyIssue] = field(default_factory=list)
    #: Key path → (line, column) of the key (list items: the item) in the file.
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)

    def locate(self, issue: PolicyIssue, anchor: str | None = None) -> PolicyIssue:
        """The issue with the position of ``anchor`` (default: its path), or of the nearest
        enclosing key that the file has (a missing key: its parent mapping)."""
        if issue.line is not None or not self.marks:
            return issue
        candidates = [anchor] if anchor else []
        path = issue.path
        while True:
            candidates.append(path)
            if not path:
                break
            path = _LAST_PART.sub("", path)
            path = path if path != candidates[-1] else ""
        for path in candidates:
            if path in self.marks:
                line, column = self.marks[path]
                return replace(issue, line=line, column=column)
        return issue

    def add(self, path: str, message: str, anchor: str | None = None) -> None:
        self.issues.append(self.locate(PolicyIssue(path, message), anchor))

    def error(self) -> PolicyError:
        return PolicyError(self.source, self.issues)


def _index(node: yaml.Node, path: str, report: PolicyReport, stack: tuple[int, ...] = ()) -> None:
    """Record the position of every key and list item under ``node``; duplicate keys are
    issues (PyYAML would keep the last one silently)."""
    if id(node) in stack:  # a recursive alias
        return
    stack += (id(node),)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Mark] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            child = f"{path}.{key}" if path else key
            mark = key_node.start_mark
            if key in seen and key != "<<":
                report.issues.append(PolicyIssue(
                    child, f"duplicate key '{key}' (first given on line {seen[key].line + 1}); "
                    "give each key once", mark.line + 1, mark.column + 1))
            seen.setdefault(key, mark)
            report.marks[child] = (mark.line + 1, mark.column + 1)  # the value in force: the last
            _index(value_node, child, report, stack)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            report.marks.setdefault(child, (item.start_mark.line + 1, item.start_mark.column + 1))
            _index(item, child, report, stack)


def _walk(loc: tuple[Any, ...]) -> tuple[Any, str]:
    """Follow an error location through the Policy schema.

    Returns the annotation validating the value at ``loc`` (None where ``loc`` leaves the
    schema) and the key path as a user wrote it, without pydantic's union tags.
    """
    current: Any = Policy
    path = ""
    parts = list(loc)
    while parts:
        origin, args = typing.get_origin(current), typing.get_args(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            name = str(parts.pop(0))
            path += f".{name}" if path else name
            field_info = current.model_fields.get(name)
            current = field_info.annotation if field_info else None
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
    return current, path


def _model(annotation: Any) -> type[BaseModel] | None:
    """The model class an annotation validates with (through Annotated and ``| None``)."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
            annotation = next(a for a in args if a is not type(None))
        else:
            break
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _choices(annotation: Any) -> list[Any]:
    """The values a Literal annotation allows (through Annotated and unions)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return list(args)
    if origin in (typing.Annotated,):
        return _choices(args[0])
    if origin in (typing.Union, types.UnionType):
        return [c for a in args for c in _choices(a)]
    return []


def _literal_kind(model: Any) -> str | None:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    field_info = model.model_fields.get("kind")
    if field_info is None:
        return None
    args = typing.get_args(field_info.annotation)
    return args[0] if args else None


_KINDS = [_literal_kind(a) for a in typing.get_args(typing.get_args(BackendSpec)[0])]
_BACKEND_KINDS = ", ".join(repr(k) for k in _KINDS)


def _issue_from_error(err: ErrorDetails) -> tuple[PolicyIssue, str | None]:
    """The issue for one pydantic error, and the key path whose position it should carry
    when that is not its own."""
    loc = tuple(err["loc"])
    annotation, path = _walk(loc)
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        parent = _model(_walk(loc[:-1])[0])
        if parent is None:
            return PolicyIssue(path, "unknown key; see the policy reference"), None
        allowed = list(parent.model_fields)
        return PolicyIssue(path, f"unknown key; expected one of: {', '.join(allowed)}"
                           f"{did_you_mean(loc[-1], allowed)}"), None
    if kind == "missing":
        return PolicyIssue(path, "required key is missing"), None
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = got.get("kind") if isinstance(got, dict) else None
        if tag is None:
            return PolicyIssue(path, f"missing key 'kind'; expected one of: {_BACKEND_KINDS}"), None
        return PolicyIssue(path, f"unknown backend kind {tag!r}; expected one of: "
                                 f"{_BACKEND_KINDS}{did_you_mean(tag, _KINDS)}"), f"{path}.kind"
    message = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(got, (dict, list)) or kind == "value_error" else f" (got {got!r})"
    hint = did_you_mean(got, _choices(annotation)) if kind == "literal_error" else ""
    return PolicyIssue(path, f"{message}{shown}{hint}"), None


def _validate(report: PolicyReport, checks: Iterable[Check]) -> None:
    """Schema, cross references and ``checks`` over ``report.data``, all of them whatever
    the others found; sets ``report.policy`` when nothing is wrong."""
    data = report.data
    if not isinstance(data, dict):
        report.issues.append(report.locate(PolicyIssue("", "the policy must be a YAML mapping")))
        return
    policy = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            report.issues.append(report.locate(*_issue_from_error(err)))
    for check in (reference_issues, *checks):
        for path, message in check(data):
            report.add(path, message)
    if all(i.line is not None for i in report.issues):  # in file order; else as found
        report.issues.sort(key=lambda i: (i.line, i.column))
    if not report.issues:
        report.policy = policy


def parse_policy(data: Any, source: str = "<policy>", checks: Iterable[Check] = ()) -> Policy:
    """Validate already-parsed YAML/JSON data as a :class:`Policy`. Raises :class:`PolicyError`."""
    report = PolicyReport(source, data)
    _validate(report, checks)
    if report.issues:
        raise report.error()
    assert report.policy is not None
    return report.policy


def inspect_policy(path: str | Path, checks: Iterable[Check] = ()) -> PolicyReport:
    """Read and check a policy file in one pass, without raising: every mistake, each with
    its line and column, is in the report's ``issues``; ``policy`` is set when there are none.

    ``checks`` are more checks over the parsed mapping (``(key path, message)`` pairs), for
    callers that know more than the schema (the model catalog, the estimators).
    """
    path = Path(path)
    report = PolicyReport(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        report.issues.append(PolicyIssue("", f"cannot read file: {reason}"))
        return report
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _index(node, "", report)
            report.marks[""] = (node.start_mark.line + 1, node.start_mark.column + 1)
        report.data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        report.issues = [PolicyIssue("", f"not valid YAML: {problem}",
                                     *((mark.line + 1, mark.column + 1) if mark else ()))]
        report.data = None
        return report
    finally:
        loader.dispose()
    _validate(report, checks)  # after the duplicate keys _index found
    return report


def load_policy(path: str | Path, checks: Iterable[Check] = ()) -> Policy:
    """Read, parse and validate a policy file. Raises :class:`PolicyError` listing every
    mistake with its line and column."""
    report = inspect_policy(path, checks)
    if report.issues:
        raise report.error()
    assert report.policy is not None
    return report.policy
