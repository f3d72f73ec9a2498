"""Mixed-adapter batches: `adapter_names=[...]`, one adapter per row, None = the bare base model.

For every pair of methods (with different numbers of virtual tokens), in one batch with a base-model row:
- each row's logits at its text positions equal the row run alone with its adapter (a row alone has V_i
  virtual slots, the batch V_max; the text sits at column V_max + t in the batch, V_i + t alone);
- generated tokens equal each row's solo generation (left-padded batch);
- a training step gives gradients only to the adapters used, equal to the sum of the rows' solo
  gradients (sum-reduced loss, so per-row terms add up exactly).
peft has no mixed batches for prompt learning (peft #759).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import PAD, make_base, xfail_if_prefix_gap

import softprompt

ADAPTERS = {
    "prompt4": lambda: softprompt.PromptTuningConfig(num_virtual_tokens=4),
    "prompt6": lambda: softprompt.PromptTuningConfig(num_virtual_tokens=6),
    "ptune3": lambda: softprompt.PromptEncoderConfig(
        num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=16
    ),
    "prefix5": lambda: softprompt.PrefixTuningConfig(num_virtual_tokens=5),
    "prefix2_proj": lambda: softprompt.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=16),
}
PAIRS = list(itertools.combinations(ADAPTERS, 2))
UNUSED = "prompt_unused"


def prefix_row_has_gap(pair: tuple[str, str], pad: str) -> bool:
    """Whether a prefix row gets slots between its prefix and its text: fill (a virtual-token adapter in the
    batch) or left pads."""
    has_prefix = any(n.startswith("prefix") for n in pair)
    has_virtual = any(not n.startswith("prefix") for n in pair)
    return has_prefix and (has_virtual or pad == "left")

# rows: (adapter slot, prompt); slot 0/1 = the pair's adapters, None = base model
ROWS = [
    (0, [5, 17, 42, 99, 7, 64, 23]),
    (1, [88, 12, 5]),
    (None, [31, 77, 120, 9, 54]),
    (0, [61, 62, 63, 64, 65, 66]),
    (1, [100, 4]),
]  # not a palindrome of adapters, so a reversed row order cannot pass


def build(family: str, pair: tuple[str, str]) -> softprompt.PeftModel:
    torch.manual_seed(11)
    model = softprompt.get_peft_model(make_base(family), ADAPTERS[pair[0]](), adapter_name=pair[0])
    model.add_adapter(pair[1], ADAPTERS[pair[1]]())
    model.add_adapter(UNUSED, softprompt.PromptTuningConfig(num_virtual_tokens=2))
    return model


def batch_for(pair, pad: str) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    n = max(len(p) for _, p in ROWS)
    ids, mask = [], []
    for _, p in ROWS:
        fill = [PAD] * (n - len(p))
        ids.append(fill + p if pad == "left" else p + fill)
        real = [1] * len(p)
        mask.append([0] * len(fill) + real if pad == "left" else real + [0] * len(fill))
    names = [None if slot is None else pair[slot] for slot, _ in ROWS]
    return torch.tensor(ids), torch.tensor(mask), names


def text_logits_by_row(logits: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's logits at its real text tokens, in order: column V + t holds text token t."""
    V = logits.shape[1] - mask.shape[1]
    return [logits[i, V:][mask[i].bool()] for i in range(mask.shape[0])]


def solo_logits(model, name: str | None, prompt: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt])
    return model(input_ids=ids, adapter_names=[name]).logits[0, -len(prompt) :]


@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_mixed_forward_rows_equal_solo_runs(family, pair, pad, request):
    xfail_if_prefix_gap(request, family, prefix_row_has_gap(pair, pad))
    model = build(family, pair).eval()
    ids, mask, names = batch_for(pair, pad)
    with torch.no_grad():
        rows = text_logits_by_row(model(input_ids=ids, attention_mask=mask, adapter_names=names).logits, mask)
        for i, (name, (_, prompt)) in enumerate(zip(names, ROWS)):
            torch.testing.assert_close(rows[i], solo_logits(model, name, prompt), atol=1e-5, rtol=0, msg=lambda m: f"row {i} ({name}): {m}")
        # and the adapters do differ from each other and from the base (guards against a trivial pass)
        a, b = (solo_logits(model, n, ROWS[0][1]) for n in pair)
        assert (a - b).abs().max() > 1e-3
        assert (a - solo_logits(model, None, ROWS[0][1])).abs().max() > 1e-3


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_mixed_generate_rows_equal_solo_generation(family, pair, request):
    xfail_if_prefix_gap(request, family, prefix_row_has_gap(pair, "left"))
    model = build(family, pair).eval()
    ids, mask, names = batch_for(pair, "left")
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=6, eos_token_id=None)
    for i, (name, (_, prompt)) in enumerate(zip(names, ROWS)):
        alone = model.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], max_new_tokens=6, eos_token_id=None)
        assert out[i, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist(), f"row {i} ({name})"


def _sum_loss(row_logits: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    """Next-token cross-entropy over one row's text, summed (not averaged)."""
    return F.cross_entropy(row_logits[:-1], torch.tensor(prompt[1:]), reduction="sum")


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_mixed_training_step_gradients_are_the_sum_of_solo_gradients(family, pair, request):
    xfail_if_prefix_gap(request, family, prefix_row_has_gap(pair, "right"))
    model = build(family, pair).train()
    ids, mask, names = batch_for(pair, "right")
    rows = text_logits_by_row(model(input_ids=ids, attention_mask=mask, adapter_names=names).logits, mask)
    sum(_sum_loss(r, p) for r, (_, p) in zip(rows, ROWS)).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    assert mixed and all(n.startswith("prompt_encoder.") for n in mixed)  # the base model stays frozen
    used = {f"prompt_encoder.{name}." for name in pair}
    assert {n for n in mixed if not any(n.startswith(u) for u in used)} == set()  # UNUSED gets nothing
    assert {n for n, p in model.named_parameters() if p.requires_grad and any(n.startswith(u) for u in used)} == set(mixed)

    expected: dict[str, torch.Tensor] = {}
    for name, (_, prompt) in zip(names, ROWS):
        if name is None:
            continue
        _sum_loss(solo_logits(model, name, prompt), prompt).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, 0) + p.grad
        model.zero_grad(set_to_none=True)
    assert set(expected) == set(mixed)
    for n in mixed:
        assert mixed[n].abs().sum() > 0, n
        torch.testing.assert_close(mixed[n], expected[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")

    # and the step itself runs, twice
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=ids, attention_mask=mask, adapter_names=names, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_adapter_names_validation():
    model = build("llama", ("prompt4", "prefix5"))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="nope"):
        model(input_ids=ids, adapter_names=["prompt4", "nope"])
    with pytest.raises(ValueError, match="2 rows"):
        model(input_ids=ids, adapter_names=["prompt4"])
