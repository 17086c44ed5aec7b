"""What a request asks its output to be (`GuidedSpec`), and that ask as llguidance's grammar.

Plain values and pure functions: the door builds a `GuidedSpec`, it crosses the process
boundary as is, and the engine's `structured.GrammarCompiler` turns it into a grammar with
`llguidance_grammar`, which raises `InvalidRequest` for a spec that cannot be one.
"""

from __future__ import annotations

import json
from typing import Any, Final

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.types import Guided

#: What a request may constrain its output to, as `GuidedSpec.kind`.
KINDS: Final = ("json_schema", "json_object", "regex", "choice", "grammar")
#: JSON is written as `json.dumps` writes it: one line, ", " between items, ": " after keys.
#: No free whitespace: a small model left free to emit whitespace can emit it forever.
JSON_SEPARATORS: Final = (", ", ": ")
#: JSON Schema keywords whose value is a subschema, a map of names to subschemas, or a list
#: of subschemas (what `strict` walks; data such as `enum` or `const` is left alone).
_SCHEMA_KEYS: Final = frozenset({"items", "additionalItems", "unevaluatedItems", "contains",
    "additionalProperties", "unevaluatedProperties", "propertyNames", "not", "if", "then",
    "else"})  # fmt: skip
_SCHEMA_MAP_KEYS: Final = frozenset({"properties", "patternProperties", "$defs", "definitions",
    "dependentSchemas"})  # fmt: skip
_SCHEMA_LIST_KEYS: Final = frozenset({"anyOf", "oneOf", "allOf", "prefixItems", "items"})
#: An object schema saying any of these has decided about other properties itself.
_OPEN_KEYS: Final = frozenset({"additionalProperties", "unevaluatedProperties",
    "patternProperties"})  # fmt: skip


#: The request's structured-output spec (`types.Guided`: kind, spec text, choices, strict),
#: a msgspec struct that crosses the process boundary as is.
GuidedSpec = Guided
#: The field every refusal of a spec names (each door renders it: `response_format`,
#: `guided_json`, `sampling_parameters.guided_*`, gRPC's `guided`).
FIELD = "guided"


def llguidance_grammar(spec: GuidedSpec) -> str:
    """llguidance's grammar text for `spec`; InvalidRequest for a spec that cannot be one."""
    import llguidance

    if spec.kind not in KINDS:
        raise InvalidRequest("guided", f"unknown kind {spec.kind!r}; expected one of {KINDS}")
    options: Any = {
        "item_separator": JSON_SEPARATORS[0],
        "key_separator": JSON_SEPARATORS[1],
        "whitespace_flexible": False,
        # Never `lenient`: a keyword llguidance cannot enforce is an error, not ignored.
    }
    try:
        if spec.kind == "json_object":
            return str(
                llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options)
            )
        if spec.kind == "json_schema":
            schema = _schema(spec)
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options))
        if spec.kind == "regex":
            if not spec.spec:
                raise InvalidRequest(FIELD, "the regular expression is empty")
            return str(llguidance.LLMatcher.grammar_from_regex(spec.spec))
        if spec.kind == "choice":
            return str(llguidance.grammar_from("choice", json.dumps(_choices(spec))))
        if not spec.spec.strip():
            raise InvalidRequest(FIELD, "the grammar is empty")
        return str(llguidance.grammar_from("grammar", spec.spec))
    except InvalidRequest:
        raise
    except (ValueError, TypeError) as e:  # llguidance's word for a spec it cannot read
        raise InvalidRequest(FIELD, first_line(str(e))) from e


def _schema(spec: GuidedSpec) -> dict[str, Any]:
    try:
        schema = json.loads(spec.spec)
    except json.JSONDecodeError as e:
        raise InvalidRequest(FIELD, f"not JSON: {e}") from e
    if not isinstance(schema, dict):
        raise InvalidRequest(FIELD, f"a schema is a JSON object, not {type(schema).__name__}")
    return _closed(schema) if spec.strict else schema


def _closed(schema: Any, in_all_of: bool = False) -> Any:
    """`schema` with `additionalProperties: false` on each object schema that lists
    `properties` and is silent about others, at any depth. Not inside `allOf`, where
    closing each part would forbid the other parts' properties. Written by hand: no
    library offers it."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYS & out.keys():
        out[key] = _closed(out[key])
    for key in _SCHEMA_MAP_KEYS & out.keys():
        if isinstance(out[key], dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LIST_KEYS & out.keys():
        if isinstance(out[key], list):
            out[key] = [_closed(sub, key == "allOf") for sub in out[key]]
    silent = not _OPEN_KEYS & out.keys()
    if isinstance(out.get("properties"), dict) and silent and not in_all_of:
        out["additionalProperties"] = False
    return out


def _choices(spec: GuidedSpec) -> list[str]:
    choices = list(spec.choices)
    if not choices:
        raise InvalidRequest(FIELD, "choices are a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequest(FIELD, "each choice is a non-empty string")
    return choices


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "cannot be compiled"
