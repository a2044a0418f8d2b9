"""Tool definitions in Harmony: JSON schema -> the TypeScript-like ``namespace functions { ... }`` block.

The rules follow openai/harmony's renderer (the spec's reference implementation) so that the model sees tools
exactly as in training: descriptions as ``//`` comments above a field, ``?`` for optional fields, enums as unions
of string literals, defaults as trailing comments, ``() => any`` for a function without arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

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


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _is_enum(schema: Mapping[str, Any]) -> bool:
    return isinstance(schema.get("enum"), list) and len(schema["enum"]) > 0


def _default(value: Any, schema: Mapping[str, Any], *, quote_enum: bool) -> str:
    # A string default is quoted unless the field is an enum (whose literals are already quoted in the type).
    if isinstance(value, str) and (quote_enum or not _is_enum(schema)):
        return f'default: "{value}"'
    if isinstance(value, str):
        return f"default: {value}"
    return f"default: {_json(value)}"


def _nullable(type_str: str, schema: Mapping[str, Any]) -> str:
    return f"{type_str} | null" if schema.get("nullable") is True and "null" not in type_str else type_str


def schema_to_typescript(schema: Mapping[str, Any], indent: str = "") -> str:
    """Render one JSON schema as a TypeScript type (the reference renderer's ``json_schema_to_typescript``)."""
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _nullable(schema_to_typescript(variant, indent + "   "), variant)
            comments = [variant["description"]] if isinstance(variant.get("description"), str) else []
            if "default" in variant:
                comments.append(_default(variant["default"], variant, quote_enum=True))
            if comments:
                out += " // " + " ".join(comments)
        return out
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
        kind = None
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        literals = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
        return " | ".join(literals) if literals else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        items = schema.get("items")
        return f"{schema_to_typescript(items, indent)}[]" if isinstance(items, Mapping) else "Array<any>"
    return "any"


def _object_to_typescript(schema: Mapping[str, Any], indent: str) -> str:
    out = f"{indent}// {schema['description']}\n" if isinstance(schema.get("description"), str) else ""
    out += "{\n"
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = {r for r in schema.get("required") or [] if isinstance(r, str)}
    for key, val in props.items():
        val = val if isinstance(val, Mapping) else {}
        opt = "" if key in required else "?"
        if isinstance(val.get("title"), str):
            out += f"{indent}// {val['title']}\n{indent}//\n"
        one_of = val.get("oneOf")
        if one_of is None and isinstance(val.get("description"), str):
            out += f"{indent}// {val['description']}\n"
        examples = val.get("examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n"
            out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
        if isinstance(one_of, list):
            out += _property_one_of(key, opt, val, one_of, indent)
            continue
        out += f"{indent}{key}{opt}: " + _nullable(schema_to_typescript(val, indent + "    "), val) + ","
        if "default" in val:
            out += " // " + _default(val["default"], val, quote_enum=False)
        out += "\n"
    return out + f"{indent}}}"


def _property_one_of(key: str, opt: str, val: Mapping[str, Any], one_of: list[Any], indent: str) -> str:
    """A field whose type is a ``oneOf``: one ``| variant`` line each, the field's description above (once)."""
    desc = val.get("description") if isinstance(val.get("description"), str) else None
    first_desc = one_of[0].get("description") if one_of and isinstance(one_of[0], Mapping) else None
    above = desc is not None and desc != first_desc
    out = f"{indent}// {desc}\n" if above else ""
    if "default" in val:
        out += f"{indent}// {_default(val['default'], val, quote_enum=False)}\n"
    out += f"{indent}{key}{opt}:\n"
    for i, variant in enumerate(one_of):
        out += f"{indent} | " + _nullable(schema_to_typescript(variant, indent + "   "), variant)
        comments = []
        v_desc = variant.get("description")
        if not (i == 0 and above) and isinstance(v_desc, str) and v_desc != desc:
            comments.append(v_desc)
        if "default" in variant:
            comments.append(_default(variant["default"], variant, quote_enum=False))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"


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
