"""Grammar-constrained decoding for in-process models, and checking what came out.

The grammars are llama.cpp GBNF, built with llama.cpp's own JSON-schema converter
(``llama_cpp.llama_grammar.SchemaConverter``, shipped with llama-cpp-python). One
converter builds every rule of a request's grammar, so a response schema and the tool-call
schemas share their primitive rules (``string``, ``space``, ...) without clashing names.

* ``response_format: json_object`` → any JSON object.
* ``response_format: json_schema`` → JSON matching the schema.
* tools with ``tool_choice: required`` / a named function → one (or, with parallel calls,
  several) Hermes blocks ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  whose arguments match that function's ``parameters``.
* tools with ``auto`` together with a JSON response format → either of the two.

llama.cpp's converter covers most of JSON Schema but not all of it (it ignores what it
cannot express, e.g. some ``format``s), so the result is also checked with ``jsonschema``
(:func:`schema_errors`) before it is returned.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from .features import ResponseFormat, ToolSpec

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


class GrammarError(ValueError):
    """A schema cannot be turned into a grammar (or is not a valid JSON schema)."""


def _converter() -> Any:
    grammar = importlib.import_module("llama_cpp.llama_grammar")
    return grammar.SchemaConverter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False,
                                   dotall=False, raw_pattern=False)


def _visit(converter: Any, schema: dict[str, Any], name: str, what: str) -> str:
    check_schema(schema, what)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), name)
        rule: str = converter.visit(resolved, name)
    except Exception as exc:  # noqa: BLE001 - the converter raises anything on odd schemas
        raise GrammarError(f"{what} cannot be turned into a grammar: {exc}") from None
    return rule


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal escapes like a JSON string


def call_schema(tool: ToolSpec) -> dict[str, Any]:
    """The JSON a Hermes block holds for one call of ``tool``."""
    params: dict[str, Any] = tool.parameters if tool.parameters is not None else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def build_grammar(*, tools: list[ToolSpec] | None = None, force_call: bool = False,
                  parallel: bool = True, response: ResponseFormat | None = None) -> str | None:
    """The GBNF for one request, or ``None`` when decoding is free.

    ``tools`` are the functions the model may call (already narrowed to the named one for a
    named ``tool_choice``); ``force_call`` makes a call mandatory (``required``/named). With
    ``tools`` but neither ``force_call`` nor a JSON ``response``, decoding stays free (the
    Hermes parser reads the text afterwards).
    """
    json_response = response is not None and response.type != "text"
    calls = bool(tools) and (force_call or json_response)
    if not calls and not json_response:
        return None
    converter = _converter()
    alternatives: list[str] = []
    if calls:
        assert tools
        call_rules = [_visit(converter, call_schema(t), f"call{i}",
                             f"the parameters schema of tool '{t.name}'")
                      for i, t in enumerate(tools)]
        block = (f"{_literal(TOOL_CALL_START + chr(10))} ( {' | '.join(call_rules)} ) "
                 f"{_literal(chr(10) + TOOL_CALL_END)}")
        more = f' ( "\\n" {block} )*' if parallel else ""
        alternatives.append(f"{block}{more}")
    if json_response and not (calls and force_call):
        assert response is not None
        if response.type == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        else:
            schema = response.schema or {}
        alternatives.append(_visit(converter, schema, "response",
                                   "response_format.json_schema.schema"))
    rules: str = converter.format_grammar()
    return f"{rules}\nroot ::= {' | '.join(f'( {a} )' for a in alternatives)}\n"


def _jsonschema() -> Any:
    return importlib.import_module("jsonschema")


def check_schema(schema: dict[str, Any], what: str) -> None:
    """Raise :class:`GrammarError` if ``schema`` is not a valid JSON schema."""
    jsonschema = _jsonschema()
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise GrammarError(f"{what} is not a valid JSON schema: {exc.message}") from None


def schema_errors(schema: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` does not match ``schema`` (the most relevant error, with its place), or
    ``None`` when it does."""
    jsonschema = _jsonschema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"{'$' + where}: {error.message}"
