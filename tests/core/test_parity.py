"""softprompt against peft (the oracle), for every method variant x model family, fp32.

Same base weights, same initial adapter weights (copied from peft's), same batches:
- logits, loss and every trainable gradient within 1e-5 (unpadded and right-padded batches; only
  positions whose mask is 1 are compared);
- 20 AdamW steps give the same losses within 1e-4;
- `print_trainable_parameters()` prints peft's exact line.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Pair, make_batch, trainable

ATOL = 1e-5


def _full_mask(mask: torch.Tensor, logits_len: int) -> torch.Tensor:
    """The batch mask extended over the leading virtual-token slots (real in both peft and ours)."""
    extra = logits_len - mask.shape[1]
    return torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1).bool()


@pytest.mark.parametrize("pad", [None, "right"])
def test_forward_and_gradients_match_peft(pair: Pair, pad):
    batch = make_batch(pad=pad)
    pair.peft.train()
    pair.ours.train()
    out_p = pair.peft(**batch)
    out_s = pair.ours(**batch)
    assert out_s.logits.shape == out_p.logits.shape
    real = _full_mask(batch["attention_mask"], out_p.logits.shape[1])
    torch.testing.assert_close(out_s.logits[real], out_p.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_s.loss, out_p.loss, atol=ATOL, rtol=0)

    out_p.loss.backward()
    out_s.loss.backward()
    params_p, params_s = trainable(pair.peft), trainable(pair.ours)
    assert sorted(params_s) == sorted(params_p)
    for name, p in params_p.items():
        assert p.grad is not None and params_s[name].grad is not None, name
        torch.testing.assert_close(params_s[name].grad, p.grad, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    # the base model stays frozen
    assert all(p.grad is None for n, p in pair.ours.base_model.named_parameters())


def test_adapter_changes_the_output(pair: Pair):
    """Guards the parity test against a trivial pass: the adapter must change the text logits."""
    batch = make_batch()
    L = batch["input_ids"].shape[1]
    ours = pair.ours(input_ids=batch["input_ids"]).logits[:, -L:]
    base = pair.base(input_ids=batch["input_ids"]).logits
    assert (ours - base).abs().max() > 1e-3


def test_training_matches_peft(pair: Pair):
    """20 AdamW steps, alternating an unpadded and a right-padded batch: the same loss at every step."""
    opts = [
        torch.optim.AdamW(list(trainable(m).values()), lr=1e-2) for m in (pair.peft, pair.ours)
    ]
    pair.peft.train()
    pair.ours.train()
    losses: list[tuple[float, float]] = []
    for step in range(20):
        batch = make_batch(pad="right" if step % 2 else None, seed=step % 2)
        step_losses = []
        for model, opt in zip((pair.peft, pair.ours), opts):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step_losses.append(loss.item())
        losses.append(tuple(step_losses))
    for step, (lp, ls) in enumerate(losses):
        assert abs(lp - ls) < 1e-4, f"step {step}: peft {lp} vs softprompt {ls}"
    assert losses[18][1] < losses[0][1]  # it trained: step 18 sees step 0's batch again


def test_print_trainable_parameters_matches_peft(pair: Pair, capsys):
    pair.peft.print_trainable_parameters()
    line_p = capsys.readouterr().out
    pair.ours.print_trainable_parameters()
    line_s = capsys.readouterr().out
    assert line_s == line_p
    assert line_s.startswith("trainable params: ")
    assert pair.ours.get_nb_trainable_parameters() == pair.peft.get_nb_trainable_parameters()
