"""Tool definitions in Harmony: JSON schema -> the TypeScript-like ``namespace functions { ... }`` block.

The rules follow openai/harmony's renderer (``json_schema_to_typescript`` in src/encoding.rs, the spec's reference
implementation) so that the model sees tools exactly as in training: descriptions as ``//`` comments above a field,
``?`` for optional fields, enums as unions of string literals, defaults as trailing comments (strings in quotes as
they are, other values as serde_json's compact JSON), ``() => any`` for a function without arguments. A tool whose
parameters are not JSON schema where the renderer reads them (``"enum": "celsius"``, ``"items": "string"``, a NaN
default) is refused with a ValueError naming the tool and the parameter (:func:`check_tool_schema`) rather than
rendered as harmony would, silently dropping what its author meant.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from ossrl.harmony.messages import Tool

BROWSER_SECTION = """## browser

// Tool for browsing.
// The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
// Cite information from the tool using the following format:
// `【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
// Do not quote more than 10 words directly from the tool output.
// sources=web (default: web)
namespace browser {

// Searches for information related to `query` and displays `topn` results.
type search = (_: {
query: string,
topn?: number, // default: 10
source?: string,
}) => any;

// Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.
// Valid link ids are displayed with the formatting: `【{id}†.*】`.
// If `cursor` is not provided, the most recent page is implied.
// If `id` is a string, it is treated as a fully qualified URL associated with `source`.
// If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.
// Use this function without `id` to scroll to a new location of an opened page.
type open = (_: {
id?: number | string, // default: -1
cursor?: number, // default: -1
loc?: number, // default: -1
num_lines?: number, // default: -1
view_source?: boolean, // default: false
source?: string,
}) => any;

// Finds exact matches of `pattern` in the current page, or the page given by `cursor`.
type find = (_: {
pattern: string,
cursor?: number, // default: -1
}) => any;

} // namespace browser"""  # noqa: E501

PYTHON_SECTION = """## python

Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when creating plots, tables, or files).

When you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster."""  # noqa: E501

# Built-in tools live in the system message, in this order (the reference renderer sorts namespaces by name).
BUILTIN_TOOLS: dict[str, str] = {"browser": BROWSER_SECTION, "python": PYTHON_SECTION}


def _ryu(x: float) -> str:
    """A float as serde_json writes it (the ryu crate's ``format64``): ``1.0``, ``1e16``, ``0.00001``, ``1.5e-7``."""
    if not math.isfinite(x):
        raise ValueError(f"{x} is not a JSON number")
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    mantissa, _, exp = repr(abs(x)).partition("e")  # repr: the same shortest round-trip digits as ryu
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    k = int(exp or 0) - len(frac) + len(digits) - len(digits.rstrip("0"))  # value = digits * 10**k
    digits = digits.rstrip("0")
    n, kk = len(digits), len(digits) + k  # 10**(kk-1) <= value < 10**kk
    if 0 <= k and kk <= 16:
        out = digits + "0" * k + ".0"
    elif 0 < kk <= 16:
        out = f"{digits[:kk]}.{digits[kk:]}"
    elif -5 < kk <= 0:
        out = "0." + "0" * -kk + digits
    else:
        out = f"{digits[0]}{'.' + digits[1:] if n > 1 else ''}e{kk - 1}"
    return ("-" if x < 0 else "") + out


_U64_MAX, _I32_MAX = 2**64 - 1, 2**31 - 1
_JSON_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?)(\d+))?")


def _serde_number(text: str) -> int | float:
    """The number serde_json reads from the JSON ``text`` of a number, as harmony builds it (without the
    ``float_roundtrip`` feature; serde_json's ``parse_integer`` .. ``f64_from_parts``): a u64 or i64 stays an integer;
    anything else is its first digits that fit a u64, times or divided by a power of ten in f64 arithmetic, which can
    be a bit off the correctly rounded value (``1.1e-30`` is read as ``1.1000000000000001e-30``)."""
    m = _JSON_NUMBER.fullmatch(text)
    if m is None:
        raise ValueError(f"{text} is not a JSON number")
    sign, whole, frac, exp_sign, exp_digits = m.groups()

    def overflows(sig: int, digit: int) -> bool:
        return sig >= _U64_MAX // 10 and (sig > _U64_MAX // 10 or digit > _U64_MAX % 10)

    sig, exponent, long_integer = 0, 0, False
    for i, ch in enumerate(whole):
        if overflows(sig, int(ch)):  # parse_long_integer: the remaining integer digits only scale
            sig, exponent, long_integer = sig, len(whole) - i, True
            break
        sig = sig * 10 + int(ch)
    if frac is None and exp_digits is None and not long_integer:
        if not sign:
            return sig
        return -sig if 0 < sig <= 2**63 else -float(sig)  # i64, else f64 (as for -0)
    for ch in frac or "":  # parse_decimal: digits that would overflow the u64 are dropped
        if overflows(sig, int(ch)):
            break
        sig, exponent = sig * 10 + int(ch), exponent - 1
    if exp_digits is not None:
        exp = int(exp_digits)
        if exp > _I32_MAX:  # parse_exponent_overflow
            if sig and exp_sign != "-":
                raise ValueError(f"{text} is out of range for a JSON number")
            return -0.0 if sign else 0.0
        exponent = max(-(2**31), min(_I32_MAX, exponent - exp if exp_sign == "-" else exponent + exp))
    f = float(sig)
    while True:  # f64_from_parts
        if abs(exponent) <= 308:
            if exponent >= 0:
                f *= float(f"1e{exponent}")
                if math.isinf(f):
                    raise ValueError(f"{text} is out of range for a JSON number")
            else:
                f /= float(f"1e{-exponent}")
            break
        if f == 0.0:
            break
        if exponent >= 0:
            raise ValueError(f"{text} is out of range for a JSON number")
        f /= 1e308
        exponent += 308
    return -f if sign else f


def _json(value: Any) -> str:
    """``value`` as harmony prints a JSON value (``format!("{default}")``: serde_json's compact ``Display``) after
    openai_harmony sent it to Rust as Python's JSON: keys in order, strings escaped as JSON, numbers as serde_json
    reads (:func:`_serde_number`) and ryu writes them (:func:`_ryu`)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is not a JSON number")
        number = _serde_number(json.dumps(value))
        return str(number) if isinstance(number, int) else _ryu(number)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_json, value)) + "]"
    if isinstance(value, Mapping):
        if not all(k is None or isinstance(k, (str, int, float)) for k in value):
            raise ValueError("an object's keys must be strings")
        keys = [k if isinstance(k, str) else json.dumps(k) for k in value]  # what a JSON round trip makes of a key
        return "{" + ",".join(f"{_json(k)}:{_json(v)}" for k, v in zip(keys, value.values(), strict=True)) + "}"
    raise ValueError(f"a {type(value).__name__} is not a JSON value")


def _get(schema: Any, key: str) -> Any:
    # serde_json's Value::get: None for a missing key and for anything that is not an object
    return schema.get(key) if isinstance(schema, Mapping) else None


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _is_enum(schema: Any) -> bool:
    enum = _get(schema, "enum")
    return _is_list(enum) and len(enum) > 0


def _default(value: Any, schema: Any, *, bare_enum: bool) -> str:
    # harmony: a string default in quotes, as is (no escaping: `default: "he said "hi""`); an enum field's string
    # default bare where `bare_enum` (properties), else as JSON (top-level oneOf variants); other values as JSON
    if isinstance(value, str) and not _is_enum(schema):
        return f'default: "{value}"'
    if isinstance(value, str) and bare_enum:
        return f"default: {value}"
    return f"default: {_json(value)}"


def _nullable(type_str: str, schema: Any) -> str:
    return f"{type_str} | null" if _get(schema, "nullable") is True and "null" not in type_str else type_str


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """Render one JSON schema as a TypeScript type, as openai/harmony's ``json_schema_to_typescript``
    (src/encoding.rs) does, malformed parts included: a non-list ``enum`` is ignored (``string``), ``items`` that is
    not an object (a tuple list, ``true``, null) is ``any[]``, anything but an object schema is ``any``. Tools are
    checked before rendering (:func:`check_tool_schema`), so such schemas raise there instead."""
    one_of = _get(schema, "oneOf")
    if _is_list(one_of):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _nullable(schema_to_typescript(variant, indent + "   "), variant)
            comments = [_get(variant, "description")] if isinstance(_get(variant, "description"), str) else []
            if isinstance(variant, Mapping) and "default" in variant:
                comments.append(_default(variant["default"], variant, bare_enum=False))
            if comments:
                out += " // " + " ".join(comments)
        return out
    kind = _get(schema, "type")
    if _is_list(kind):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
        kind = None
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        enum = schema.get("enum")
        literals = [f'"{v}"' for v in enum if isinstance(v, str)] if _is_list(enum) else []
        return " | ".join(literals) if literals else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _object_to_typescript(schema: Mapping[str, Any], indent: str) -> str:
    out = f"{indent}// {schema['description']}\n" if isinstance(schema.get("description"), str) else ""
    out += "{\n"
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    req = schema.get("required")
    required = {r for r in req if isinstance(r, str)} if _is_list(req) else set()
    for key, val in props.items():
        opt = "" if key in required else "?"
        if isinstance(_get(val, "title"), str):
            out += f"{indent}// {val['title']}\n{indent}//\n"
        has_one_of = isinstance(val, Mapping) and "oneOf" in val  # even a malformed oneOf hides these comments
        if not has_one_of and isinstance(_get(val, "description"), str):
            out += f"{indent}// {val['description']}\n"
        examples = _get(val, "examples")
        if _is_list(examples) and examples:
            out += f"{indent}// Examples:\n"
            out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
        if has_one_of and _is_list(val["oneOf"]):
            out += _property_one_of(key, opt, val, val["oneOf"], indent)
            continue
        out += f"{indent}{key}{opt}: " + _nullable(schema_to_typescript(val, indent + "    "), val) + ","
        if not has_one_of and isinstance(val, Mapping) and "default" in val:
            out += " // " + _default(val["default"], val, bare_enum=True)
        out += "\n"
    return out + f"{indent}}}"


def _property_one_of(key: str, opt: str, val: Mapping[str, Any], one_of: Sequence[Any], indent: str) -> str:
    """A field whose type is a ``oneOf``: one ``| variant`` line each, the field's description above (once)."""
    desc = val.get("description") if isinstance(val.get("description"), str) else None
    first_desc = _get(one_of[0], "description") if one_of else None
    above = desc is not None and desc != first_desc
    out = f"{indent}// {desc}\n" if above else ""
    if "default" in val:
        out += f"{indent}// {_default(val['default'], val, bare_enum=True)}\n"
    out += f"{indent}{key}{opt}:\n"
    for i, variant in enumerate(one_of):
        out += f"{indent} | " + _nullable(schema_to_typescript(variant, indent + "   "), variant)
        comments = []
        v_desc = _get(variant, "description")
        if not (i == 0 and above) and isinstance(v_desc, str) and v_desc != desc:
            comments.append(v_desc)
        if isinstance(variant, Mapping) and "default" in variant:
            comments.append(_default(variant["default"], variant, bare_enum=True))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"


def check_tool_schema(tool: str, parameters: Any) -> None:
    """Raise ValueError, naming the tool and the parameter, for what is not JSON schema where harmony's renderer
    reads it: a schema that is not an object (or ``true``/``false``), an ``enum`` that is not a list (``"enum":
    "celsius"``: harmony would drop it and show a plain ``string``), ``items`` that is neither a schema nor a list
    of schemas, a ``oneOf`` or ``properties`` of the wrong kind, a ``default`` that is not JSON (NaN, infinity, a
    set). Anything harmony renders from valid JSON schema (tuple ``items`` lists: ``any[]``; quotes in defaults,
    written as is) renders as harmony renders it."""
    if parameters is None:
        return

    def fail(path: str, problem: str) -> NoReturn:
        raise ValueError(f"tool {tool!r}: {f'parameter {path!r}' if path else 'parameters'}: {problem}")

    def kind(value: Any) -> str:
        return "null" if value is None else f"a {type(value).__name__} ({value!r:.40})"

    def walk(schema: Any, path: str) -> None:
        if isinstance(schema, bool):
            return
        if not isinstance(schema, Mapping):
            fail(path, f"a schema must be an object, got {kind(schema)}")
        if "enum" in schema and not _is_list(schema["enum"]):
            fail(path, f'"enum" must be a list of values, got {kind(schema["enum"])}')
        if "default" in schema:
            try:
                _json(schema["default"])
            except ValueError as e:
                fail(path, f'"default" is not JSON: {e}')
        props = schema.get("properties", {})
        if not isinstance(props, Mapping):
            fail(path, f'"properties" must be an object, got {kind(props)}')
        for key, val in props.items():
            walk(val, f"{path}.{key}" if path else str(key))
        if "items" in schema:
            items = schema["items"]
            if _is_list(items):  # tuple validation (JSON schema before 2020-12): harmony shows `any[]`
                for i, item in enumerate(items):
                    walk(item, f"{path}[{i}]")
            elif isinstance(items, (Mapping, bool)):
                walk(items, f"{path}[]")
            else:
                fail(path, f'"items" must be a schema or a list of schemas, got {kind(items)}')
        if "oneOf" in schema:
            if not _is_list(schema["oneOf"]):
                fail(path, f'"oneOf" must be a list of schemas, got {kind(schema["oneOf"])}')
            for i, variant in enumerate(schema["oneOf"]):
                walk(variant, f"{path}.oneOf[{i}]" if path else f"oneOf[{i}]")

    if not isinstance(parameters, Mapping):
        fail("", f"must be an object schema, got {kind(parameters)}")
    walk(parameters, "")


def _takes_arguments(parameters: Mapping[str, Any] | None) -> bool:
    # An object schema without properties means "no arguments": the spec writes those as `() => any`.
    if parameters is None:
        return False
    return not (parameters.get("type") == "object" and not parameters.get("properties"))


def render_tool_namespace(name: str, tools: Sequence[Tool | Mapping[str, Any]], description: str | None = None) -> str:
    """``## functions`` + ``namespace functions { ... } // namespace functions``."""
    lines = [f"## {name}\n"]
    for line in (description or "").splitlines():
        lines.append(f"// {line}" if tools else line)
    if tools:
        lines.append(f"namespace {name} {{\n")
        for tool in map(Tool.coerce, tools):
            check_tool_schema(tool.name, tool.parameters)
            lines.extend(f"// {line}" for line in tool.description.splitlines())
            if _takes_arguments(tool.parameters):
                lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters or {})}) => any;\n")
            else:
                lines.append(f"type {tool.name} = () => any;\n")
        lines.append(f"}} // namespace {name}")
    return "\n".join(lines)


def render_tools_section(
    tools: Sequence[Tool | Mapping[str, Any]] = (), builtin: Sequence[str] = (), namespace: str = "functions"
) -> str:
    """The ``# Tools`` section: built-in tools (system message) or function tools (developer message)."""
    unknown = [b for b in builtin if b not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(f"unknown built-in tool(s) {unknown}; known: {', '.join(BUILTIN_TOOLS)}")
    sections = [text for b, text in BUILTIN_TOOLS.items() if b in builtin]
    if tools:
        sections.append(render_tool_namespace(namespace, tools))
    return "\n\n".join(["# Tools", *sections])
