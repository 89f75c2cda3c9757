"""Function calling for Gemma 3, which has no tool tokens: prompt format, constraints and parsing.

The format (one place defines it; the prompt, the history and the parser agree on it):
- The tool definitions are described in the system text, which Gemma 3's template folds into the
  first user turn (`tools_prompt`): one JSON object per function, and the instruction to answer a
  call with only `{"name": ..., "arguments": {...}}`, or a JSON list of those for several calls.
- Earlier assistant `tool_calls` are written back into the model's turn in that same JSON form
  (`render_tool_calls`); `tool` results become user turns with a ```tool_output block
  (`render_tool_result`).
- `tool_choice` "required" or a named function constrains decoding to a JSON Schema that only
  admits a call (or a list of calls) of the declared functions with arguments valid against their
  schemas (`ToolPlan.constraint`). "auto" leaves the model free; `parse_tool_calls` then recognizes
  a call in the text: a JSON object/list as above (also inside a ``` fence), or Python-call style
  `get_weather(city="Paris")`, `[f(a=1), g(b=2)]`, `print(f(a=1))` in a ```tool_code fence.
- `ToolCallExtractor` does the same while streaming: text that cannot be a call is streamed as
  content at once; from the first sign of a call (`{`, `[`, a fence, a function's name) it holds
  the text back until the choice ends, then emits the calls, or the held text as content if no
  call parses.

Arguments are returned as JSON text (OpenAI's `function.arguments`). Only declared function names
are accepted; in "auto" mode arguments are not checked against the schema (constrained modes
guarantee it).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from server.pipeline.events import ParsedCall, ToolCallDelta, ToolCallStart
from server.pipeline.request import Function, PastToolCall, Tools

MAX_PARALLEL_CALLS = 16
_FENCE = re.compile(r"```[ \t]*(?:json|tool_code|tool_call|python|py)?[ \t]*\n?(.*?)```", re.DOTALL)
_EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ToolPlan:
    """What a request's `tools`/`tool_choice` mean for the prompt, the sampling and the output."""

    mode: str  # "none", "auto", "required" or "named"
    functions: dict[str, Function] = field(default_factory=dict)
    prompt_text: str | None = None
    constraint: dict[str, Any] | None = None  # a JSON Schema for constrained decoding
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none"


def plan_tools(tools: Tools | None) -> ToolPlan:
    if tools is None or not tools.functions or tools.choice == "none":
        return ToolPlan("none")
    functions = {function.name: function for function in tools.functions}
    if tools.choice == "function":
        chosen = functions[tools.function or ""]
        return ToolPlan(
            "named",
            functions,
            tools_prompt(list(functions.values()), must_call=chosen.name, parallel=False),
            call_schema([chosen], parallel=False),
            parallel=False,
        )
    parallel = tools.parallel
    if tools.choice == "required":
        return ToolPlan(
            "required",
            functions,
            tools_prompt(list(functions.values()), must_call="", parallel=parallel),
            call_schema(list(functions.values()), parallel=parallel),
            parallel,
        )
    return ToolPlan("auto", functions, tools_prompt(list(functions.values()), parallel=parallel), None, parallel)


# ---- prompt -----------------------------------------------------------------------------------


def tools_prompt(functions: list[Function], *, must_call: str | None = None, parallel: bool = True) -> str:
    """The tool section of the system text. `must_call`: "" = some function, a name = that one."""
    lines = [
        "You can call the functions described below, one JSON object per function.",
        'To call a function, answer with only a JSON object {"name": <function name>, "arguments": '
        "<object of arguments>}"
        + ("; to call several at once, answer with only a JSON list of such objects." if parallel else ".")
        + " The results will be given back to you in the next turn.",
    ]
    if must_call:
        lines.append(f"You must call the function {must_call} now.")
    elif must_call == "":
        lines.append("You must call at least one function now.")
    else:
        lines.append("If no function is needed, answer normally.")
    lines.append("")
    for function in functions:
        spec: dict[str, Any] = {"name": function.name}
        if function.description:
            spec["description"] = function.description
        spec["parameters"] = function.parameters or _EMPTY_OBJECT_SCHEMA
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)


def render_tool_calls(calls: list[PastToolCall]) -> str:
    """Earlier calls, as the model's text in the format the prompt asks for."""
    rendered = [{"name": call.name, "arguments": _arguments_value(call.arguments)} for call in calls]
    return json.dumps(rendered[0] if len(rendered) == 1 else rendered, ensure_ascii=False)


def render_tool_result(name: str, content: str) -> str:
    return f"Result of {name}:\n```tool_output\n{content.strip()}\n```"


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # keep what the client sent rather than refuse its history


# ---- constrained decoding ---------------------------------------------------------------------


def call_schema(functions: list[Function], *, parallel: bool) -> dict[str, Any]:
    """A JSON Schema that admits only calls of `functions` with valid arguments.

    Each function's `$defs`/`definitions` move to the root under a per-function prefix (their
    `$ref`s rewritten), since the parameters schema is no longer the root.
    """
    defs: dict[str, Any] = {}
    single: list[dict[str, Any]] = []
    for index, function in enumerate(functions):
        parameters, own_defs = _hoist_definitions(function.parameters or _EMPTY_OBJECT_SCHEMA, f"f{index}_")
        defs.update(own_defs)
        single.append(
            {
                "type": "object",
                "properties": {"name": {"const": function.name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    one: dict[str, Any] = single[0] if len(single) == 1 else {"anyOf": single}
    schema: dict[str, Any] = (
        {"anyOf": [one, {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}]}
        if parallel
        else dict(one)
    )
    if defs:
        schema["$defs"] = defs
    return schema


def _hoist_definitions(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = dict(schema)
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        for name, value in (schema.pop(key, None) or {}).items():
            defs[prefix + name] = value
    if not defs:
        return schema, {}

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: (_rewrite_ref(v, prefix) if k == "$ref" and isinstance(v, str) else rewrite(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    return rewrite(schema), {name: rewrite(value) for name, value in defs.items()}


def _rewrite_ref(ref: str, prefix: str) -> str:
    for root in ("#/$defs/", "#/definitions/"):
        if ref.startswith(root):
            return "#/$defs/" + prefix + ref[len(root) :]
    return ref


# ---- parsing ----------------------------------------------------------------------------------


def parse_tool_calls(body: str, functions: dict[str, Function]) -> list[ParsedCall] | None:
    """Calls written as JSON or as Python calls; None when `body` is not (only) calls of `functions`."""
    body = body.strip()
    if not body:
        return None
    if body[0] in "{[":
        calls = _json_calls(body, functions)
        if calls is not None or body[0] == "{":
            return calls
    return _python_calls(body, functions)


def _json_calls(body: str, functions: dict[str, Function]) -> list[ParsedCall] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or set(item) - {"name", "arguments", "parameters"}:
            return None
        name = item.get("name")
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(name, str) or name not in functions or not isinstance(arguments, dict):
            return None
        calls.append(ParsedCall(name, json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def _python_calls(body: str, functions: dict[str, Function]) -> list[ParsedCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if _is_call(tree, "print") and len(tree.args) == 1 and not tree.keywords:  # type: ignore[attr-defined]
        tree = tree.args[0]  # type: ignore[attr-defined]
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.func.id not in functions:
            return None
        arguments = _python_arguments(node, functions[node.func.id])
        if arguments is None:
            return None
        calls.append(ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def _is_call(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def _python_arguments(node: ast.Call, function: Function) -> dict[str, Any] | None:
    names = list(((function.parameters or {}).get("properties") or {}).keys())
    if len(node.args) > len(names):
        return None
    arguments: dict[str, Any] = {}
    try:
        for name, value in zip(names, node.args, strict=False):
            arguments[name] = _literal(value)
        for keyword in node.keywords:
            if keyword.arg is None:
                return None
            arguments[keyword.arg] = _literal(keyword.value)
    except ValueError:
        return None
    return arguments


_NAMED_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.expr) -> Any:
    """A JSON-like literal (also true/false/null as JSON writes them)."""
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        result = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                raise ValueError("dict unpacking")
            result[str(_literal(key))] = _literal(value)
        return result
    value = ast.literal_eval(node)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise ValueError("not a JSON value")


# ---- streaming --------------------------------------------------------------------------------

_ARGUMENT_KEYS = ("arguments", "parameters")
_JSON_FENCE_LABELS = ("", "json", "tool_call")
_NOT_JSON = -1
CallPiece = ToolCallStart | ToolCallDelta


class _CallScanner:
    """Follows JSON calls (`{"name": ..., "arguments": {...}}` or a list of them) as they are written,
    so that each call's arguments stream while they are generated.

    A call starts once its `name` (a declared function) has been read and its `arguments` object
    opens; from then on the arguments' text goes out as it comes. Anything that is not this shape
    stops the scanner (`failed`): the whole text is then parsed when the choice ends. The scan is one
    pass over the characters, however the text arrives.
    """

    def __init__(self, functions: dict[str, Function], choice: int) -> None:
        self.functions = functions
        self.choice = choice
        self.body = ""
        self.scanned = 0
        self.failed = False
        self.closed = False  # the top-level value has ended
        self.started: list[ParsedCall] = []  # calls whose arguments are (being) streamed, in order
        self._depth = 0
        self._call_depth = 0  # 1: the top is one call object; 2: a list of call objects
        self._in_string = False
        self._escaped = False
        self._string_from = 0
        self._expect_key = False
        self._key: str | None = None
        self._name: str | None = None
        self._position = -1  # the call object being read, among the top-level ones
        self._arguments_from: int | None = None  # where the streaming call's arguments start in body
        self._sent = 0  # how far into body its arguments have gone out

    @property
    def streaming(self) -> bool:
        return self._arguments_from is not None

    def feed(self, text: str) -> list[CallPiece]:
        self.body += text
        pieces: list[CallPiece] = []
        body = self.body
        index = self.scanned
        while index < len(body) and not self.failed and not self.closed:
            self._step(body, index, pieces)
            index += 1
        self.scanned = index
        if self._arguments_from is not None and self._sent < len(body):
            pieces.append(self._arguments_piece(len(body)))
        return pieces

    def _arguments_piece(self, end: int) -> ToolCallDelta:
        piece = self.body[self._sent : end]
        self._sent = end
        self.started[-1].arguments += piece
        return ToolCallDelta(self.choice, len(self.started) - 1, piece)

    def _step(self, body: str, index: int, pieces: list[CallPiece]) -> None:
        char = body[index]
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if self._depth == self._call_depth and self._arguments_from is None:
                    self._string_ended(body[self._string_from : index + 1])
            return
        if char in " \t\r\n":
            return
        if self._depth == 0 and char not in "{[":
            self.failed = True
        elif char == '"':
            self._in_string, self._string_from = True, index
        elif char in "{[":
            self._open(char, index, pieces)
        elif char in "}]":
            self._close(index, pieces)
        elif self._depth == self._call_depth:
            if char == ":":
                self._expect_key = False
            elif char == ",":
                self._expect_key, self._key = True, None

    def _string_ended(self, literal: str) -> None:
        try:
            value = json.loads(literal)
        except ValueError:
            self.failed = True
            return
        if self._expect_key:
            self._key = value
        elif self._key == "name":
            self._name = value

    def _open(self, char: str, index: int, pieces: list[CallPiece]) -> None:
        depth = self._depth
        if depth == 0:
            self._call_depth = 1 if char == "{" else 2
        if depth == self._call_depth - 1:  # a call object opens
            if char != "{":
                self.failed = True
                return
            self._position += 1
            self._expect_key, self._key, self._name = True, None, None
        elif (
            depth == self._call_depth
            and char == "{"
            and self._key in _ARGUMENT_KEYS
            and self._name in self.functions
            and len(self.started) == self._position  # every earlier call was streamed
        ):
            call = ParsedCall(self._name or "", "")
            self.started.append(call)
            pieces.append(ToolCallStart(self.choice, self._position, call.id, call.name))
            self._arguments_from = self._sent = index
        self._depth += 1

    def _close(self, index: int, pieces: list[CallPiece]) -> None:
        self._depth -= 1
        if self._depth < 0:
            self.failed = True
            return
        if self._arguments_from is not None and self._depth == self._call_depth:
            pieces.append(self._arguments_piece(index + 1))  # the arguments object is whole
            self._arguments_from = None
        if self._depth == 0:
            self.closed = True


class ToolCallExtractor:
    """Splits one choice's output into content and tool calls, as it arrives.

    `feed(text)` returns the text that can be sent as content now, and the pieces of calls that can
    be sent now (`ToolCallStart`, `ToolCallDelta`: a JSON call's arguments stream as they are
    written); `finish()` returns the rest of both, and the choice's calls. Every call is started and
    streamed before it is returned (one recognized only at the end, e.g. written Python-style, goes
    out whole then). Non-streaming responses use the same object, so both agree.

    Once a call has started streaming it stays a call: if the text then stops being a valid call
    (the output limit cut it, or the model broke the JSON) the call ends with what was written, as
    OpenAI's own models do; text after streamed calls is not content (the model was asked to answer
    with only the calls).
    """

    def __init__(self, plan: ToolPlan, index: int = 0) -> None:
        self.plan = plan
        self.index = index
        self.text = ""
        self.emitted = 0
        # Constrained output is nothing but the call: hold it all.
        self.held_from: int | None = 0 if plan.constraint is not None else None
        self._decided = plan.constraint is not None
        self._call_starts = [name + "(" for name in plan.functions] + ["print("]
        self.complete = False  # after finish(): the calls parsed whole (not cut or broken)
        self._scanner: _CallScanner | None = None
        # Where JSON calls begin in the text: not known yet (None), or _NOT_JSON for a held text that
        # cannot be JSON calls (Python-style, another fence): those are parsed whole at the end.
        self._scan_from: int | None = 0 if plan.constraint is not None else None

    def feed(self, delta: str) -> tuple[str, list[CallPiece]]:
        self.text += delta
        if self.held_from is not None:
            return "", self._scan()
        text = self.text
        if not self._decided:
            head = text.lstrip()
            if not head:
                return "", []  # only whitespace so far
            if head[0] in "{[`" or any(head.startswith(start) for start in self._call_starts):
                self.held_from = len(text) - len(head)
                return "", self._scan()
            if any(start.startswith(head) for start in self._call_starts):
                return "", []  # a function's name so far: could still become a call
            self._decided = True
        fence = text.find("```", self.emitted)
        if fence >= 0:
            self.held_from = fence
            end = fence
        else:
            end = max(self.emitted, len(text.rstrip("`")))  # a partial fence at the end waits
        piece = text[self.emitted : end]
        self.emitted = end
        return piece, self._scan() if self.held_from is not None else []

    def _scan(self) -> list[CallPiece]:
        """Feeds the held text to the call scanner, once it is known where JSON calls would begin."""
        assert self.held_from is not None
        if self._scan_from is None:
            held = self.text[self.held_from :]
            if not held.startswith("```"):
                self._scan_from = self.held_from if held[:1] in "{[" else _NOT_JSON
            else:
                line_end = held.find("\n")
                if line_end < 0:
                    return []  # the fence's label is not complete yet
                label = held[3:line_end].strip().lower()
                self._scan_from = self.held_from + line_end + 1 if label in _JSON_FENCE_LABELS else _NOT_JSON
        if self._scan_from == _NOT_JSON:
            return []
        if self._scanner is None:
            self._scanner = _CallScanner(self.plan.functions, self.index)
            return self._scanner.feed(self.text[self._scan_from :])
        return self._scanner.feed(self.text[self._scan_from + len(self._scanner.body) :])

    def finish(self) -> tuple[str, list[CallPiece], list[ParsedCall]]:
        """The rest of the content, the calls' last pieces, and the calls (none: all was content)."""
        text = self.text
        if self.held_from is None:
            rest = text[self.emitted :]
            self.emitted = len(text)
            return rest, [], []
        started = self._scanner.started if self._scanner is not None else []
        before = text[self.emitted : self.held_from]
        content, calls = self._parse_held(before)
        self.complete = bool(calls)
        if calls:
            # A call the scanner streamed keeps its id and the text it streamed (the same call).
            pieces: list[CallPiece] = []
            for position, call in enumerate(calls):
                if position < len(started):
                    calls[position] = started[position]
                else:
                    pieces.append(ToolCallStart(self.index, position, call.id, call.name))
                    pieces.append(ToolCallDelta(self.index, position, call.arguments))
            return (before if started else content), pieces, calls
        if started:
            return before, [], list(started)
        return text[self.emitted :], [], []

    def _parse_held(self, before: str) -> tuple[str, list[ParsedCall]]:
        held = self.text[self.held_from :]
        calls = parse_tool_calls(held, self.plan.functions)
        if calls is not None:
            return before, calls
        stripped = held.lstrip()
        match = _FENCE.match(stripped)
        if match is not None and self.plan.constraint is None:
            calls = parse_tool_calls(match.group(1), self.plan.functions)
            if calls is not None:
                return before + stripped[match.end() :], calls
        return "", []
