"""OpenAI's completions and chat bodies ↔ unmask's `GenerateRequest` / `GenerateResponse`.

Pure translation, no I/O: the gateway (service/gateway.py) sends what this builds through the
gRPC client and hands what comes back to the builders below. Every parameter OpenAI defines is
either mapped, accepted only at its neutral value, ignored (a short documented list) or refused
with INVALID_ARGUMENT naming it; docs/http_api.md has the table. Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from unmask.client import chat_request, generate_request, infill_request, sampler_params
from unmask.errors import InvalidArgument
from unmask.v1 import unmask_pb2 as pb

# the chat template: one line per message, then the assistant's turn for the model to write
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_TURN = "Assistant:"
CHAT_STOP = "\nUser:"  # added to every flattened chat: the model does not write the next user turn
# a model with its own chat template (public checkpoints) gets the messages as they are, with
# OpenAI's `developer` as the `system` the templates know
TEMPLATE_ROLES = {"developer": "system"}

# mapped onto the request
_STANDARD = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "seed", "stop", "n", "stream", "stream_options", "echo", "suffix"}  # fmt: skip
# accepted and ignored: they change nothing about the output
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
# accepted only at the value that means "off" (or null)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
    "logprobs": (False, 0), "top_logprobs": (0,), "best_of": (1,), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},),
}  # fmt: skip
# unmask's own sampler knobs, allowed as extra body fields (`extra_body=` in the openai client)
EXTENSIONS = ("modality", "steps", "block_length", "threshold", "position_score", "top_k",
              "remask_budget", "remask_threshold", "cache", "max_steps", "stop_at_eos",
              "speculative")  # fmt: skip
_ONLY = {"prompt": "completions", "echo": "completions", "suffix": "completions",
         "best_of": "completions", "messages": "chat", "max_completion_tokens": "chat",
         "top_logprobs": "chat", "tools": "chat", "tool_choice": "chat", "functions": "chat",
         "function_call": "chat", "response_format": "chat", "parallel_tool_calls": "chat",
         "store": "chat", "metadata": "chat", "service_tier": "chat"}  # fmt: skip
# a request field (proto path) → the OpenAI parameter it came from
_PARAM_OF_FIELD = {"params.gen_length": "max_tokens", "prompt": "prompt", "infill": "suffix"}
FINISH_REASON = {"length": "length", "max_steps": "length", "eos": "stop", "stop": "stop"}


@dataclass
class Call:
    """What the response builders need to know about the request besides its result."""

    kind: str  # completions | chat
    model: str
    request: pb.GenerateRequest
    prompt: str = ""
    suffix: str = ""
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def _check_names(body: dict[str, Any], kind: str) -> None:
    for key, value in body.items():
        if _ONLY.get(key, kind) != kind:
            raise InvalidArgument(f"not a parameter of /v1/{_path(kind)}", field=key)
        if key in _STANDARD or key in IGNORED or key in EXTENSIONS:
            continue
        if key in NEUTRAL:
            if value is not None and value not in NEUTRAL[key]:
                raise InvalidArgument(f"not supported by unmask; only {NEUTRAL[key][0]!r} "
                                      "(or null) is accepted", field=key, value=value)  # fmt: skip
            continue
        raise InvalidArgument("unknown parameter (see docs/http_api.md for what is accepted)",
                              field=key, value=value)  # fmt: skip


def _path(kind: str) -> str:
    return "completions" if kind == "completions" else "chat/completions"


def _params(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """The sampler knobs given, each checked alone (an error names the OpenAI parameter)."""
    knobs: dict[str, tuple[str, Any]] = {}  # SamplerParams field -> (OpenAI name, value)
    tokens = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    if body.get(tokens) is not None:
        knobs["gen_length"] = (tokens, body[tokens])
    for key in ("temperature", "top_p", "seed", *EXTENSIONS[1:]):
        if body.get(key) is not None:
            knobs[key] = (key, body[key])
    out = {}
    for name, (key, value) in knobs.items():
        if isinstance(value, float) and name in ("gen_length", "seed") and value.is_integer():
            value = int(value)
        try:
            sampler_params(**{name: value})
        except InvalidArgument as exc:
            raise InvalidArgument(exc.message, field=key, value=value) from None
        out[name] = value
    return out


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidArgument("a string or a list of strings", field=name, value=value)
    return values


def _common(body: Any, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(body, dict):
        raise InvalidArgument("must be a JSON object", field="body")
    _check_names(body, kind)
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidArgument("a model name (GET /v1/models)", field="model", value=model)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InvalidArgument("a whole number >= 1", field="n", value=n)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidArgument("true or false", field="stream", value=stream)
    if stream and (n or 1) > 1:
        raise InvalidArgument("n > 1 cannot be streamed; send one request per sample", field="n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidArgument("only {'include_usage': bool}", field="stream_options")
    modality = body.get("modality") or "text"
    if modality not in ("text", "code"):
        raise InvalidArgument("text or code (MIDI: POST /v1/midi)", field="modality")
    common = {"model": model, "modality": modality, "n": n or 0}
    extra = {"stream": stream, "include_usage": bool(options.get("include_usage"))}
    return common, extra


def completion_call(body: Any) -> Call:
    """A /v1/completions body → the request to send (with `suffix`: an infill of max_tokens)."""
    common, extra = _common(body, "completions")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("one string (a list of prompts or of token ids is not supported: "
                              "send one request per prompt)", field="prompt")  # fmt: skip
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise InvalidArgument("a string", field="suffix")
    echo = body.get("echo") or False
    params = _params(body, "completions")
    stop = _str_list(body.get("stop"), "stop")
    if suffix:  # the gap between prompt and suffix, max_tokens long (default 32)
        gap = params.pop("gen_length", 32)
        msg = infill_request([prompt, gap, suffix] if prompt else [gap, suffix], params=params,
                             **common)  # fmt: skip
        msg.stop.extend(stop)
    else:
        msg = generate_request(prompt, params=params, stop=stop, **common)
    return Call("completions", common["model"], msg, prompt, suffix, bool(echo), **extra)


def chat_messages(messages: Any) -> list[tuple[str, str]]:
    """The messages checked: (role, content) each, content parts joined (text only)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("a non-empty list of {role, content}", field="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(CHAT_ROLES)}",
                                  field=f"messages[{i}].role")  # fmt: skip
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidArgument("only text parts are supported",
                                      field=f"messages[{i}].content")  # fmt: skip
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise InvalidArgument("a string or text parts", field=f"messages[{i}].content")
        out.append((m["role"], content))
    return out


def render_chat(messages: Any) -> str:
    """The chat template: `Role: content` per message (System, User, Assistant), one per line,
    then `Assistant:` for the model to continue."""
    lines = [f"{CHAT_ROLES[role]}: {content}" for role, content in chat_messages(messages)]
    return "\n".join(lines) + "\n" + CHAT_TURN


def chat_call(body: Any, *, template: bool = False) -> Call:
    """A /v1/chat/completions body → the request to send. `template`: the model has its own
    chat template (public checkpoints): the messages go as the gRPC `chat` input and the
    server renders them; else they are flattened by `render_chat` (with `CHAT_STOP`)."""
    common, extra = _common(body, "chat")
    messages = chat_messages(body.get("messages"))
    stop = _str_list(body.get("stop"), "stop")
    params = _params(body, "chat")
    if template:
        msgs = [(TEMPLATE_ROLES.get(role, role), content) for role, content in messages]
        msg = chat_request(msgs, params=params, stop=stop, model=common["model"],
                           modality=common["modality"])  # fmt: skip
        msg.n = common["n"]
        return Call("chat", common["model"], msg, **extra)
    prompt = render_chat(body.get("messages"))
    msg = generate_request(prompt, params=params, stop=[*stop, CHAT_STOP], **common)
    return Call("chat", common["model"], msg, prompt, **extra)


def param_of(field_path: str | None, kind: str) -> str | None:
    """The OpenAI parameter behind a request field the server named (params.top_p → top_p)."""
    if not field_path:
        return field_path
    if kind == "chat" and field_path in ("prompt", "chat", "chat.messages"):
        return "messages"
    if kind == "chat" and field_path.startswith("chat.messages"):  # chat.messages[0] → messages[0]
        return field_path.removeprefix("chat.")
    if field_path in _PARAM_OF_FIELD:
        return _PARAM_OF_FIELD[field_path]
    return field_path.removeprefix("params.")


# ---- responses -----------------------------------------------------------------------------


def completion_text(call: Call, text: str) -> str:
    """The output less the echoed prompt (and, for an infill, less the suffix)."""
    if call.suffix and text.endswith(call.suffix):
        text = text[: len(text) - len(call.suffix)]
    if not call.echo and call.prompt and text.startswith(call.prompt):
        text = text[len(call.prompt) :]
    return text


def finish_reason(r: pb.GenerateResponse) -> str:
    return FINISH_REASON.get(r.usage.finish_reason, "length")


def usage(r: pb.GenerateResponse) -> dict[str, int]:
    samples = list(r.samples) or [r]
    completion = sum(s.usage.generated_tokens for s in samples)
    return {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": completion,
            "total_tokens": r.usage.prompt_tokens + completion}  # fmt: skip


def _head(call: Call, r_id: str) -> dict[str, Any]:
    prefix, obj = (("cmpl-", "text_completion") if call.kind == "completions"
                   else ("chatcmpl-", "chat.completion"))  # fmt: skip
    return {"id": prefix + r_id, "object": obj, "created": call.created, "model": call.model,
            "system_fingerprint": None}  # fmt: skip


def response(call: Call, r: pb.GenerateResponse) -> dict[str, Any]:
    """A finished GenerateResponse → the OpenAI response body (one choice per sample)."""
    choices = []
    for i, s in enumerate(list(r.samples) or [r]):
        text = completion_text(call, s.text)
        if call.kind == "completions":
            choices.append({"index": i, "text": text, "logprobs": None,
                            "finish_reason": finish_reason(s)})  # fmt: skip
        else:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": finish_reason(s)})  # fmt: skip
    return {**_head(call, r.job_id), "choices": choices, "usage": usage(r)}


def chunk(call: Call, job_id: str, text: str | None = None, *, finish: str | None = None,
          first: bool = False) -> dict[str, Any]:  # fmt: skip
    """One streamed chunk: a piece of text, or (finish) the end of the choice."""
    head = _head(call, job_id)
    if call.kind == "completions":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    else:
        head["object"] = "chat.completion.chunk"
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**head, "choices": [choice]}


def usage_chunk(call: Call, r: pb.GenerateResponse) -> dict[str, Any]:
    obj = "text_completion" if call.kind == "completions" else "chat.completion.chunk"
    return {**_head(call, r.job_id), "object": obj, "choices": [], "usage": usage(r)}


class Deltas:
    """Text deltas from the stream's committed blocks, never more than the final answer says.

    A block's text is appended as it commits, less what must wait: an incomplete UTF-8
    character at its end (U+FFFD) and a tail that may be the start of a stop string. Once a
    stop string shows, nothing more is sent. `finish(final_text)` gives what is left of the
    final answer, so the deltas add up to the non-streamed text. An infill streams only at the
    end (its blocks are not in text order with the fixed parts)."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.stop = list(call.request.stop)
        self.incremental = call.request.WhichOneof("input") in ("prompt", "chat")
        self.base = call.prompt if call.echo else ""  # echo: the prompt comes first
        self.text = self.base  # and the committed blocks so far
        self.sent = ""
        self.stopped = False

    def block(self, text: str) -> str:
        if not self.incremental or self.stopped:
            return ""
        self.text += text
        ready = self.text.split("\ufffd", 1)[0]
        hits = [i for i in (ready.find(s, len(self.base)) for s in self.stop) if i >= 0]
        if hits:
            ready, self.stopped = ready[: min(hits)], True
        else:
            hold = max((k for s in self.stop for k in range(1, len(s))
                        if ready.endswith(s[:k])), default=0)  # fmt: skip
            ready = ready[: len(ready) - hold]
        return self._send(ready)

    def finish(self, final_text: str) -> str:
        return self._send(completion_text(self.call, final_text))

    def _send(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent) :], upto
        return delta
