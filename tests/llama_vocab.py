"""The real LLaMA-1/2 tokenizer (Vicuna-7B v1.5's 32000-piece SentencePiece BPE), rebuilt offline for tests.

The vocabulary and merges come from the npm package `llama-tokenizer-js` 1.2.2 (MIT), pinned by its registry
integrity hash: `vocab_base64` is tokenizer.json's vocab in id order joined by "\\n", `merges_binary` its merges
as pairs of little-endian uint16 vocab ids in priority order (the package's data-conversion.py). From these we
write a SentencePiece ModelProto equivalent to LLaMA's tokenizer.model, the Vicuna v1.5 tokenizer files around
it, and an independent re-implementation of what the published code's slow tokenizer (transformers 4.31
`LlamaTokenizer`) returns, so the transformers-5 tokenizer that mcomp loads can be compared against it.
"""

from __future__ import annotations

import array
import base64
import hashlib
import io
import itertools
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

PACKAGE_URL = "https://registry.npmjs.org/llama-tokenizer-js/-/llama-tokenizer-js-1.2.2.tgz"
PACKAGE_INTEGRITY = "sha512-Wmth393dc3odWU3IzARJ3r2oIfWgw9GdJ5Gm+hGhfECNO18UHLRqEFSf511jn4E9KcQGzuuKw4Wl08pHAemLAw=="
JS_MEMBER = "package/llama-tokenizer.js"
VOCAB_SIZE = 32000
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
N_BYTES = 256  # <0x00>..<0xFF> at ids 3..258
SPACE = "\u2581"  # "▁", SentencePiece's escaped space
WHITESPACE_SCORE = -1e9  # see build_sentencepiece_model


def default_cache_dir() -> Path:
    """A stable per-user cache, so the ~700 KB package is downloaded once per machine, not per run."""
    env = os.environ.get("MCOMP_TEST_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("mcomp-tests"))


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def _write_atomic(path: Path, data: bytes) -> None:
    # temp file in the same folder + rename, so a concurrent or interrupted run never sees half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_package(cache_dir: str | Path | None = None) -> Path:
    """Path of `llama-tokenizer.js` from the pinned, integrity-checked tarball (downloaded once, then cached)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / PACKAGE_URL.rsplit("/", 1)[1]
    data = tgz.read_bytes() if tgz.is_file() else None
    if data is None or _integrity(data) != PACKAGE_INTEGRITY:  # missing or a corrupt cached copy: fetch again
        try:
            with urllib.request.urlopen(PACKAGE_URL, timeout=60) as resp:
                data = resp.read()
        except OSError as e:  # URLError and timeouts are OSErrors
            raise RuntimeError(
                f"could not download {PACKAGE_URL}: {e}. For offline runs put the tarball in "
                f"{cache} (or point MCOMP_TEST_CACHE at a folder holding it)."
            ) from e
        got = _integrity(data)
        if got != PACKAGE_INTEGRITY:
            raise RuntimeError(f"integrity mismatch for {PACKAGE_URL}: expected {PACKAGE_INTEGRITY}, got {got}")
        _write_atomic(tgz, data)
    # Read the one member we need into memory and write it under a name we choose: no member name ever becomes
    # a path here, so a hostile archive cannot traverse out of the cache.
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.getmember(JS_MEMBER)
        if not member.isfile():
            raise RuntimeError(f"{PACKAGE_URL}: {JS_MEMBER} is not a regular file")
        js = tar.extractfile(member).read()
    out = cache / "llama-tokenizer-js-1.2.2" / "llama-tokenizer.js"
    out.parent.mkdir(exist_ok=True)
    if not out.is_file() or out.read_bytes() != js:
        _write_atomic(out, js)
    return out


def _js_string(js: str, name: str) -> str:
    m = re.search(rf"\b{name}\s*=\s*\"([A-Za-z0-9+/=]+)\"", js)
    if m is None:
        raise ValueError(f"no base64 string literal `{name}` in the JS file")
    return m.group(1)


def parse_vocab_and_merges(js: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(pieces in id order, merges as (left id, right id) in priority order), checked for shape."""
    vocab = base64.b64decode(_js_string(js, "llama_vocab_base64"), validate=True).decode("utf-8").split("\n")
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} distinct pieces, got {len(vocab)} ({len(set(vocab))} distinct)")
    want_head = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(N_BYTES)]
    if vocab[: len(want_head)] != want_head:
        raise ValueError("ids 0..258 are not <unk>, <s>, </s>, <0x00>..<0xFF>")
    raw = base64.b64decode(_js_string(js, "llama_merges_binary"), validate=True)
    if len(raw) % 4:
        raise ValueError(f"merges blob of {len(raw)} bytes is not a whole number of uint16 pairs")
    ids = array.array("H")
    ids.frombytes(raw)
    if sys.byteorder != "little":  # the blob was packed little-endian ('H' on x86)
        ids.byteswap()
    if max(ids) >= VOCAB_SIZE:
        raise ValueError("merge refers to an id outside the vocabulary")
    return vocab, list(zip(ids[0::2], ids[1::2]))


_JS_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "0": "\0",
    "\\": "\\",
    "'": "'",
    '"': '"',
}


def _js_unescape(s: str) -> str:
    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] in "ux":
            return chr(int(e[1:], 16))
        if e in _JS_ESCAPES:
            return _JS_ESCAPES[e]
        raise ValueError(f"unsupported JS escape \\{e}")

    return re.sub(r"\\(u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2}|.)", one, s, flags=re.DOTALL)


def js_test_cases(js: str) -> list[tuple[str, list[int]]]:
    """The package's own `testCase(input, expectedIds)` calls (input string literal, expected ids with BOS)."""
    pattern = re.compile(r"testCase\(\s*([\"'])((?:\\.|(?!\1).)*)\1\s*,\s*\[([\d\s,]*)\]\s*\)", re.DOTALL)
    return [
        (_js_unescape(m.group(2)), [int(t) for t in m.group(3).replace(",", " ").split()]) for m in pattern.finditer(js)
    ]


def load_package(cache_dir: str | Path | None = None) -> tuple[list[str], list[tuple[int, int]], str]:
    js = fetch_package(cache_dir).read_text(encoding="utf-8")
    vocab, merges = parse_vocab_and_merges(js)
    return vocab, merges, js


def piece_scores(vocab: list[str], merges: list[tuple[int, int]]) -> list[float]:
    """SentencePiece scores whose highest-first BPE reproduces the merges' priority order.

    SentencePiece merges the adjacent pair whose concatenation has the highest score (leftmost on ties); the
    merges rank pairs. Checked here: (1) every merge yields a vocab piece and every two-piece split of a vocab piece
    is a listed merge, so both sides can merge the same pairs; (2) except for the 15 whitespace-only pieces
    ("▁▁".."▁"*16), the merges come grouped by result piece in increasing id order, so a score falling with the
    id (LLaMA's own convention, -(id - 259)) gives the same order; (3) the whitespace-only pieces' merges all come
    last, interleaved, i.e. they tied in the source (LLaMA gives them -1e9): a whitespace piece only ever merges
    with whitespace, and since ("▁","▁") ranks last of all, merge order grows the leftmost run first, which is what
    equal scores (leftmost first) do too. The tests check this against a merge-rank BPE on space runs.
    """
    index = {p: i for i, p in enumerate(vocab)}
    pairs = set(merges)
    first_rank: dict[int, int] = {}
    for rank, (a, b) in enumerate(merges):
        piece = index.get(vocab[a] + vocab[b])
        if piece is None:
            raise ValueError(f"merge {rank} ({vocab[a]!r}, {vocab[b]!r}) is not a vocabulary piece")
        first_rank.setdefault(piece, rank)
    head = len(SPECIALS) + N_BYTES
    whitespace = {i for i in first_rank if set(vocab[i]) == {SPACE}}
    others = [i for i in range(head, VOCAB_SIZE) if i not in whitespace]
    for s in vocab[head:]:  # (1) completeness: SentencePiece would merge any split whose halves are pieces
        for c in range(1, len(s)):
            a, b = index.get(s[:c]), index.get(s[c:])
            if a is not None and b is not None and a >= head and b >= head and (a, b) not in pairs:
                raise ValueError(f"{s!r} = {s[:c]!r} + {s[c:]!r} has no merge")
    ranked = [i for i in others if i in first_rank]
    if ranked != sorted(ranked, key=first_rank.__getitem__):  # (2)
        raise ValueError("non-whitespace merge results are not in id order")
    last_rank = {}
    for rank, (a, b) in enumerate(merges):
        last_rank[index[vocab[a] + vocab[b]]] = rank
    if any(last_rank[i] > first_rank[j] for i, j in itertools.pairwise(ranked)):
        raise ValueError("merges of one piece are interleaved with another's")
    if min(first_rank[i] for i in whitespace) < max(last_rank[i] for i in ranked):  # (3)
        raise ValueError("whitespace merges are not all after the others")
    scores = [0.0] * VOCAB_SIZE
    for i in range(head, VOCAB_SIZE):
        scores[i] = WHITESPACE_SCORE if i in whitespace else -float(i - head)
    return scores


def build_sentencepiece_model(vocab: list[str], merges: list[tuple[int, int]]) -> bytes:
    """A serialized SentencePiece ModelProto equivalent to LLaMA's tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = piece_scores(vocab, merges)
    m = pb.ModelProto()
    t = m.trainer_spec  # the fields encoding reads, plus LLaMA's values for the informative ones
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = VOCAB_SIZE
    t.byte_fallback = True  # characters outside the vocab become <0xXX> pieces, never <unk>
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_piece, t.bos_piece, t.eos_piece = SPECIALS
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.max_sentencepiece_length = 16
    n = m.normalizer_spec
    n.name = "identity"  # no NFKC: text is used as is
    n.add_dummy_prefix = True  # " " in front of the text, hence "▁Hello" for "Hello"
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True  # " " -> "▁"
    Piece = pb.ModelProto.SentencePiece
    for i, piece in enumerate(vocab):
        p = m.pieces.add(piece=piece, score=scores[i])
        if i < len(SPECIALS) + N_BYTES:  # NORMAL is the default and left unset, as in LLaMA's file
            p.type = Piece.UNKNOWN if i == 0 else Piece.CONTROL if i < len(SPECIALS) else Piece.BYTE
    return m.SerializeToString()


def _added_token(content: str, with_type: bool) -> dict:
    d = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **d} if with_type else d


def write_vicuna_tokenizer(folder: str | Path, model: bytes | None = None, legacy: bool | None = False) -> Path:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json laid out like lmsys/vicuna-7b-v1.5.

    `model`: serialized tokenizer.model (built from the cached package when None).

    `legacy`: the value of Vicuna v1.5's own file could not be read here (unverified); False is the best
    estimate (LLaVA's training code special-cases `not tokenizer.legacy` for its Vicuna-based tokenizers).
    None leaves the key out.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = build_sentencepiece_model(*load_package()[:2])
    (folder / "tokenizer.model").write_bytes(model)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>", True),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>", True),
        "legacy": legacy,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>", True),
    }
    if legacy is None:
        del config["legacy"]
    special = {
        k: _added_token(v, False) for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return folder


_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


def published_ids(sp, text: str, add_bos: bool = True, legacy: bool = True) -> list[int]:
    """What transformers 4.31's slow `LlamaTokenizer(...)(text)["input_ids"]` returns, on a SentencePieceProcessor.

    4.31 `PreTrainedTokenizer.tokenize`: split the text at the special-token strings (its trie; none of
    "<unk>", "<s>", "</s>" is a prefix of another, so a regex split is the same); LLaMA's special tokens are
    AddedToken(lstrip=False, rstrip=False), so no whitespace around them is stripped (a special token given as a
    plain string would strip both sides; no prompt tested here has whitespace next to one); each text piece goes
    through `_tokenize`, pieces become ids via `piece_to_id`, and BOS is put in front.
    `legacy=True` (4.31's default): `_tokenize` is plain `sp.encode`, so every piece gets the dummy-prefix "▁".
    `legacy=False` (4.31's first version of the fix): the whole text is prefixed with "▁" (its own "▁" turned into
    spaces); the first piece drops that "▁" and is encoded as usual; a later piece not starting with " " loses the
    leading "▁" of its first token (an orphan "▁" is dropped, "▁ab" becomes "ab", <unk> if that is no piece).
    """
    if not legacy:
        text = SPACE + text.replace(SPACE, " ")
    ids = [sp.piece_to_id(SPECIALS[1])] if add_bos else []
    for part in _SPECIAL_SPLIT.split(text):
        if not part:
            continue
        if part in SPECIALS:
            ids.append(sp.piece_to_id(part))
            continue
        is_first = not legacy and part.startswith(SPACE)
        if is_first:
            part = part[1:]
        tokens = sp.encode(part, out_type=str)
        if not legacy and not is_first and not part.startswith(" ") and tokens and tokens[0].startswith(SPACE):
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        ids.extend(sp.piece_to_id(t) for t in tokens)
    return ids
