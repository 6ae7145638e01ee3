"""Each pass on the smallest graph that shows it: the rewrite happens, and the graph computes
the same function before and after it (checked with PyTorch on fresh random inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimum_disc.compiler import ops
from optimum_disc.compiler.graph import tensor_shape
from optimum_disc.compiler.passes.activations import recognise_gelu
from optimum_disc.compiler.passes.attention import fuse_attention
from optimum_disc.compiler.passes.cleanup import drop_noops
from optimum_disc.compiler.passes.embeddings import fuse_embeddings
from optimum_disc.compiler.passes.first_token_rows import first_token_rows
from optimum_disc.compiler.passes.gemm_epilogue import fuse_gemm_epilogue
from optimum_disc.compiler.passes.key_padding_mask import key_padding_mask
from optimum_disc.compiler.passes.layer_norm import fuse_layer_norm
from optimum_disc.compiler.passes.merge_qkv import merge_qkv
from optimum_disc.compiler.passes.pointwise import fuse_pointwise
from optimum_disc.compiler.passes.pooler import fuse_first_token

from .graphs import assert_same_function, export_graph, targets

aten = torch.ops.aten
H, HEADS = 16, 2


def _inputs(batch=3, seq=6, hidden=None):
    mask = (torch.rand(batch, seq) > 0.3).long()
    mask[:, 0] = 1
    x = {"input_ids": torch.randint(0, 50, (batch, seq)), "attention_mask": mask}
    if hidden:
        x["hidden"] = torch.randn(batch, seq, hidden)
    return x


class Attention(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.emb = nn.Embedding(50, H)
        self.q, self.k, self.v = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.causal = causal

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        b, s, _ = x.shape

        def heads(t):
            return t.view(b, s, -1, H // HEADS).transpose(1, 2)

        mask = attention_mask[:, None, None, :].bool().expand(b, 1, s, s)
        if self.causal:
            mask = mask & torch.ones(s, s, dtype=torch.bool).tril()
        o = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), mask
        )
        return (o.transpose(1, 2).reshape(b, s, H),)


def test_drop_noops_removes_clone_dropout_and_noop_cast(seed):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.drop = nn.Embedding(50, H), nn.Dropout(0.1)

        def forward(self, input_ids, attention_mask):
            x = self.drop(self.emb(input_ids)).clone().to(torch.float32)
            return (x * attention_mask[..., None],)

    g = export_graph(M(), _inputs())
    before = g.copy()
    g = drop_noops(g)
    found = set(targets(g))
    assert not found & {aten.clone.default, aten.dropout.default, aten._to_copy.default}, found
    assert_same_function(before, g, _inputs(4, 5))


def test_key_padding_mask_reads_attention_mask_directly(seed):
    g = drop_noops(export_graph(Attention(), _inputs()))
    before = g.copy()
    g = key_padding_mask(g)
    (sdpa,) = [n for n in g.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert sdpa.args[3].target is ops.padding_mask
    assert sdpa.args[3].args[0].name == "attention_mask"
    assert len(g.graph.nodes) < len(before.graph.nodes)
    assert_same_function(before, g, _inputs(2, 7))


def test_key_padding_mask_leaves_a_causal_mask_alone(seed):
    """A causal mask is not a key-padding mask: the attention keeps its own mask (lowering runs
    it as a PyTorch op), and the graph computes what it did."""
    g = drop_noops(export_graph(Attention(causal=True), _inputs()))
    before = g.copy()
    g = key_padding_mask(g)
    (sdpa,) = [n for n in g.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert sdpa.args[3].target is not ops.padding_mask
    assert not [n for n in g.graph.nodes if n.target is ops.padding_mask]
    assert_same_function(before, g, _inputs(2, 7))


def test_fuse_attention_then_merge_qkv(seed):
    g = key_padding_mask(drop_noops(export_graph(Attention(), _inputs())))
    before = g.copy()
    g = fuse_attention(g)
    assert ops.attention in targets(g)
    assert aten.scaled_dot_product_attention.default not in targets(g)
    assert_same_function(before, g, _inputs(3, 5))
    g = merge_qkv(g)
    assert targets(g).count(aten.linear.default) == 1
    assert ops.attention_packed in targets(g)
    (linear,) = [n for n in g.graph.nodes if n.target is aten.linear.default]
    assert tuple(g.constant(linear.args[1]).shape) == (3 * H, H)
    assert_same_function(before, g, _inputs(2, 9))


@pytest.mark.parametrize(
    "act,name",
    [
        (F.gelu, "gelu"),
        (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh"),
        (torch.tanh, "tanh"),
        (torch.relu, "relu"),
    ],
)
def test_gemm_epilogue_folds_activation_and_residual(seed, act, name):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(H, H)

        def forward(self, input_ids, attention_mask, hidden):
            return (act(self.fc(hidden)) + hidden,)

    g = export_graph(M(), _inputs(hidden=H))
    before = g.copy()
    g = fuse_gemm_epilogue(drop_noops(g))
    assert targets(g) == [ops.linear]
    (node,) = [n for n in g.graph.nodes if n.target is ops.linear]
    assert node.args[3] == name and node.args[4].name == "hidden"
    assert_same_function(before, g, _inputs(2, 3, hidden=H))


def test_layer_norm_takes_the_residual_add(seed):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(H, eps=1e-7)

        def forward(self, input_ids, attention_mask, hidden):
            return (self.ln(hidden + hidden * 2), self.ln(hidden))

    g = export_graph(M(), _inputs(hidden=H))
    before = g.copy()
    g = fuse_layer_norm(drop_noops(g))
    lns = [n for n in g.graph.nodes if n.target is ops.layer_norm]
    assert len(lns) == 2 and aten.layer_norm.default not in targets(g)
    assert sorted(n.args[1] is None for n in lns) == [False, True]
    assert_same_function(before, g, _inputs(2, 4, hidden=H))


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word, self.pos, self.types = (
            nn.Embedding(50, H),
            nn.Embedding(64, H),
            nn.Embedding(2, H),
        )
        self.ln = nn.LayerNorm(H)
        self.register_buffer("position_ids", torch.arange(64).expand(1, -1), persistent=False)

    def forward(self, input_ids, attention_mask, token_type_ids):
        s = input_ids.shape[1]
        x = self.word(input_ids) + self.types(token_type_ids)
        x = x + self.pos(self.position_ids[:, :s])
        return (self.ln(x),)


def test_fuse_embeddings(seed):
    inputs = {**_inputs(), "token_type_ids": torch.randint(0, 2, (3, 6))}
    g = export_graph(Embeddings(), inputs)
    before = g.copy()
    g = fuse_embeddings(fuse_layer_norm(drop_noops(g)))
    assert targets(g) == [ops.embed_layernorm]
    fresh = {**_inputs(2, 11), "token_type_ids": torch.randint(0, 2, (2, 11))}
    assert_same_function(before, g, fresh)


def test_first_token_pooling(seed):
    class M(nn.Module):
        def forward(self, input_ids, attention_mask, hidden):
            return (hidden[:, 0],)

    g = export_graph(M(), _inputs(hidden=H))
    before = g.copy()
    g = fuse_first_token(g)
    assert targets(g) == [ops.first_token]
    assert_same_function(before, g, _inputs(4, 2, hidden=H))


def test_pointwise_chain_becomes_one_generated_kernel(seed):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(H))

        def forward(self, input_ids, attention_mask, hidden):
            x = hidden + self.bias
            c = math.sqrt(2.0 / math.pi)
            return (0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0)))),)

    g = export_graph(M(), _inputs(hidden=H))
    before = g.copy()
    g = fuse_pointwise(drop_noops(g))
    assert targets(g) == [ops.pointwise]
    (node,) = [n for n in g.graph.nodes if n.target is ops.pointwise]
    assert node.args[0]["inputs"] == ["full", "col"] or node.args[0]["inputs"] == ["col", "full"]
    assert_same_function(before, g, _inputs(2, 5, hidden=H))


class EncoderLayerAndPooler(nn.Module):
    """Embeddings, a post-LayerNorm encoder layer and a first-token pooler; ``both`` also
    returns the layer's output, which then needs every row."""

    def __init__(self, both=False):
        super().__init__()
        self.both = both
        self.attention = Attention()
        self.out = nn.Linear(H, H)
        self.ln1, self.ln2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.up, self.down = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)
        self.pool = nn.Linear(H, H)
        # Not the default (ones, zeros): a LayerNorm's parameters must land on the right rows.
        for ln in (self.ln1, self.ln2):
            nn.init.normal_(ln.weight)
            nn.init.normal_(ln.bias)

    def forward(self, input_ids, attention_mask):
        x = self.attention.emb(input_ids)
        (a,) = self.attention(input_ids, attention_mask)
        h = self.ln1(self.out(a) + x)
        h = self.ln2(self.down(F.gelu(self.up(h))) + h)
        pooled = torch.tanh(self.pool(h[:, 0]))
        return (pooled, h) if self.both else (pooled,)


def _encoder_passes(g):
    g = merge_qkv(fuse_attention(key_padding_mask(drop_noops(g))))
    g = fuse_layer_norm(fuse_gemm_epilogue(recognise_gelu(g)))
    return fuse_first_token(g)


def test_first_token_rows_runs_the_last_layer_on_the_first_token(seed):
    g = _encoder_passes(export_graph(EncoderLayerAndPooler(), _inputs()))
    before = g.copy()
    g = first_token_rows(g)
    assert ops.attention_packed not in targets(g)
    (att,) = [n for n in g.graph.nodes if n.target is ops.attention_packed_first]
    b = tensor_shape(att.args[0])[0]
    # Everything after the attention is one row per sequence: [B, width].
    nodes = [n for n in g.graph.nodes if n.op == "call_function"]
    tail = nodes[nodes.index(att) :]
    assert [n.target for n in tail].count(ops.linear) == 4  # out, up, down, pool
    for n in tail:
        assert len(tensor_shape(n)) == 2 and tensor_shape(n)[0] == b, n.format_node()
    # The residual stream into the region is gathered, the pooling's own gather is gone.
    (gather,) = [n for n in g.graph.nodes if n.target is ops.first_token]
    assert tensor_shape(gather.args[0])[:2] == tensor_shape(att.args[0])[:2]
    assert_same_function(before, g, _inputs(3, 7))
    assert_same_function(before, g, _inputs(1, 1))


def test_first_token_rows_leaves_a_model_that_reads_every_row(seed):
    g = _encoder_passes(export_graph(EncoderLayerAndPooler(both=True), _inputs()))
    code = g.gm.code
    g = first_token_rows(g)
    assert g.gm.code == code
    assert ops.attention_packed in targets(g) and ops.attention_packed_first not in targets(g)
