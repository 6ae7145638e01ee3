"""Helpers of the reliability tests: tiny random BERT models, random inputs, comparisons.

Tolerance: fp32 compiled against eager fp32, every compared element within ``RTOL`` times the
output's scale (its largest magnitude, at least 1). With ``remove_padding=True`` token-level
outputs at padding positions must be exactly zero; real positions are compared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import transformers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-4
MAX_POSITIONS = 32
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=MAX_POSITIONS,
    type_vocab_size=2,
    # Larger than BERT's 0.02, so that outputs are far from zero and differences show.
    initializer_range=0.2,
)
PADDINGS = ("none", "right", "left", "random")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]


def random_inputs(
    generator: torch.Generator, batch: int, seq: int, padding: str, device=DEVICE
) -> dict:
    """input_ids, token_type_ids and an attention_mask with the given padding style.

    ``right`` / ``left``: every row holds at least one real token; ``random``: any pattern,
    rows of padding only included.
    """
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq), generator=generator)
    types = torch.randint(0, TINY["type_vocab_size"], (batch, seq), generator=generator)
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
    pos = torch.arange(seq)[None]
    if padding == "right":
        mask = pos < lengths[:, None]
    elif padding == "left":
        mask = pos >= (seq - lengths)[:, None]
    elif padding == "random":
        mask = torch.rand(batch, seq, generator=generator) > 0.35
    elif padding == "none":
        mask = torch.ones(batch, seq, dtype=torch.bool)
    else:
        raise ValueError(padding)
    inputs = {"input_ids": ids, "attention_mask": mask.long(), "token_type_ids": types}
    return {k: v.to(device) for k, v in inputs.items()}


def eager(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL):
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if got.numel() == 0:
        return
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol} x scale {scale:.3g}"


def compare(out, ref, mask: torch.Tensor | None, remove_padding: bool, what: str = ""):
    """Every field of ``ref`` against ``out``: fp32, same shape, within RTOL; token-level
    fields at padding positions are zeros when padding is removed."""
    fields = [k for k, v in ref.items() if v is not None]
    assert list(out.keys()) == fields, f"{what}: fields {list(out.keys())} != {fields}"
    for field in fields:
        got, want = out[field], ref[field]
        assert got.dtype == torch.float32, f"{what} {field}: dtype {got.dtype}"
        assert got.shape == want.shape, f"{what} {field}: {tuple(got.shape)} != {want.shape}"
        token_level = mask is not None and got.dim() >= 3 and got.shape[:2] == mask.shape
        if token_level and remove_padding:
            pad = (mask == 0).to(got.device)
            assert torch.count_nonzero(got[pad]) == 0, f"{what} {field}: nonzero at padding"
            assert_close(got[~pad], want[~pad.to(want.device)], f"{what} {field}")
        else:
            assert_close(got, want, f"{what} {field}")


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def rehash(folder: Path) -> None:
    """Rewrite the manifest's sizes and sha256 after an edit: what a careless hand-edit that
    also 'fixes' the manifest leaves (the manifest is a checksum list, not a signature)."""
    path = folder / "disc_manifest.json"
    manifest = json.loads(path.read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))


def tiny_tokenizer(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(folder), model_max_length=MAX_POSITIONS
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer
