"""Tokenizer tests: spec section 5 check vectors, decode rules, streaming decoder."""
from __future__ import annotations

import base64
import hashlib
import random
import time
import unicodedata

import numpy as np
import pytest
import torch

import qwen_fast.tokenizer as tokmod
from qwen_fast.errors import CheckpointError
from qwen_fast.testing import SPECIAL_FILE_KINDS, make_special_file
from qwen_fast.tokenizer import (
    ENDOFTEXT, EOD_ID, IM_END, IM_END_ID, IM_START, IM_START_ID, PAT_STR, VOCAB_SHA256,
    IncrementalDecoder, QwenTokenizer, default_vocab_path, load_tiktoken_bpe,
)


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.default()


# ---------------------------------------------------------------------------------------
# Vocabulary and constants
# ---------------------------------------------------------------------------------------

def test_packaged_vocab_sha256():
    data = default_vocab_path().read_bytes()
    assert len(data) == 2_561_218
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    assert VOCAB_SHA256 == "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def test_pat_str_exact():
    assert PAT_STR == (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_vocab_size_and_special_ids(tok):
    assert len(tok) == 151851
    assert tok.vocab_size == 151851
    assert tok.eod_id == EOD_ID == 151643
    assert tok.im_start_id == IM_START_ID == 151644
    assert tok.im_end_id == IM_END_ID == 151645
    sp = tok.special_tokens
    assert len(sp) == 208
    assert sp[ENDOFTEXT] == 151643
    assert sp[IM_START] == 151644 and IM_START == "<|im_start|>"
    assert sp[IM_END] == 151645 and IM_END == "<|im_end|>"
    assert sp["<|extra_0|>"] == 151646
    assert sp["<|extra_204|>"] == 151850
    assert "<|extra_205|>" not in sp
    assert tok.token_to_id("<|extra_0|>") == 151646
    assert tok.token_to_id(IM_END) == IM_END_ID
    assert tok.token_to_id("\n") == 198
    with pytest.raises(KeyError):
        tok.token_to_id("<|extra_205|>")
    # special_tokens returns a copy
    sp["x"] = 1
    assert "x" not in tok.special_tokens


def test_first_ranks_and_bytes(tok):
    assert tok.id_to_bytes(0) == b"!"
    assert tok.id_to_bytes(198) == b"\n"
    assert tok.id_to_bytes(220) == b" "
    assert tok.id_to_bytes(IM_END_ID) == b"<|im_end|>"
    assert tok.id_to_bytes(np.int64(220)) == b" "


def test_from_dir(tmp_path, tok):
    # no qwen.tiktoken in the directory -> packaged copy
    t = QwenTokenizer.from_dir(tmp_path)
    assert t.vocab_file == default_vocab_path()
    # a directory that has one -> that file
    (tmp_path / "qwen.tiktoken").write_bytes(default_vocab_path().read_bytes())
    t2 = QwenTokenizer.from_dir(tmp_path)
    assert t2.vocab_file == tmp_path / "qwen.tiktoken"
    assert t2.encode("Panda") == [47, 9817]


# ---------------------------------------------------------------------------------------
# Encode check vectors (spec section 5)
# ---------------------------------------------------------------------------------------

def test_encode_special_as_text(tok):
    assert tok.encode('print("<|endoftext|>")', allowed_special=set()) == \
        [1350, 9639, 91, 8691, 723, 427, 91, 82598]


def test_encode_special_default_all(tok):
    assert tok.encode('print("<|endoftext|>")') == [1350, 445, 151643, 899]


def test_encode_allowed_subset(tok):
    assert tok.encode('print("<|extra_0|>")<|endoftext|>', allowed_special={"<|endoftext|>"}) == \
        [1350, 9639, 91, 15460, 62, 15, 91, 82598, 151643]


@pytest.mark.parametrize("text, ids", [
    ("Panda", [47, 9817]),
    (" Panda", [72410]),
    ("12345 hello  world\n\n  x", [16, 17, 18, 19, 20, 23811, 220, 1879, 271, 220, 856]),
    ("\n", [198]),
    ("system", [8948]),
    ("user", [872]),
    ("assistant", [77091]),
    ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
])
def test_encode_vectors(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.encode(text, allowed_special=set()) == ids
    assert tok.decode(ids) == text


def test_lookahead_whitespace_split(tok):
    # "a   b" pre-tokenises as ["a", "  ", " b"] (lookahead), not ["a", "   ", "b"]
    ids = tok.encode("a   b")
    assert [tok.decode([i]) for i in ids] == ["a", "  ", " b"]


def test_nfc_normalisation(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.encode("caf" + "e\u0301" + " ok") == tok.encode("caf\u00e9 ok")
    # decode is not normalised back: it returns the NFC text
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"


def test_disallowed_special_raises(tok):
    with pytest.raises(ValueError):
        tok.encode("hi <|im_end|>", allowed_special=set(), disallowed_special={IM_END})
    with pytest.raises(ValueError):
        tok.encode("hi <|endoftext|>", allowed_special=set(), disallowed_special="all")
    # not present -> fine
    assert tok.encode("hi", allowed_special=set(), disallowed_special={IM_END}) == tok.encode("hi")


def test_encode_type_errors(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="str"):
        tok.encode(None)
    with pytest.raises(TypeError):
        tok.encode("x", allowed_special="everything")
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_encode_empty(tok):
    assert tok.encode("") == []
    assert tok.decode([]) == ""


# ---------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------

def test_decode_partial_utf8(tok):
    assert tok.decode([51461]) == " \ufffd"
    assert tok.decode([51461, 117]) == " 根"


def test_decode_errors_override(tok):
    assert tok.decode([51461], errors="ignore") == " "
    with pytest.raises(UnicodeDecodeError):
        tok.decode([51461], errors="strict")
    assert tok.decode_bytes([51461, 117]) == " 根".encode()


def test_decode_specials_and_skip(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><|extra_3|><|endoftext|>")
    assert ids[0] == IM_START_ID
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><|extra_3|><|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.decode([151850], skip_special_tokens=True) == ""
    assert tok.decode([151642], skip_special_tokens=True) == tok.decode([151642])


def test_decode_input_types(tok):
    ids = tok.encode("Hello, 世界!")
    text = "Hello, 世界!"
    assert tok.decode(ids) == text
    assert tok.decode(tuple(ids)) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.int32)) == text
    assert tok.decode(np.array(ids)) == text
    assert tok.decode(np.array(ids, dtype=np.uint32)) == text
    assert tok.decode([np.int64(i) for i in ids]) == text
    assert tok.decode(ids[0]) == tok.decode(ids[:1])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids]))
    with pytest.raises(TypeError):
        tok.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.decode("abc")


@pytest.mark.parametrize("bad", [-1, 151851, 151935, 151936, 10**9])
def test_decode_bad_id(tok, bad):
    with pytest.raises(ValueError, match=str(bad)) as ei:
        tok.decode([1, bad])
    assert "0..151850" in str(ei.value)
    if 151851 <= bad <= 151935:
        assert "padding" in str(ei.value)


def test_bad_id_in_id_to_bytes_and_stream(tok):
    with pytest.raises(ValueError, match="padding"):
        tok.id_to_bytes(151900)
    with pytest.raises(ValueError):
        IncrementalDecoder(tok).push(151851)


ROUND_TRIP = [
    "Hello, world!",
    "你好，世界！今天天气怎么样？",
    "Mixed 中文 and English, numbers 1234567890, emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦.",
    "Qwen（通义千问）是阿里云研发的大语言模型。\n\n  def f(x):\n\treturn x ** 2  # 平方\n",
    "日本語のテキスト、한국어 텍스트, Ελληνικά, русский, العربية",
    "   leading and trailing spaces   ",
    "tabs\tand\r\nCRLF\r\nlines",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² + 𝑦² = 𝑧²  ∑∫√∞",
    "<|im_start|>special<|im_end|> inside",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special=set())) == text


# ---------------------------------------------------------------------------------------
# Vocabulary file validation
# ---------------------------------------------------------------------------------------

def _write(tmp_path, lines, name="bad.tiktoken"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines))
    return p


def test_small_valid_vocab(tmp_path):
    """load_tiktoken_bpe(n_ranks=None) parses any well-formed vocabulary; QwenTokenizer needs
    exactly the 151643 ranks of Qwen v1, even with verify=False."""
    import base64
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    p = _write(tmp_path, lines + [""], name="small.tiktoken")
    ranks = load_tiktoken_bpe(p, n_ranks=None)
    assert len(ranks) == 256 and ranks[b"!"] == 33
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=r"small.tiktoken: vocabulary has 256 ranks \(0..255\), "
                                                  r"expected exactly 151643 \(0..151642\); rank 256 is "
                                                  r"missing \(the file ends at line 256\)"):
            QwenTokenizer(p, verify=verify)


@pytest.mark.parametrize("lines, match", [
    (["IQ== 0", "Ig==", "Iw== 2"], r"line 2"),
    (["IQ== 0", "Ig== 1 extra"], r"line 2"),
    (["IQ== 0", "!!!! 1"], r"line 2: invalid base64"),
    (["IQ== 0", "Ig== one"], r"line 2: rank"),
    (["IQ== 0", "Ig== -1"], r"line 2: rank"),
    (["IQ== 0", "IQ== 1"], r"line 2: duplicate token"),
    (["IQ== 0", "Ig== 0"], r"line 2: duplicate rank"),
    (["IQ== 0", "Ig== 2"], r"not contiguous.*rank 1 is missing"),
    (["IQ== 1", "Ig== 2"], r"not contiguous.*rank 0 is missing"),
    ([], r"no tokens"),
])
def test_malformed_vocab(tmp_path, lines, match):
    p = _write(tmp_path, lines)
    with pytest.raises(CheckpointError, match=match) as ei:
        QwenTokenizer(p)
    assert "bad.tiktoken" in str(ei.value)


def test_missing_vocab(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.tiktoken: no such file; expected the Qwen "
                                              r"vocabulary file"):
        QwenTokenizer(tmp_path / "nope.tiktoken")


# ---------------------------------------------------------------------------------------
# IncrementalDecoder
# ---------------------------------------------------------------------------------------

STREAM_TEXTS = ROUND_TRIP + [
    "根据您的描述，我建议您先检查一下网络连接。",
    "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩😘",
    "🇨🇳🇺🇸🇯🇵 flags and ZWJ 🧑‍💻 sequences",
    "a" * 50 + "中" * 50 + "🎉" * 20,
    "鑫鑫鑫 龘 㐀 𠀀 𪚥",
]


def _stream(tok, ids, skip=False):
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    deltas = [dec.push(i) for i in ids]
    tail = dec.flush()
    return dec, deltas, tail


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_matches_decode(tok, text):
    ids = tok.encode(text)
    dec, deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert dec.text == text
    assert tail == ""
    for d in deltas:
        assert "\ufffd" not in d
    assert dec.ids == ids


def test_incremental_really_splits_characters(tok):
    """Some texts here have characters split across tokens, so the hold-back path runs."""
    ids = tok.encode("鑫鑫鑫 龘 㐀 𠀀 𪚥")
    dec = IncrementalDecoder(tok)
    held = [i for i in ids if dec.push(i) == "" and dec.pending_bytes]
    assert held, "expected at least one token that ends inside a UTF-8 character"
    assert dec.flush() == "" and dec.text == "鑫鑫鑫 龘 㐀 𠀀 𪚥"


def test_incremental_holds_back_partial(tok):
    dec = IncrementalDecoder(tok)
    assert dec.push(51461) == " "      # " " + first byte(s) of 根: hold the partial char
    assert dec.pending_bytes != b""
    assert dec.push(117) == "根"
    assert dec.pending_bytes == b""
    assert dec.flush() == ""
    assert dec.text == " 根"


def test_incremental_invalid_sequence(tok):
    # 51461 ends with an incomplete UTF-8 lead; "a" cannot continue it
    a = tok.encode("a")[0]
    ids = [51461, a, 51461, 51461, tok.encode("中")[0]]
    dec, deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids, errors="replace")
    assert dec.text == tok.decode(ids)
    assert "\ufffd" in dec.text
    # trailing incomplete sequence is only emitted by flush
    dec2 = IncrementalDecoder(tok)
    assert dec2.push(51461) == " "
    assert dec2.flush() == "\ufffd"
    assert dec2.text == tok.decode([51461])


def test_incremental_skip_special(tok):
    ids = tok.encode("<|im_start|>assistant\n你好😀<|im_end|><|endoftext|>")
    dec, deltas, tail = _stream(tok, ids, skip=True)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)
    dec, deltas, tail = _stream(tok, ids, skip=False)
    assert "".join(deltas) + tail == tok.decode(ids)


def test_incremental_random_ids(tok):
    """Random ids (including byte-level fragments) must match decode(errors='replace')."""
    rng = random.Random(1234)
    # bias towards the byte-fragment region and multi-byte tokens
    frag = [i for i in range(256)] + [51461, 117, 94, 235, 245, 72, 100]
    for _ in range(300):
        n = rng.randint(1, 30)
        ids = [rng.choice(frag) if rng.random() < 0.6 else rng.randrange(151851)
               for _ in range(n)]
        for skip in (False, True):
            dec, deltas, tail = _stream(tok, ids, skip=skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
            assert dec.text == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_push_many_and_reset(tok):
    ids = tok.encode("流式输出 streaming 🎉")
    dec = IncrementalDecoder(tok)
    out = dec.push_many(ids) + dec.flush()
    assert out == "流式输出 streaming 🎉"
    dec.reset()
    assert dec.text == "" and dec.ids == []
    assert dec.push_many(torch.tensor(ids)) + dec.flush() == out


# ---------------------------------------------------------------------------------------
# The release vocabulary: exact rank count, sha256, bounded regular file
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_lines():
    return default_vocab_path().read_bytes().splitlines(keepends=True)


def test_truncated_release_vocab(tmp_path, vocab_lines):
    p = tmp_path / "qwen.tiktoken"
    for n in (151642, 100_000, 300):
        p.write_bytes(b"".join(vocab_lines[:n]))
        for verify in (True, False):
            with pytest.raises(CheckpointError, match=rf"qwen.tiktoken: vocabulary has {n} ranks "
                                                      rf"\(0..{n - 1}\), expected exactly 151643 "
                                                      rf"\(0..151642\); rank {n} is missing \(the file "
                                                      rf"ends at line {n}\)"):
                QwenTokenizer(p, verify=verify)
    # cut inside the last line: a malformed line, named by its number
    p.write_bytes(b"".join(vocab_lines)[:-3])
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken: line 151643: "):
        QwenTokenizer(p)


def test_extra_rank_is_refused(tmp_path, vocab_lines):
    import base64
    p = tmp_path / "qwen.tiktoken"
    p.write_bytes(b"".join(vocab_lines) + base64.b64encode(b"\xff" * 200) + b" 151643\n")
    with pytest.raises(CheckpointError, match=r"vocabulary has 151644 ranks .* rank 151643 \(line 151644\) "
                                              r"and later are extra"):
        QwenTokenizer(p, verify=False)


def test_modified_vocab_needs_verify_false(tmp_path, vocab_lines):
    lines = list(vocab_lines)
    a, b = lines[1000].split(), lines[1001].split()       # swap two tokens: still well-formed
    lines[1000], lines[1001] = b[0] + b" " + a[1] + b"\n", a[0] + b" " + b[1] + b"\n"
    p = tmp_path / "qwen.tiktoken"
    p.write_bytes(b"".join(lines))
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match=rf"qwen.tiktoken: sha256 is {digest}, expected "
                                              rf"{VOCAB_SHA256} .*verify=False"):
        QwenTokenizer(p)
    with pytest.raises(CheckpointError, match="sha256"):
        QwenTokenizer.from_dir(tmp_path)
    t = QwenTokenizer(p, verify=False)
    assert t.token_to_id(base64.b64decode(a[0])) == 1001
    assert QwenTokenizer.from_dir(tmp_path, verify=False).vocab_size == 151851
    assert QwenTokenizer.default().token_to_id(base64.b64decode(a[0])) == 1000   # cache keyed by content


def test_vocab_needs_every_single_byte(tmp_path):
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(255)]
    lines.append(f"{base64.b64encode(b'ab').decode()} 255")
    p = _write(tmp_path, lines)
    with pytest.raises(CheckpointError, match=r"bad.tiktoken: byte 0xff has no token \(1 of the 256 "
                                              r"single bytes are missing\)"):
        load_tiktoken_bpe(p, n_ranks=None)


def test_huge_rank_number(tmp_path):
    p = _write(tmp_path, ["IQ== " + "9" * 5000])
    with pytest.raises(CheckpointError, match=r"line 1: rank '9999.*' is not a non-negative integer below 10\*\*9"):
        QwenTokenizer(p)


@pytest.mark.parametrize("kind", SPECIAL_FILE_KINDS)
def test_vocab_must_be_a_regular_file(tmp_path, alarm, kind):
    p = tmp_path / "qwen.tiktoken"
    make_special_file(p, kind)
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken( is a|: no such file)"):
        QwenTokenizer(p)
    if kind != "directory":    # a directory named qwen.tiktoken is not "a vocab in the dir"
        with pytest.raises(CheckpointError, match=r"qwen.tiktoken"):
            QwenTokenizer.from_dir(tmp_path)


def test_oversized_vocab(tmp_path):
    p = tmp_path / "qwen.tiktoken"
    with open(p, "wb") as f:
        f.truncate((16 << 20) + 1)
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken is 16777217 bytes, more than the 16777216"):
        QwenTokenizer(p)


# ---------------------------------------------------------------------------------------
# Long whitespace runs: cut into PAT_STR's own pre-tokens, same ids as encoding whole
# ---------------------------------------------------------------------------------------



_ALPHABET = [" ", " ", " ", "\t", "\n", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u3000",
             "\u2028", "\u2009", "\x1c",                               # \x1c: isspace() but not \s
             "a", "b", "Z", "é", "e\u0301", "中", "文", "ア", "1", "7", "٣", "!", ".", "'", "s", "'s",
             "-", "😀", "\u0301", "<|endoftext|>", "<|im_end|>", "<|", "|>", "\ud800"]
_ALLOWED = ["all", set(), {"<|endoftext|>"}]


def _whole(tok, text, allowed):
    """What tiktoken gives for the whole string (short strings never hit its limit)."""
    return tok.encoding.encode(unicodedata.normalize("NFC", text),
                               allowed_special=allowed if allowed == "all" else frozenset(allowed),
                               disallowed_special=())


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_long_run_cutting_equals_whole_encoding(tok, monkeypatch, limit):
    """With the cut-off lowered, every whitespace run longer than `limit` goes through our own
    pre-tokenisation; the ids must equal tiktoken's for the whole string."""
    monkeypatch.setattr(tokmod, "WS_RUN_LIMIT", limit)
    rng = random.Random(limit)
    for _ in range(3000):
        text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 24)))
        for allowed in _ALLOWED:
            assert tok.encode(text, allowed_special=allowed) == _whole(tok, text, allowed), (text, allowed)


@pytest.mark.parametrize("text", [
    "a   b", "a \n b", "!\n\n  \n  x", "!\n\n", "x\n\n   \n   ", " ", "\n", "  ", "\t!", " !", "  !",
    "a\r\n\r\n  b", "<|endoftext|>\n\n  x", "<|endoftext|>   ", "  <|endoftext|>", "x  <|im_end|>y",
    "12  34", "'s  's", "中  文", "\u3000\u3000x", "a\x85\x85b", "a\x1c\x1cb", "😀\n\n 😀", "!" + " \n" * 5,
])
def test_long_run_cutting_edge_cases(tok, monkeypatch, text):
    monkeypatch.setattr(tokmod, "WS_RUN_LIMIT", 0)
    for allowed in _ALLOWED:
        assert tok.encode(text, allowed_special=allowed) == _whole(tok, text, allowed)


def test_long_run_cutting_is_used_for_long_runs_only(tok, monkeypatch):
    calls = []
    real = QwenTokenizer._encode_long_ws
    monkeypatch.setattr(QwenTokenizer, "_encode_long_ws", lambda *a: calls.append(1) or real(*a))
    text = "x" + " " * tokmod.WS_RUN_LIMIT + "y"
    assert tok.encode(text) == _whole(tok, text, "all") and not calls
    text = "x" + " " * (tokmod.WS_RUN_LIMIT + 1) + "y"
    assert tok.encode(text) == _whole(tok, text, "all") and calls


@pytest.mark.parametrize("name, text", [
    ("2M spaces", " " * 2_000_000),
    ("2M newlines", "\n" * 2_000_000),
    ("1M tabs", "\t" * 1_000_000),
    ("mixed", "x" + " \t\n\r" * 400_000 + "  y"),
    ("runs between words", ("word" + " " * 1_200_000) * 2 + "!"),
    ("ideographic", "\u3000" * 1_500_000 + "中"),
    ("punct then newlines", "!" + "\n" * 1000 + " " * 1_500_000 + "<|endoftext|>"),
])
def test_million_whitespace_chars(tok, name, text):
    t0 = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t0 < 20, name
    assert tok.decode(ids) == text


def test_long_whitespace_pieces(tok):
    """Runs past the limit are the pre-tokens PAT_STR gives them: all of the run at the end of
    the text, all but the last character before a word (which takes it: " y"), and up to the
    last newline first."""
    enc, n = tok.encoding, 50_000
    assert n > tokmod.WS_RUN_LIMIT
    assert tok.encode(" " * n) == enc._encode_single_piece(b" " * n)
    assert tok.encode("x" + " " * n + "y") == (
        enc.encode("x") + enc._encode_single_piece(b" " * (n - 1)) + enc.encode(" y"))
    assert tok.encode("x" + " " * n + "\n" + " " * n + "y") == (
        enc.encode("x") + enc._encode_single_piece(b" " * n + b"\n")
        + enc._encode_single_piece(b" " * (n - 1)) + enc.encode(" y"))
    assert tok.encode("x" + " " * n + "y") == _whole(tok, "x" + " " * n + "y", "all")


@pytest.mark.parametrize("name, text", [
    ("1M letters", "a" * 1_000_000),
    ("1M random letters", "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz")
                                  for _ in range(1_000_000))),
    ("1M digits", "7" * 1_000_000),
    ("1M punctuation", "!" * 1_000_000),
    ("1M mixed punctuation", "".join(random.Random(1).choice("!@#$%^&*()[]{};:,.<>/?|") for _ in range(1_000_000))),
    ("300k CJK", "中" * 300_000),
    ("300k emoji", "😀" * 300_000),
    ("1M combining marks", "\u0301" * 1_000_000),
])
def test_million_char_words(tok, name, text):
    """A single huge pre-token is BPE-merged in one piece; tiktoken >= 0.13 does that in
    O(n log n) (older versions are quadratic: minutes for these)."""
    t0 = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t0 < 20, name
    assert tok.decode(ids) == text


@pytest.mark.parametrize("ids", [{1, 2, 3}, frozenset({4, 5}), {1: "a", 2: "b"}])
def test_unordered_collections_are_not_token_ids(tok, ids):
    """Token ids have an order: a set or a dict would decode in its iteration order, so the one
    id parser behind decode, IncrementalDecoder and extract_response refuses them."""
    with pytest.raises(TypeError, match="expected a sequence of token ids"):
        tok.decode(ids)
    with pytest.raises(TypeError, match="expected a sequence of token ids"):
        IncrementalDecoder(tok).push_many(ids)
    assert IncrementalDecoder(tok).push_many(iter([40, 41])) == tok.decode([40, 41])
