"""Structured output: every finished output of a grammar-masked walk over random logits has
the asked shape; specs that cannot be enforced are refused; drafts and cuts behave."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.structured import (
    GrammarCompiler,
    GuidedSpec,
    Matcher,
    allocate_bitmask,
    apply_bitmask_,
)

#: The tiny model's head is wider than its tokenizer (ids past it have no token).
PAD = 7


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler.from_tokenizer(tokenizer, len(tokenizer) + PAD, [tokenizer.eos_token_id])


def obj(props: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), **kw}


def generate(
    matcher: Matcher, vocab: int, seed: int, limit: int = 120, eos: int = 2
) -> tuple[list[int], bool]:
    """Greedy over random logits under the mask: (tokens before EOS, finished)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(limit):
        logits = torch.randn(vocab, generator=gen)
        matcher.mask_logits_(logits)
        token = int(torch.argmax(logits))
        assert matcher.accept(token), f"the matcher refused {token}, which its mask allowed"
        if token == eos:
            assert matcher.is_terminated
            return out, True
        out.append(token)
    return out, False


SCHEMAS = {
    "enum": obj({"level": {"enum": ["low", "medium", "high"]}}),
    "nested object, required": obj(
        {"user": obj({"id": {"type": "integer", "minimum": 0, "maximum": 999},
                      "ok": {"type": "boolean"}}),
         "note": {"type": "null"}}
    ),
    "array maxItems, string maxLength": obj(
        {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1,
                  "maxItems": 3}}
    ),
    "integer and number bounds": obj(
        {"n": {"type": "integer", "minimum": -5, "maximum": 12},
         "x": {"type": "number", "minimum": 0, "maximum": 1}}
    ),
    "anyOf, const": obj(
        {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                         {"type": "string", "maxLength": 3}]},
         "kind": {"const": "fixed"}}
    ),
    "additionalProperties false, optional": {
        "type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}},
        "required": ["a"], "additionalProperties": False,
    },
    "$defs and $ref": {
        "$defs": {"P": obj({"x": {"type": "integer", "minimum": 0, "maximum": 5}})},
        **obj({"ps": {"type": "array", "items": {"$ref": "#/$defs/P"}, "maxItems": 2}}),
    },
    "pattern": obj({"code": {"type": "string", "pattern": "^[A-C]{2}-[0-9]$"}}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_outputs_validate_against_the_schema(
    compiler: GrammarCompiler, tokenizer: Any, name: str
) -> None:
    schema = SCHEMAS[name]
    grammar = compiler.compile(GuidedSpec("json_schema", json.dumps(schema)))
    finished = 0
    for seed in range(6):
        out, done = generate(grammar.matcher(), compiler.vocab_size, seed)
        if done:
            finished += 1
            jsonschema.validate(json.loads(tokenizer.decode(out)), schema)
    assert finished >= 4, f"only {finished} of 6 walks finished within 120 tokens"


def test_json_object_is_any_object(compiler: GrammarCompiler, tokenizer: Any) -> None:
    grammar = compiler.compile(GuidedSpec("json_object"))
    seen = 0
    for seed in range(8):
        out, done = generate(grammar.matcher(), compiler.vocab_size, seed, limit=60)
        if done:
            seen += 1
            assert isinstance(json.loads(tokenizer.decode(out)), dict)
    assert seen


def test_strict_closes_objects_that_say_nothing(compiler: GrammarCompiler, tokenizer: Any) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    extra = tokenizer.encode('{"a": 1, "b": 2}', add_special_tokens=False)
    strict = compiler.compile(GuidedSpec("json_schema", schema)).matcher()
    loose = compiler.compile(GuidedSpec("json_schema", schema, strict=False)).matcher()
    assert strict.validate(extra) < len(extra)
    assert loose.validate(extra) == len(extra)


def test_regex_choice_and_grammars(compiler: GrammarCompiler, tokenizer: Any) -> None:
    regex = r"[a-c]{2,4}-\d{1,3}"
    g = compiler.compile(GuidedSpec("regex", regex))
    choices = ["yes", "no", 'say "maybe"', "日本"]
    c = compiler.compile(GuidedSpec("choice", choices=tuple(choices)))
    gbnf = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"\n'
    lark = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: /[0-9]+/ | "(" expr ")"\n'
    grammars = [compiler.compile(GuidedSpec("grammar", text)) for text in (gbnf, lark)]
    for seed in range(5):
        out, done = generate(g.matcher(), compiler.vocab_size, seed)
        assert done and re.fullmatch(regex, tokenizer.decode(out))
        out, done = generate(c.matcher(), compiler.vocab_size, seed)
        assert done and tokenizer.decode(out) in choices
        for grammar in grammars:
            out, done = generate(grammar.matcher(), compiler.vocab_size, seed)
            if done:  # an arithmetic expression: Python parses it
                ast.parse(tokenizer.decode(out), mode="eval")


BAD = [
    ("json_schema", '{"type": "object", ', "not JSON"),
    ("json_schema", '{"type": "strng"}', "strng"),
    ("json_schema", "[1, 2]", "JSON object"),
    ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}', "minimum"),
    ("json_schema", '{"properties": {"a": {"$ref": "#/$defs/X"}}}', "/$defs/X"),
    # Keywords llguidance cannot enforce are refused, never dropped.
    ("json_schema", '{"type": "array", "uniqueItems": true}', "uniqueItems"),
    ("json_schema", '{"not": {"type": "string"}}', "not"),
    ("json_schema", '{"if": {"type": "string"}, "then": {"maxLength": 2}}', "if"),
    ("json_schema", '{"type": "string", "format": "no-such-format"}', "no-such-format"),
    ("regex", "(ab", "regex"),
    ("regex", "", "empty"),
    # A choice's strings are in `choices` (a JSON list on the wire, a tuple here).
    ("choice", (), "non-empty"),
    ("choice", ("a", ""), "non-empty string"),
    ("grammar", 'root ::= "a" missing', "missing"),
    ("grammar", "start: (", ""),
    ("grammar", "", "empty"),
]


@pytest.mark.parametrize(("kind", "text", "named"), BAD)
def test_specs_that_cannot_compile_are_refused(
    compiler: GrammarCompiler, kind: str, text: Any, named: str
) -> None:
    spec = GuidedSpec(kind, choices=text) if kind == "choice" else GuidedSpec(kind, text)
    with pytest.raises(InvalidRequest) as err:
        compiler.compile(spec)
    assert err.value.field == "guided"
    assert named in str(err.value)


def test_unknown_kind_is_refused(compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidRequest, match="unknown kind 'xml'"):
        compiler.compile(GuidedSpec("xml", "<a/>"))


def test_eos_only_at_the_end(compiler: GrammarCompiler, tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    m = compiler.compile(GuidedSpec("regex", "[0-9]{2,3}")).matcher()
    assert not m.allowed()[eos] and not m.is_complete
    assert m.accept(tokenizer.encode("4", add_special_tokens=False)[0])
    before = m.allowed()
    assert not before[eos], "EOS before the grammar's end must be masked"
    assert [m.allows(t) for t in range(len(tokenizer))] == before[: len(tokenizer)].tolist()
    assert not m.accept(eos) and m.error is None and not m.is_terminated
    assert torch.equal(m.allowed(), before), "a refused token changed the state"
    m = compiler.compile(GuidedSpec("regex", "[0-9]{2,3}")).matcher()
    for t in tokenizer.encode("42", add_special_tokens=False):
        assert m.accept(t)
    allowed = m.allowed()
    assert allowed[eos] and m.is_complete and not m.must_end
    for t in tokenizer.encode("7", add_special_tokens=False):
        assert m.accept(t)
    assert m.must_end and m.allowed().nonzero().flatten().tolist() == [eos]
    assert m.accept(eos) and m.is_terminated
    assert not m.allowed().any() and not m.accept(eos)


def test_cut_output_is_not_terminated(compiler: GrammarCompiler) -> None:
    grammar = compiler.compile(GuidedSpec("json_schema", json.dumps(SCHEMAS["enum"])))
    m = grammar.matcher()
    _, done = generate(m, compiler.vocab_size, seed=0, limit=3)
    assert not done and not m.is_terminated and not m.is_complete


def test_rollback_equals_never_accepting(compiler: GrammarCompiler, tokenizer: Any) -> None:
    schema = json.dumps(SCHEMAS["nested object, required"])
    grammar = compiler.compile(GuidedSpec("json_schema", schema))
    text = '{"user": {"id": 42, "ok": true}, "note": null}'
    tokens = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    m = grammar.matcher()
    for i in range(len(tokens)):
        before = m.allowed()
        draft = tokens[i : i + 4]
        assert m.validate(draft) == len(draft)
        for t in draft:
            assert m.accept(t)
        m.rollback(len(draft))
        assert not m.is_terminated
        assert torch.equal(m.allowed(), before), f"state after rolling back at {i} differs"
        assert m.accept(tokens[i])
    assert m.is_terminated
    # A rejected draft: validate stops at the first token outside the grammar.
    fresh = grammar.matcher()
    wrong = tokenizer.encode('{"user": {"id": "x', add_special_tokens=False)
    assert fresh.validate(wrong) == len(
        tokenizer.encode('{"user": {"id": ', add_special_tokens=False)
    )
    with pytest.raises(ValueError, match="cannot roll back"):
        fresh.rollback(1)


def test_draft_masks_equal_step_by_step(compiler: GrammarCompiler, tokenizer: Any) -> None:
    grammar = compiler.compile(GuidedSpec("json_schema", json.dumps(SCHEMAS["enum"])))
    m = grammar.matcher()
    prefix = tokenizer.encode('{"lev', add_special_tokens=False)
    for t in prefix:
        assert m.accept(t)
    draft = tokenizer.encode('el": "high"} oops', add_special_tokens=False)
    rows = allocate_bitmask(len(draft) + 1, compiler.vocab_size)
    n = m.fill_draft_bitmasks(draft, rows)
    assert n == len(tokenizer.encode('el": "high"}', add_special_tokens=False))
    step = grammar.matcher()
    for t in prefix:
        step.accept(t)
    one = allocate_bitmask(1, compiler.vocab_size)
    for i in range(n + 1):
        step.fill_bitmask(one)
        assert torch.equal(one[0], rows[i]), f"draft mask {i} differs"
        if i < n:
            step.accept(draft[i])
    after = allocate_bitmask(1, compiler.vocab_size)
    m.fill_bitmask(after)
    assert torch.equal(after[0], rows[0]), "filling the draft's masks moved the matcher"
    # A draft that completes the output and ends it: EOS counts; nothing follows it.
    done = tokenizer.encode('el": "low"}', add_special_tokens=False)
    draft = [*done, tokenizer.eos_token_id, done[0]]
    rows = allocate_bitmask(len(draft) + 1, compiler.vocab_size)
    assert m.fill_draft_bitmasks(draft, rows) == len(done) + 1
    assert bool(rows[len(done)][0] >> tokenizer.eos_token_id & 1)
    assert not rows[len(done) + 1].any() and bool((rows[len(done) + 2] == -1).all())


def test_batch_fill_equals_one_by_one(compiler: GrammarCompiler, tokenizer: Any) -> None:
    specs = [GuidedSpec("json_schema", json.dumps(s)) for s in SCHEMAS.values()]
    matchers: list[Matcher | None] = []
    for i, spec in enumerate(specs):
        m = compiler.compile(spec).matcher()
        generate(m, compiler.vocab_size, seed=i, limit=i + 1)
        matchers.append(m)
    matchers.insert(2, None)  # an unconstrained sequence in the batch
    batch = allocate_bitmask(len(matchers), compiler.vocab_size)
    compiler.fill_bitmasks(matchers, batch)
    assert bool((batch[2] == -1).all()), "an unconstrained row is left as it was"
    one = allocate_bitmask(1, compiler.vocab_size)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill_bitmask(one)
            assert torch.equal(one[0], batch[i])


def test_mask_logits_covers_a_padded_head(compiler: GrammarCompiler, tokenizer: Any) -> None:
    m = compiler.compile(GuidedSpec("choice", choices=("yes", "no"))).matcher()
    allowed = m.allowed()
    assert allowed.shape == (compiler.vocab_size,) and not allowed[len(tokenizer) :].any()
    wide = torch.zeros(compiler.vocab_size + 40)
    m.mask_logits_(wide)
    assert torch.equal(torch.isfinite(wide[: compiler.vocab_size]), allowed)
    assert not torch.isfinite(wide[compiler.vocab_size :]).any()
    half = torch.zeros(2, compiler.vocab_size, dtype=torch.bfloat16)
    rows = allocate_bitmask(2, compiler.vocab_size)
    m.fill_bitmask(rows, 1)
    apply_bitmask_(half, rows)
    assert torch.isfinite(half[0]).all() and torch.equal(torch.isfinite(half[1]), allowed)


def test_compile_is_cached_and_matchers_are_independent(compiler: GrammarCompiler) -> None:
    spec = GuidedSpec("regex", "[0-9]+")
    grammar = compiler.compile(spec)
    assert compiler.compile(GuidedSpec("regex", "[0-9]+")) is grammar
    a, b = grammar.matcher(), grammar.matcher()
    generate(a, compiler.vocab_size, seed=1, limit=3)
    assert torch.equal(b.allowed(), grammar.matcher().allowed())
    twin = a.copy()
    assert torch.equal(twin.allowed(), a.allowed())
    a.reset()
    assert torch.equal(a.allowed(), b.allowed())


def test_cache_drops_the_least_recently_used(tokenizer: Any) -> None:
    small = GrammarCompiler.from_tokenizer(tokenizer, len(tokenizer), [2], cache_size=2)
    first = small.compile(GuidedSpec("regex", "a"))
    small.compile(GuidedSpec("regex", "b"))
    assert small.compile(GuidedSpec("regex", "a")) is first  # now the most recent
    small.compile(GuidedSpec("regex", "c"))
    assert small.compile(GuidedSpec("regex", "a")) is first
    assert small.compile(GuidedSpec("regex", "b")) is not None  # recompiled, no error


@pytest.mark.integration
def test_real_tokenizer_walks_a_typical_schema(default_registry: Path) -> None:
    from tokenizers import Tokenizer

    path = default_registry / "smollm2-135m-instruct" / "1" / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    eos = tok.token_to_id("<|im_end|>")
    compiler = GrammarCompiler.from_file(path, 49152, [eos])
    schema = {
        "$defs": {"Step": obj({"explanation": {"type": "string"}, "output": {"type": "string"}},
                              additionalProperties=False)},
        **obj({"steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}},
               "final_answer": {"type": "string"}}, additionalProperties=False),
    }  # fmt: skip
    instance = {"steps": [{"explanation": "Subtract 7 from both sides.", "output": "8x = -30"}],
                "final_answer": "x = -3.75"}  # fmt: skip
    m = compiler.compile(GuidedSpec("json_schema", json.dumps(schema))).matcher()
    for t in [*tok.encode(json.dumps(instance), add_special_tokens=False).ids, eos]:
        assert m.allowed()[t]
        assert m.accept(t)
    assert m.is_terminated
    # Random logits over the whole vocabulary: bounded strings and arrays so a walk ends.
    bounded = json.loads(
        json.dumps(schema).replace('"type": "string"', '"type": "string", "maxLength": 12')
    )
    bounded["properties"]["steps"]["maxItems"] = 2
    for seed in range(3):
        m = compiler.compile(GuidedSpec("json_schema", json.dumps(bounded))).matcher()
        out, done = generate(m, 49152, seed=seed, limit=400, eos=eos)
        assert done
        jsonschema.validate(json.loads(tok.decode(out)), bounded)


def test_strict_walks_subschemas_not_data() -> None:
    from slimserve.engine.guided import llguidance_grammar

    schema = {
        "type": "object",
        "properties": {
            # A property named like a keyword is a property, not a keyword.
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "pick": {"enum": [{"properties": {"a": 1}}]},  # data: left as written
            "both": {"allOf": [{"properties": {"a": {"type": "integer"}}},
                               {"properties": {"b": {"type": "integer"}}}]},
            "ref": {"$ref": "#/$defs/D"},
        },
        "$defs": {"D": {"type": "object", "properties": {"d": {"type": "boolean"}}}},
    }  # fmt: skip
    text = llguidance_grammar(GuidedSpec("json_schema", json.dumps(schema)))
    written = json.loads(text)["grammars"][0]["json_schema"]
    props = written["properties"]
    assert written["additionalProperties"] is False
    assert props["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in props["properties"]["properties"]
    assert props["pick"] == schema["properties"]["pick"]  # type: ignore[index]
    assert all("additionalProperties" not in part for part in props["both"]["allOf"])
    assert written["$defs"]["D"]["additionalProperties"] is False
