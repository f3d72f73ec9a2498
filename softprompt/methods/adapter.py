"""The one interface every prompt method answers (the registry of methods is in `config.py`).

An adapter gives, for the rows that use it, either virtual-token input embeddings `(V, D)` placed
before the text, or a key/value prefix `(layers, 2, kv_heads, V, head_dim)` seen by every attention
layer. The model wrapper asks for both and uses what it gets; it never asks which method it holds.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.methods.config import ModelShape, PromptLearningConfig


class PromptAdapter(nn.Module):
    """Base of the three methods: learned parameters -> one prompt tensor (`compute`)."""

    # Where the prompt enters the model: "input" (virtual-token embeddings before the text) or "prefix"
    # (keys and values seen by every attention layer). The packer reserves room by this, without computing.
    placement = "input"

    def __init__(self, config: PromptLearningConfig, shape: ModelShape):
        super().__init__()
        self.config = config
        self.shape = shape
        self._cached: tuple[tuple, torch.Tensor] | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def compute(self) -> torch.Tensor:
        """The method's raw output, fp32; its shape is what peft saves as `prompt_embeddings`."""
        raise NotImplementedError

    def prompt(self) -> torch.Tensor:
        """`compute()`, cached while gradients are off and the parameters have not changed.

        Only a no-grad result is ever kept, so a cached tensor never carries a graph: a `no_grad`
        pass followed by a training step still trains every parameter.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            self._cached = None
            return self._compute_fp32()
        key = (self.training,) + tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, self._compute_fp32())
        return self._cached[1]

    def _compute_fp32(self) -> torch.Tensor:
        """`compute()` outside any autocast: the encoders are small, and under bf16 autocast a Linear keeps a
        bf16 copy of its weight for the backward (prefix projection on a 2048-wide, 24-layer model: 411 MB)."""
        device = next(self.parameters()).device.type
        if not torch.amp.is_autocast_available(device):  # no autocast there to leave
            return self.compute()
        with torch.autocast(device_type=device, enabled=False):
            return self.compute()

    def input_embeddings(self) -> torch.Tensor | None:
        """Virtual-token embeddings `(V, hidden)` to place before the text, or None."""
        return None

    def key_values(self) -> torch.Tensor | None:
        """Key/value prefix `(layers, 2, kv_heads, V, head_dim)` for every attention layer, or None."""
        return None

    @torch.no_grad()
    def exported(self) -> torch.Tensor:
        """peft's `prompt_embeddings`: the output in eval mode (no dropout), fp32, on CPU."""
        was_training = self.training
        self.eval()
        try:
            return self.compute().detach().float().cpu().contiguous()
        finally:
            self.train(was_training)

    def has_encoder(self) -> bool:
        """Whether parameters beyond the exported prompt exist (saved in softprompt's own file)."""
        return False
