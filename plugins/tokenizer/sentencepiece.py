"""The challenge's byte accounting for val_bpb over a SentencePiece vocabulary (official baseline).

val_bpb = (mean token NLL / ln 2) × (tokens / bytes). A target token stands for its piece's UTF-8 bytes, plus
one for a leading-space marker ``▁`` unless the previous token is a boundary (control, unknown or unused)
token; byte-fallback pieces count one byte. The tables are per vocabulary id, so the count of a target
depends only on it and the previous token. A tokenizer with a lossless text transform would count per
validation position instead (``ByteCounts.count`` receives the position).
"""

from __future__ import annotations

from pathlib import Path

import dataclasses

import attrs
import numpy as np
import torch
from torch import Tensor

from pgolf_core.errors import DataError
from pgolf_core.hookspecs import hookimpl
from pgolf_core.registry import Technique


@attrs.define(frozen=True, kw_only=True)
class SentencePieceParams:
    """No parameters: the model file is [data] tokenizer."""


@dataclasses.dataclass(frozen=True)
class PieceBytes:
    """Byte tables per vocabulary id: piece length, has a leading ``▁``, is a boundary token."""

    base_bytes: Tensor
    has_leading_space: Tensor
    is_boundary: Tensor

    def count(self, prev_ids: Tensor, tgt_ids: Tensor, first_pos: int = 0) -> Tensor:
        nbytes = self.base_bytes[tgt_ids].to(dtype=torch.int16)
        nbytes += (self.has_leading_space[tgt_ids] & ~self.is_boundary[prev_ids]).to(dtype=torch.int16)
        return nbytes


def load_model(path: str, vocab_size: int):
    import sentencepiece as spm

    file = Path(path)
    if file.suffix != ".model":
        raise DataError(f"data.tokenizer {path}: expected a SentencePiece .model file")
    if not file.is_file():
        raise DataError(f"data.tokenizer {path}: file not found; set data.tokenizer (or TOKENIZER_PATH with --legacy-env)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(file))
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError with C++ text
        raise DataError(f"data.tokenizer {path}: not a readable SentencePiece model ({str(exc).strip().splitlines()[0]})") from None
    if int(sp.vocab_size()) != vocab_size:
        raise DataError(
            f"data.tokenizer {path} has vocab_size {int(sp.vocab_size())} but model.vocab_size is {vocab_size}; "
            "use the matching tokenizer or set model.vocab_size"
        )
    return sp


def byte_tables(sp, vocab_size: int, device: torch.device) -> PieceBytes:
    """(bytes per piece, has leading '▁', is boundary token), as the challenge's evaluation defines them."""
    sp_vocab = int(sp.vocab_size())
    size = max(sp_vocab, vocab_size)
    base_bytes = np.zeros((size,), dtype=np.int16)
    has_space = np.zeros((size,), dtype=np.bool_)
    boundary = np.ones((size,), dtype=np.bool_)
    for token_id in range(sp_vocab):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        boundary[token_id] = False
        if sp.is_byte(token_id):
            base_bytes[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith("\u2581"):
            has_space[token_id] = True
            piece = piece[1:]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return PieceBytes(
        torch.tensor(base_bytes, dtype=torch.int16, device=device),
        torch.tensor(has_space, dtype=torch.bool, device=device),
        torch.tensor(boundary, dtype=torch.bool, device=device),
    )


class SentencePieceTokenizer:
    def __init__(self) -> None:
        self.sp = None
        self.path = ""
        self.vocab_size = 0

    def load(self, path: str, vocab_size: int) -> None:
        self.sp = load_model(path, vocab_size)
        self.path, self.vocab_size = path, vocab_size

    def byte_counts(self, val_tokens: Tensor, device: torch.device) -> PieceBytes:
        return byte_tables(self.sp, self.vocab_size, device)

    def check_shards(self, val_tokens: Tensor, data_path: str) -> None:
        """Shards made with a smaller tokenizer than the one declared (sp1024 shards, sp4096 tokenizer) pass the
        token-id range check but score garbage bytes. A validation split much longer than the vocabulary uses ids
        close to its top; one whose ids all lie in the lower half was tokenized with something smaller."""
        vocab_size = self.vocab_size
        if val_tokens.numel() < 2 * vocab_size:
            return  # too short to judge
        top = int(val_tokens.numpy().max()) if val_tokens.device.type == "cpu" else int(val_tokens.to(torch.int32).max())
        if top < vocab_size // 2:
            raise DataError(
                f"data.path {data_path}: its validation tokens use ids up to {top} only, but data.tokenizer {self.path} "
                f"has {vocab_size} pieces; the shards look made with a smaller tokenizer (e.g. sp1024 shards with an sp4096 "
                "tokenizer); use the tokenizer the shards were made with"
            )


@hookimpl
def pgolf_register_techniques(register) -> None:
    register(
        Technique(
            name="sentencepiece",
            slot="tokenizer",
            params=SentencePieceParams,
            build=lambda params, ctx: SentencePieceTokenizer(),
            summary="SentencePiece byte tables for val_bpb: piece bytes, leading-space marker, boundary tokens (official baseline)",
            source="https://github.com/openai/parameter-golf/blob/main/train_gpt.py",
            example='[tokenizer]\nuse = "sentencepiece"',
        )
    )
