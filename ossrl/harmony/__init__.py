"""The Harmony chat format of gpt-oss: render conversations to tokens, parse sampled completions back.

Follows the public spec (openai/harmony, "OpenAI Harmony Response Format"): a generated system message, a developer
message with instructions and TypeScript-like function definitions, channels (analysis/commentary/final), tool calls
ending in ``<|call|>``, a final answer ending in ``<|return|>``, chain of thought of finished turns dropped.
"""

from ossrl.harmony.messages import CHANNELS, REASONING_EFFORTS, ROLES, Message, Tool, ToolCall, messages_from_chat
from ossrl.harmony.parse import ParsedCompletion, parse_completion
from ossrl.harmony.render import (
    DEFAULT_IDENTITY,
    GENERATION_PROMPT,
    developer_text,
    drop_old_analysis,
    render_completion,
    render_completion_text,
    render_conversation,
    render_conversation_text,
    render_messages,
    render_messages_text,
    system_text,
)
from ossrl.harmony.tiny_tokenizer import build_tiny_tokenizer
from ossrl.harmony.tokenizer import (
    REQUIRED_TOKENS,
    TINY_SPECIAL_TOKENS,
    HarmonyTokens,
    load_harmony_tokenizer,
    missing_harmony_tokens,
)
from ossrl.harmony.tools import render_tool_namespace, render_tools_section, schema_to_typescript

__all__ = [
    "CHANNELS",
    "DEFAULT_IDENTITY",
    "GENERATION_PROMPT",
    "REASONING_EFFORTS",
    "REQUIRED_TOKENS",
    "ROLES",
    "TINY_SPECIAL_TOKENS",
    "HarmonyTokens",
    "Message",
    "ParsedCompletion",
    "Tool",
    "ToolCall",
    "build_tiny_tokenizer",
    "developer_text",
    "drop_old_analysis",
    "load_harmony_tokenizer",
    "messages_from_chat",
    "missing_harmony_tokens",
    "parse_completion",
    "render_completion",
    "render_completion_text",
    "render_conversation",
    "render_conversation_text",
    "render_messages",
    "render_messages_text",
    "render_tool_namespace",
    "render_tools_section",
    "schema_to_typescript",
    "system_text",
]
