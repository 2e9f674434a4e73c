"""
Tokenizers: one interface (`encode` / `decode`, the BOS / EOS / pad ids a model config needs) over Gemma's
sentencepiece model, Llama-3's tiktoken rank file, a GGUF file's vocabulary (formats/gguf.py) and a byte-level BPE
tokenizer.json (Qwen's; formats/hf_tokenizer.py).

    tok = load_tokenizer("google/gemma-2-2b")         # a model folder, a tokenizer file or a hub id
    ids = tok.encode("def main():", bos=True)
"""
from __future__ import annotations

import os
import re
import unicodedata

from formats import disk
from formats import hub
from formats.gguf import LLAMA3_PATTERN

# Llama-3's 256 special tokens (the Llama-3.1 / 3.2 list), numbered after the base vocabulary: with Llama-3's 128000
# base ranks <|begin_of_text|> is 128000 and <|end_of_text|> 128001. A rank file with fewer base tokens (as in the
# tests) gets the same list numbered from its own size: bos = n_base. Its split pattern: formats/gguf.LLAMA3_PATTERN.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"] + \
                  [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+$")
# Gemma keeps it at the top, Llama-3 in original/; a converted GGUF (formats/gguf.py) its BPE as tokenizer.gguf.json;
# Qwen only a tokenizer.json (byte-level BPE: formats/hf_tokenizer.py)
TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.gguf.json", "tokenizer.json")


class Tokenizer:
    """`encode` / `decode` plus the ids a model config needs. Special-token strings inside the text: a GGUF's
    tokenizer reads them as transformers' tokenizer for the file does (`split_special_tokens=False`, its default:
    "<|im_start|>" is one token), the others as plain text (Meta's and sentencepiece's default, so a corpus that
    quotes "<|end_of_text|>" cannot forge one); `encode(..., split_special_tokens=)` chooses per call."""

    def __init__(self, path: str):
        self.path, self.gguf = path, False
        self.split_special_tokens, self.special, self._added = True, {}, {}
        self._matchers = {True: None, False: None}
        with open(path, "rb") as f:
            head = f.read(256).split(b"\n", 1)[0]
        if path.endswith(".gguf.json") or os.path.basename(path) == "tokenizer.json":
            self._load_gguf(path)
        elif _TIKTOKEN_LINE.match(head):
            self._load_tiktoken(path)
        else:
            self._load_sentencepiece(path)

    def _load_sentencepiece(self, path):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: neither a sentencepiece model nor a tiktoken rank file ({e})") from None
        self.kind = "sentencepiece"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: sentencepiece model defines no BOS/EOS token (needed to join documents)")

    def _load_tiktoken(self, path):
        import base64
        import tiktoken
        ranks = {}
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if not _TIKTOKEN_LINE.match(line.rstrip(b"\r\n")):
                    raise ValueError(f"{path}:{n}: expected '<base64 token> <rank>' (Llama-3 tokenizer.model format)")
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        n_base = len(ranks)
        if sorted(ranks.values()) != list(range(n_base)):
            raise ValueError(f"{path}: ranks are not 0..{n_base - 1} without gaps or repeats")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError(f"{path}: rank file lacks some of the 256 single bytes (text could not be encoded)")
        specials = {s: n_base + i for i, s in enumerate(LLAMA3_SPECIALS)}
        self.enc = tiktoken.Encoding(os.path.basename(path), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.kind = "tiktoken"
        self.vocab_size = n_base + len(LLAMA3_SPECIALS)
        self.bos_id, self.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        self.pad_id = None

    def _load_gguf(self, path):
        """A GGUF file's tokenizer (formats/gguf.py keeps its metadata as tokenizer.gguf.json) or an HF tokenizer.json
        of a byte-level BPE (formats/hf_tokenizer.py reads it into the same spec): a byte-level BPE in tiktoken, or
        Gemma's sentencepiece vocabulary as the sentencepiece model written beside it at conversion."""
        from formats.gguf import SENTENCEPIECE_FILE, added_tokens, bpe_encoding, literal_matcher
        from formats.hf_tokenizer import tokenizer_spec
        spec = tokenizer_spec(path) if os.path.basename(path) == "tokenizer.json" else \
            disk.read_json(path, f"{path}: no such file")
        self.nfc = bool(spec.get("nfc"))  # Qwen2's normaliser: NFC before the split
        sp_model = os.path.join(os.path.dirname(path), SENTENCEPIECE_FILE)
        if spec.get("model") == "llama" and os.path.isfile(sp_model):
            self._load_sentencepiece(sp_model)
        else:
            self.enc, _ = bpe_encoding(spec, os.path.basename(os.path.dirname(os.path.abspath(path))))
            self.kind = "tiktoken"
        self.gguf, self.split_special_tokens = True, False
        self.special, user = added_tokens(spec)
        if self.kind == "sentencepiece":
            user = {}  # sentencepiece matches its user-defined pieces itself
        self._added, self._special_names = {**self.special, **user}, {i: t for t, i in self.special.items()}
        self._matchers = {False: literal_matcher(self._added), True: literal_matcher(user)}
        self.vocab_size = len(spec["tokens"])
        self.bos_id, self.eos_id = spec.get("bos_token_id"), spec.get("eos_token_id")
        self.pad_id = spec.get("padding_token_id")
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{path}: the GGUF tokenizer defines no BOS/EOS token (needed to join documents)")

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               split_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`. split_special_tokens: a special token's string in the text spelled out (True) or
        read as its id (False); None: this tokenizer's reference default (self.split_special_tokens)."""
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        matcher = self._matchers[split]
        ids, start = [self.bos_id] if bos else [], 0
        for m in matcher.finditer(text) if matcher else ():  # added tokens found whole, the text between encoded
            ids += self._encode_text(text[start:m.start()]) + [self._added[m.group()]]
            start = m.end()
        return ids + self._encode_text(text[start:]) + ([self.eos_id] if eos else [])

    def _encode_text(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self.sp.encode(text)
        # tiktoken's regex is very slow on huge inputs and on long runs of (non-)whitespace: cut them first, as
        # Meta's reference tokenizer does (400k-character chunks, runs of at most 25k)
        # (a GGUF vocabulary's reference is HF's tokenizer, which does not cut: its chunks end where every split
        # pattern ends a piece, a line break between non-spaces or a letter before punctuation, so nothing changes)
        if getattr(self, "nfc", False):  # Qwen2's normaliser (formats/hf_tokenizer.py)
            text = unicodedata.normalize("NFC", text)
        ids = []
        for chunk in (self._chunks(text) if self.gguf else
                      (text[i:i + 400_000] for i in range(0, len(text), 400_000))):
            for piece in re.split(r"(\s{25000}|\S{25000})", chunk):
                if piece:
                    ids.extend(self.enc.encode_ordinary(piece))
        if ids and max(ids) >= self.vocab_size:  # a byte a GGUF vocabulary lacks
            ids = [i for i in ids if i < self.vocab_size]
        return ids

    @staticmethod
    def _chunks(text: str, size: int = 400_000):
        start = 0
        while len(text) - start > size:
            m = None
            for m in re.finditer(r"\S\n(?=\S)|[A-Za-z](?=[(.,;:=\[])", text[start + size // 2:start + size]):
                pass
            end = start + size // 2 + m.end() if m else start + size
            yield text[start:end]
            start = end
        yield text[start:]

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        matcher = self._matchers[self.split_special_tokens]
        if self.kind == "sentencepiece" and not (matcher and any(matcher.search(t) for t in texts)):
            return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=os.cpu_count() or 1)  # threaded
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary (size {self.vocab_size})")
        if self.kind == "tiktoken":
            return self.enc.decode(ids)
        if not self.special:
            return self.sp.decode(ids)
        # sentencepiece writes control tokens as nothing; transformers (a GGUF's reference) writes their strings
        names, out, run = self._special_names, [], []
        for i in ids + [None]:
            if i is None or i in names:
                out.append(self.sp.decode(run))
                out.append(names.get(i, ""))
                run = []
            else:
                run.append(i)
        return "".join(out)

    def __repr__(self):
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def load_tokenizer(path: str) -> Tokenizer:
    """A model folder (Gemma's `tokenizer.model`, or Llama-3's `original/tokenizer.model`), a tokenizer file, or a
    hub id. The file's content decides its kind: tiktoken rank files are text lines, sentencepiece is protobuf."""
    path = str(path)
    from formats import gguf
    if gguf.is_gguf(path):  # the tokenizer kept beside the GGUF's cached conversion
        path = gguf.model_dir(path)
        if not os.path.isfile(os.path.join(path, gguf.TOKENIZER_FILE)):
            raise FileNotFoundError(f"{path}: the GGUF file defines no tokenizer (tokenizer.ggml.tokens)")
    if os.path.isdir(path):
        if tokenizer_file(path):
            return Tokenizer(tokenizer_file(path))
        raise FileNotFoundError(f"{path}: no tokenizer.model, original/tokenizer.model or tokenizer.json in this "
                                f"folder")
    if os.path.isfile(path):
        return Tokenizer(path)
    if not hub.is_hub_path(path, sub_folders=False):
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder (and not a hub id like 'google/gemma-2-2b')")
    return load_tokenizer(hub.resolve(path, _choose_tokenizer_file))


def tokenizer_file(folder: str) -> str | None:
    return next((os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))), None)


def _choose_tokenizer_file(files: dict[str, int]) -> list[str]:
    for rel in TOKENIZER_FILES:
        if rel in files:  # a tokenizer.json names its BOS / EOS ids in the files beside it
            return [rel] + ([f for f in ("config.json", "tokenizer_config.json") if f in files]
                            if rel == "tokenizer.json" else [])
    raise FileNotFoundError("no tokenizer.model, original/tokenizer.model or tokenizer.json in this repo")
