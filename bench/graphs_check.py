"""GPU check of CUDA-graph decoding: every answer equals the same request through `PeftModel.generate`.

Small random models of five families in float32 on CUDA (where greedy answers are exact, not bf16-rounded),
mixed adapters of all three methods, 40 requests of different lengths through an engine of 16 slots and a
context of 320 tokens, so that steps run at many batch buckets and at the width buckets 64 to 320.
CPU tests cover the same step replayed eagerly (tests/serve/test_serve_graphs.py); this is the capture itself.

    python bench/graphs_check.py        # CUDA only; writes $OUT/graphs_check.json (or ./graphs_check.json)
"""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import softprompt as sp  # noqa: E402
from softprompt.serve import Engine, SamplingParams  # noqa: E402

COMMON = dict(vocab_size=500, pad_token_id=0, eos_token_id=1, bos_token_id=1)
FAMILIES = {
    "bloom": lambda: transformers.BloomConfig(**COMMON, hidden_size=64, n_layer=2, n_head=4),
    "llama": lambda: transformers.LlamaConfig(**COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": lambda: transformers.GPT2Config(**COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, max_position_embeddings=512),
}
ADAPTERS = {
    "pt": lambda: sp.PromptTuningConfig(num_virtual_tokens=7),
    "mlp": lambda: sp.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=32),
    "prefix": lambda: sp.PrefixTuningConfig(num_virtual_tokens=9),
    "proj": lambda: sp.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32),
}


def check(family: str) -> dict:
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
        model = sp.PeftModel.empty(base).eval()
        for name, make in ADAPTERS.items():
            model.add_adapter(name, make())
            for p in model.prompt_encoder[name].parameters():  # not the zero/identity start: rows must differ
                torch.nn.init.normal_(p, std=0.5)
    model.eval()
    engine = Engine(model, max_num_seqs=16, max_model_len=320, eos_token_ids=[], cuda_graphs=True)
    engine.warm_up()  # as the server starts: the store at full size, the first graph captured
    names = [*ADAPTERS, None]
    g = torch.Generator().manual_seed(1)
    reqs = []
    for i in range(40):
        prompt = torch.randint(3, 500, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        reqs.append((prompt, names[i % len(names)], int(torch.randint(1, 260, (1,), generator=g))))
    seqs = engine.generate([p for p, _, _ in reqs], [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
                                                    for *_, m in reqs], [a for _, a, _ in reqs])
    same = 0
    for (prompt, adapter, max_tokens), seq in zip(reqs, seqs):
        ids = torch.tensor([prompt], device="cuda")
        alone = model.generate(ids, adapter_names=[adapter], max_new_tokens=max_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        same += seq.output_ids == alone
    return {"family": family, "requests": len(reqs), "same_as_generate": same, "graphs_failed": engine.graphs.failed,
            "graphs_captured": sorted(engine.graphs.graphs), "steps": engine.stats["steps"]}


def main() -> None:
    assert torch.cuda.is_available(), "this check needs CUDA"
    rows = []
    for family in FAMILIES:
        row = check(family)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = os.path.join(os.environ.get("OUT", "."), "graphs_check.json")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    ok = all(r["same_as_generate"] == r["requests"] and not r["graphs_failed"] for r in rows)
    print("all equal" if ok else "MISMATCH", flush=True)


if __name__ == "__main__":
    main()
