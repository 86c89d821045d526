"""Checks a policy needs beyond its schema, before anything is served.

- :data:`CHECKS`: mistakes that need to know the gateway (the model catalog, the
  difficulty estimators, the environment's key variables); pass them to
  :func:`policies.load_policy` or :func:`policies.inspect_policy` so that they are reported
  in the same pass as the schema's, each with its line and column.
- :func:`missing_extras`: backends (and a ledger) whose Python package is not installed,
  one line each with the exact ``pip install`` command; each backend kind declares its own
  (:attr:`backends.BackendKind.requirement`). Found with :func:`importlib.util.find_spec`:
  nothing heavy is imported.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from backends import KINDS, BackendKind, Requirement
from policies import Policy, did_you_mean, resolve_key_ref

_ENV_REF = re.compile(r"^env:[A-Za-z_][A-Za-z0-9_]*$")


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def catalog_models(data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """A llama.cpp backend's model must be a catalog name or an existing file."""
    from backends.models import CATALOG

    for name, spec in _mapping(data.get("backends")).items():
        spec = _mapping(spec)
        model = spec.get("model")
        if spec.get("kind") == "llamacpp" and isinstance(model, str) and model \
                and model not in CATALOG and not Path(model).expanduser().is_file():
            yield (f"backends.{name}.model", f"'{model}' is neither a catalog model "
                   f"({', '.join(CATALOG)}) nor an existing file{did_you_mean(model, CATALOG)}")


def estimators(data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Every ``routing.estimator`` must name a registered difficulty estimator, and every
    ``routing.cascade.prior`` one that scores up front (not ``cascade`` itself)."""
    from .routing import ESTIMATORS

    known = sorted(ESTIMATORS)
    places = [("routing", data.get("routing"))] + [
        (f"tenants.{t}.routing", _mapping(spec).get("routing"))
        for t, spec in _mapping(data.get("tenants")).items()]
    priors = [n for n in known if n != "cascade"]
    for where, routing in places:
        name = _mapping(routing).get("estimator")
        if isinstance(name, str) and name and name not in ESTIMATORS:
            yield (f"{where}.estimator", f"unknown difficulty estimator '{name}'; expected one "
                   f"of: {', '.join(known)}{did_you_mean(name, known)}")
        prior = _mapping(_mapping(routing).get("cascade")).get("prior")
        if isinstance(prior, str) and prior and prior not in priors:
            yield (f"{where}.cascade.prior", f"unknown difficulty estimator '{prior}' for the "
                   f"cascade's prior; expected one of: {', '.join(priors)}"
                   f"{did_you_mean(prior, priors)}")


def key_variables(data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """An ``env:VAR`` key reference needs ``$VAR`` set (else it stands for no key)."""
    places = [("admin.keys", _mapping(data.get("admin")).get("keys"))] + [
        (f"tenants.{t}.keys", _mapping(spec).get("keys"))
        for t, spec in _mapping(data.get("tenants")).items()]
    for where, keys in places:
        for j, ref in enumerate(keys if isinstance(keys, list) else []):
            if not (isinstance(ref, str) and _ENV_REF.match(ref)):
                continue
            try:
                resolve_key_ref(ref)
            except KeyError as exc:
                yield (f"{where}[{j}]", f"environment variable {exc.args[0]} is unset or empty, "
                       f"so key reference '{ref}' has no key")


#: The checks `joulegate check-policy` adds to the schema's.
CHECKS = (catalog_models, estimators, key_variables)


def _key(kind: BackendKind, requirement: Requirement) -> str:
    """``backend:<kind>``, or ``backend:<kind>:<mode>`` when only that mode needs it."""
    return ":".join(filter(None, ("backend", kind.name, requirement.mode)))


def _requirements() -> dict[str, Requirement]:
    """What needs an optional extra (see pyproject.toml): each backend kind's, from the
    registry (keyed by :func:`_key`), and a ledger kind's (``ledger:<kind>``)."""
    table = {_key(kind, kind.requirement): kind.requirement
             for kind in KINDS.values() if kind.requirement is not None}
    table["ledger:redis"] = Requirement("redis", "redis", "redis")
    return table


#: What :func:`missing_extras` looks for, keyed as :func:`_requirements` says.
REQUIREMENTS: dict[str, Requirement] = _requirements()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a spec
        return False


def _users(backend: str, tiers: list[Any]) -> str:
    names = [t["name"] for t in tiers if isinstance(t, dict) and t.get("backend") == backend
             and isinstance(t.get("name"), str)]
    if not names:
        return f"backend '{backend}'"
    quoted = ", ".join(f"'{n}'" for n in names)
    return f"tier {quoted} uses backend '{backend}'" if len(names) == 1 else \
        f"tiers {quoted} use backend '{backend}'"


def missing_extras(policy: Policy | Mapping[str, Any],
                   requirements: Mapping[str, Requirement] | None = None) -> list[str]:
    """One line for each backend (and the ledger) whose Python package is not installed,
    naming the tier, the backend's kind and the exact install command; empty when all is
    there. ``policy`` is a validated :class:`Policy` or the parsed YAML mapping (checked
    tolerantly, for a file with other mistakes too)."""
    needs = REQUIREMENTS if requirements is None else requirements
    data = policy.model_dump() if isinstance(policy, Policy) else _mapping(policy)
    given_tiers = data.get("tiers")
    tiers = given_tiers if isinstance(given_tiers, list) else []
    lines = []
    for name, spec in _mapping(data.get("backends")).items():
        spec = _mapping(spec)
        kind_name = spec.get("kind")
        kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
        wanted = kind.requirement if kind is not None else None
        if kind is None or wanted is None or not kind.needs_requirement(spec):
            continue
        what = ", ".join(filter(None, (f"kind {kind.name}", wanted.mode)))
        need = needs.get(_key(kind, wanted))
        if need is None or _installed(need.module):
            continue
        who = _users(name, tiers)
        if who.startswith("tier"):
            line = f"{who} ({what}), which needs {need.package}: {need.install}"
        else:
            line = f"{who} ({what}, used by no tier) needs {need.package}: {need.install}"
        if wanted.hint:
            line += f" ({wanted.hint})"
        lines.append(line)
    ledger_kind = _mapping(data.get("ledger")).get("kind")
    need = needs.get(f"ledger:{ledger_kind}")
    if need is not None and not _installed(need.module):
        lines.append(f"the ledger (kind {ledger_kind}) needs {need.package}: {need.install}")
    return lines
