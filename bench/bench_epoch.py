"""One epoch of the seed's 52k Chinese Alpaca rows on the GPU: softprompt vs peft, both through `Trainer`.

The protocol of the training-speed issue: random-weight models shaped like `Langboat/bloom-1b4-zh` and like
a Qwen2/Llama of the same size (both with the SmolLM2 tokenizer, vocabulary 49,152), the real rows of
`alpaca_chinese_52k.jsonl.gz` under the seed's template (max_length 256), real (non-pad, non-virtual)
tokens counted on the GPU from the batches the model was fed. softprompt runs as `softprompt train` runs it
(`build_trainer(TrainConfig.load(yaml, overrides))` then `trainer.train()`); peft through a plain `Trainer`
with the seed's collator. MFU counts `2*(2*P*L + 2*n_layer*L*L*hidden)` FLOPs for a row of L real tokens,
`P = n_layer*12*hidden^2 + vocab*hidden`, over 790 TFLOP/s (the H200's measured bf16 rate).

    python bench/bench_epoch.py --data .bench/alpaca_chinese_52k.jsonl.gz --tokenizer .bench/smollm2-tokenizer
        [--runs seed,best,peft-seed,peft-best] [--shapes bloom-1b4-zh,qwen2-1b4] [--steps 60]

Writes $OUT/bench_epoch.json (or ./bench_epoch.json; `--out` names another file); prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, Qwen2Config, TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from softprompt.train.config import TrainConfig  # noqa: E402
from softprompt.train.trainer import build_trainer  # noqa: E402

ROWS = 52002
PEAK = 790e12
SHAPES = {
    "bloom-1b4-zh": lambda: BloomConfig(vocab_size=49152, hidden_size=2048, n_layer=24, n_head=16),
    "qwen2-1b4": lambda: Qwen2Config(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                                     tie_word_embeddings=False),
    # a CPU smoke test of this script: python bench/bench_epoch.py ... --shapes tiny --steps 2 --warm 1
    "tiny": lambda: LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
}
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()
METHODS = {  # the seed's three scripts, and the variants of the table
    "prompt_tuning": dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="下面是一段人与机器人的对话。"),
    "p_tuning": dict(num_virtual_tokens=10, encoder_hidden_size=1024),
    "prefix_tuning": dict(num_virtual_tokens=10, prefix_projection=True),
}


def flops(L: torch.Tensor, cfg) -> float:
    """Sum over rows of L real tokens (a tensor of lengths) of 2*(2*P*L + 2*n_layer*L^2*hidden)."""
    h, n, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    P = n * 12 * h * h + v * h
    L = L.double()
    return float((2 * (2 * P * L + 2 * n * L * L * h)).sum())


class Meter(TrainerCallback):
    """Times steps warm..end (GPU synchronised at both ends); counts the rows and real tokens fed meanwhile.

    The clock stops at the end of the last step, before Trainer's end of training: softprompt's callbacks then
    draw the loss curve (`LossPlotCallback`), and the first matplotlib import of a process took ~1 s (0.9 s on
    the CPU machine, 0.13 s for a later plot). Runs 1-13 stopped it at `on_train_end`, which charged that to the
    timed steps of softprompt's rows only, the most to a process's first run."""

    def __init__(self, warm: int):
        self.warm, self.on, self.t0, self.t1 = warm, False, None, None
        self.lengths: list[torch.Tensor] = []

    def hook(self, module, args, kwargs):
        if not self.on:
            return
        packing = kwargs.get("packing")
        if packing is not None:  # real tokens of each segment: text slots (not virtual, not padding)
            seg, text = packing["segment_ids"], (packing["segment_ids"] > 0) & (packing["virtual_slot"] < 0)
            counts = torch.zeros(seg.shape[0], seg.shape[1] + 1, device=seg.device, dtype=torch.long)
            counts.scatter_add_(1, seg, text.long())
            self.lengths.append(counts[:, 1:].reshape(-1))  # zeros dropped at the end: no host sync per step
        else:
            self.lengths.append(kwargs["attention_mask"].sum(dim=1))

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warm and self.t0 is None:
            sync()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            self.t0, self.on, self.compiles0 = time.perf_counter(), True, compiles()
            self.mid_step = self.warm + (state.max_steps - self.warm) // 2
        if self.on and state.global_step == self.mid_step:  # one sync halfway: is the second half faster?
            sync()
            self.t_mid, self.compiles_mid = time.perf_counter(), compiles()

    def on_step_end(self, args, state, control, **kwargs):
        if self.on and state.global_step >= state.max_steps:
            self._stop(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.on:  # stopped before max_steps
            self._stop(state)

    def _stop(self, state) -> None:
        sync()
        self.t1, self.on = time.perf_counter(), False
        self.steps, self.compiles1 = state.global_step - self.warm, compiles()


def compiles() -> int:
    """Frames dynamo has compiled so far in this process (recompilations included)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def measure(trainer, model, cfg, warm: int) -> dict:
    meter = Meter(warm)
    handle = model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    trainer.add_callback(meter)
    try:
        trainer.train()
    finally:
        handle.remove()
    dt = meter.t1 - meter.t0
    lengths = torch.cat(meter.lengths).cpu()
    lengths = lengths[lengths > 0]
    rows, tokens = len(lengths), int(lengths.sum())
    row = {"steps_timed": meter.steps, "s_per_step": round(dt / meter.steps, 4), "rows": rows,
           "real_tok_s": round(tokens / dt), "mfu": round(flops(lengths, cfg) / dt / PEAK, 4),
           "epoch_min": round(ROWS / (rows / dt) / 60, 2), "train_wall_s": round(meter.t1 - meter.start, 1),
           # compiles inside the timed steps (a recompile there is warm-up the timing caught), and the second
           # half's seconds a step (steady state, if the first half paid for compiling)
           "compiles_timed": meter.compiles1 - meter.compiles0}
    if getattr(meter, "t_mid", None) is not None and meter.steps > 1:
        row["s_per_step_2nd_half"] = round((meter.t1 - meter.t_mid) / (meter.warm + meter.steps - meter.mid_step), 4)
        row["compiles_2nd_half"] = meter.compiles1 - meter.compiles_mid
    if CUDA:  # a CUDA graph's working memory is reserved in its pool, not allocated: report both
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    graphs = getattr(model, "packed_graphs", None)
    if graphs is not None:  # micro-batches that ran from a graph, and the shapes recorded
        row["graph_replays"], row["graph_shapes"] = graphs.replays, len(graphs.graphs)
    return row


def check_graphs(method: str, folder: Path, data: str, work: Path, batches: int, yaml: str | None, batch: int) -> dict:
    """Gradients of the trainable weights on `batches` real batches (each a step's packed micro-batches, their
    shapes as they come), with CUDA graphs and without, on one model: the graphs record on the first pass and
    replay on the second; the batches run again in another order, so that shapes alternate in the shared pool.
    The eager pass twice gives the noise floor (atomics in the backward are not deterministic)."""
    from softprompt.core.packed_graphs import PackedGraphs
    from softprompt.train.trainer import _to_device

    keys = {} if yaml else dict(per_device_train_batch_size=batch, gradient_accumulation_steps=1)
    trainer, model = softprompt_run(yaml, method, folder, data, work / f"check-{method}", 1, **keys)
    model.train()
    loader = iter(trainer.get_train_dataloader())
    inputs = [next(loader) for _ in range(batches)]

    def grads(i):
        model.zero_grad(set_to_none=True)
        with trainer.compute_loss_context_manager():
            loss = sum(trainer.compute_loss(model, {**inputs[i], "packs": [_to_device(p, trainer.args.device)]})
                       for p in inputs[i]["packs"])
        loss.backward()
        return float(loss), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])

    graphs = model.packed_graphs = PackedGraphs(model.base_model)
    order = list(range(batches)) + list(reversed(range(batches)))
    graphed = [grads(i) for i in order]
    model.packed_graphs = None
    eager = [grads(i) for i in range(batches)]
    again = [grads(i) for i in range(batches)]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    return {"batches": batches, "graph_shapes": len(graphs.graphs), "graph_replays": graphs.replays,
            "micro_batches": [len(x["packs"]) for x in inputs],
            "loss_eager": [round(e[0], 5) for e in eager], "loss_graphs": [round(g[0], 5) for g in graphed],
            "grad_rel_diff_graphs": max(rel(graphed[k][1], eager[i][1]) for k, i in enumerate(order)),
            "grad_rel_diff_eager_twice": max(rel(again[i][1], eager[i][1]) for i in range(batches))}


def make_model_folder(shape: str, tokenizer: str, root: Path) -> Path:
    folder = root / shape
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=torch.bfloat16 if CUDA else torch.float32)
    model.save_pretrained(folder)
    for f in Path(tokenizer).iterdir():
        shutil.copy(f, folder / f.name)
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return folder


def softprompt_run(yaml: str | None, method: str, model: Path, data: str, out: Path, steps: int, **keys):
    overrides = dict(model=str(model), data=data, output_dir=str(out), max_steps=steps, save_strategy="no",
                     val_size=0, logging_steps=1000, report_to="none", disable_tqdm=True, seed=0)
    overrides.update(keys)
    if yaml is None:
        overrides.update(method=method, **METHODS[method])
    config = TrainConfig.load(REPO / "examples" / yaml if yaml else None, overrides)
    trainer, _, _ = build_trainer(config)
    return trainer, trainer.model


def peft_run(method: str, model_dir: Path, data: str, out: Path, steps: int, dtype, bs: int, ga: int, **args):
    import peft
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from softprompt.data.rows import ColumnMap
    from softprompt.data.token_cache import tokenized_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = tokenized_rows(data, ColumnMap(), tokenizer, 256, "alpaca")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if CUDA else "cpu")
    T = peft.TaskType.CAUSAL_LM
    keys = dict(METHODS[method])
    if method == "prompt_tuning":
        keys = dict(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=keys["prompt_tuning_init_text"],
                    num_virtual_tokens=len(tokenizer(keys["prompt_tuning_init_text"])["input_ids"]),
                    tokenizer_name_or_path=str(model_dir))
    cls = {"prompt_tuning": peft.PromptTuningConfig, "p_tuning": peft.PromptEncoderConfig,
           "prefix_tuning": peft.PrefixTuningConfig}[method]
    model = peft.get_peft_model(base, cls(task_type=T, **keys))
    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                              max_steps=steps, save_strategy="no", logging_steps=1000, report_to="none",
                              disable_tqdm=True, seed=0, learning_rate=1e-3, **args)
    trainer = Trainer(model=model, args=targs, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    return trainer, model


def each_softprompt_run(plan: list, key: str, choice: str, values: tuple) -> list:
    """`plan` with each softprompt run under `key`'s values: `choice` "true" leaves it as it is, "false" takes the
    second value, "both" runs both in turn; peft's runs stay as they are."""
    if choice == "true":
        return plan
    chosen = values if choice == "both" else values[1:]
    out = []
    for shape, method, lib, setting, extra in plan:
        out += ([(shape, method, lib, setting, {**extra, key: value}) for value in chosen] if lib == "softprompt"
                else [(shape, method, lib, setting, extra)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--runs", default="seed,best,peft-seed,peft-best")
    ap.add_argument("--shapes", default="bloom-1b4-zh,qwen2-1b4")
    ap.add_argument("--methods", default="prompt_tuning,p_tuning,prefix_tuning")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batches", default="32", help="batch sizes of the best-settings runs, e.g. 32,64")
    ap.add_argument("--warm", type=int, default=20, help="untimed steps first (compiling happens there)")
    ap.add_argument("--models", default="/tmp/bench-models")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of softprompt's layers, e.g. reduce-overhead")
    ap.add_argument("--compile-dynamic", default="rule", choices=["rule", "true", "auto"],
                    help="how softprompt's layers compile: 'rule' as softprompt trains (compile_layers' default: "
                         "'auto' except for BLOOM); 'true' every size symbolic (compile_layers(dynamic=True)); "
                         "'auto' dynamo's automatic dynamic with symbolic module integers (dynamic=None)")
    ap.add_argument("--cudnn-sdp", default="true", choices=["true", "false", "both"],
                    help="softprompt's runs with cuDNN's attention kernels allowed, without them, or both in turn "
                         "(its per-shape set-up cost the host 0.8-0.9 ms a call in run 12's profile of bloom "
                         "prefix tuning); peft's runs keep torch's default")
    ap.add_argument("--no-cudnn-sdp", action="store_true", help="the same as --cudnn-sdp false")
    ap.add_argument("--graphs", default="true", choices=["true", "false", "both"],
                    help="softprompt's cuda_graphs: each softprompt run with graphs, without, or both")
    ap.add_argument("--out", default=None, help="the results file (default: $OUT/bench_epoch.json)")
    ap.add_argument("--check-graphs", type=int, default=0, metavar="BATCHES",
                    help="instead of timing: gradients on BATCHES batches with graphs and without, compared")
    args = ap.parse_args()
    if args.compile_mode or args.compile_dynamic != "rule":  # experiments: every softprompt run below compiles so
        import functools

        import softprompt.train.trainer as sp_trainer
        dynamic = {"rule": "auto", "true": True, "auto": None}[args.compile_dynamic]
        sp_trainer.compile_layers = functools.partial(sp_trainer.compile_layers, mode=args.compile_mode,
                                                      dynamic=dynamic)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.no_cudnn_sdp:
        args.cudnn_sdp = "false"
    cudnn_default = torch.backends.cuda.cudnn_sdp_enabled()
    out_file = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "bench_epoch.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/bench-epoch")
    results = []
    runs = args.runs.split(",")
    methods = args.methods.split(",")
    plan = []
    for shape in args.shapes.split(","):
        if "seed" in runs and shape == "bloom-1b4-zh":  # the seed's recipe as shipped: only paths given
            plan += [(shape, m, "softprompt", "seed", {}) for m in methods]
        if "peft-seed" in runs and shape == "bloom-1b4-zh":
            plan.append((shape, "prompt_tuning", "peft", "seed", {}))
        for batch in map(int, args.batches.split(",")):
            for m in methods:
                if "best" in runs:
                    plan.append((shape, m, "softprompt", f"bs{batch}", {}))
                if "padded" in runs:
                    plan.append((shape, m, "softprompt", f"bs{batch}-padded", {"packing": False}))
                if "peft-best" in runs:
                    plan.append((shape, m, "peft", f"bs{batch}", {}))
    if args.check_graphs:
        for shape in args.shapes.split(","):
            folder = make_model_folder(shape, args.tokenizer, Path(args.models))
            for method in methods:
                settings = ([(f"{method}.yaml", 1)] if "seed" in runs else []) + (
                    [(None, int(args.batches.split(",")[0]))] if "best" in runs else [])
                for yaml, batch in settings:  # --runs seed / best choose the settings checked
                    row = {"shape": shape, "method": method, "check": "graphs",
                           "setting": "seed" if yaml else f"bs{batch}"}
                    try:
                        row.update(check_graphs(method, folder, args.data, work, args.check_graphs, yaml, batch))
                    except Exception:
                        row["error"] = traceback.format_exc()[-1500:]
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    out_file.write_text(json.dumps({"rows": results}, indent=1))
        plan = []
    # softprompt's runs with the switch off, or on and then off, in one process (peft's runs as they are)
    plan = each_softprompt_run(plan, "cuda_graphs", args.graphs, ("true", "false"))
    plan = each_softprompt_run(plan, "cudnn_sdp", args.cudnn_sdp, (True, False))
    cudnn_now = cudnn_default
    for shape, method, lib, setting, extra in plan:
        row = {"shape": shape, "method": method, "lib": lib, "setting": setting, **extra}
        extra = dict(extra)
        cudnn = extra.pop("cudnn_sdp", None)
        cudnn = cudnn_default if cudnn is None else cudnn
        if cudnn != cudnn_now:  # compiled graphs keep the kernel chosen when they were traced: trace again
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            torch._dynamo.reset()
            cudnn_now = cudnn
        row["cudnn_sdp"] = cudnn
        trainer = model = None
        try:
            folder = make_model_folder(shape, args.tokenizer, Path(args.models))
            cfg = SHAPES[shape]()
            out = work / f"{shape}-{method}-{lib}-{setting}"
            t = time.perf_counter()
            batch = int(setting.split("-")[0][2:]) if setting.startswith("bs") else 1
            warm = args.warm
            if lib == "softprompt" and setting == "seed":
                steps, warm = warm + 3 * args.steps, warm + 10
                trainer, model = softprompt_run(f"{method}.yaml", method, folder, args.data, out, steps, **extra)
            elif lib == "softprompt":
                steps = warm + args.steps
                bs_keys = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=1, **extra)
                trainer, model = softprompt_run(None, method, folder, args.data, out, steps, **bs_keys)
            elif setting == "seed":
                steps, warm = 30, 5
                trainer, model = peft_run(method, folder, args.data, out, steps, torch.float32, 1, 8)
            else:
                steps, warm = 10 + args.steps, 10
                trainer, model = peft_run(method, folder, args.data, out, steps, torch.bfloat16, batch, 1,
                                          bf16=True, train_sampling_strategy="group_by_length",
                                          dataloader_num_workers=4)
            row["setup_s"] = round(time.perf_counter() - t, 1)
            row.update(measure(trainer, model, cfg, warm))
        except Exception:
            row["error"] = traceback.format_exc()[-1500:]
        results.append(row)
        print(json.dumps(row), flush=True)
        out_file.write_text(json.dumps({"rows": results}, indent=1))  # kept if cut short
        del trainer, model
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    meta = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "cudnn_sdp": args.cudnn_sdp, "compile_dynamic": args.compile_dynamic}
    try:
        meta["peft"] = __import__("peft").__version__
    except ImportError:
        pass
    out_file.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
