"""Tokenizer and IncrementalDetokenizer: llama.cpp golden ids, known Qwen ids, HF chat-template parity, streaming decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import GOLDEN_DIR, QWEN_DIR, require_shared  # also re-exported by conftest

from stagecoach.coordinator.random_checkpoint import write_tokenizer_files
from stagecoach.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer
from stagecoach.errors import CheckpointError, RequestError

# llama.cpp's convert_hf_to_gguf_update.py writes each text followed by this separator (the file ends with one),
# and one line per text in .out: " id id id\n" (an empty text gives an empty line).
GOLDEN_SEP = "\n__ggml_vocab_test__\n"
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.inp")) if GOLDEN_DIR.is_dir() else []

HELLO_IDS = [9707, 11, 1879, 0]
CHAT_MESSAGES = [{"role": "user", "content": "Give me a short introduction to large language model."}]
CHAT_IDS = [
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
    151644, 872, 198, 35127, 752, 264, 2805, 16800, 311, 3460, 4128, 1614, 13, 151645, 198,
    151644, 77091, 198,
]  # fmt: skip

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France.\nCafé, naïve — 你好 👍🏽"},
    {"role": "user", "content": "And of Japan?  Answer in 日本語, please.\n"},
]
SYSTEM = {"role": "system", "content": "You are a terse geography bot."}
CONVERSATIONS = {"no_system": CONVERSATION, "system": [SYSTEM, *CONVERSATION]}

STREAM_TEXTS = {
    "chinese": "大型语言模型是一种人工智能。你好，世界！",
    "emoji_skin_tones": "👍🏽👋🏿🙌🏻 ok 🧑🏾‍💻 done",
    "accented_latin": "Café, naïve, résumé, jalapeño, Zürich, São Paulo, Kraków, Ærøskøbing.",
    "mixed": "mix: 日本語 🚂🚃 é 한국어 ∑ ∞ ≠ → ½ €100 🦙 llama\nnew line\t tab",
}
# Characters each tokenizer is known to cut across tokens (checked in the tests, not assumed).
SPLIT_TEXT = "Ærøskøbing 🚂 ∑ 日本語 naïve"


def read_golden(inp: Path) -> tuple[list[str], list[list[int]]]:
    raw = inp.read_bytes().decode("utf-8")  # bytes: no newline translation
    assert raw.endswith(GOLDEN_SEP), f"{inp} does not end with the separator"
    texts = raw[: -len(GOLDEN_SEP)].split(GOLDEN_SEP)
    out = inp.with_suffix(".out").read_bytes().decode("utf-8")
    lines = out.split("\n")
    assert lines[-1] == "", f"{inp.with_suffix('.out')} does not end with a newline"
    expected = [[int(t) for t in line.split()] for line in lines[:-1]]
    assert len(texts) == len(expected), f"{inp.name}: {len(texts)} texts but {len(expected)} id lines"
    return texts, expected


@pytest.fixture(scope="module")
def real() -> Tokenizer:
    require_shared(QWEN_DIR / "tokenizer.json")
    return Tokenizer(QWEN_DIR)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Tokenizer:
    return Tokenizer(tiny_dir)


@pytest.fixture(params=["tiny", "real"])
def any_tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def hf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def hf_pair(request):
    """(ours, HF's) tokenizer for the folder named by the parametrization."""
    cache = {}

    def get(which: str):
        if which not in cache:
            if which == "tiny":
                cache[which] = (request.getfixturevalue("tiny"), hf_tokenizer(request.getfixturevalue("tiny_dir")))
            else:
                cache[which] = (request.getfixturevalue("real"), hf_tokenizer(QWEN_DIR))
        return cache[which]

    return get


# ---------------------------------------------------------------- golden ids


def test_golden_parser_keeps_edge_newlines():
    """The separator convention: texts that are empty or made of newlines survive the split exactly."""
    require_shared(GOLDEN_DIR)
    assert GOLDEN_FILES, f"no *.inp files in {GOLDEN_DIR}"
    texts, expected = read_golden(GOLDEN_FILES[0])
    assert texts[:3] == ["ied 4 ½ months", "Führer", ""]
    for text, ids in [("", []), (" ", [220]), ("\t", [197]), ("\n", [198]), ("\n\n", [271]), ("\n\n\n", [1406]),
                      ("\t\n", [1572]), ("\n =", [198, 284]), ("    Hello\n    Hello", [262, 21927, 198, 262, 21927])]:  # fmt: skip
        assert text in texts, f"{text!r} not parsed out of {GOLDEN_FILES[0].name}"
        assert expected[texts.index(text)] == ids, text
    assert texts[-1].startswith("\n \n\n \n\n\n \t \t\t \t\n") and texts[-1].endswith("We'Ve a'lL")


@pytest.mark.parametrize("inp", GOLDEN_FILES or [None], ids=[p.stem for p in GOLDEN_FILES] or ["absent"])
def test_golden_ids(real, inp):
    require_shared(GOLDEN_DIR)
    if inp is None:
        pytest.fail(f"{GOLDEN_DIR} holds no *.inp files")
    require_shared(inp.with_suffix(".out"))
    texts, expected = read_golden(inp)
    mismatches = [
        (text, want, got) for text, want in zip(texts, expected, strict=False) if (got := real.encode(text)) != want
    ]
    print(f"{inp.name}: {len(texts) - len(mismatches)}/{len(texts)} golden texts match")
    assert not mismatches, f"{len(mismatches)}/{len(texts)} mismatches in {inp.name}, first: {mismatches[0]!r}"


# ---------------------------------------------------------------- known ids, stop ids


def test_known_ids(real):
    assert real.encode("Hello, world!") == HELLO_IDS
    assert real.decode(HELLO_IDS) == "Hello, world!"
    assert real.encode_chat(CHAT_MESSAGES) == CHAT_IDS
    assert real.encode_chat(CHAT_MESSAGES, add_generation_prompt=False) == CHAT_IDS[:-3]
    assert (
        real.decode(CHAT_IDS)
        == "system\nYou are a helpful assistant.\nuser\n" + CHAT_MESSAGES[0]["content"] + "\nassistant\n"
    )
    assert real.token_to_id("<|im_end|>") == 151645


def test_stop_ids(real, tiny, tiny_dir, tmp_path):
    assert real.stop_token_ids == [151645, 151643]  # generation_config.json's list, not config.json's int
    # Tiny folder: no generation_config.json nor config.json → the eos_token of tokenizer_config.json.
    assert tiny.stop_token_ids == [tiny.token_to_id("<|im_end|>")] == [2]
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer(tmp_path / "m").stop_token_ids == [0]


# ---------------------------------------------------------------- chat template vs HF


@pytest.mark.parametrize("which", ["tiny", "real"])
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_matches_hf(hf_pair, which, generation_prompt, conversation):
    ours, hf = hf_pair(which)
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n") == generation_prompt
    assert ("You are a helpful assistant." in text) == (conversation == "no_system")
    assert text.count("<|im_start|>") == 3 + 1 + generation_prompt  # 3 turns + system (given or default)

    ids = ours.encode_chat(messages, add_generation_prompt=generation_prompt)
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)[
        "input_ids"
    ]
    assert ids == list(hf_ids)
    assert ids == hf.encode(expected, add_special_tokens=False)
    im_start = ours.token_to_id("<|im_start|>")
    assert ids.count(im_start) == text.count("<|im_start|>")  # special-token text became the special id


# ---------------------------------------------------------------- streaming detokenization


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    """Feeds ids one by one, checking after each step that what was emitted is all the complete text so far."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas: list[str] = []
    for k, token_id in enumerate(ids, 1):
        deltas.append(detok.add(token_id))
        emitted, so_far = "".join(deltas), tok.decode(ids[:k], skip_special_tokens=skip_special_tokens)
        if so_far.endswith("\ufffd"):
            assert so_far.startswith(emitted), (k, emitted, so_far)
        else:
            assert emitted == so_far, f"after {k} ids: emitted {emitted!r}, complete text {so_far!r}"
    return deltas, detok.flush()


@pytest.mark.parametrize("name", list(STREAM_TEXTS))
def test_stream_multibyte(any_tok, name):
    text = STREAM_TEXTS[name]
    ids = any_tok.encode(text)
    assert any_tok.decode(ids) == text
    deltas, tail = stream(any_tok, ids)
    assert not [d for d in deltas if "\ufffd" in d], deltas
    assert tail == ""  # a complete text is emitted by add() itself, nothing is left for flush()
    assert "".join(deltas) + tail == any_tok.decode(ids) == text
    assert sum(1 for d in deltas if d) > 1  # streamed, not emitted in one piece


def test_stream_characters_split_across_tokens(any_tok):
    ids = any_tok.encode(SPLIT_TEXT)
    pieces = [any_tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), f"no token of {SPLIT_TEXT!r} cuts a character: {pieces}"
    deltas, tail = stream(any_tok, ids)
    assert "" in deltas  # some id was held back until its character completed
    assert not [d for d in deltas if "\ufffd" in d], deltas
    assert "".join(deltas) + tail == any_tok.decode(ids) == SPLIT_TEXT


def test_stream_ends_inside_a_character(any_tok):
    """flush() gives back the held bytes (as U+FFFD), so deltas + flush equal decode of the cut ids."""
    ids = any_tok.encode(SPLIT_TEXT)
    cut = next(k for k in range(1, len(ids)) if any_tok.decode(ids[:k]).endswith("\ufffd"))
    deltas, tail = stream(any_tok, ids[:cut])
    assert not [d for d in deltas if "\ufffd" in d], deltas
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == any_tok.decode(ids[:cut])


@pytest.mark.parametrize("skip", [True, False])
def test_stream_chat_with_special_tokens(any_tok, skip):
    messages = [*CONVERSATION, {"role": "assistant", "content": STREAM_TEXTS["mixed"]}]
    rendered = any_tok.apply_chat_template(messages, add_generation_prompt=False)
    ids = any_tok.encode_chat(messages, add_generation_prompt=False)
    deltas, tail = stream(any_tok, ids, skip_special_tokens=skip)
    assert not [d for d in deltas if "\ufffd" in d], deltas
    assert "".join(deltas) + tail == any_tok.decode(ids, skip_special_tokens=skip)
    if skip:
        assert "<|im_start|>" not in "".join(deltas)
    else:
        assert "".join(deltas) + tail == rendered


# ---------------------------------------------------------------- errors


def test_folder_without_tokenizer_json(tiny_dir, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text((tiny_dir / "tokenizer_config.json").read_text())
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    with pytest.raises(CheckpointError):
        Tokenizer(tmp_path / "missing")


@pytest.mark.parametrize(
    "messages",
    [
        ["hello"],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "user", "content": "fine"}, {"role": "assistant"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": 7, "content": "hi"}],
        None,
        {"role": "user", "content": "hi"},
    ],
    ids=[
        "string",
        "no_content",
        "no_role",
        "second_bad",
        "content_none",
        "content_int",
        "content_list",
        "role_int",
        "none",
        "dict",
    ],
)
def test_malformed_messages(tiny, messages):
    with pytest.raises(RequestError):
        tiny.apply_chat_template(messages)
    with pytest.raises(RequestError):
        tiny.encode_chat(messages)


def test_template_errors(tiny_dir, tmp_path):
    no_template = tmp_path / "no_template"
    no_template.mkdir()
    shutil.copy(tiny_dir / "tokenizer.json", no_template)
    with pytest.raises(RequestError, match="no chat template"):
        Tokenizer(no_template).apply_chat_template([{"role": "user", "content": "hi"}])

    strict = tmp_path / "strict"
    shutil.copytree(tiny_dir, strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(strict)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    with pytest.raises(RequestError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])

    config["chat_template"] = "{% for m in messages %}"  # does not compile
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not compile"):
        Tokenizer(strict)
