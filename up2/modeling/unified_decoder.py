"""g: the Transformer shared by every task and by inputs and targets alike (paper §4.3, Eq. 6).

Shape shorthand: B sequences, T tokens, d width.

The decoder is BERT-like (post-LayerNorm, GELU FFN; paper §5.2: BERT-base sizes with 6
layers). A learned ``[SPE]`` token is put in front of every sequence; tasks read the
sequence-level representation there.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from up2.modeling.decoder_outputs import SPE, DecoderCache, DecoderOutput, segment_span
from up2.modeling.moe import ConditionalMoE
from up2.modeling.token_attributes import ATTRIBUTE_DIM
from up2.structures import TokenAttention, TokenBatch

__all__ = ["UnifiedDecoder", "UnifiedDecoderLayer", "DecoderCache", "DecoderOutput", "build_attention_mask", "SPE"]



def build_attention_mask(batch: TokenBatch) -> Optional[torch.Tensor]:
    """Boolean "may attend" mask for ``F.scaled_dot_product_attention``, or None for none.

    Args:
        batch: tokens (B, T, d), padding_mask (B, T) bool (True = pad), attention kind and,
            for CAUSAL, prefix_length (B,) int64 (None = no bidirectional prefix); has_padding.

    Returns:
        None for a BIDIRECTIONAL batch declared free of padding (``has_padding=False``): every
        token attends every token, and attention without a mask lets SDPA pick FlashAttention
        on GPUs. Otherwise (B, 1, T, T) bool, True where query t may attend key s. Padding keys
        are masked; every token may attend itself, so no row is empty (padded rows stay finite).

    Prefix-causal (CAUSAL) batches keep the dense mask: ``flex_attention``'s block masks would
    avoid it, but flex_attention has no attention dropout (g trains with it) and without
    ``torch.compile`` it materialises the full score matrix, on the CPU too.
    """
    if batch.attention is TokenAttention.BIDIRECTIONAL and batch.has_padding is False:
        return None
    B, T = batch.padding_mask.shape
    device = batch.padding_mask.device
    allowed = (~batch.padding_mask)[:, None, :].expand(B, T, T)
    if batch.attention is TokenAttention.CAUSAL:
        idx = torch.arange(T, device=device)
        causal = (idx[None, :] <= idx[:, None])[None]  # (1, T, T): key s <= query t
        if batch.prefix_length is not None:  # keys of the bidirectional prefix
            causal = causal | (idx[None, :] < batch.prefix_length[:, None])[:, None, :]
        allowed = allowed & causal
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


class FeedForward(nn.Module):
    """Dense FFN: Linear(d, f) -> GELU -> dropout -> Linear(f, d). Input/output (B, T, d); it
    returns ``(y, None)``, as a ``ConditionalMoE`` returns ``(y, balance loss)``."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attributes: torch.Tensor | None = None) -> Tuple[torch.Tensor, None]:
        return self.fc2(self.dropout(F.gelu(self.fc1(x)))), None


class UnifiedDecoderLayer(nn.Module):
    """One post-LN Transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

    ``ffn_factory`` (zero-argument callable returning a module called as ``ffn(x, attributes)``
    that returns ``(y, auxiliary loss or None)``, e.g. a ``ConditionalMoE``) replaces the dense
    FFN when given.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 ffn_factory: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"UNIFIED_DECODER.EMBED_DIM={embed_dim} is not divisible by NUM_HEADS={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout) if ffn_factory is None else ffn_factory()
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], attributes=None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, T, d); attn_mask: (B, 1, T, T) bool (True = may attend), or None (all may);
        attributes: (B, T, A) or None. Returns ((B, T, d), the FFN's auxiliary loss (0-dim) or None)."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = self.norm1(x + self.dropout(self.out_proj(attn.transpose(1, 2).reshape(x.shape))))
        y, aux = self.ffn(x, attributes)
        return self.norm2(x + self.dropout(y)), aux

    def forward_cached(self, x: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]],
                       attn_mask: Optional[torch.Tensor], attributes=None, need_output: bool = True):
        """``forward`` for new tokens over the keys / values of earlier ones (eval, no dropout).

        Args:
            x: (B, t, d) the new tokens.  past: keys and values (B, H, S, d / H) of the S earlier
                tokens, or None (S = 0).  attn_mask: (B, 1, t, S + t) bool, True = may attend
                (None: all may).
            attributes: (B, t, A) or None.  need_output: False computes only the keys and values.

        Returns:
            ((B, t, d) or None, (keys, values) (B, H, S + t, d / H) of all S + t tokens).
        """
        B, t, d = x.shape
        heads = (B, t, self.num_heads, d // self.num_heads)
        if need_output:
            q, k, v = self.qkv(x).view(B, t, 3, *heads[2:]).permute(2, 0, 3, 1, 4)
        else:
            k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).view(B, t, 2, *heads[2:]).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        if not need_output:
            return None, (k, v)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = self.norm1(x + self.out_proj(attn.transpose(1, 2).reshape(x.shape)))
        return self.norm2(x + self.ffn(x, attributes)[0]), (k, v)


def _moe_factory(g) -> Optional[Callable[[], nn.Module]]:
    """ConditionalMoE factory from cfg.MODEL.UNIFIED_DECODER.MOE, or None (dense) when absent/disabled."""
    moe = g.get("MOE")
    if moe is None or not moe.get("ENABLED", False):
        return None
    return partial(
        ConditionalMoE,
        embed_dim=g.EMBED_DIM,
        ffn_dim=g.FFN_DIM,
        num_experts=moe.NUM_EXPERTS,
        top_k=moe.TOP_K,
        attribute_dim=ATTRIBUTE_DIM,
        dropout=g.DROPOUT,
        balance_loss_weight=moe.get("BALANCE_LOSS_WEIGHT", 0.0),
        noise_std=moe.get("NOISE_STD", 1.0),
    )


class UnifiedDecoder(nn.Module):
    """The modality-agnostic Transformer g (paper §4.3).

    ``forward`` prepends ``[SPE]`` and returns un-normalised features; the likelihood
    (``up2.modeling.likelihood``) L2-normalises them.

    ``[SPE]`` enters the first layer at its learned scale (initialised small), not through the
    input LayerNorm that brings every content token to unit scale, as a ViT's class token does
    (``spe_input_norm=False``; ``MODEL.UNIFIED_DECODER.SPE_INPUT_NORM``; the paper, §4.3, does
    not say). In the post-LN layers a unit-scale constant ``[SPE]`` outweighs
    the attention's average of the content, so at initialisation g's output at ``[SPE]`` hardly
    depends on the sequence: class names and images then start on nearly one vector, and a
    contrastive likelihood (Eq. 7) can settle there, every logit equal, without learning.
    """

    @configurable
    def __init__(self, *, embed_dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float,
                 ffn_factory: Optional[Callable[[], nn.Module]] = None, spe_input_norm: bool = False):
        """
        Args:
            embed_dim: d. num_layers: Transformer layers (paper: 6). num_heads: attention heads.
            ffn_dim: FFN hidden width. dropout: dropout of attention, FFN and embeddings.
            ffn_factory: None for dense FFNs; else called once per layer to build its FFN, e.g.
                ``partial(ConditionalMoE, ...)`` (paper §5.2: Conditional MoE in every FFN). Such
                FFNs need ``TokenBatch.attributes``.
            spe_input_norm: whether the input LayerNorm normalises ``[SPE]`` too (True: as
                checkpoints written before this option did; see the class docstring).
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.spe_input_norm = spe_input_norm
        self.spe = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.spe, std=0.02)
        self.input_norm = nn.LayerNorm(embed_dim)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            UnifiedDecoderLayer(embed_dim, num_heads, ffn_dim, dropout, ffn_factory) for _ in range(num_layers)
        )

    @classmethod
    def from_config(cls, cfg):
        g = cfg.MODEL.UNIFIED_DECODER
        return {
            "embed_dim": g.EMBED_DIM,
            "num_layers": g.NUM_LAYERS,
            "num_heads": g.NUM_HEADS,
            "ffn_dim": g.FFN_DIM,
            "dropout": g.DROPOUT,
            "ffn_factory": _moe_factory(g),
            "spe_input_norm": g.get("SPE_INPUT_NORM", True),  # a config without the key: as it was trained
        }

    def no_weight_decay(self) -> Set[str]:
        """The ``[SPE]`` token is an embedding: not decayed (``up2.solver.weight_decay``)."""
        return {"spe"}

    def with_spe(self, batch: TokenBatch) -> TokenBatch:
        """Return a new batch with ``[SPE]`` as token 0 (tokens (B, T+1, d)); prefix_length grows
        by 1, the segments shift by 1 and the segment ``"spe"`` names position 0."""
        B = batch.tokens.shape[0]
        spe = self.spe.to(batch.tokens.dtype).expand(B, 1, -1)
        pad = torch.zeros(B, 1, dtype=torch.bool, device=batch.padding_mask.device)
        attributes = batch.attributes
        if attributes is not None:
            attributes = torch.cat([attributes[:, :1], attributes], dim=1)
        prefix = None if batch.prefix_length is None else batch.prefix_length + 1
        segments = {SPE: slice(0, 1)}
        segments.update({name: slice(part.start + 1, part.stop + 1) for name, part in batch.segments.items()})
        return TokenBatch(
            tokens=torch.cat([spe, batch.tokens], dim=1),
            padding_mask=torch.cat([pad, batch.padding_mask], dim=1),
            attributes=attributes,
            attention=batch.attention,
            prefix_length=prefix,
            segments=segments,
            has_padding=batch.has_padding,  # [SPE] is never padding
        )

    def _input(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first layer's input (B, T+1, d) from ``[SPE] ++ tokens`` (B, T+1, d): the input
        LayerNorm over the content tokens, and over ``[SPE]`` only when ``spe_input_norm``."""
        if self.spe_input_norm:
            return self.input_norm(tokens)
        return torch.cat([tokens[:, :1], self.input_norm(tokens[:, 1:])], dim=1)

    def forward(self, batch: TokenBatch, read: Optional[Sequence[str]] = None) -> "DecoderOutput":
        """Encode a token batch (paper §4.3, Eq. 6).

        Args:
            batch: TokenBatch WITHOUT ``[SPE]``: tokens (B, T, d) float, padding_mask (B, T) bool,
                named ``segments``.
            read: the segments the caller reads (``"spe"`` and names of ``batch.segments``);
                None = all. The output holds the positions from the first to the last of them.

        Returns:
            DecoderOutput: the features of the read span, its named segments and the MoE
            load-balancing loss summed over layers (None with dense FFNs).

        Raises:
            ValueError: a token width other than d; a name in ``read`` that is not a segment.
        """
        if batch.tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"token width {batch.tokens.shape[-1]} != unified decoder width {self.embed_dim}")
        batch = self.with_spe(batch)
        span = segment_span(batch.segments, read, batch.tokens.shape[1])
        x = self.input_dropout(self._input(batch.tokens))
        mask = build_attention_mask(batch)
        aux = []
        for layer in self.layers:
            x, loss = layer(x, mask, batch.attributes)
            if loss is not None:
                aux.append(loss)
        x = x[:, span]
        segments = {name: slice(part.start - span.start, part.stop - span.start)
                    for name, part in batch.segments.items() if span.start <= part.start and part.stop <= span.stop}
        return DecoderOutput(x, segments, torch.stack(aux).sum() if aux else None)

    @torch.no_grad()
    def prefill(self, batch: TokenBatch) -> DecoderCache:
        """Start incremental decoding: the keys and values of ``[SPE] ++ batch`` at every layer
        (captioning inference, paper §4.3).

        The prefix attends within itself (bidirectionally, padding masked), as the prefix of a
        CAUSAL sequence does, so tokens appended later with ``extend`` get the same
        features as ``forward`` over the whole prefix-causal sequence (up to float rounding).

        Args:
            batch: the prefix WITHOUT ``[SPE]`` (e.g. image tokens): tokens (B, T, d),
                padding_mask (B, T), attributes (B, T, A) when the FFNs are MoE.

        Returns:
            DecoderCache over the T + 1 prefix tokens.

        Raises:
            RuntimeError: in training mode (incremental decoding is for inference).
            ValueError: tokens not (B, T, d), a padding mask of another shape, or a batch whose
                ``attention`` is not BIDIRECTIONAL (text already in the prefix).
        """
        if self.training:
            raise RuntimeError("UnifiedDecoder.prefill is for inference: call .eval() first")
        if batch.tokens.dim() != 3 or batch.tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"prefill: tokens must be (B, T, {self.embed_dim}), got {tuple(batch.tokens.shape)}")
        if tuple(batch.padding_mask.shape) != tuple(batch.tokens.shape[:2]):
            raise ValueError(f"prefill: padding_mask must be (B, T) = {tuple(batch.tokens.shape[:2])}, got "
                             f"{tuple(batch.padding_mask.shape)}")
        if batch.attention is not TokenAttention.BIDIRECTIONAL:
            raise ValueError(f"prefill: the prefix attends bidirectionally within itself; got a {batch.attention} "
                             "batch (append causal tokens with extend instead)")
        batch = self.with_spe(batch)
        mask = build_attention_mask(batch)
        x = self._input(batch.tokens)
        layers = []
        for i, layer in enumerate(self.layers):
            x, kv = layer.forward_cached(x, None, mask, batch.attributes, need_output=i < len(self.layers) - 1)
            layers.append(kv)
        return DecoderCache(layers, batch.padding_mask)

    @torch.no_grad()
    def extend(self, cache: DecoderCache, tokens: torch.Tensor, attributes: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, DecoderCache]:
        """Append causal tokens to a cached sequence (paper §4.3, prefix-causal): each new token attends to every
        (unpadded) cached token, the new tokens before it and itself.

        Args:
            cache: from ``prefill`` or an earlier ``extend``.
            tokens: (B, t, d) new tokens (not padded).  attributes: (B, t, A) or None.

        Returns:
            ((B, t, d) features of the new tokens, as ``forward`` of the whole sequence gives
            them; the cache extended by the t tokens).

        Raises:
            RuntimeError: in training mode.
            ValueError: tokens not (B, t, d), or a cache from a decoder of another depth or
                head count.
        """
        if self.training:
            raise RuntimeError("UnifiedDecoder.extend is for inference: call .eval() first")
        if tokens.dim() != 3 or tokens.shape[0] != cache.padding_mask.shape[0] or tokens.shape[2] != self.embed_dim:
            raise ValueError(f"tokens must be (B={cache.padding_mask.shape[0]}, t, {self.embed_dim}), "
                             f"got {tuple(tokens.shape)}")
        B, t, d = tokens.shape
        S = cache.padding_mask.shape[1]
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"extend: the cache holds {len(cache.layers)} layers, this decoder has {len(self.layers)}")
        k0 = cache.layers[0][0]
        heads = self.layers[0].num_heads
        if tuple(k0.shape) != (B, heads, S, d // heads):
            raise ValueError(f"extend: cache keys must be (B={B}, H={heads}, S={S}, {d // heads}), got "
                             f"{tuple(k0.shape)} (a cache of another decoder?)")
        new_pad = torch.zeros(B, t, dtype=torch.bool, device=tokens.device)
        padding = torch.cat((cache.padding_mask, new_pad), dim=1)  # (B, S + t)
        idx = torch.arange(S + t, device=tokens.device)
        allowed = ~padding[:, None, :] & (idx[None, :] < S + 1 + torch.arange(t, device=tokens.device)[:, None])
        allowed = allowed | (idx[None, :] == S + torch.arange(t, device=tokens.device)[:, None])  # itself
        mask = allowed[:, None]  # (B, 1, t, S + t)
        x = self.input_norm(tokens)
        layers = []
        for layer, past in zip(self.layers, cache.layers):
            x, kv = layer.forward_cached(x, past, mask, attributes)
            layers.append(kv)
        return x, DecoderCache(layers, padding)

