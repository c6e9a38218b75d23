"""Qwen v1 tokenizer (byte-level BPE over tiktoken), as specified in qwen-spec.md section 5.

Behaviour matches the Hugging Face ``QWenTokenizer`` (``tokenization_qwen.py``):

* the vocabulary is a ``qwen.tiktoken`` file, one ``base64(token_bytes) rank`` per line,
  ranks 0..151642 contiguous, rank == token id. It is checked on load: a regular file of at
  most 16 MiB, exactly these 151643 ranks, and the release file's sha256 (``verify=False``
  loads a deliberately different but well-formed file); every problem is a CheckpointError;
* 208 special tokens follow from id 151643 (``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ``<|extra_0|>`` .. ``<|extra_204|>``), so ``len(tokenizer) == 151851``;
* ``encode`` NFC-normalises first, and by default (``allowed_special="all"``) turns special
  surface forms in the text into special ids;
* ``decode`` concatenates the bytes of every id (specials as their surface string) and decodes
  UTF-8 with ``errors="replace"`` unless told otherwise; no clean-up of spaces.

Whitespace runs of any length encode (tiktoken's regex alone fails at about a million
characters): runs longer than WS_RUN_LIMIT are cut into PAT_STR's own pre-tokens here, with
the same ids as encoding the whole string.

``IncrementalDecoder`` turns a stream of ids into text deltas that never split a UTF-8
character, and whose concatenation equals ``decode(all_ids)`` exactly.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import operator
import os
import re
import unicodedata
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, Mapping, Optional, Sequence, Union

import tiktoken

from .config import MAX_VOCAB_BYTES, read_bounded_file
from .errors import CheckpointError

__all__ = [
    "ENDOFTEXT", "IM_START", "IM_END", "EXTRAS", "SPECIAL_TOKENS", "SPECIAL_START_ID",
    "EOD_ID", "IM_START_ID", "IM_END_ID", "VOCAB_SIZE", "MODEL_VOCAB_ROWS", "PAT_STR",
    "VOCAB_FILENAME", "VOCAB_SHA256", "default_vocab_path", "load_tiktoken_bpe",
    "QwenTokenizer", "IncrementalDecoder",
]

# ---------------------------------------------------------------------------------------
# Constants (qwen-spec.md section 5)
# ---------------------------------------------------------------------------------------

#: Pre-tokenisation regex: cl100k without digit grouping (one digit per token).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))

SPECIAL_START_ID = 151643
#: Special tokens in id order, starting at SPECIAL_START_ID.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS

EOD_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645

#: Number of decodable ids (151643 BPE ranks + 208 specials).
VOCAB_SIZE = SPECIAL_START_ID + len(SPECIAL_TOKENS)  # 151851
#: Rows of the model's embedding / logits; ids VOCAB_SIZE..MODEL_VOCAB_ROWS-1 are padding.
MODEL_VOCAB_ROWS = 151936

VOCAB_FILENAME = "qwen.tiktoken"
#: sha256 of the released qwen.tiktoken (also the packaged copy).
VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

assert VOCAB_SIZE == 151851
assert SPECIAL_TOKENS.index(IM_END) + SPECIAL_START_ID == IM_END_ID

PathLike = Union[str, "os.PathLike[str]"]


def default_vocab_path() -> Path:
    """Path of the vocabulary file packaged with qwen_fast."""
    return Path(__file__).resolve().parent / "data" / VOCAB_FILENAME


def load_tiktoken_bpe(vocab_file: PathLike,
                      n_ranks: Optional[int] = SPECIAL_START_ID) -> dict[bytes, int]:
    """Read a ``base64 rank`` file into ``{token_bytes: rank}``, validating it.

    The file must be a regular file of at most 16 MiB. Blank lines are ignored (as the HF
    loader does). Raises CheckpointError (a ValueError) naming the file and the 1-based line
    number on a malformed line, a duplicate token or rank; naming the missing rank when the
    ranks are not exactly 0..N-1; when N is not ``n_ranks`` (151643 for Qwen v1: a truncated
    file); or when one of the 256 single-byte tokens is missing (byte-level BPE needs them
    all). ``n_ranks=None`` accepts any count (for tools and tests).
    """
    path = Path(vocab_file)
    data = read_bounded_file(path, MAX_VOCAB_BYTES, CheckpointError, _VOCAB_WHAT)
    return _parse_tiktoken_bpe(data, path, n_ranks)


_VOCAB_WHAT = "Qwen vocabulary file (qwen.tiktoken: 'base64 rank' lines)"


def _parse_tiktoken_bpe(data: bytes, path: Path, n_ranks: Optional[int]) -> dict[bytes, int]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise CheckpointError(f"{path}: line {line_no}: non-ASCII byte in vocabulary file "
                              f"(expected 'base64 rank' lines)") from None

    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, int] = {}  # rank -> line number
    last_line = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        last_line = line_no
        parts = line.split()
        if len(parts) != 2:
            raise CheckpointError(f"{path}: line {line_no}: malformed line {line[:80]!r}: expected "
                                  f"'<base64 token> <rank>', got {len(parts)} field(s)")
        b64, rank_s = parts
        try:
            token = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointError(f"{path}: line {line_no}: invalid base64 token "
                                  f"{b64[:60]!r}") from None
        if not token:
            raise CheckpointError(f"{path}: line {line_no}: empty token")
        if not rank_s.isdigit() or not rank_s.isascii() or len(rank_s) > 9:
            raise CheckpointError(f"{path}: line {line_no}: rank {rank_s[:40]!r} is not a "
                                  f"non-negative integer below 10**9")
        rank = int(rank_s)
        if token in ranks:
            raise CheckpointError(f"{path}: line {line_no}: duplicate token {token!r} "
                                  f"(already has rank {ranks[token]})")
        if rank in seen_ranks:
            raise CheckpointError(f"{path}: line {line_no}: duplicate rank {rank} "
                                  f"(first used on line {seen_ranks[rank]})")
        ranks[token] = rank
        seen_ranks[rank] = line_no

    n = len(ranks)
    if n == 0:
        raise CheckpointError(f"{path}: vocabulary file has no tokens")
    if max(seen_ranks) != n - 1:
        missing = next(r for r in range(n) if r not in seen_ranks)
        raise CheckpointError(f"{path}: ranks are not contiguous 0..{n - 1}: rank {missing} is "
                              f"missing (largest rank is {max(seen_ranks)})")
    if n_ranks is not None and n != n_ranks:
        if n < n_ranks:
            why = (f"rank {n} is missing (the file ends at line {last_line}): truncated, or not "
                   "the Qwen v1 vocabulary")
        else:
            why = f"rank {n_ranks} (line {seen_ranks[n_ranks]}) and later are extra"
        raise CheckpointError(f"{path}: vocabulary has {n} ranks (0..{n - 1}), expected exactly "
                              f"{n_ranks} (0..{n_ranks - 1}); {why}")
    if n > SPECIAL_START_ID:
        raise CheckpointError(f"{path}: vocabulary has {n} tokens, but special tokens start at id "
                              f"{SPECIAL_START_ID}; at most {SPECIAL_START_ID} BPE ranks are allowed")
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    if absent:
        raise CheckpointError(f"{path}: byte 0x{absent[0]:02x} has no token ({len(absent)} of the "
                              "256 single bytes are missing); byte-level BPE needs all of them")
    return ranks


#: sha256 of a vocabulary file's bytes -> (ranks, tiktoken Encoding), the few most recent.
_ENCODINGS: dict[str, tuple] = {}

#: Whitespace runs longer than this are cut into pre-tokens by QwenTokenizer itself (tiktoken's
#: regex fails at about 10**6); shorter ones go to tiktoken whole.
WS_RUN_LIMIT = 4096

#: Unicode White_Space, which is what \s means in tiktoken's (Rust) regex engine.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=8)
def _long_ws_runs(limit: int) -> "re.Pattern[str]":
    """Maximal whitespace runs longer than ``limit``. The lookbehind makes the search start
    only at the first character of a run, so it is linear in the text."""
    return re.compile(f"(?<![{_WS}])[{_WS}]{{{limit + 1},}}")


_WS_SET = frozenset(re.findall(f"[{_WS}]", "".join(map(chr, range(0x3001)))))


def _is_punct(ch: str) -> bool:
    r"""[^\s\p{L}\p{N}] of PAT_STR (with the regex module's Unicode tables, as recent as
    tiktoken's; unicodedata's if it is missing)."""
    if ch in _WS_SET:
        return False
    try:
        import regex
    except ImportError:  # pragma: no cover - tiktoken depends on regex
        return unicodedata.category(ch)[0] not in "LN"
    return regex.match(r"[\p{L}\p{N}]", ch) is None


def _special_ends_at(text: str, i: int, allowed) -> bool:
    """Does an allowed special token (which tiktoken splits out) end just before text[i]?"""
    if i < 4 or not text.startswith("|>", i - 2):
        return False
    j = text.rfind("<|", max(0, i - 40), i - 2)
    return j >= 0 and text[j:i] in allowed


def _special_starts_at(text: str, i: int, allowed) -> bool:
    """Does an allowed special token start at text[i]? (None has "|>" inside.)"""
    if not text.startswith("<|", i):
        return False
    j = text.find("|>", i + 2, i + 40)
    return j >= 0 and text[i:j + 2] in allowed


def _as_special_set(value, name: str):
    """Normalise an allowed/disallowed_special argument for tiktoken."""
    if value == "all":
        return "all"
    if isinstance(value, str):
        raise TypeError(f"{name} must be 'all' or a collection of special-token strings, "
                        f"got the string {value!r}")
    if value is None:
        return set()
    try:
        return frozenset(value)
    except TypeError:
        raise TypeError(f"{name} must be 'all' or a collection of special-token strings, "
                        f"got {type(value).__name__}") from None


def _to_id_list(ids) -> list[int]:
    """Accept an int, a sequence of ints, or a 0/1-D torch tensor / numpy array."""
    if isinstance(ids, bool):
        raise TypeError("token ids must be integers, got bool")
    if isinstance(ids, int):
        return [ids]
    ndim = getattr(ids, "ndim", None)
    if ndim is not None and hasattr(ids, "tolist"):  # torch.Tensor, numpy.ndarray
        if ndim > 1:
            raise ValueError(f"expected a 1-D array of token ids, got shape "
                             f"{tuple(ids.shape)}")
        dtype = str(getattr(ids, "dtype", ""))
        if "int" not in dtype:
            raise TypeError(f"token id array must have an integer dtype, got {dtype}")
        ids = ids.tolist()
        if ndim == 0:
            return [int(ids)]
    if isinstance(ids, (str, bytes, bytearray)):
        raise TypeError(f"expected token ids, got {type(ids).__name__}")
    # Ids have an order: a set or a dict's keys would be decoded in whatever order they iterate.
    if not isinstance(ids, (Sequence, Iterator)) or isinstance(ids, (AbstractSet, Mapping)):
        raise TypeError(f"expected a sequence of token ids (list, tuple, 1-D array), got "
                        f"{type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool):
            raise TypeError("token ids must be integers, got bool")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"token ids must be integers, got {type(i).__name__} "
                            f"({i!r})") from None
    return out


class QwenTokenizer:
    """Qwen v1 tokenizer (see module docstring)."""

    def __init__(self, vocab_file: PathLike, verify: bool = True):
        """Load ``vocab_file`` (a ``qwen.tiktoken``): exactly 151643 contiguous ranks, and with
        ``verify`` (default) the release file's sha256 VOCAB_SHA256. ``verify=False`` loads a
        deliberately different vocabulary that is still structurally valid. Every problem is a
        CheckpointError naming the file."""
        self.vocab_file = Path(vocab_file)
        data = read_bounded_file(self.vocab_file, MAX_VOCAB_BYTES, CheckpointError, _VOCAB_WHAT)
        digest = hashlib.sha256(data).hexdigest()
        cached = _ENCODINGS.get(digest)
        if cached is None:
            ranks = _parse_tiktoken_bpe(data, self.vocab_file, SPECIAL_START_ID)
        if verify and digest != VOCAB_SHA256:
            raise CheckpointError(
                f"{self.vocab_file}: sha256 is {digest}, expected {VOCAB_SHA256} (the Qwen v1 "
                "release qwen.tiktoken): the file is modified or corrupted. To use a "
                "deliberately different vocabulary pass verify=False (QwenTokenizer) or "
                "verify_vocab=False (Engine.from_pretrained)")
        self._special_tokens = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self._special_tokens.items()}
        if cached is None:
            enc = tiktoken.Encoding(name="qwen", pat_str=PAT_STR, mergeable_ranks=ranks,
                                    special_tokens=self._special_tokens)
            cached = _ENCODINGS[digest] = (ranks, enc)
            while len(_ENCODINGS) > 4:
                del _ENCODINGS[next(iter(_ENCODINGS))]
        # The same bytes give the same (never mutated) ranks and Encoding: parsed once.
        self._mergeable_ranks, self._enc = cached
        self._n_ranks = len(self._mergeable_ranks)
        self._id_to_bytes: list[bytes] | None = None  # built lazily by id_to_bytes

    # -- construction --------------------------------------------------------------------

    @classmethod
    def default(cls) -> "QwenTokenizer":
        """Tokenizer over the vocabulary packaged with qwen_fast."""
        return cls(default_vocab_path())

    @classmethod
    def from_dir(cls, path: PathLike | None = None, verify: bool = True) -> "QwenTokenizer":
        """Load ``path/qwen.tiktoken`` if the directory has one (whatever it is: a FIFO or a
        broken symlink there is an error, not a silent fallback), else the packaged vocabulary.

        ``path`` may also name a vocabulary file directly.
        """
        if path is not None:
            p = Path(path)
            if not p.is_dir() and os.path.lexists(p):
                return cls(p, verify=verify)
            candidate = p / VOCAB_FILENAME
            if os.path.lexists(candidate):
                return cls(candidate, verify=verify)
        return cls.default()

    # -- properties ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (BPE ranks + specials): 151851 for the real vocabulary."""
        return self._enc.n_vocab

    def __len__(self) -> int:
        return self._enc.n_vocab

    @property
    def eod_id(self) -> int:
        return EOD_ID

    @property
    def eos_token_id(self) -> int:
        return EOD_ID

    @property
    def im_start_id(self) -> int:
        return IM_START_ID

    @property
    def im_end_id(self) -> int:
        return IM_END_ID

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token surface string -> id (a copy)."""
        return dict(self._special_tokens)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken Encoding."""
        return self._enc

    def __repr__(self) -> str:
        return f"QwenTokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    # -- encode ----------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        allowed_special: Union[str, AbstractSet[str]] = "all",
        disallowed_special: Union[str, Collection[str]] = (),
    ) -> list[int]:
        """NFC-normalise ``text`` and encode it.

        ``allowed_special="all"`` (default): special surface forms become special ids.
        ``allowed_special=set()``: they are plain text. Forms in ``disallowed_special`` (a
        collection, or ``"all"`` = every special not allowed) raise ValueError if present.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        allowed = _as_special_set(allowed_special, "allowed_special")
        disallowed = _as_special_set(disallowed_special, "disallowed_special")
        unknown = [s for s in (allowed if allowed != "all" else ())
                   if s not in self._special_tokens]
        unknown += [s for s in (disallowed if disallowed != "all" else ())
                    if s not in self._special_tokens]
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)!r}")
        text = unicodedata.normalize("NFC", text)
        if len(text) > WS_RUN_LIMIT and _long_ws_runs(WS_RUN_LIMIT).search(text) is not None:
            return self._encode_long_ws(text, allowed, disallowed)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=disallowed)

    # -- long whitespace runs -----------------------------------------------------------------
    #
    # tiktoken's regex engine gives up ("Max stack size exceeded for backtracking") on the
    # alternative \s+(?!\S) over a whitespace run of about a million characters. Such runs are
    # cut here into the exact pre-tokens PAT_STR gives them, so that the ids are the same as
    # encoding the whole string would give. Over a maximal whitespace run [s, n) followed by X
    # (a non-whitespace character, or the end of the text / of the segment before an allowed
    # special token), PAT_STR's matches are:
    #   * leading \r/\n characters are taken by the punctuation alternative
    #     ` ?[^\s\p{L}\p{N}]+[\r\n]*` when the character before s is punctuation (not a
    #     letter, digit or the end of a special token); the run's own pre-tokens start at i0,
    #     after them;
    #   * if [i0, n) holds a \r or \n, `\s*[\r\n]+` matches from i0 up to and including the
    #     last one (k): [i0, k+1) (the alternatives before it cannot match inside a run);
    #   * the rest [j, n) has no \r/\n. If X is the end: `\s+(?!\S)` takes all of it. Else
    #     it takes all but the last character ([j, n-1), when that is not empty), and the last
    #     one starts the next pre-token (" word", " !", or alone), which tiktoken encodes with
    #     the text after it.
    # The pre-tokens inside the run are BPE-encoded as single pieces; the text between runs is
    # encoded by tiktoken as usual, cut only at positions that are pre-token boundaries and
    # whose pre-tokens do not look past the cut.

    def _encode_long_ws(self, text: str, allowed, disallowed) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:      # what tiktoken does with surrogates, done before cutting
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        enc = self._enc
        allowed_set = self._special_tokens if allowed == "all" else allowed

        def chunk(a: int, b: int) -> list[int]:
            return enc.encode(text[a:b], allowed_special=allowed, disallowed_special=disallowed) \
                if b > a else []

        # BPE of one pre-token, as tiktoken's encode does for each regex match (tiktoken 0.5+).
        single = getattr(enc, "_encode_single_piece", None) or enc._core_bpe.encode_single_piece

        def piece(a: int, b: int) -> list[int]:
            return single(text[a:b].encode("utf-8"))

        out: list[int] = []
        pos = 0     # text[:pos] is encoded; pos is a pre-token boundary
        for m in _long_ws_runs(WS_RUN_LIMIT).finditer(text):
            s, n = m.span()
            i0 = s
            c = len(text[s:n]) - len(text[s:n].lstrip("\r\n"))
            if c and s > 0 and _is_punct(text[s - 1]) and not _special_ends_at(text, s, allowed_set):
                i0 = s + c
            out += chunk(pos, i0)
            k = max(text.rfind("\r", i0, n), text.rfind("\n", i0, n))
            j = i0
            if k >= 0:
                out += piece(i0, k + 1)
                j = k + 1
            if j == n:
                pos = n
            elif n == len(text) or _special_starts_at(text, n, allowed_set):
                out += piece(j, n)
                pos = n
            elif n - j >= 2:
                out += piece(j, n - 1)
                pos = n - 1
            else:
                pos = j
        out += chunk(pos, len(text))
        return out

    __call__ = encode

    # -- decode ----------------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not (0 <= i < self._n_ranks or i in self._special_by_id):
                msg = (f"token id {i} is out of range: valid ids are 0..{self.vocab_size - 1}")
                if self._n_ranks < SPECIAL_START_ID and self._n_ranks <= i < SPECIAL_START_ID:
                    msg += f" (this vocabulary has no ids {self._n_ranks}..{SPECIAL_START_ID - 1})"
                elif self.vocab_size <= i < MODEL_VOCAB_ROWS:
                    msg += (f"; ids {self.vocab_size}..{MODEL_VOCAB_ROWS - 1} are padding rows of "
                            f"the model's {MODEL_VOCAB_ROWS}-row logits and are not decodable")
                raise ValueError(msg)

    def decode_bytes(self, ids, skip_special_tokens: bool = False) -> bytes:
        """Concatenated bytes of ``ids`` (special ids give their surface string)."""
        ids = _to_id_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < EOD_ID]
        self._check_ids(ids)
        return self._enc.decode_bytes(ids)

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Decode ids to text: bytes of every id concatenated, then UTF-8 with ``errors``.

        ``skip_special_tokens=True`` drops every id >= 151643 (all specials).
        """
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode(
            "utf-8", errors=errors)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (special ids give their surface string)."""
        (token_id,) = _to_id_list([token_id])
        self._check_ids([token_id])
        return self._enc.decode_single_token_bytes(token_id)

    def token_to_id(self, token: Union[str, bytes]) -> int:
        """Id of a special token surface string (e.g. ``"<|im_end|>"``) or of a BPE token's bytes."""
        if isinstance(token, str):
            try:
                return self._special_tokens[token]
            except KeyError:
                pass
            raw = token.encode("utf-8")
            if raw in self._mergeable_ranks:
                return self._mergeable_ranks[raw]
            raise KeyError(f"{token!r} is neither a special token nor a single BPE token")
        if isinstance(token, (bytes, bytearray)):
            try:
                return self._mergeable_ranks[bytes(token)]
            except KeyError:
                raise KeyError(f"{bytes(token)!r} is not a single BPE token") from None
        raise TypeError(f"token_to_id() expects str or bytes, got {type(token).__name__}")

    def id_to_token(self, token_id: int) -> Union[str, bytes]:
        """Special id -> surface string; BPE id -> its bytes."""
        (token_id,) = _to_id_list([token_id])
        self._check_ids([token_id])
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        return self._enc.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id >= EOD_ID


class IncrementalDecoder:
    """Streaming decoder: push ids one at a time, get text deltas.

    A delta never ends in the middle of a UTF-8 character: an incomplete trailing sequence
    is held back until the bytes that complete it arrive. Bytes that can never form a valid
    character are emitted as U+FFFD exactly as ``bytes.decode(errors="replace")`` would, so
    ``"".join(deltas) + flush() == tokenizer.decode(all_ids, skip_special_tokens, "replace")``.
    """

    def __init__(self, tokenizer: QwenTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self._ids: list[int] = []

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        (token_id,) = _to_id_list([token_id])
        self.tokenizer._check_ids([token_id])  # validate even when skipped
        self._ids.append(token_id)
        if self.skip_special_tokens and token_id >= EOD_ID:
            return ""
        delta = self._dec.decode(self.tokenizer.id_to_bytes(token_id), final=False)
        if delta:
            self._parts.append(delta)
        return delta

    def push_many(self, ids: Union[Sequence[int], Iterator[int]]) -> str:
        """Push several ids; return the concatenated delta."""
        return "".join(self.push(i) for i in _to_id_list(ids))

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete trailing sequence becomes U+FFFD)."""
        delta = self._dec.decode(b"", final=True)
        self._dec.reset()
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def pending_bytes(self) -> bytes:
        """Bytes held back because they may still be the start of a character."""
        return self._dec.getstate()[0]

    @property
    def text(self) -> str:
        """All text emitted so far (deltas and flushes)."""
        return "".join(self._parts)

    @property
    def ids(self) -> list[int]:
        """All ids pushed so far."""
        return list(self._ids)

    def reset(self) -> None:
        self._dec.reset()
        self._parts.clear()
        self._ids.clear()
