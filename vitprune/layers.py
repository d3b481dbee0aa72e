"""Prunable and factorized layers: timm's Attention and Mlp with gates and pruned widths, and W = B·A.

Gated and pruned blocks swap timm's ``Attention``/``Mlp`` for the subclasses below, which keep
timm's child modules (and so timm's state-dict keys) and add only what pruning needs: optional
gates, an input index into the residual stream, and separate query/key and value head widths
with the original attention scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitprune.errors import ModelError

ATTN_GATES = ("gate_in", "gate_qk", "gate_out")
# At most this many tokens, batched inference takes the explicit matmul-softmax-matmul path: on CPU, PyTorch's fused
# kernel costs a fixed overhead per (image, head) that dominates short sequences (measured, 2 threads: 17 tokens,
# batch 64: fused 479 us, explicit 132 us; 197 tokens, batch 8: fused 2.0x faster; batch 1 and training: fused).
EXPLICIT_TOKENS = 64
# At most this many residual features, a layer whose input dims were pruned runs without gradients (inference,
# evaluation) as x @ W_full^T, W_full its weight with zero columns where dims were pruned, instead of gathering the
# kept features first: the same numbers (a zero column adds exact zeros), and on small models the gather costs more
# than the pruned columns save. Measured (2 threads, Intel Xeon, the default model's pruned_gates_60 against dense,
# interleaved): 1.02x -> 1.08x at batch 1, 1.35x -> 1.45x at batch 64; from 128 features up the gather pays (a layer
# keeping 60 % of C inputs, 3C outputs: gather + GEMM 0.64-0.92 of the padded GEMM's time).
PAD_INPUT_WIDTH = 64
MLP_GATES = ("gate_in", "gate_hidden")


def new_gate(size: int) -> nn.Parameter:
    """A VTP gate: a learnable vector of ones."""
    return nn.Parameter(torch.ones(size))


def select_features(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[..., index]; gather is several times faster than index_select on the last dim on CPU."""
    return torch.gather(x, -1, index.expand(*x.shape[:-1], -1))


def gated_linear(layer: nn.Module, x: torch.Tensor, in_gate: torch.Tensor | None = None,
                 out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x * in_gate) with its outputs scaled by out_scale, computed by scaling the weight instead of x.

    Same function; the gates touch in*out weights rather than batch*tokens*in activations, which
    keeps sparse training nearly as fast as dense training.
    """
    if in_gate is None and out_scale is None:
        return layer(x)
    if not isinstance(layer, nn.Linear):
        y = layer(x if in_gate is None else x * in_gate)
        return y if out_scale is None else y * out_scale
    weight, bias = layer.weight, layer.bias
    if in_gate is not None:
        weight = weight * in_gate
    if out_scale is not None:
        weight = weight * out_scale[:, None]
        bias = None if bias is None else bias * out_scale
    return F.linear(x, weight, bias)


def input_pruned_linear(layer: nn.Module, x: torch.Tensor, index: torch.Tensor | None,
                        in_gate: torch.Tensor | None = None, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gated_linear(layer, x[..., index], in_gate, out_scale): the kept features gathered, or (PAD_INPUT_WIDTH) x
    times the layer's weight scattered into x's full width, the same function."""
    if index is None:
        return gated_linear(layer, x, in_gate, out_scale)
    if in_gate is None and out_scale is None and _pads_input(layer, x):
        return F.linear(x, _full_width_weight(layer, index, x.shape[-1]), layer.bias)
    return gated_linear(layer, select_features(x, index), in_gate, out_scale)


def _pads_input(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` takes the whole residual stream (see PAD_INPUT_WIDTH): a plain linear layer, no gradients
    to carry back to its compact weight, no forward hook that expects to see it run on its own inputs (MAC counts,
    calibration statistics), not being traced for export or compilation (those keep the gather)."""
    return (x.shape[-1] <= PAD_INPUT_WIDTH and isinstance(layer, nn.Linear) and not torch.is_grad_enabled()
            and not _hooked(layer) and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def _hooked(layer: nn.Module) -> bool:
    """Whether a forward hook would see `layer` run: its own or a global one."""
    hooks = nn.modules.module
    return bool(layer._forward_hooks or layer._forward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks)


def _full_width_weight(layer: nn.Linear, index: torch.Tensor, width: int) -> torch.Tensor:
    """layer.weight with zero columns inserted where input dims were pruned (width columns), built once per weight
    version and kept on the layer as a plain attribute: not a parameter or buffer, so never saved or counted. The
    entry holds the weight and index it was built from (compared by identity, so a new tensor at a reused address
    cannot match) with their versions and storage (an in-place change or `.data` swap rebuilds it)."""
    weight = layer.weight
    state = (weight._version, weight.data_ptr(), index._version, index.data_ptr(), width)
    cached = layer.__dict__.get("_full_width_weight")
    if cached is None or cached[0] is not weight or cached[1] is not index or cached[2] != state:
        full = weight.new_zeros(weight.shape[0], width)
        full[:, index] = weight
        cached = layer.__dict__["_full_width_weight"] = (weight, index, state, full)
    return cached[-1]


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dim of `t` to `width`."""
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


class PrunableAttention(Attention):
    """timm Attention with optional VTP gates, pruned input dims and separate q/k and v head widths."""

    def __init__(self, attn: Attention):
        nn.Module.__init__(self)
        self.training = attn.training  # a wrapped eval-mode model stays in eval mode (eval takes the explicit path)
        if getattr(attn, "gate", None) is not None:
            raise ModelError("attention with a sigmoid output gate (timm gated=True) cannot be pruned exactly")
        for name, child in attn.named_children():
            setattr(self, name, child)
        self.gate = None
        self.num_heads = attn.num_heads
        self.qk_head_dim = getattr(attn, "qk_head_dim", attn.head_dim)
        self.v_head_dim = getattr(attn, "v_head_dim", attn.head_dim)
        self.head_dim = self.v_head_dim
        self.attn_dim = self.num_heads * self.v_head_dim
        self.scale = attn.scale  # the original head dim's scale, kept through pruning
        self.fused_attn = attn.fused_attn
        self.register_buffer("in_index", getattr(attn, "in_index", None))
        for site in ATTN_GATES:
            self.register_parameter(site, getattr(attn, site, None))

    def qkv_row_scale(self) -> torch.Tensor | None:
        """Per-output-row scale of qkv from the `qk` gate: q and k rows both by g, so the logits scale by g^2."""
        gate = self._parameters["gate_qk"]
        if gate is None:
            return None
        return torch.cat([gate, gate, gate.new_ones(self.num_heads * self.v_head_dim)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        h, dqk, dv = self.num_heads, self.qk_head_dim, self.v_head_dim
        # gates and the input index are read from the module's own dicts: nn.Module.__getattr__ is slow, and a small
        # model at batch 1 spends its time in such overhead
        gates, index = self._parameters, self._buffers["in_index"]
        qkv = input_pruned_linear(self.qkv, x, index, gates["gate_in"], self.qkv_row_scale())  # (B, N, H*(2*Dqk+Dv))
        if dqk == dv:  # one reshape for all three, as timm does: fewer operators for every call
            q, k, v = qkv.reshape(b, n, 3, h, dv).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        else:
            q, k, v = qkv.split([h * dqk, h * dqk, h * dv], dim=-1)
            q = q.view(b, n, h, dqk).transpose(1, 2)  # (B, H, N, Dqk)
            k = k.view(b, n, h, dqk).transpose(1, 2)  # (B, H, N, Dqk)
            v = v.view(b, n, h, dv).transpose(1, 2)  # (B, H, N, Dv)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._attend(q, k, v, attn_mask, is_causal)  # (B, H, N, Dv)
        x = x.transpose(1, 2).reshape(b, n, h * dv)  # (B, N, H*Dv)
        x = self.norm(x)
        x = gated_linear(self.proj, x, gates["gate_out"])  # (B, N, C)
        return self.proj_drop(x)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        """softmax(scale * q k^T + mask) v: explicitly for short sequences in batched inference (EXPLICIT_TOKENS), else
        through the fused kernel when timm would use it. Every path is the same function; the choice depends on the
        shapes alone, so the same call gives the same numbers on every run."""
        short = not self.training and not is_causal and q.shape[0] > 1 and q.shape[-2] <= EXPLICIT_TOKENS
        if not self.fused_attn or short:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            return attn @ v
        dropout = self.attn_drop.p if self.training else 0.0
        if q.shape[-1] == v.shape[-1]:  # pruned jointly (or not at all): the fused kernel at the pruned width
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                                  dropout_p=dropout)
        # q/k and v pruned apart (e.g. qk-norm, which cannot be pruned): the fused kernels need equal widths, so the
        # narrower side is zero-padded — exact (zero q/k columns add nothing to the logits, zero v columns are sliced
        # off) and, measured on CPU, faster than the unfused path at the true widths.
        width = max(q.shape[-1], v.shape[-1])
        out = F.scaled_dot_product_attention(_pad_last(q, width), _pad_last(k, width), _pad_last(v, width),
                                             attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                             dropout_p=dropout)
        return out[..., :v.shape[-1]]


class PrunableMlp(Mlp):
    """timm Mlp with optional VTP gates on its input and hidden features, and pruned input dims."""

    def __init__(self, mlp: Mlp):
        nn.Module.__init__(self)
        self.training = mlp.training
        for name, child in mlp.named_children():
            setattr(self, name, child)
        self.register_buffer("in_index", getattr(mlp, "in_index", None))
        for site in MLP_GATES:
            self.register_parameter(site, getattr(mlp, site, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, index = self._parameters, self._buffers["in_index"]  # read directly: see PrunableAttention.forward
        x = input_pruned_linear(self.fc1, x, index, gates["gate_in"])  # (B, N, hidden), from the kept features
        x = self.drop1(self.act(x))
        x = self.norm(x)
        x = gated_linear(self.fc2, x, gates["gate_hidden"])  # (B, N, C)
        return self.drop2(x)


class FactorizedLinear(nn.Module):
    """y = B(A x) + bias: two nn.Linear layers, the bias on the second."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """The product B @ A (what the layer computes, as one matrix)."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> FactorizedLinear:
        layer = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.first.weight.copy_(a)
            layer.second.weight.copy_(b)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def vit_blocks(model: nn.Module) -> nn.Sequential:
    """The transformer blocks of a timm VisionTransformer; a clear error for anything else."""
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if not (isinstance(getattr(block, "attn", None), Attention) and isinstance(getattr(block, "mlp", None), Mlp)):
            raise ModelError(f"block {i} ({type(block).__name__}) does not have timm's Attention and Mlp; "
                             "only standard pre-norm ViT blocks can be gated and pruned")
    return model.blocks


def make_prunable(model: nn.Module) -> nn.Module:
    """Swap every block's Attention/Mlp for the prunable subclasses (in place; same function, same keys)."""
    for block in vit_blocks(model):
        if not isinstance(block.attn, PrunableAttention):
            block.attn = PrunableAttention(block.attn)
        if not isinstance(block.mlp, PrunableMlp):
            block.mlp = PrunableMlp(block.mlp)
    return model

