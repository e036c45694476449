"""Tool calling and structured output for both adapters: rendering tools into the prompt, the constraint that
makes every call parse, and parsing calls back out of the answer (whole or streamed).

A call is written ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`` (the Hermes layout that
Qwen's and other chat templates use), and generation is constrained to it: to a call of one of the tools
(``tool_choice="required"`` or a tool's name), or to a call or a plain answer that does not start with ``<``
(``"auto"``). Where the model's chat template renders tools (it reads ``tools``), it gets them as
``apply_chat_template(tools=...)``; otherwise :data:`TOOLS_PROMPT` is added to the system message, and earlier
calls are written into their assistant turns in the same layout.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from blockrag.engine import Constraint
from blockrag.errors import StructuredRequestError
from blockrag.engine.constrain import lark_json

from .matching import render_chat

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ToolChoice = Literal["auto", "required", "none"] | str
"""``"auto"``: the model calls a tool or answers; ``"required"``: it calls one; ``"none"``: it answers; or the
name of the tool it must call."""

TOOLS_PROMPT = ("You can call these tools:\n<tools>\n{tools}\n</tools>\nTo call a tool, reply with "
                f'{CALL_OPEN}{{{{"name": <tool name>, "arguments": <arguments as a JSON object>}}}}{CALL_CLOSE} '
                "and nothing else.")
"""Added to the system message for chat templates that do not render tools; ``{tools}``: one JSON line each."""
SCHEMA_PROMPT = "Reply with one JSON object that matches this JSON schema, and keep its strings short:\n{schema}"
"""Added to the system message of a request whose answer is constrained to a schema: the constraint makes the
answer parse, and the schema in the prompt tells the model what each field is for."""


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call: its name, what it does, and the JSON schema of its arguments (an object)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    @classmethod
    def from_openai(cls, tool: Mapping[str, Any]) -> "ToolSpec":
        """A tool in OpenAI's layout (``{"type": "function", "function": {...}}`` or the function alone)."""
        function = tool.get("function", tool)
        if not function.get("name"):
            raise StructuredRequestError(f"a tool needs a name; got {dict(tool)!r}")
        return cls(function["name"], function.get("description") or "",
                   function.get("parameters") or {"type": "object", "properties": {}})

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (or one from the conversation's history, to render back into the prompt)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_text(self) -> str:
        return f"{CALL_OPEN}{json.dumps({'name': self.name, 'arguments': self.arguments})}{CALL_CLOSE}"


def closed_schema(schema: Any) -> Any:
    """``schema`` with every object that does not say otherwise closed to extra properties (OpenAI's strict mode).

    An open object lets a small model add properties without end; the caller's parser rejects or drops them anyway.
    """
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": closed_schema(
        dict(tool.parameters))}, "required": ["name", "arguments"], "additionalProperties": False}


def _chosen(tools: Sequence[ToolSpec], choice: ToolChoice) -> list[ToolSpec]:
    if choice in ("auto", "required"):
        return list(tools)
    named = [t for t in tools if t.name == choice]
    if not named:
        raise StructuredRequestError(f"tool_choice={choice!r} names no bound tool; the tools are {[t.name for t in tools]} "
                            "(or pass 'auto', 'required' or 'none').")
    return named


def tool_constraint(tools: Sequence[ToolSpec], choice: ToolChoice = "auto", parallel: bool = False) -> Constraint | None:
    """What the answer must match when ``tools`` are bound: calls of the chosen tools (one, or with ``parallel`` one
    or more), or under ``"auto"`` a call or a plain answer (whose text is not steered to close early: a call the
    budget cuts short then stays text); ``None`` for ``"none"`` or no tools."""
    if choice == "none" or not tools:
        return None
    chosen = _chosen(tools, choice)
    schema = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(t) for t in chosen]}
    calls = "call (\"\\n\" call)*" if parallel else "call"
    answer = "\n    | ANSWER\nANSWER: /[^<\\s][\\s\\S]*/" if choice == "auto" else ""
    return Constraint.lark(f"start: calls{answer}\ncalls: {calls}\ncall: {json.dumps(CALL_OPEN)} arguments "
                           f"{json.dumps(CALL_CLOSE)}\narguments: {lark_json(schema)}\n", close_early=choice != "auto")


def response_constraint(schema: Mapping[str, Any] | None) -> Constraint:
    """Output that is a JSON object valid against ``schema`` (its objects closed), or any JSON object."""
    return Constraint.json_object() if schema is None else Constraint.json_schema(closed_schema(dict(schema)))


def request_constraint(tools: Sequence[ToolSpec], choice: ToolChoice = "auto", parallel: bool = False,
                       response_format: Mapping[str, Any] | None = None) -> Constraint | None:
    """The constraint of one request: its tools' calls, or its ``response_format`` in OpenAI's layout
    (``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema": ...}}``), not both."""
    if response_format is None:
        return tool_constraint(tools, choice, parallel)
    if tools and choice != "none":
        raise StructuredRequestError("a request takes tools or a response format, not both: bind one of them")
    kind = response_format.get("type")
    if kind == "json_object":
        return response_constraint(None)
    if kind == "json_schema" and isinstance(response_format.get("json_schema", {}).get("schema"), Mapping):
        return response_constraint(response_format["json_schema"]["schema"])
    raise StructuredRequestError(f"response_format must be {{'type': 'json_object'}} or {{'type': 'json_schema', "
                                 f"'json_schema': {{'schema': {{...}}}}}}; got {dict(response_format)!r}")


def renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the model's chat template renders a ``tools`` list itself."""
    return bool(tokenizer.chat_template) and "tools" in tokenizer.chat_template


def _with_system(turns: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``turns`` with ``text`` added to the system message (a new one if there is none)."""
    if turns and turns[0]["role"] == "system":
        return [{**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def response_schema(response_format: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The JSON schema of a ``response_format`` (OpenAI's layout), if it has one."""
    return (response_format or {}).get("json_schema", {}).get("schema")


def render_tool_chat(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Mapping[str, Any]],
                     tools: Sequence[ToolSpec] = (), schema: Mapping[str, Any] | None = None) -> str:
    """The prompt for chat ``turns`` (role, content, and for assistant turns any ``tool_calls`` as
    :class:`ToolCall`) with ``tools`` offered, or the answer's JSON ``schema`` given, ready for the assistant's
    turn."""
    if schema is not None:
        turns = _with_system([dict(t) for t in turns], SCHEMA_PROMPT.format(schema=json.dumps(schema)))
    if renders_tools(tokenizer):
        hf = [{**t, "tool_calls": [{"type": "function", "id": c.id, "function": {
            "name": c.name, "arguments": c.arguments}} for c in t["tool_calls"]]} if t.get("tool_calls") else dict(t)
            for t in turns]
        return tokenizer.apply_chat_template(hf, tools=[t.as_openai() for t in tools] or None,
                                             add_generation_prompt=True, tokenize=False)
    plain = [{"role": t["role"], "content": "".join([t.get("content") or "", *(
        c.as_text() for c in t.get("tool_calls") or ())])} for t in turns]
    if tools:
        plain = _with_system(plain, TOOLS_PROMPT.format(tools="\n".join(json.dumps(t.as_openai()["function"])
                                                                         for t in tools)))
    return render_chat(tokenizer, plain)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The answer's text outside tool calls, and the calls in it (an unparseable one stays text)."""
    calls: list[ToolCall] = []
    rest, at = [], 0
    while (start := text.find(CALL_OPEN, at)) >= 0:
        end = text.find(CALL_CLOSE, start)
        try:
            body = json.loads(text[start + len(CALL_OPEN):end]) if end >= 0 else None
        except json.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or \
                not isinstance(body.get("arguments"), dict):
            break
        rest.append(text[at:start])
        calls.append(ToolCall(body["name"], body["arguments"]))
        at = end + len(CALL_CLOSE)
    rest.append(text[at:])
    return "".join(rest).strip() if calls else text, calls


@dataclass
class CallDelta:
    """Part of a streamed call: its ``index`` among the answer's calls; ``id`` and ``name`` in its first delta
    only, then ``arguments`` text, whose deltas join to the call's arguments as JSON."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class ToolCallStream:
    """Splits streamed answer text into text deltas and :class:`CallDelta` s as the text arrives.

    Relies on the constrained layout (``{"name": "...", "arguments": ...}``, no extra whitespace). Text that may
    still become a call's opening is held back until it is known.
    """

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[ToolCall] = []
        """The calls complete so far, with the ids their first deltas carried."""
        self._at = 0  # where unread text starts
        self._args_at: int | None = None  # where the current call's arguments start
        self._sent = 0  # argument characters sent for the current call
        self._id = self._name = ""

    def feed(self, delta: str) -> list[str | CallDelta]:
        """The text deltas and call deltas that ``delta`` completes, in order."""
        self.text += delta
        out: list[str | CallDelta] = []
        while True:
            if self._args_at is None:
                start = self.text.find(CALL_OPEN, self._at)
                if start < 0:
                    keep = next((k for k in range(len(CALL_OPEN) - 1, 0, -1) if self.text.endswith(CALL_OPEN[:k])), 0)
                    if len(self.text) - keep > self._at:
                        out.append(self.text[self._at:len(self.text) - keep])
                        self._at = len(self.text) - keep
                    return out
                if start > self._at:
                    out.append(self.text[self._at:start])
                head = self.text[start + len(CALL_OPEN):]
                marker = head.find('", "arguments": ')
                if not head.startswith('{"name": "') or marker < 0:
                    self._at = start
                    return out
                self._id, self._name = f"call_{uuid.uuid4().hex[:24]}", json.loads(head[len('{"name": '):marker + 1])
                out.append(CallDelta(len(self.calls), id=self._id, name=self._name))
                self._args_at, self._sent = start + len(CALL_OPEN) + marker + len('", "arguments": '), 0
            arguments = self.text[self._args_at:]
            try:  # succeeds only once the arguments object is complete: until then, every character is part of it
                value, end = json.JSONDecoder().raw_decode(arguments)
            except json.JSONDecodeError:
                value, end = None, len(arguments)
            if end > self._sent:
                out.append(CallDelta(len(self.calls), arguments[self._sent:end]))
                self._sent = end
            close = arguments.find(CALL_CLOSE, end) if value is not None else -1
            if close < 0:
                return out
            self.calls.append(ToolCall(self._name, value, self._id))
            self._at, self._args_at = self._args_at + close + len(CALL_CLOSE), None

    def finish(self) -> list[str]:
        """Whatever text was held back once the answer is complete, a call the budget cut short included (it
        stays text, as :func:`parse_tool_calls` leaves it)."""
        rest = self.text[self._at:]
        self._at, self._args_at = len(self.text), None
        return [rest] if rest else []
