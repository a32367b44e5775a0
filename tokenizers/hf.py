"""The tokenizer of a public checkpoint (LLaDA, Dream, SDAR, ...): its `tokenizer.json`, read with
Hugging Face's `tokenizers` library, and its chat template, rendered in a sandboxed jinja2
environment. Never `trust_remote_code`: only the data files are read.

It offers the part of the unified vocabulary's interface the Generator, the samplers and the
Engine use for text and code (encode, decode, special ids, stripping specials); MIDI and grammar
masks do not exist here, and the public-model Generator refuses requests for them.

Import note: this module is `unmask.tokenizers.hf`; the Hugging Face package is the top-level
`tokenizers`. The repository folder `tokenizers/` has no `__init__.py`, so even with the
repository root on `sys.path` the installed regular package wins (a regular package always beats a
namespace directory); `hf_tokenizers()` checks that it did (tests/test_public_tokenizer.py).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from unmask.errors import CheckpointError, InvalidArgument, TokenizerError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def hf_tokenizers() -> ModuleType:
    """Hugging Face's `tokenizers` module, never this repository's folder of the same name."""
    module = importlib.import_module("tokenizers")
    if not hasattr(module, "Tokenizer"):
        raise CheckpointError(
            f"`import tokenizers` found {getattr(module, '__path__', module)}, not Hugging Face's "
            "package: run from outside the repository root or reinstall (`make install`)",
            field="tokenizer",
        )
    return module


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A public checkpoint's tokenizer. `encode_text`/`decode` never add or keep special tokens."""

    modalities = ("text", "code")
    public = True  # the Engine's block events decode with decode(), not the unified ranges

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.exists():
            raise CheckpointError(
                f"{directory} has no {TOKENIZER_FILE} (only the fast-tokenizer file is read)",
                field="tokenizer",
                value=str(path),
            )
        try:
            self.tok = hf_tokenizers().Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises its own exception type
            raise CheckpointError(f"unreadable {TOKENIZER_FILE}: {exc}", field="tokenizer") from exc
        cfg_path = directory / TOKENIZER_CONFIG
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template_path = directory / CHAT_TEMPLATE_FILE
        template = self.config.get("chat_template")
        if template_path.exists():
            template = template_path.read_text()
        elif isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        digest = hashlib.sha256(path.read_bytes())
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        digest.update((self.chat_template or "").encode())
        self.content_hash = digest.hexdigest()[:16]
        self.special_ids: set[int] = {
            int(i) for i, t in self.tok.get_added_tokens_decoder().items() if t.special
        }
        self.size = self.tok.get_vocab_size(with_added_tokens=True)
        # set by the family adapter (models/families/) once the checkpoint's ids are known
        self.mask_id = self.eos_id = self.pad_id = -1
        self.bos_id: int | None = None

    # ---- special tokens -----------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def config_token_id(self, key: str) -> int | None:
        """The id of tokenizer_config.json's `key` ("eos_token", "pad_token", ...), if any."""
        return self.token_id(_token_text(self.config.get(key)))

    def set_specials(self, *, mask_id: int, eos_id: int, pad_id: int, bos_id: int | None) -> None:
        self.mask_id, self.eos_id, self.pad_id, self.bos_id = mask_id, eos_id, pad_id, bos_id
        self.special_ids |= {i for i in (mask_id, eos_id, pad_id, bos_id) if i is not None}

    # ---- text ---------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError("text must be a string", field="prompt")
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode(self, data: str | bytes, modality: str) -> list[int]:
        if modality not in self.modalities or not isinstance(data, str):
            raise InvalidArgument(
                f"this model's tokenizer handles text and code only, not {modality}",
                field="modality",
                value=modality,
            )
        return self.encode_text(data)

    def decode(self, ids: Sequence[int], modality: str = "text") -> str:
        return self.tok.decode(
            [i for i in ids if i not in self.special_ids], skip_special_tokens=True
        )

    def strip_specials(self, ids: Sequence[int]) -> list[int]:
        return [int(i) for i in ids if int(i) not in self.special_ids]

    def token_str(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or f"<{int(i)}>"

    # ---- chat ---------------------------------------------------------------------------------
    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The checkpoint's chat template applied to `messages` ({"role", "content"} each), in a
        sandboxed jinja2 environment (no attribute access to internals, no file system)."""
        if not self.chat_template:
            raise InvalidArgument(
                "this model has no chat template (tokenizer_config.json chat_template or "
                "chat_template.jinja); send a plain prompt",
                field="chat",
            )
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InvalidArgument(
                f"the chat template refused the messages: {message}", field="chat"
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        specials = {
            k: _token_text(v) or ""
            for k, v in self.config.items()
            if k.endswith("_token") and _token_text(v) is not None
        }
        try:
            return env.from_string(self.chat_template).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **specials,
            )
        except TemplateError as exc:
            raise InvalidArgument(f"the chat template failed: {exc}", field="chat") from exc

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Rendered template -> ids; special tokens written in the template become their ids."""
        text = self.render_chat(messages)
        return list(self.tok.encode(text, add_special_tokens=False).ids)
