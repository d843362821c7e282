"""tinyflow's networks: a tiny ``diffusers.FluxTransformer2DModel`` and a tiny text encoder.

The image is its own latent: an RGB image (B, 3, 32, 32) in [-1, 1] is
pixel-unshuffled by 2 into (B, 12, 16, 16), then packed by FluxPipeline's own
2x2 packing into (B, 64, 48): 64 tokens of 4x4 pixels. With the pipeline's
``vae_scale_factor`` set to 2 the pipeline makes exactly these latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .grammar import IMAGE_SIZE, MAX_TOKENS, VOCAB

#: Pixels per latent cell side (pixel unshuffle factor); with FLUX's 2x2 packing a token is 4x4 px.
LATENT_FACTOR = 2
TEXT_DIM = 64

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=3 * LATENT_FACTOR**2 * 4,
    num_layers=2,
    num_single_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=TEXT_DIM,
    pooled_projection_dim=TEXT_DIM,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Word-level transformer encoder over tinyflow's vocabulary.

    Returns FLUX's two text inputs: token states (B, L, D) and a pooled vector
    (B, D) read from the leading ``<cls>`` token.

    ``local_kernel = k > 0`` adds a causal convolution over the embedded words before the attention
    layers, ``h_t <- h_t + b + sum_{j<k} W_j h_{t-j}`` (``W_j`` is ``local.weight[:, :, k - 1 - j]``),
    so each word's state is a function of the ``k - 1`` words before it ("red square" differs from
    "blue square" at the shape token). FLUX gives text tokens no rotary position, so the transformer
    reads the token states as a set; without such a local term two prompts that swap attributes
    between two objects encode almost alike. The convolution starts at zero and is built after the
    other layers: with the same seed, an encoder with it starts as the same encoder without it.

    ``lookahead = m > 0`` adds the mirror term over the ``m`` words *after* each word,
    ``h_t <- h_t + sum_{1<=j<=m} U_j e_{t+j}`` (``U_j`` is ``ahead.weight[:, :, j - 1]``; ``e`` the
    embedded words, no bias), so an adjective's state carries the shape it qualifies ("blue" in "a
    blue square" differs from "blue" in "a blue circle"). Without it only the shape token is bound
    and the colour and size tokens float free in the set, which the transformer can give to either
    object. It too starts at zero and is built last.
    """

    @register_to_config
    def __init__(self, vocab: list[str] | tuple[str, ...] = VOCAB, max_tokens: int = MAX_TOKENS,
                 dim: int = TEXT_DIM, layers: int = 2, heads: int = 4, local_kernel: int = 0,
                 lookahead: int = 0) -> None:
        super().__init__()
        if local_kernel < 0:
            raise ValueError(f"local_kernel must be >= 0 (got {local_kernel})")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 (got {lookahead})")
        self.embed = nn.Embedding(len(vocab), dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, dim)
        # Built last, so the other layers draw the same random init with or without it.
        self.local: nn.Conv1d | None = None
        if local_kernel:
            self.local = nn.Conv1d(dim, dim, local_kernel)
            nn.init.zeros_(self.local.weight)
            nn.init.zeros_(self.local.bias)
        self.ahead: nn.Conv1d | None = None
        if lookahead:
            self.ahead = nn.Conv1d(dim, dim, lookahead, bias=False)
            nn.init.zeros_(self.ahead.weight)

    def embed_words(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> the attention layers' input (B, L, D): word + position (+ word convolutions)."""
        e = self.embed(ids) + self.pos[: ids.shape[1]]
        h = e
        if self.local is not None:  # causal: pad k-1 positions on the left
            x = F.pad(e.transpose(1, 2), (self.local.kernel_size[0] - 1, 0))
            h = h + self.local(x).transpose(1, 2)
        if self.ahead is not None:  # strictly after: drop the word itself, pad m positions on the right
            x = F.pad(e.transpose(1, 2)[:, :, 1:], (0, self.ahead.kernel_size[0]))
            h = h + self.ahead(x).transpose(1, 2)
        return h

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.encoder(self.embed_words(ids)))
        return h, self.pool(h[:, 0])


def new_transformer() -> FluxTransformer2DModel:
    """A freshly initialised tinyflow transformer."""
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> packed latents (B, H*W/16, 48)."""
    z = F.pixel_unshuffle(images, LATENT_FACTOR)  # (B, 12, H/2, W/2)
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def latent_to_image(latents: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Packed latents (B, T, 48) -> images (B, 3, H, W) in [-1, 1] (unclamped)."""
    b, _, ch = latents.shape
    h, w = height // (2 * LATENT_FACTOR), width // (2 * LATENT_FACTOR)
    z = latents.view(b, h, w, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    z = z.reshape(b, ch // 4, h * 2, w * 2)
    return F.pixel_shuffle(z, LATENT_FACTOR)


def image_ids(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX image position ids (T, 3): ``[0, row, col]`` per token, as FluxPipeline makes them."""
    h, w = height // (2 * LATENT_FACTOR), width // (2 * LATENT_FACTOR)
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(length: int = MAX_TOKENS, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX text position ids (L, 3): all zeros."""
    return torch.zeros(length, 3, device=device, dtype=dtype)
