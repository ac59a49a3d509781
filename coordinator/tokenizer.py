"""Text ↔ token ids for a checkpoint folder: `tokenizers` encode/decode, HF chat templates, stop ids, streaming decode."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from stagecoach.coordinator.demo_model import cache_root
from stagecoach.coordinator.gguf_convert import tokenizer_dir
from stagecoach.errors import CheckpointError, RequestError
from stagecoach.proto import gguf


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_template(source: str):
    """Compiles a chat template the way HF's apply_chat_template does (sandboxed, same options and helpers)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # HF replaces jinja's HTML-escaping tojson with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"the checkpoint's chat template does not compile: {e}") from None


class Tokenizer:
    """A checkpoint folder's tokenizer.json, tokenizer_config.json and generation_config.json (a GGUF file's, from its
    metadata, where the folder has none)."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file() and (found := gguf.find_gguf(model_dir)) is not None:
            model_dir = tokenizer_dir(found, cache_root() / "gguf-tokenizers")  # from the file's metadata
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the checkpoint folder needs a tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        self.config: dict = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special_tokens = {
            name: _token_text(self.config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = model_dir / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        self.chat_template: str | None = template
        self._compiled = _compile_template(template) if template else None
        self.stop_token_ids = self._find_stop_ids(model_dir)

    def _find_stop_ids(self, model_dir: Path) -> list[int]:
        for name in ("generation_config.json", "config.json"):
            path = model_dir / name
            if path.is_file():
                eos = json.loads(path.read_text()).get("eos_token_id")
                if eos is not None:
                    return [eos] if isinstance(eos, int) else list(eos)
        eos_text = self.special_tokens.get("eos_token")
        eos_id = self._tok.token_to_id(eos_text) if eos_text else None
        return [eos_id] if eos_id is not None else []

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # Qwen2 adds no BOS; special-token text such as <|im_start|> maps to its id.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The same ids as `encode`, for several texts; `tokenizers` releases the GIL for this call (not for `encode`),
        so it can run on a thread beside an event loop without stalling it."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The rendered chat text, as HF's `apply_chat_template(..., tokenize=False)` gives it."""
        if self._compiled is None:
            raise RequestError("this checkpoint has no chat template: send a plain prompt instead of messages")
        if not isinstance(messages, (list, tuple)):
            raise RequestError(
                f"messages must be a list of objects with 'role' and 'content', got {type(messages).__name__}"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
            if not isinstance(message["role"], str):
                raise RequestError(f"messages[{i}]['role'] must be a string, got {type(message['role']).__name__}")
        import jinja2

        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                # as HF: the caller's keyword arguments override the special tokens' names
                **({k: v for k, v in self.special_tokens.items() if v is not None} | kwargs),
            )
        except jinja2.exceptions.TemplateError as e:
            raise RequestError(f"the chat template refused the messages: {e}") from None
        except TypeError as e:
            # e.g. content None, a number or a list where the template concatenates strings
            raise RequestError(
                f"the chat template cannot render the messages (check each message's content type): {e}"
            ) from None

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, release_gil: bool = False
    ) -> list[int]:
        """The rendered chat's ids; release_gil: tokenise with `encode_batch` (for a thread beside an event loop)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode_batch([text])[0] if release_gil else self.encode(text)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting half a UTF-8 character.

    Decodes a short window of recent ids and emits what it adds beyond the already-emitted part;
    a window ending in U+FFFD (an incomplete byte sequence) waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]
