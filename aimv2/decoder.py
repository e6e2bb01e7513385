"""The AIMv2 multimodal decoder: causal attention over [image tokens | BOS | caption tokens]."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aimv2_kernels as ak

from .blocks import add_norm, init_weights, make_blocks, run_blocks
from .config import AIMv2Config
from .packing import DecoderLayout


@dataclass
class DecodeCache:
    """Keys and values (B, H, S, D) of every decoder block for the rows decoded so far, and the
    number of text rows (BOS included) among them."""
    keys: list[Tensor]
    values: list[Tensor]
    text_rows: int


class AIMv2Decoder(nn.Module):
    """(encoder features (B, N, enc_dim), tokens (B, T)) -> (pixel predictions, text hidden states).

    The sequence is [N projected image features | BOS | T token embeddings] with learned positions on
    the text part only, run causally. Outputs come already shifted: pixel_pred[:, i] (from image
    position i) predicts patch i + 1; text_hidden[:, k] (BOS for k = 0, else token k - 1) predicts
    token k. The text logits are text_hidden @ text_head.weight.T; the loss fuses that product.

    State-dict keys: image_proj.{weight,bias}, token_embed.weight, bos (1, 1, dec_dim),
    pos_embed (1, T + 1, dec_dim), blocks.{i}..., norm.weight, pixel_head.weight, text_head.weight.
    """

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.config = config
        c = config
        self.image_proj = nn.Linear(c.enc_dim, c.dec_dim, bias=True)
        self.token_embed = nn.Embedding(c.vocab_size, c.dec_dim)
        self.bos = nn.Parameter(torch.empty(1, 1, c.dec_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, c.max_text_len + 1, c.dec_dim))
        self.blocks = make_blocks(c.dec_dim, c.dec_depth, c.dec_heads, c.dec_hidden, c.norm_eps)
        self.norm = ak.nn.RMSNorm(c.dec_dim, eps=c.norm_eps)
        self.pixel_head = nn.Linear(c.dec_dim, c.patch_dim, bias=False)
        self.text_head = nn.Linear(c.dec_dim, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        nn.init.normal_(self.bos, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def _check_tokens(self, tokens: Tensor, batch: int) -> None:
        T = self.config.max_text_len
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be an int32/int64 tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() != 2 or tokens.shape[0] != batch or not 1 <= tokens.shape[1] <= T:
            raise ValueError(f"tokens must have shape ({batch}, T) with 1 <= T <= max_text_len={T}, got {tuple(tokens.shape)}")

    def hidden_states(self, features: Tensor, tokens: Tensor) -> Tensor:
        """Final-normed decoder states (B, N + 1 + T, dec_dim) of [image | BOS | tokens]."""
        B, N, _ = features.shape
        self._check_tokens(tokens, B)
        T = tokens.shape[1]
        image = self.image_proj(features)  # (B, N, dec_dim)
        text = torch.cat([self.bos.expand(B, -1, -1), self.token_embed(tokens)], dim=1)  # (B, T + 1, dec_dim)
        # The sequence is content + positions (none on the image part). The positions start the residual
        # stream and the content is its first update, added by the first block's fused norm. Under
        # autocast the content is float32 (cat promotes the bf16 image part to the text's float32).
        content = torch.cat([image, text], dim=1)  # (B, S, dec_dim)
        positions = torch.cat([self.pos_embed.new_zeros(1, N, self.config.dec_dim), self.pos_embed[:, : T + 1]], dim=1)
        return run_blocks(self.blocks, self.norm, positions.expand(B, -1, -1), None, causal=True, update=content)

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """-> pixel_pred (B, N - 1, patch_dim) for patches 1..N-1, text_hidden (B, T, dec_dim) for tokens 0..T-1."""
        N, T = features.shape[1], tokens.shape[1]
        h = self.hidden_states(features, tokens)
        pixel_pred = self.pixel_head(h[:, : N - 1])
        text_hidden = h[:, N : N + T]  # BOS .. token T-2; the last token's output predicts nothing
        return pixel_pred, text_hidden

    def forward_packed(self, features: Tensor, lengths: list[int], tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Packed images: features (T, enc_dim) of n images of N_i = lengths[i] patches back to back,
        tokens (n, L) -> pixel_pred (T - n, patch_dim) for patches 1 .. N_i - 1 of each image (image
        after image), text_hidden (n, L, dec_dim).

        Each image's own sequence [N_i image tokens | BOS | L tokens] runs causally, packed with the
        others and never seeing them; the positions and outputs are those of `forward` per image."""
        n = len(lengths)
        self._check_tokens(tokens, n)
        L = tokens.shape[1]
        layout = DecoderLayout.build(lengths, L, features.device)
        image = self.image_proj(features)  # (T, dec_dim)
        text = torch.cat([self.bos.expand(n, -1, -1), self.token_embed(tokens)], dim=1).flatten(0, 1)  # (n * (L + 1), dec_dim)
        # one gather puts every row in its sequence; positions (none on image rows) go the same way
        content = torch.cat([image, text])[layout.order]  # (S, dec_dim)
        positions = torch.cat([self.pos_embed.new_zeros(features.shape[0], self.config.dec_dim),
                               self.pos_embed[0, : L + 1].repeat(n, 1)])[layout.order]
        h = run_blocks(self.blocks, self.norm, positions, None, causal=True, update=content,
                       packing=(layout.cu_seqlens, layout.max_seqlen))  # (S, dec_dim)
        return self.pixel_head(h[layout.pixel_rows]), h[layout.text_rows]

    # ---- incremental decoding (inference only) -----------------------------------------------------
    # Greedy captioning calls the decoder once per written token. Run whole, each call would redo the
    # N image rows and every earlier token in every block, though causality makes their states final
    # once computed; with a cache of each block's keys and values a call costs one row per image
    # (measured on the tiny preset: 256 held-out captions in about a tenth of the time).

    def _cached_blocks(self, stream: Tensor, update: Tensor, cache: DecodeCache) -> Tensor:
        """New rows (B, S, D) of stream and pending update through every block, attending to the
        cached rows and causally among themselves; appends their keys and values to the cache."""
        B, S, _ = stream.shape
        for i, block in enumerate(self.blocks):
            h, stream = add_norm(update, stream, block.norm1)
            attn = block.attn
            q, k, v = attn.qkv(h).view(B, S, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if i < len(cache.keys):  # rows after the cached ones see all of those (and themselves)
                if S != 1:
                    raise ValueError("after the first call, the cached decoder takes one row at a time")
                k, v = torch.cat([cache.keys[i], k], dim=2), torch.cat([cache.values[i], v], dim=2)
                cache.keys[i], cache.values[i] = k, v
                out = F.scaled_dot_product_attention(q, k, v)
            else:  # the first call: the same causal attention as training
                cache.keys.append(k)
                cache.values.append(v)
                out = ak.prefix_causal_attention(q, k, v, None, causal=True)
            attn_out = attn.proj(out.transpose(1, 2).reshape(B, S, attn.dim))
            h, stream = add_norm(attn_out, stream, block.norm2)
            update = block.mlp(h)
        return add_norm(update, stream, self.norm)[0]

    @torch.no_grad()
    def start_decoding(self, features: Tensor) -> tuple[Tensor, DecodeCache]:
        """Eval-time start of incremental decoding: features (B, N, enc_dim) -> (hidden (B, dec_dim)
        of the BOS row, which predicts token 0; the cache). Then `decode_next` per token."""
        B, N, _ = features.shape
        content = torch.cat([self.image_proj(features), self.bos.expand(B, -1, -1)], dim=1)  # (B, N + 1, d)
        positions = torch.cat([self.pos_embed.new_zeros(1, N, self.config.dec_dim), self.pos_embed[:, :1]], dim=1)
        cache = DecodeCache([], [], text_rows=1)
        h = self._cached_blocks(positions.expand(B, -1, -1), content, cache)
        return h[:, -1], cache

    @torch.no_grad()
    def decode_next(self, token: Tensor, cache: DecodeCache) -> Tensor:
        """token (B,) int: the token just written -> hidden (B, dec_dim) of its row, which predicts
        the next token. Equals `hidden_states` over all tokens so far, up to rounding."""
        k = cache.text_rows  # the token's row in the text part: its position embedding
        if k > self.config.max_text_len:
            raise ValueError(f"the decoder has positions for max_text_len={self.config.max_text_len} tokens")
        B = token.shape[0]
        content = self.token_embed(token.view(B, 1))  # (B, 1, d)
        h = self._cached_blocks(self.pos_embed[:, k:k + 1].expand(B, -1, -1), content, cache)
        cache.text_rows += 1
        return h[:, 0]

    def text_logits(self, text_hidden: Tensor) -> Tensor:
        """(B, T, dec_dim) -> (B, T, vocab) logits; materializes them, for inspection and sampling only."""
        return self.text_head(text_hidden)
