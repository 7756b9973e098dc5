"""The SentencePiece tokenizer behind val_bpb: loading, vocabulary check and the per-token byte tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from torch import Tensor

from .errors import DataError


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    file = Path(path)
    if file.suffix != ".model":
        raise DataError(f"data.tokenizer {path}: expected a SentencePiece .model file")
    if not file.is_file():
        from .sample import for_vocab

        sample = for_vocab(vocab_size)
        offline = f"; or run offline at toy size on the built-in sample (--toy, or data.tokenizer = '{sample}')" if sample else ""
        raise DataError(
            f"data.tokenizer {path}: file not found; set data.tokenizer (or TOKENIZER_PATH with --legacy-env), or download it "
            f"with the shards (pgolf data download --variant sp{vocab_size}, needs the network){offline}"
        )
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


def byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
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
    return (
        torch.tensor(base_bytes, dtype=torch.int16, device=device),
        torch.tensor(has_space, dtype=torch.bool, device=device),
        torch.tensor(boundary, dtype=torch.bool, device=device),
    )


def check_shards_match(tokens: Tensor, vocab_size: int, data_path: str, tokenizer_path: str) -> None:
    """Shards made with a smaller tokenizer than the one declared (sp1024 shards, sp4096 tokenizer) pass the
    token-id range check but score garbage bytes. A validation split much longer than the vocabulary uses ids
    close to its top; one whose ids all lie in the lower half was tokenized with something smaller."""
    if tokens.numel() < 2 * vocab_size:
        return  # too short to judge
    top = int(tokens.numpy().max()) if tokens.device.type == "cpu" else int(tokens.to(torch.int32).max())
    if top < vocab_size // 2:
        raise DataError(
            f"data.path {data_path}: its validation tokens use ids up to {top} only, but data.tokenizer {tokenizer_path} "
            f"has {vocab_size} pieces; the shards look made with a smaller tokenizer (e.g. sp1024 shards with an sp4096 "
            "tokenizer); use the tokenizer the shards were made with"
        )
