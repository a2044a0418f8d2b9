"""Tool schemas that are malformed or unusual, rendered as openai/harmony renders them or refused clearly.

Every expected string below is what openai/harmony v0.0.8 produces: `HarmonyEncoding::json_schema_to_typescript`
in src/encoding.rs (called by `template_tools_section` as `type {name} = (_: {ts}) => any;`). They were derived
from that function's code and checked against the function itself, compiled on its own with serde_json
(preserve_order, no float_roundtrip, as harmony's Cargo.toml has it) and fed the JSON that openai_harmony's Python
side sends (`json.dumps`); numbers in defaults go through serde_json's reading and ryu's writing.
"""

from __future__ import annotations

import math

import pytest

from ossrl.harmony import Tool, render_tool_namespace, schema_to_typescript
from ossrl.harmony.tools import check_tool_schema

Q = 'he said "hi"'


def namespace(params, name="f"):
    return render_tool_namespace("functions", [Tool(name, "Doc.", params)])


def wrap(ts, name="f"):
    head = "## functions\n\nnamespace functions {\n\n// Doc.\n"
    return head + f"type {name} = (_: {ts}) => any;\n\n}} // namespace functions"


# --- enum given as a string ----------------------------------------------------------------------------------------


def test_enum_given_as_a_string_is_refused_naming_tool_and_parameter():
    params = {"type": "object", "properties": {"unit": {"type": "string", "enum": "celsius", "default": "celsius"}}}
    with pytest.raises(ValueError, match=r"""tool 'get_weather': parameter 'unit': "enum" must be a list of values, """
                                         r"""got a str \('celsius'\)"""):  # fmt: skip
        namespace(params, "get_weather")
    nested = {"type": "object", "properties": {"opts": {"type": "object", "properties": {"u": {"enum": None}}}}}
    with pytest.raises(ValueError, match=r"""tool 'f': parameter 'opts.u': "enum" must be a list of .*, got null"""):
        namespace(nested)
    # harmony's json_schema_to_typescript: `enum_vals.as_array()` is None for a string, so the type is a plain
    # `string` and the default is quoted (`is_enum` is false); the renderer alone does the same (never the
    # characters of the string, as it once did: "c" | "e" | "l" | ...)
    assert schema_to_typescript(params) == '{\nunit?: string, // default: "celsius"\n}'


def test_enum_lists_render_as_harmony():
    # `filter_map(|v| v.as_str().map(|s| format!("\"{s}\"")))`: strings only, quotes inside as they are; an enum
    # field's string default is written bare; an empty enum is no enum (`is_enum` needs a non-empty array)
    params = {"type": "object", "properties": {
        "u": {"type": "string", "enum": ["a", 1, None, Q], "default": Q},
        "e": {"type": "string", "enum": [], "default": "c"},
    }}  # fmt: skip
    assert namespace(params) == wrap(
        '{\nu?: "a" | "he said "hi"", // default: he said "hi"\ne?: string, // default: "c"\n}'
    )


# --- items given as a list (tuple-typed arrays) --------------------------------------------------------------------


def test_tuple_items_render_as_any_array_like_harmony():
    # `"array" => if let Some(items) = schema.get("items") { format!("{}[]", json_schema_to_typescript(items)) }`:
    # a list (or `true`, or `{}`) is no object schema, so its type is `any` and the field is `any[]`; only a
    # missing `items` gives `Array<any>`
    params = {"type": "object", "required": ["pair"], "properties": {
        "pair": {"type": "array", "items": [{"type": "number"}, {"type": "string"}], "description": "x then label"},
        "flags": {"type": "array", "items": True},
        "free": {"type": "array", "items": {}},
        "bare": {"type": "array"},
    }}  # fmt: skip
    assert namespace(params) == wrap(
        "{\n// x then label\npair: any[],\nflags?: any[],\nfree?: any[],\nbare?: Array<any>,\n}"
    )
    # the schemas inside a tuple are not shown, but they must still be schemas
    bad = {"type": "object", "properties": {"pair": {"type": "array", "items": [{"type": "number"}, "string"]}}}
    with pytest.raises(ValueError, match=r"tool 'f': parameter 'pair\[1\]': a schema must be an object, got a str"):
        namespace(bad)


def test_items_that_are_no_schema_are_refused():
    for items, got in (("string", r"a str \('string'\)"), (None, "null"), (3, r"a int \(3\)")):
        params = {"type": "object", "properties": {"tags": {"type": "array", "items": items}}}
        with pytest.raises(ValueError, match=rf"""tool 'f': parameter 'tags': "items" must be a schema or a list of """
                                             rf"""schemas, got {got}"""):  # fmt: skip
            namespace(params)
        assert schema_to_typescript(params) == "{\ntags?: any[],\n}"  # what harmony would have shown


def test_items_with_a_one_of_render_as_harmony():
    # items are rendered at the field's indent; a top-level oneOf writes "\n{indent} | variant // comments"; there an
    # enum variant's string default is `format!("default: {default}")`, i.e. JSON with escaped quotes
    params = {"type": "object", "properties": {"p": {"type": "array", "items": {"oneOf": [
        {"type": "string", "enum": ["a"], "default": Q},
        {"type": "number", "default": 2.5e-7, "description": "d"},
    ]}}}}  # fmt: skip
    assert schema_to_typescript(params) == (
        '{\np?: \n     | "a" // default: "he said \\"hi\\""\n     | number // d default: 2.5e-7[],\n}'
    )


# --- quotes (and other characters) inside defaults -----------------------------------------------------------------


def test_quotes_inside_defaults_render_as_harmony():
    # strings: `format!("default: \"{}\"", default.as_str().unwrap())`, nothing escaped (so a newline ends the
    # comment line, as in harmony); an enum field's string bare; any other value `format!("default: {default}")`:
    # serde_json's compact JSON, where quotes and control characters are escaped and other characters are not
    params = {"type": "object", "properties": {
        "s": {"type": "string", "default": Q},
        "e": {"type": "string", "enum": [Q, "b"], "default": Q},
        "o": {"type": "object", "default": {"k": Q, "n": [1, 2.0, None, True]}},
        "nl": {"type": "string", "default": "a\nb\\c\t"},
        "uni": {"type": "string", "default": "café ☕ \u2028"},
        "ctl": {"type": "object", "default": {"x": "\x01\x7f\u00e9\b\f"}},
    }}  # fmt: skip
    assert namespace(params) == wrap(
        '{\ns?: string, // default: "he said "hi""\n'
        'e?: "he said "hi"" | "b", // default: he said "hi"\n'
        'o?: {\n    }, // default: {"k":"he said \\"hi\\"","n":[1,2.0,null,true]}\n'
        'nl?: string, // default: "a\nb\\c\t"\n'
        'uni?: string, // default: "café ☕ \u2028"\n'
        'ctl?: {\n    }, // default: {"x":"\\u0001\x7fé\\b\\f"}\n}'
    )


def test_quotes_inside_one_of_defaults_render_as_harmony():
    # a property-level oneOf: the field's default on its own comment line, then one line per variant; an enum's
    # string default is bare there, but JSON in a top-level oneOf
    field = {"type": "object", "properties": {
        "a": {"description": "A", "default": Q, "oneOf": [
            {"type": "string", "default": Q}, {"type": "string", "enum": ["x"], "default": Q},
            {"type": "number", "default": 1e21}]},
        "b": {"enum": ["x"], "default": Q, "oneOf": [{"type": "string"}]},
        "c": {"default": {"q": Q}, "oneOf": [{"type": "string"}]},
    }}  # fmt: skip
    assert namespace(field) == wrap(
        '{\n// A\n// default: "he said "hi""\na?:\n | string // default: "he said "hi""\n'
        ' | "x" // default: he said "hi"\n | number // default: 1e21\n,\n'
        '// default: he said "hi"\nb?:\n | string\n,\n'
        '// default: {"q":"he said \\"hi\\""}\nc?:\n | string\n,\n}'
    )
    top = {"oneOf": [
        {"type": "string", "enum": [Q], "default": Q},
        {"type": "string", "default": Q},
        {"type": "object", "properties": {"z": {"type": "boolean"}}, "default": {"z": Q}},
    ]}  # fmt: skip
    assert schema_to_typescript(top) == (
        '\n | "he said "hi"" // default: "he said \\"hi\\""\n | string // default: "he said "hi""\n'
        ' | {\n   z?: boolean,\n   } // default: {"z":"he said \\"hi\\""}'
    )


def test_number_defaults_are_written_as_serde_json_writes_them():
    # serde_json prints floats with ryu (shortest digits; exponent without "+" or zero padding, from 1e16 up and
    # below 1e-5) and reads integers beyond 64 bits as floats (the first 19-20 digits times a power of ten)
    floats = [0.0, -0.0, 1.0, 0.1, 1e15, 1e16, 1.5e16, 123456789012345678.0, 1e-4, 1e-5, 1.5e-5, 1e-6, 1.234e-7,
              5e-324, 1.7976931348623157e308, -2.5, 1e100, 100.0, 1 / 3, 1e22, 0.5e-4]  # fmt: skip
    written = ["0.0", "-0.0", "1.0", "0.1", "1000000000000000.0", "1e16", "1.5e16", "1.2345678901234568e17", "0.0001",
               "0.00001", "0.000015", "1e-6", "1.234e-7", "5e-324", "1.7976931348623157e308", "-2.5", "1e100", "100.0",
               "0.3333333333333333", "1e22", "0.00005"]  # fmt: skip
    ints = [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**20, 12345678901234567890123]
    written += ["0", "-1", "9223372036854775807", "-9223372036854775808", "18446744073709551615",
                "1.8446744073709552e19", "-9.223372036854776e18", "1e20", "1.2345678901234568e22"]  # fmt: skip
    props = {f"n{i}": {"type": "number", "default": v} for i, v in enumerate(floats + ints)}
    expected = "".join(f"n{i}?: number, // default: {w}\n" for i, w in enumerate(written))
    assert schema_to_typescript({"type": "object", "properties": props}) == "{\n" + expected + "}"
    # openai_harmony sends Python's JSON to Rust, and serde_json (built without float_roundtrip) reads a float as
    # significand / 10**k in f64: a bit off at times, and harmony writes what it read
    off = {"type": "object", "properties": {"a": {"default": 1.1e-30}, "b": {"default": 3e-31}}}
    assert schema_to_typescript(off) == (
        "{\na?: any, // default: 1.1000000000000001e-30\nb?: any, // default: 3.0000000000000003e-31\n}"
    )
    nested = {"type": "object", "properties": {"r": {"type": "array", "default": [1e16, {"x": 1.5e-7}]}}}
    assert schema_to_typescript(nested) == '{\nr?: Array<any>, // default: [1e16,{"x":1.5e-7}]\n}'


def test_defaults_that_are_not_json_are_refused():
    for value, why in ((math.nan, "nan is not a JSON number"), (math.inf, "inf is not a JSON number"),
                       ({1, 2}, "a set is not a JSON value"), (10**400, "out of range for a JSON number"),
                       ([1, -math.inf], "-inf is not a JSON number")):  # fmt: skip
        params = {"type": "object", "properties": {"x": {"type": "number", "default": value}}}
        with pytest.raises(ValueError, match=f"""tool 'f': parameter 'x': "default" is not JSON: .*{why}"""):
            namespace(params)


# --- other malformed parts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ("{}", r"tool 'f': parameters: must be an object schema, got a str \('\{\}'\)"),
        ({"type": "object", "properties": ["a"]}, r"""tool 'f': parameters: "properties" must be an object"""),
        ({"type": "object", "properties": {"a": "string"}}, r"parameter 'a': a schema must be an object, got a str"),
        ({"type": "object", "properties": {"a": {"oneOf": {"type": "string"}}}},
         r"""parameter 'a': "oneOf" must be a list of schemas, got a dict"""),
        ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, 5]}}},
         r"parameter 'a.oneOf\[1\]': a schema must be an object, got a int \(5\)"),
        ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "properties": {
            "b": {"type": "string", "enum": "x"}}}}}}, r"""parameter 'a\[\].b': "enum" must be a list"""),
    ],
)  # fmt: skip
def test_malformed_schemas_are_refused_with_the_path(params, message):
    with pytest.raises(ValueError, match=message):
        namespace(params)


def test_valid_schemas_pass_the_check():
    check_tool_schema("f", None)
    check_tool_schema("f", {"type": "object", "properties": {"a": True, "b": {"type": "array", "items": False}}})
    check_tool_schema("f", {"oneOf": [{"type": "string"}, {"type": "array", "items": [{"type": "number"}]}]})
