"""Fine-tuning on a CPU: peak memory and speed of our step beside transformers (and peft), and what adapting a
pretrained model buys over training from scratch.

    python bench/bench_finetune.py speed                  # SmolLM2-135M and Qwen2.5-0.5B shapes, full and LoRA
    python bench/bench_finetune.py speed --shapes smollm2-135m --modes lora
    python bench/bench_finetune.py interleaved --layers 4 # tokens/s only, ours and the peer alternating
    python bench/bench_finetune.py adapt --budget 120     # the toy model on the Python docs vs from scratch

`speed`: models of the real shapes and vocabularies (random weights: the shapes are what costs), built from
transformers configurations written out here (no download). Each (shape, mode, implementation) runs in a fresh
process, ours and the peer's one after the other; peak memory is the process's peak resident memory during the
training steps (Linux's VmHWM, reset after the model is built); the step is forward, backward and a fused AdamW step on the trainable parameters, float32 (what
`amp: auto` chooses on a CPU whose bf16 matmuls are not faster), the same batch of random tokens for both.
LoRA: rank 8, alpha 16, on q, k, v, o, gate, up, down, for us and for peft. Both models released in these shapes
ship bf16 weights, so our LoRA starts from weights bf16 holds exactly and, as training does, keeps the frozen ones in
bf16 and computes in float32; `ours-f32source` starts from float32 weights, which stay float32.

`adapt`: the built-in pretrained toy model (the default pipeline's recipe on the generated stories, trained
for --pretrain seconds) fine-tuned on the Python documentation of bench_quality.py, beside the default recipe
trained from scratch on it, for the same wall-clock budget: held-out bits per byte (documents never seen).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# The Hugging Face configurations of the two models (config.json of HuggingFaceTB/SmolLM2-135M and
# Qwen/Qwen2.5-0.5B), the fields that set the shape.
SHAPES = {
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True},
}  # fmt: skip
LORA = {"rank": 8, "alpha": 16, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLEMENTATIONS = {"full": ["ours", "transformers"], "lora": ["ours", "peft", "ours-f32source"]}


def hf_config(shape: str):
    import transformers

    fields = dict(SHAPES[shape])
    kind = fields.pop("model_type")
    cls = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    return cls(**fields)


def our_model(shape: str):
    """Our GPT of the same shape (the same fields, read as our model's config)."""
    from tinygpt.model.gpt import GPT, GPTConfig

    c = SHAPES[shape]
    config = GPTConfig(vocab_size=c["vocab_size"], arch=c["model_type"], n_layer=c["num_hidden_layers"],
                       n_head=c["num_attention_heads"], n_kv_head=c["num_key_value_heads"], n_embd=c["hidden_size"],
                       n_ff=c["intermediate_size"], block_size=c["max_position_embeddings"], norm_eps=c["rms_norm_eps"],
                       rope_theta=c["rope_theta"], tie_embeddings=c["tie_word_embeddings"])
    return GPT(config)


def build(shape: str, mode: str, impl: str):
    """The model to train and a function (tokens) -> loss."""
    import torch

    if impl.startswith("ours"):
        from tinygpt.model.lora import apply_lora
        from tinygpt.model.train import hand_back_freed_memory

        hand_back_freed_memory()  # as training does when it starts from a model on a CPU
        model = our_model(shape)
        if mode == "lora":
            if impl != "ours-f32source":  # the released weights: bf16, widened to float32 as training loads them
                for weight in model.parameters():
                    weight.data = weight.data.bfloat16().float()
            apply_lora(model, rank=LORA["rank"], alpha=LORA["alpha"], targets=LORA["targets"])
        return model, lambda x, y: model(x, y)[1]
    import transformers

    config = hf_config(shape)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                           target_modules=HF_TARGETS, lora_dropout=0.0))
    return model, lambda x, y: model(input_ids=x, labels=y).loss  # labels shift inside: y is x here


def measure_step(shape: str, mode: str, impl: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    """In this (fresh) process: build, then `steps` timed training steps after one warm-up step."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_of = build(shape, mode, impl)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = SHAPES[shape]["vocab_size"]
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    # ours predicts the next token from (x, y) shifted by one; transformers shifts labels itself
    x, y = (tokens[:, :-1], tokens[:, 1:]) if impl.startswith("ours") else (tokens[:, :-1], tokens[:, :-1])
    build_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # the peak of the training steps alone (resident weights, activations, optimizer state), not of building a
    # random model (which a real start, loaded from its files, does not do): Linux resets VmHWM on "5"
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    return {"shape": shape, "mode": mode, "impl": impl, "tokens_per_s": batch * seq / statistics.median(times),
            "peak_rss_gb": peak_resident_gb(), "build_peak_gb": build_peak_gb,
            "trainable": sum(p.numel() for p in params), "loss": float(loss)}


def peak_resident_gb() -> float:
    """VmHWM: the process's peak resident memory since start or the last reset."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def speed(args) -> list[dict]:
    rows = []
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after a warm-up, {args.threads} threads")
    print(f"{'shape':<14} {'mode':<5} {'implementation':<14} {'trainable':>12} {'peak GB':>8} {'tokens/s':>9} "
          f"{'vs peer':>8}")
    for shape in args.shapes:
        for mode in args.modes:
            peer = None
            for impl in [i for i in IMPLEMENTATIONS[mode] if not args.impls or i in args.impls]:
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                cmd = [sys.executable, __file__, "_step", json.dumps([shape, mode, impl, args.batch, args.seq,
                                                                      args.steps, args.threads])]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode:
                    why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
                    print(f"{shape:<14} {mode:<5} {impl:<14} failed: {why}")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                if impl in ("transformers", "peft"):
                    peer = row
                ours = next((r for r in rows if r["shape"] == shape and r["mode"] == mode and r["impl"] == "ours"),
                            None)
                ratio = f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if ours and peer and row is peer else ""
                print(f"{shape:<14} {mode:<5} {impl:<14} {row['trainable']:>12,} {row['peak_rss_gb']:>8.2f} "
                      f"{row['tokens_per_s']:>9.1f} {ratio:>8}", flush=True)
    return rows


def interleaved(args) -> list[dict]:
    """Speed only, on a busy machine: ours and the peer built in one process, their steps alternating, so that
    both see the same load; `--layers` keeps the real widths and vocabulary with fewer blocks."""
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        SHAPES[f"{shape}/{args.layers}"] = dict(SHAPES[shape], num_hidden_layers=args.layers or
                                                SHAPES[shape]["num_hidden_layers"])
        for mode in args.modes:
            impls = ["ours", "peft" if mode == "lora" else "transformers"]
            built = {}
            for impl in impls:
                torch.manual_seed(0)
                model, loss_of = build(f"{shape}/{args.layers}", mode, impl)
                params = [p for p in model.parameters() if p.requires_grad]
                built[impl] = (loss_of, torch.optim.AdamW(params, lr=1e-4, fused=True))
            tokens = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.seq + 1))
            times: dict[str, list[float]] = {impl: [] for impl in impls}
            for step in range(args.steps + 1):
                for impl, (loss_of, optimizer) in built.items():
                    x, y = (tokens[:, :-1], tokens[:, 1:]) if impl == "ours" else (tokens[:, :-1], tokens[:, :-1])
                    started = time.perf_counter()
                    loss_of(x, y).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step:
                        times[impl].append(time.perf_counter() - started)
            speed_of = {impl: args.batch * args.seq / statistics.median(t) for impl, t in times.items()}
            rows.append({"shape": shape, "layers": args.layers, "mode": mode, "tokens_per_s": speed_of})
            print(f"{shape:<14} {args.layers or 'all':>6} {mode:<5} ours {speed_of['ours']:8.1f} tokens/s, "
                  f"{impls[1]} {speed_of[impls[1]]:8.1f}: {speed_of['ours'] / speed_of[impls[1]]:.2f}x", flush=True)
    return rows


# --- adapt: the pretrained toy model on new text -------------------------------------------------------------


def pretrain_toy(work: Path, budget: float) -> Path:
    """The default pipeline's model on the generated stories (download builtin tiny -> ... -> train), once."""
    from bench_quality import tinygpt

    folder = work / "toy"
    if (folder / "best.pt").exists():
        return folder / "best.pt"
    folder.mkdir(parents=True, exist_ok=True)
    tinygpt("download", "--source", "builtin", "--size", "tiny", "--out", str(folder / "raw.txt"), log=folder / "d.log")
    tinygpt("clean", "--input", str(folder / "raw.txt"), "--out", str(folder / "corpus.txt"), "--stats",
            str(folder / "stats.json"), log=folder / "c.log")
    tinygpt("train_bpe", "--corpus", str(folder / "corpus.txt"), "--out", str(folder / "tokenizer.json"),
            "--vocab_size", "4096", log=folder / "b.log")
    tinygpt("encode", "--corpus", str(folder / "corpus.txt"), "--tokenizer", str(folder / "tokenizer.json"),
            "--out_dir", str(folder), log=folder / "e.log")
    return timed_train(folder, folder, {"arch": "llama"}, budget)


def timed_train(data: Path, out: Path, settings: dict, budget: float) -> Path:
    """Train for about `budget` seconds: a 20-step calibration run measures the step time, which sets max_steps."""
    from bench_quality import step_seconds, tinygpt

    def run(folder: Path, max_steps: int) -> None:
        flags = [f"--{k}={v}" for k, v in settings.items()]
        tinygpt("train", "--data_dir", str(data), "--tokenizer", str(data / "tokenizer.json"), "--out",
                str(folder / "best.pt"), "--runs_dir", str(folder / "runs"), "--max_steps", str(max_steps),
                "--eval_interval", str(max(1, max_steps // 4)), "--eval_batches", "8", "--log_interval", "5",
                *flags, log=folder / "train.log")

    calibration = out / "calibration"
    calibration.mkdir(parents=True, exist_ok=True)
    run(calibration, 20)
    tokens_per_step = 16 * int(settings.get("block_size", 128))
    max_steps = max(25, int(budget / (step_seconds(calibration) * tokens_per_step)))
    started = time.perf_counter()
    run(out, max_steps)
    print(f"  {out.name}: {max_steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return out / "best.pt"


def held_out_bpb(work: Path, checkpoint: Path, held_out: Path) -> float:
    from bench_quality import tinygpt

    result = checkpoint.parent / "held_out.json"
    tinygpt("evaluate", "--checkpoint", str(checkpoint), "--text", str(held_out), "--json", str(result),
            "--device", "cpu", "--batch_size", "16", log=checkpoint.parent / "evaluate.log")
    return json.loads(result.read_text())["bits_per_byte"]


def adapt(args) -> list[dict]:
    from bench_quality import prepare_corpus, tinygpt, tokens_dir

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus, held_out, info = prepare_corpus(work, 0.1, 600_000)
    toy = pretrain_toy(work, args.pretrain)
    # the docs in the toy model's own tokens: a fine-tuned model keeps its tokenizer
    toy_tokens = work / "tokens-toy"
    if not (toy_tokens / "meta.json").exists():
        toy_tokens.mkdir(exist_ok=True)
        (toy_tokens / "tokenizer.json").write_bytes((toy.parent / "tokenizer.json").read_bytes())
        tinygpt("encode", "--corpus", str(corpus), "--tokenizer", str(toy_tokens / "tokenizer.json"), "--out_dir",
                str(toy_tokens), "--val_fraction", "0.05", "--split", "tail", log=toy_tokens / "e.log")
    runs = {"scratch (default recipe, own tokenizer)": (tokens_dir(work, corpus, 4096), {"arch": "llama"}),
            "scratch (toy's tokenizer)": (toy_tokens, {"arch": "llama"})}
    for lr in args.lrs:
        runs[f"fine-tuned, lr {lr:g}"] = (toy_tokens, {"init_from": str(toy), "lr": lr, "min_lr": lr / 10})
    runs[f"LoRA r16, lr {args.lrs[-1]:g}"] = (toy_tokens, {"init_from": str(toy), "lr": args.lrs[-1],
                                                           "min_lr": args.lrs[-1] / 10, "lora_rank": 16})
    print(f"held-out bits per byte after {args.budget:.0f} s of training, {info['scored_bytes'] / 1e6:.2f} MB scored")
    rows = [{"run": "toy model as is", "held_out_bpb": held_out_bpb(work, toy, held_out)}]
    print(f"{rows[0]['run']:<40} {rows[0]['held_out_bpb']:.4f}", flush=True)
    for i, (name, (data, settings)) in enumerate(runs.items()):
        out = work / "adapt" / f"run{i}"
        checkpoint = timed_train(data, out, settings, args.budget)
        rows.append({"run": name, "settings": settings, "held_out_bpb": held_out_bpb(work, checkpoint, held_out)})
        change = rows[-1]["held_out_bpb"] / rows[1]["held_out_bpb"] - 1
        print(f"{name:<40} {rows[-1]['held_out_bpb']:.4f} {change:+.1%} vs scratch", flush=True)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["_step"]:  # a child process measuring one step
        print(json.dumps(measure_step(*json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed", help="peak memory and tokens/s of a fine-tuning step, beside transformers and peft")
    s.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    s.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    s.add_argument("--impls", nargs="+", choices=sorted({i for v in IMPLEMENTATIONS.values() for i in v}),
                   help="only these implementations (default: all of the mode's)")
    i = sub.add_parser("interleaved", help="tokens/s only, ours and the peer alternating in one process")
    i.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    i.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    i.add_argument("--layers", type=int, default=0, help="blocks kept (0: all); widths and vocabulary stay real")
    i.add_argument("--batch", type=int, default=1)
    i.add_argument("--seq", type=int, default=256)
    i.add_argument("--steps", type=int, default=3)
    i.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = sub.add_parser("adapt", help="the toy model fine-tuned on the Python docs vs training from scratch")
    a.add_argument("--budget", type=float, default=120, help="training seconds per run")
    a.add_argument("--pretrain", type=float, default=240, help="training seconds of the toy model")
    a.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3], help="fine-tuning learning rates to try")
    a.add_argument("--work", default="bench-quality", help="bench_quality's folder (corpus reused)")
    args = parser.parse_args()
    rows = {"speed": speed, "interleaved": interleaved, "adapt": adapt}[args.part](args)
    Path(f"bench-finetune-{args.part}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
