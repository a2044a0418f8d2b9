"""A Jinja chat template for transformers' ``apply_chat_template`` that renders Harmony like ossrl's renderer.

It reads gpt-oss's HF conventions (``thinking`` for the analysis channel, ``tool_calls``, ``tool`` messages,
``tools``, ``reasoning_effort``, ``model_identity``, ``builtin_tools``) plus ``current_date`` and ``instructions``,
and differs from the template shipped with gpt-oss checkpoints where that one departs from the Harmony spec: tool
calls are written as the model writes them (``<|channel|>commentary to=functions.f <|constrain|>json``) and tool
output is passed as is (not JSON-encoded again). JSON-schema ``oneOf`` is rendered only by the Python renderer
(:func:`ossrl.harmony.render_conversation`), which is the reference; this template covers the common subset.
"""

from __future__ import annotations

import json

from ossrl.harmony.tools import BROWSER_SECTION, PYTHON_SECTION

_TEMPLATE = r"""
{%- macro ts(s, indent) -%}
{%- if s.type is defined and s.type is sequence and s.type is not string -%}
{{- s.type | join(' | ') | replace('integer', 'number') -}}
{%- elif s.type == 'object' -%}
{%- if s.description is string -%}{{- indent ~ '// ' ~ s.description ~ '\n' -}}{%- endif -%}
{{- '{\n' -}}
{%- for key, val in (s.properties or {}).items() -%}
{%- if val.title is string -%}{{- indent ~ '// ' ~ val.title ~ '\n' ~ indent ~ '//\n' -}}{%- endif -%}
{%- if val.description is string -%}{{- indent ~ '// ' ~ val.description ~ '\n' -}}{%- endif -%}
{%- if val.examples -%}
{{- indent ~ '// Examples:\n' -}}
{%- for ex in val.examples if ex is string -%}{{- indent ~ '// - "' ~ ex ~ '"\n' -}}{%- endfor -%}
{%- endif -%}
{%- set t = ts(val, indent ~ '    ') -%}
{%- if val.nullable is true and 'null' not in t -%}{%- set t = t ~ ' | null' -%}{%- endif -%}
{{- indent ~ key ~ ('' if key in (s.required or []) else '?') ~ ': ' ~ t ~ ',' -}}
{%- if val.default is defined -%}
{%- if val.default is string and val.enum -%}{{- ' // default: ' ~ val.default -}}
{%- elif val.default is string -%}{{- ' // default: "' ~ val.default ~ '"' -}}
{%- else -%}{{- ' // default: ' ~ (val.default | tojson(separators=(',', ':'))) -}}
{%- endif -%}
{%- endif -%}
{{- '\n' -}}
{%- endfor -%}
{{- indent ~ '}' -}}
{%- elif s.type == 'string' and s.enum -%}
{{- '"' ~ (s.enum | join('" | "')) ~ '"' -}}
{%- elif s.type in ['string', 'boolean'] -%}
{{- s.type -}}
{%- elif s.type in ['number', 'integer'] -%}
{{- 'number' -}}
{%- elif s.type == 'array' -%}
{{- (ts(s['items'], indent) ~ '[]') if s['items'] is mapping else 'Array<any>' -}}
{%- else -%}
{{- 'any' -}}
{%- endif -%}
{%- endmacro -%}

{%- set loop_messages = messages -%}
{%- if messages and messages[0].role in ['system', 'developer'] -%}
{%- set instructions = messages[0].content -%}
{%- set loop_messages = messages[1:] -%}
{%- endif -%}

{#- System message -#}
{{- '<|start|>system<|message|>' ~ (model_identity if model_identity is defined else @IDENTITY@) ~ '\n' -}}
{{- 'Knowledge cutoff: 2024-06\n' -}}
{{- 'Current date: ' ~ (current_date if current_date is defined else strftime_now('%Y-%m-%d')) ~ '\n\n' -}}
{{- 'Reasoning: ' ~ (reasoning_effort if reasoning_effort is defined else 'medium') ~ '\n\n' -}}
{%- if builtin_tools -%}
{{- '# Tools\n\n' -}}
{%- if 'browser' in builtin_tools -%}{{- @BROWSER@ ~ '\n\n' -}}{%- endif -%}
{%- if 'python' in builtin_tools -%}{{- @PYTHON@ ~ '\n\n' -}}{%- endif -%}
{%- endif -%}
{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}
{%- if tools -%}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{%- endif -%}
{{- '<|end|>' -}}

{#- Developer message: instructions and function tools -#}
{%- if instructions or tools -%}
{{- '<|start|>developer<|message|>' -}}
{%- if instructions -%}{{- '# Instructions\n\n' ~ instructions -}}{%- endif -%}
{%- if instructions and tools -%}{{- '\n\n' -}}{%- endif -%}
{%- if tools -%}
{{- '# Tools\n\n## functions\n\nnamespace functions {\n\n' -}}
{%- for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{%- for line in (f.description or '').splitlines() -%}{{- '// ' ~ line ~ '\n' -}}{%- endfor -%}
{%- if f.parameters is mapping and not (f.parameters.type == 'object' and not f.parameters.properties) -%}
{{- 'type ' ~ f.name ~ ' = (_: ' ~ ts(f.parameters, '') ~ ') => any;\n\n' -}}
{%- else -%}
{{- 'type ' ~ f.name ~ ' = () => any;\n\n' -}}
{%- endif -%}
{%- endfor -%}
{{- '} // namespace functions' -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- endif -%}

{#- Chain of thought of finished turns (before the last user message, answered by a final message) is dropped -#}
{%- set ns = namespace(last_user=-1, last_call=none) -%}
{%- for m in loop_messages -%}
{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}

{%- for m in loop_messages -%}
{%- set i = loop.index0 -%}
{%- if m.role in ['system', 'developer'] -%}
{{- raise_exception('system/developer messages are only allowed first') -}}
{%- elif m.role == 'user' -%}
{{- '<|start|>user<|message|>' ~ (m.content or '') ~ '<|end|>' -}}
{%- elif m.role == 'assistant' -%}
{%- set thinking = m.thinking or m.reasoning_content or '' -%}
{%- if m.tool_calls -%}
{%- if thinking and m.content -%}
{{- raise_exception('an assistant message with tool calls has both thinking and content') -}}
{%- endif -%}
{%- set thinking = thinking or m.content or '' -%}
{%- set answered = namespace(found=false) -%}
{%- for later in loop_messages[i + 1:ns.last_user] -%}
{%- if later.role == 'assistant' and not later.tool_calls -%}{%- set answered.found = true -%}{%- endif -%}
{%- endfor -%}
{%- set dropped = i < ns.last_user and answered.found -%}
{%- else -%}
{%- set dropped = i < ns.last_user -%}
{%- endif -%}
{%- if thinking and not dropped -%}
{{- '<|start|>assistant<|channel|>analysis<|message|>' ~ thinking ~ '<|end|>' -}}
{%- endif -%}
{%- if m.tool_calls -%}
{%- for call in m.tool_calls -%}
{%- set f = call.function if call.function is defined else call -%}
{{- '<|start|>assistant<|channel|>commentary to=functions.' ~ f.name ~ ' <|constrain|>json<|message|>' -}}
{{- f.arguments if f.arguments is string else ((f.arguments or {}) | tojson) -}}
{{- '<|call|>' -}}
{%- set ns.last_call = f.name -%}
{%- endfor -%}
{%- else -%}
{{- '<|start|>assistant<|channel|>final<|message|>' ~ (m.content or '') -}}
{{- '<|return|>' if loop.last and not add_generation_prompt else '<|end|>' -}}
{%- endif -%}
{%- elif m.role == 'tool' -%}
{%- set name = m.name or ns.last_call -%}
{%- if not name -%}{{- raise_exception('tool message with no name and no earlier tool call') -}}{%- endif -%}
{{- '<|start|>' ~ (name if '.' in name else 'functions.' ~ name) ~ ' to=assistant<|channel|>commentary<|message|>' -}}
{{- (m.content if m.content is string else (m.content | tojson)) ~ '<|end|>' -}}
{%- else -%}
{{- raise_exception('unknown role ' ~ m.role) -}}
{%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}
"""

CHAT_TEMPLATE = (
    _TEMPLATE.strip()
    .replace("@IDENTITY@", json.dumps("You are ChatGPT, a large language model trained by OpenAI."))
    .replace("@BROWSER@", json.dumps(BROWSER_SECTION, ensure_ascii=False))
    .replace("@PYTHON@", json.dumps(PYTHON_SECTION, ensure_ascii=False))
)
