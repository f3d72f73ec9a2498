"""`forward(loss_only=True)`: the LM head runs only where a label follows; loss and gradients stay the same.

Checked against peft's full-logits loss for every family x variant, with masked prompts, right padding and
`num_items_in_batch` (what Trainer passes under gradient accumulation).
"""

from __future__ import annotations

import pytest
import torch
from conftest import Pair, make_batch, trainable


@pytest.mark.parametrize("num_items", [None, 11])
def test_loss_only_keeps_loss_and_gradients(pair: Pair, num_items):
    batch = make_batch(pad="right")
    batch["labels"][:, :3] = -100  # a masked prompt: no logits needed there
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    pair.peft.train()
    pair.ours.train()
    out_p = pair.peft(**batch, **kwargs)
    out_o = pair.ours(**batch, **kwargs, loss_only=True)
    out_p.loss.backward()
    out_o.loss.backward()
    torch.testing.assert_close(out_o.loss, out_p.loss, atol=1e-5, rtol=1e-5)
    assert out_o.logits.shape[1] < out_p.logits.shape[1]  # the head really skipped positions
    theirs, ours = trainable(pair.peft), trainable(pair.ours)
    for name, p in ours.items():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4)
    full = pair.ours(**batch, **kwargs)  # the default: every position's logits, as peft
    assert full.logits.shape == out_p.logits.shape
