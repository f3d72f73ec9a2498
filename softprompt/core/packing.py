"""Packing: rows laid end to end in a few long rows, each row with its own prompt, no padding between.

A padded batch of Alpaca rows (mean 157 tokens, cap 256) is about 40% padding, and the seed's recipe (one row
per forward, eight forwards per optimizer step) leaves the GPU idle most of the time. A packed micro-batch is

    row 0: [v v v | text of row a ...][v v v | text of row b ...][pads]
    row 1: [v v v | text of row c .............][v v v | text d][pads]

where `v` are the virtual tokens of each row's own adapter (prompt tuning, P-tuning) and every segment
restarts its positions. A prefix-tuning segment has no `v`: it sees its adapter's key/value prefix through
the attention mask, and its positions start after the prefix, as the row alone. The mask lets a token see
only earlier tokens of its own segment (and its adapter's prefix), so each segment computes exactly what
the row computes alone; `packed_forward` (what `PeftModel.forward(packing=...)` runs) builds that mask and
gathers the prompts.

The collator runs on the CPU in the data loader (no host-device sync in the step): the layout, the
positions, and the flat indices and targets of the positions that carry a loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.core.packed_graphs import no_autocast_cache
from softprompt.hf.backbone import check_packable, head_loss, packed_stack
from softprompt.hf.cache import reentrant_checkpointing, route_prefix_grad

IGNORE_INDEX = -100
TASK_FIELD = "adapter_names"  # a row's adapter (multi-task data); rows without it use the default adapter


@dataclass(frozen=True)
class PromptWidths:
    """How many slots each adapter's prompt takes: virtual tokens in the input, or key/value prefix slots."""

    virtual: Mapping[str | None, int]
    prefix: Mapping[str | None, int]
    default: str | None = None  # the adapter of rows that name none

    @classmethod
    def of(cls, model) -> "PromptWidths":
        """The widths of every adapter in `model` (a `PeftModel`)."""
        virtual: dict[str | None, int] = {None: 0}
        prefix: dict[str | None, int] = {None: 0}
        for name, adapter in model.prompt_encoder.items():
            n = adapter.num_virtual_tokens
            virtual[name] = n if adapter.placement == "input" else 0
            prefix[name] = n if adapter.placement == "prefix" else 0
        return cls(virtual, prefix, model.active_adapter)


@dataclass(frozen=True)
class PackingCollator:
    """Packs a list of tokenized rows into micro-batches for `PeftModel.forward(packing=...)`.

    Returns `{"packs": [micro-batch, ...], "num_items": label tokens in all of them}`. Each micro-batch
    holds at most `token_budget` slots (rows x length); a row is at most `row_length` slots long (longer
    segments get a row of their own). All of a call's rows are packed together, so given one optimizer
    step's rows it turns `batch 1 x accumulation 8` into one forward.
    """

    widths: PromptWidths
    row_length: int = 512
    token_budget: int = 16384
    pad_multiple: int = 8  # of the key length (prefix slots + row length)
    pad_token_id: int = 0
    # Few distinct shapes: every micro-batch as long as `row_length`, and the loss positions padded to a
    # multiple of 64. On a GPU each new matrix shape costs milliseconds of host time (cuBLAS picks its
    # kernel), more than the padding costs the device.
    fixed_shapes: bool = False
    # The cost of attention per (slot x slot) of a packed row, against the cost of one slot in the rest of the
    # model: about 1 / (6 x hidden size) (a layer's matrices cost ~24 x hidden^2 a slot, its attention ~4 x hidden
    # a slot pair). When set, and shapes are free, rows may be longer than `row_length` where that costs less:
    # short rows half `row_length` long leave a third of each packed row as padding (`make demo`: 329 slots a step
    # for 263 text and virtual ones; one row of them: 267).
    attention_cost: float = 0.0

    def __post_init__(self) -> None:
        for name in ("row_length", "token_budget", "pad_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid; it must be a positive integer")
        if isinstance(self.attention_cost, bool) or not isinstance(self.attention_cost, (int, float)) \
                or not self.attention_cost >= 0:
            raise ValueError(f"attention_cost={self.attention_cost!r} is not valid; it must be a number >= 0")

    @classmethod
    def for_model(cls, model, tokenizer, longest_row: int, token_budget: int = 16384) -> "PackingCollator":
        """The collator for `model`'s adapters: checked that the base can run packed rows, rows long enough for
        a row of `longest_row` tokens plus the longest prompt, padding with the tokenizer's pad id."""
        widths = PromptWidths.of(model)
        check_packable(model.base_model, longest_row + max(widths.virtual.values()) + max(widths.prefix.values()))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(widths, row_length=longest_row + max(widths.virtual.values()), token_budget=token_budget,
                   pad_token_id=pad, attention_cost=1 / (6 * model.shape.hidden_size))

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot pack an empty list of rows")
        segments = []  # (input_ids, labels, adapter name)
        for i, feature in enumerate(features):
            ids = list(feature["input_ids"])
            labels = list(feature["labels"]) if feature.get("labels") is not None else list(ids)
            if len(labels) != len(ids):
                raise ValueError(f"row {i}: {len(ids)} input_ids but {len(labels)} labels; they must be equal")
            name = feature.get(TASK_FIELD, self.widths.default)
            if name not in self.widths.virtual:
                known = ", ".join(sorted(str(n) for n in self.widths.virtual if n is not None))
                raise ValueError(f"row {i} is for adapter {name!r}, which the model does not have; adapters: {known}")
            segments.append((ids, labels, name))
        micro_batches = self._plan(self._sizes(segments))
        packs = [self._tensors(mb, segments) for mb in micro_batches]
        num_items = sum(p.pop("num_targets") for p in packs)
        num_tokens = sum(len(ids) for ids, _, _ in segments)  # text tokens, for tokens/s without a device sync
        return {"packs": packs, "num_items": num_items, "num_tokens": num_tokens}

    def _plan(self, sizes: list[int]) -> list[list[list[int]]]:
        """`plan` at `row_length`; with free shapes and an `attention_cost`, also at 2x, 4x, ... that length (up to
        the token budget, or one row for all), keeping the plan of least estimated cost: for each micro-batch of R
        rows T slots long, R x T x (1 + attention_cost x T)."""
        if self.fixed_shapes:
            return plan(sizes, self.row_length, self.token_budget, self.pad_multiple, min_width=self.row_length)
        best = plan(sizes, self.row_length, self.token_budget, self.pad_multiple)
        if not self.attention_cost:
            return best
        best_cost, length, total = self._cost(best, sizes), 2 * self.row_length, sum(sizes)
        while length <= self.token_budget and length < 2 * total:  # past the total, every length plans alike
            candidate = plan(sizes, length, self.token_budget, self.pad_multiple)
            cost = self._cost(candidate, sizes)
            if cost < best_cost:
                best, best_cost = candidate, cost
            length *= 2
        return best

    def _cost(self, micro_batches: list[list[list[int]]], sizes: list[int]) -> float:
        cost = 0.0
        for rows in micro_batches:
            T = _round_up(max(sum(sizes[i] for i in row) for row in rows), self.pad_multiple)
            cost += len(rows) * T * (1 + self.attention_cost * T)
        return cost

    def _sizes(self, segments) -> list[int]:
        return [self.widths.virtual[name] + len(ids) for ids, _, name in segments]

    def _tensors(self, rows: list[list[int]], segments) -> dict[str, Any]:
        """One micro-batch: `rows` lists, per packed row, the indices of its segments."""
        names = list(dict.fromkeys(segments[i][2] for row in rows for i in row))  # adapters, first-seen order
        virtual_offset, prefix_offset, owner, prefix_pos = {}, {}, [], []
        v_total = 0
        for u, name in enumerate(names):
            virtual_offset[name] = v_total
            v_total += self.widths.virtual[name]
            p = self.widths.prefix[name]
            prefix_offset[name] = len(owner)
            owner += [u] * p
            prefix_pos += list(range(p))
        sizes = [sum(self.widths.virtual[segments[i][2]] + len(segments[i][0]) for i in row) for row in rows]
        # keys are the K prefix slots then the T slots: K + T a multiple of pad_multiple keeps the attention
        # kernels on their aligned paths (an odd key length sends SDPA to a slower, larger one)
        K = len(owner)
        longest = max(sizes) if not self.fixed_shapes else max(*sizes, self.row_length)
        T = _round_up(longest + K, self.pad_multiple) - K
        R = len(rows)
        input_ids = torch.full((R, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.zeros(R, T, dtype=torch.long)
        position_ids = torch.zeros(R, T, dtype=torch.long)
        virtual_slot = torch.full((R, T), -1, dtype=torch.long)
        token_adapter = torch.full((R, T), -1, dtype=torch.long)
        targets = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for k, i in enumerate(row):
                ids, row_labels, name = segments[i]
                V, P, L = self.widths.virtual[name], self.widths.prefix[name], len(ids)
                end = start + V + L
                segment_ids[r, start:end] = k + 1
                token_adapter[r, start:end] = names.index(name)
                position_ids[r, start:end] = torch.arange(P, P + V + L)
                if V:
                    virtual_slot[r, start:start + V] = torch.arange(virtual_offset[name], virtual_offset[name] + V)
                input_ids[r, start + V:end] = torch.tensor(ids, dtype=torch.long)
                seg_labels = torch.tensor(row_labels, dtype=torch.long)
                labels[r, start + V:end] = seg_labels
                # The logits at slot t predict slot t + 1 of the same segment: the last virtual token
                # predicts the first text token, the last text token predicts nothing.
                targets[r, start + V - 1 if V else start:end - 1] = seg_labels[0 if V else 1:]
                start = end
        # the most slots a segment spans, its prefix included: a model with sliding-window layers checks it
        segment_reach = max(self.widths.prefix[segments[i][2]] + self.widths.virtual[segments[i][2]]
                            + len(segments[i][0]) for row in rows for i in row)
        flat = targets.view(-1)
        loss_index = (flat != IGNORE_INDEX).nonzero().view(-1)
        num_targets = int(loss_index.numel())
        if self.fixed_shapes:  # extra positions with an ignored target: they add nothing to the loss
            loss_index = torch.cat([loss_index, loss_index.new_zeros(_round_up(num_targets, 64) - num_targets)])
        loss_targets = flat[loss_index]
        loss_targets[num_targets:] = IGNORE_INDEX
        virtual_index = (virtual_slot.view(-1) >= 0).nonzero().view(-1)
        tensors = _one_storage({
            "segment_ids": segment_ids,  # (R, T): 1, 2, ... per segment of a row; 0 is padding
            "position_ids": position_ids,  # (R, T): restart per segment, after the segment's prefix
            "virtual_slot": virtual_slot,  # (R, T): row of the stacked virtual tokens, -1 for text
            "token_adapter": token_adapter,  # (R, T): index into adapter_names, -1 for padding
            "prefix_owner": torch.tensor(owner, dtype=torch.long),  # (K,): adapter of each prefix slot
            "prefix_positions": torch.tensor(prefix_pos, dtype=torch.long),  # (K,)
            "virtual_index": virtual_index,  # (M,): flat slots of virtual tokens ...
            "virtual_rows": virtual_slot.view(-1)[virtual_index],  # (M,): ... and their rows of the prompts
            "loss_index": loss_index,  # (N,): flat slots whose logits carry a loss
            "loss_targets": loss_targets,  # (N,): IGNORE_INDEX for padding
            "input_ids": input_ids,
            "labels": labels,
        })
        return {
            "input_ids": tensors.pop("input_ids"),
            "labels": tensors.pop("labels"),
            "adapter_names": names,
            "packing": {**tensors, "longest": segment_reach},  # longest: an int, checked without the device
            "num_targets": num_targets,
        }


def _one_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors (all int64), as views of one storage. A loader worker hands each storage to the training
    process through its own file descriptor and socket handshake; twelve a micro-batch cost the trainer's process
    ~3x the time of one (`bench/loader_transfer.py`)."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    views, start = {}, 0
    for name, t in tensors.items():
        views[name] = flat[start:start + t.numel()].view(t.shape)
        start += t.numel()
    return views


def plan(sizes: Sequence[int], row_length: int, token_budget: int, pad_multiple: int = 8,
         min_width: int = 0) -> list[list[list[int]]]:
    """Segment indices grouped into rows (first fit, longest first) and rows into micro-batches.

    A row holds segments totalling at most `row_length` slots (a longer segment gets a row alone). Rows go
    into micro-batches while rows x (longest row or `min_width`, rounded up to `pad_multiple`) stays within
    `token_budget`.
    Deterministic for given sizes, so a resumed run packs as the first one did.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if sizes[i] <= free:
                rows[r].append(i)
                room[r] -= sizes[i]
                break
        else:
            rows.append([i])
            room.append(max(row_length, sizes[i]) - sizes[i])
    filled = sorted(range(len(rows)), key=lambda r: (room[r], r))  # fullest rows first
    micro: list[list[list[int]]] = []
    width = 0
    for r in filled:
        size = max(sum(sizes[i] for i in rows[r]), min_width)
        new_width = max(width, _round_up(size, pad_multiple))
        if micro and (len(micro[-1]) + 1) * new_width <= token_budget:
            micro[-1].append(rows[r])
            width = new_width
        else:
            micro.append([rows[r]])
            width = _round_up(size, pad_multiple)
    return micro


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# -- the packed forward ---------------------------------------------------------------------------
def packed_forward(model, input_ids, inputs_embeds, packing: dict, adapter_names, kwargs: dict) -> CausalLMOutputWithPast:
    """`PeftModel.forward(packing=...)`: one forward over packed rows (the collator's batch); no host-device sync."""
    if isinstance(adapter_names, str) or adapter_names is None:
        adapter_names = [adapter_names if adapter_names is not None else model.active_adapter]
    owned = inputs_embeds is None  # embedded here: written in place below
    if owned:
        inputs_embeds = model.get_input_embeddings()(input_ids)  # (R, T, D)
    dtype = inputs_embeds.dtype
    names = list(adapter_names)
    for n in names:
        if n is not None:
            model._check_adapter(n)
    adapters = [model.prompt_encoder[n] if n is not None else None for n in names]
    virtual = [a.input_embeddings() for a in adapters if a is not None and a.placement == "input"]
    if virtual:  # each segment's virtual slots take rows of the adapters' prompts, stacked in `names` order
        table = torch.cat(virtual).to(dtype)  # (sum V, D)
        # Written at their slots by index: gathering a (R, T) index from the table would make the backward an
        # accumulating scatter of every slot (milliseconds), where this one touches the virtual slots only.
        # In place, through a flat view of a tensor of our own: the result is no view, and the first layer gets
        # what every other layer gets (torch.compile traces a layer again for an input that is a view).
        R, T, D = inputs_embeds.shape
        if not owned or inputs_embeds.requires_grad:
            inputs_embeds = inputs_embeds.clone()
        inputs_embeds.view(R * T, D).index_copy_(
            0, packing["virtual_index"], table.index_select(0, packing["virtual_rows"]))
    key_values = None
    kvs = [a.key_values() for a in adapters if a is not None and a.placement == "prefix"]
    if kvs:
        key_values = torch.cat(kvs, dim=3).to(dtype)  # (layers, 2, kv_heads, K, head_dim)
        if key_values.requires_grad and reentrant_checkpointing(model.base_model):
            key_values, inputs_embeds = route_prefix_grad(key_values, inputs_embeds)
    check_packable(model.base_model, packing.get("longest"))
    stack_inputs = (inputs_embeds, packing["segment_ids"], packing["position_ids"], packing["token_adapter"],
                    packing["prefix_owner"], packing["prefix_positions"])
    graphs = model.packed_graphs
    with no_autocast_cache(inputs_embeds.device.type):  # graphed or not, one state: layers compile once
        hidden = graphs(*stack_inputs, key_values=key_values) if graphs is not None else None
        if hidden is None:  # no graphs, or none for this micro-batch
            hidden = packed_stack(model.base_model, *stack_inputs, key_values=key_values)
    index, targets = packing["loss_index"], packing["loss_targets"]
    loss, logits = head_loss(model.base_model, hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), targets)
    num_items = kwargs.get("num_items_in_batch")
    if num_items is None:  # counted on the device: loss_targets may end in ignored padding
        num_items = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return CausalLMOutputWithPast(loss=loss / num_items, logits=logits)
