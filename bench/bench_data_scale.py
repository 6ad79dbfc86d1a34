"""Benchmark: the data stages at scale on varied real text, each against a peer measured in the same run.

    python bench/bench_data_scale.py [--mb 25 50 100 200] [--vocab_size 8192] [--threads N] [--split auto]
        [--families llama3 qwen2 smollm gpt2 --family_vocab 128256 --repeats 2]

The corpus: the .py files of this Python's site-packages (sorted paths, files under 2 MB), concatenated until
--mb megabytes; the next tenth of that size is held out to measure compression. Each stage runs as its own child
process (`python -m tinygpt <stage>`), twice: once timed (wall-clock), and once sampled for memory: the peak,
read every 20 ms, of the proportional set size (PSS: shared pages split among the processes sharing them) summed
over the child and all its worker processes, so forked workers count once. (Sampling costs this script about a
quarter of a core; in the timed run it would slow whoever keeps both cores busy, and not a one-thread peer.)
Peers, in the same kind of child process:
  train_bpe  Hugging Face tokenizers' BpeTrainer, same vocab_size, same GPT-2 split regex + ByteLevel, the same
             number of threads (RAYON_NUM_THREADS), fed the same documents in <= 1 MB pieces cut where the regex
             splits anyway (so it counts exactly our chunks; fed whole 100 MB documents it needs over 10 GB).
             Compression: bytes per token of both tokenizers on the held-out text.
  encode     tiktoken's encode_ordinary on one thread, built on our merges, over the same documents (read in the
             same pieces; no files written). Its token count must equal ours.
  families   (--families) the encode stage with an imported model's tokenizer: a vocabulary of --family_vocab
             ids (128,256: Llama 3's size) that Hugging Face's BpeTrainer learns from the corpus (quicker than ours
             at that size), in a foreign id order like the families', written as each family's tokenizer.json (its
             normalizer, pre-tokenizer regex, special tokens, BOS, ignore_merges), beside tiktoken built on the same
             ranks (ids, which follow the merge order) with the family's regex. The two run alternately, --repeats
             times each; the best time of each is shown.
             tiktoken has no Digits step nor NFC: for SmolLM it gets one regex that isolates digits (so a few
             whitespace pieces before digits differ), for Qwen2 the text is taken as it is (the sources are NFC).
The last lines extrapolate time and memory linearly from the two largest sizes to a 2 GB corpus, against 8 GB RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import site
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygpt.common import usable_cpus  # noqa: E402

MB = 1_000_000
LAPTOP_RAM_MB = 8_000
TWO_GB_MB = 2_000


# ---- the corpus ------------------------------------------------------------------------------------------------

def python_sources() -> list[Path]:
    roots = [Path(p) for p in site.getsitepackages() if Path(p).is_dir()]
    return sorted(p for root in roots for p in root.rglob("*.py") if p.is_file() and p.stat().st_size < 2 * MB)


def gather(paths: list[Path], start_mb: float, n_mb: float, out: Path) -> int:
    """Concatenate the sources that start within [start_mb, start_mb + n_mb) MB of their concatenation."""
    position, written = 0, 0
    start, end = start_mb * MB, (start_mb + n_mb) * MB
    with open(out, "wb") as f:
        for path in paths:
            if position >= end:
                break
            data = path.read_bytes() + b"\n\n"
            if position >= start:
                f.write(data)
                written += len(data)
            position += len(data)
    return written


# ---- measuring a child process -----------------------------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return pids


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant, workers included
    return usage.ru_utime + usage.ru_stime


def _run(args: list[str], env: dict | None, sample: bool) -> tuple[float, float, str, float]:
    cpu_before = _cpu_seconds()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TINYGPT_NO_PROGRESS": "1", **(env or {})})
    peak = [0]

    def sample_memory() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.02)

    start = time.perf_counter()
    sampler = threading.Thread(target=sample_memory, daemon=True)
    if sample:
        sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if sample:
        sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{err[-3000:]}")
    return seconds, peak[0] / 1000, out, _cpu_seconds() - cpu_before


def run_timed(args: list[str], env: dict | None = None) -> tuple[float, str, float]:
    """Run a command; return (seconds, stdout, CPU seconds of its process tree)."""
    seconds, _, out, cpu = _run(args, env, sample=False)
    return seconds, out, cpu


def peak_memory(args: list[str], env: dict | None = None) -> float:
    """Run a command again, sampling its memory: the peak PSS of its process tree in MB.

    Reading smaps_rollup every 20 ms costs this process about a quarter of a core, which on two cores would slow a
    command that keeps both busy (ours, HF's trainer) and not one that uses a single thread (tiktoken): so the
    time is never taken from a sampled run."""
    return _run(args, env, sample=True)[1]


def run_measured(args: list[str], env: dict | None = None) -> tuple[float, float, str, float]:
    """Run a command twice: timed, then sampled; return (seconds, peak PSS in MB, stdout, CPU seconds)."""
    seconds, out, cpu = run_timed(args, env)
    return seconds, peak_memory(args, env), out, cpu


# ---- the peers (run as child processes of this script: `--peer hf|tiktoken`) ----------------------------------

def text_pieces(corpus: Path, ends: list | None = None):
    """The corpus's documents as encode reads them, in <= 1 MB pieces; `ends` collects where documents end."""
    from tinygpt.tokenizer.pieces import iter_pieces
    with open(corpus, "rb") as f:
        for piece in iter_pieces(f):
            if ends is not None:
                ends.append(piece.ends_document)
            yield piece.data.decode("utf-8")


def peer_hf(corpus: Path, vocab_size: int, out: Path) -> None:
    from bench_bpe import train_hf  # the same HF BpeTrainer setup as bench_bpe (this script's folder is on sys.path)

    hf = train_hf(text_pieces(corpus), vocab_size)
    hf.save(str(out))


def peer_tiktoken(corpus: Path, tokenizer: Path, family: str | None = None) -> None:
    """tiktoken on our ranks with GPT-2's regex, or with `family`'s (see family_pattern)."""
    import tiktoken

    from tinygpt.tokenizer.bpe import GPT2_PATTERN, Tokenizer
    tok = Tokenizer.load(tokenizer)
    added = set(tok.added_tokens.values())
    ranks = {token: i for i, token in enumerate(tok.vocab) if i not in added}  # ours: 256 bytes, then the merges
    pattern = GPT2_PATTERN if family is None else family_pattern(family)
    enc = tiktoken.Encoding("tinygpt-bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    ends: list[bool] = []
    n_tokens = sum(len(enc.encode_ordinary(text)) for text in text_pieces(corpus, ends))
    print(n_tokens, sum(ends))


# ---- imported models' tokenizers (--families) -------------------------------------------------------------------

# tiktoken's pattern per family; SmolLM's Digits step is folded into one regex (see the module docstring).
SMOLLM_TIKTOKEN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
FAMILY_SPECIALS = {"gpt2": ["<|endoftext|>"], "smollm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   "llama3": ["<|begin_of_text|>", "<|end_of_text|>"], "qwen2": ["<|endoftext|>", "<|im_start|>",
                                                                               "<|im_end|>"]}


def family_pattern(family: str) -> str:
    from tinygpt.tokenizer.pipeline import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN
    return {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_TIKTOKEN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}[family]


def family_json(tokenizer: Path, family: str, out: Path) -> None:
    """The HF-trained vocabulary and merges as `family`'s tokenizer.json, configured as that family ships it."""
    from tinygpt.tokenizer.pipeline import LLAMA3_PATTERN, QWEN2_PATTERN

    spec = json.loads(tokenizer.read_text(encoding="utf-8"))
    n = len(spec["model"]["vocab"])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    new = [t for t in FAMILY_SPECIALS[family] if t not in spec["model"]["vocab"]]
    spec["added_tokens"] += [{"id": n + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, t in enumerate(new)]
    if family == "gpt2":
        spec["pre_tokenizer"] = {**byte_level, "use_regex": True}
    elif family == "smollm":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, {**byte_level, "use_regex": True}]}
    else:
        pattern = LLAMA3_PATTERN if family == "llama3" else QWEN2_PATTERN
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level]}
    spec["normalizer"] = {"type": "NFC"} if family == "qwen2" else None
    spec["model"]["ignore_merges"] = family == "llama3"
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if family == "llama3":
        bos = "<|begin_of_text|>"
        spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], {
            "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [n + new.index(bos)], "tokens": [bos]}}}]}
    out.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def run_families(clean: Path, work: Path, args) -> dict:
    """Encode with each family's tokenizer beside tiktoken, alternately; the best of --repeats runs of each."""
    py = [sys.executable, "-m", "tinygpt"]
    me = [sys.executable, str(Path(__file__).resolve())]
    big = work / "family_merges.json"
    threads = ["--threads", str(args.threads)]
    run_measured(me + ["--peer", "hf", "--corpus", str(clean), "--vocab_size", str(args.family_vocab), "--out",
                       str(big)], env={"RAYON_NUM_THREADS": str(args.threads)})
    results = {}
    for family in args.families:
        tok = work / f"{family}.json"
        family_json(big, family, tok)
        ours_cmd = py + ["encode", "--corpus", str(clean), "--tokenizer", str(tok), "--out_dir",
                         str(work / f"{family}_tokens")] + threads
        peer_cmd = me + ["--peer", "tiktoken", "--family", family, "--corpus", str(clean), "--tokenizer", str(tok)]
        ours, peer = [], []
        for _ in range(args.repeats):
            ours.append(run_timed(ours_cmd))
            peer.append(run_timed(peer_cmd))
        (s, out, cpu), (ts, tt_out, tt_cpu) = min(ours), min(peer)
        meta = json.loads((work / f"{family}_tokens" / "meta.json").read_text())
        tiktoken_tokens, n_documents = map(int, tt_out.split())
        per_document = 2 if family == "llama3" else 1  # <|begin_of_text|> and the end-of-text token
        results[family] = ((s, peak_memory(ours_cmd), out, cpu), (ts, peak_memory(peer_cmd), tt_out, tt_cpu),
                           tiktoken_tokens + per_document * n_documents,
                           meta["tokens"]["train"] + meta["tokens"]["val"], meta["vocab_size"])
    return results


def report_families(row: dict, args) -> None:
    print(f"\n{row['mb']:g} MB, imported tokenizers (HF-trained, {args.family_vocab:,} ids asked), encode with "
          f"{args.threads} threads vs tiktoken 1 thread, best of {args.repeats} alternating runs each:")
    for family, (ours, peer, expected, count, vocab) in row["families"].items():
        s, m, _, cpu = ours
        ts, tm, _, tt_cpu = peer
        mb_s, tt_mb_s = row["clean_bytes"] / MB / s, row["clean_bytes"] / MB / ts
        check = "= tiktoken's" if count == expected else f"differ from tiktoken's by {count - expected:+,}"
        print(f"  {family:7} vocab {vocab:,}: {s:6.1f} s {m:6.0f} MB | tiktoken {ts:6.1f} s {tm:6.0f} MB | "
              f"{mb_s:.2f} vs {tt_mb_s:.2f} MB/s = {mb_s / tt_mb_s:.2f}x tiktoken; CPU s {cpu:.1f} vs {tt_cpu:.1f} "
              f"({tt_cpu / cpu:.2f}x per core); {count:,} tokens {check}")


# ---- one size ----------------------------------------------------------------------------------------------------

def bytes_per_token(tokenizer_json: Path, text: str) -> float:
    from tokenizers import Tokenizer
    return len(text.encode()) / len(Tokenizer.from_file(str(tokenizer_json)).encode(text).ids)


def run_size(n_mb: float, paths: list[Path], work: Path, args) -> dict:
    py = [sys.executable, "-m", "tinygpt"]
    me = [sys.executable, str(Path(__file__).resolve())]
    sources, held_out = work / "sources.txt", work / "held_out.txt"
    gather(paths, 0, n_mb, sources)
    gather(paths, n_mb, n_mb / 10, held_out)
    raw, clean, tok, hf_tok, tokens = (work / n for n in ("raw.txt", "clean.txt", "tok.json", "hf.json", "tokens"))
    row: dict = {"mb": n_mb}
    row["download"] = run_measured(py + ["download", "--source", "file", "--path", str(sources), "--out", str(raw)])
    row["clean"] = run_measured(py + ["clean", "--input", str(raw), "--out", str(clean), "--split", args.split])
    threads = ["--threads", str(args.threads)]
    row["train_bpe"] = run_measured(py + ["train_bpe", "--corpus", str(clean), "--out", str(tok),
                                          "--vocab_size", str(args.vocab_size)] + threads)
    row["hf"] = run_measured(me + ["--peer", "hf", "--corpus", str(clean), "--vocab_size", str(args.vocab_size),
                                   "--out", str(hf_tok)], env={"RAYON_NUM_THREADS": str(args.threads)})
    row["encode"] = run_measured(py + ["encode", "--corpus", str(clean), "--tokenizer", str(tok), "--out_dir",
                                       str(tokens)] + threads)
    row["tiktoken"] = run_measured(me + ["--peer", "tiktoken", "--corpus", str(clean), "--tokenizer", str(tok)])
    meta = json.loads((tokens / "meta.json").read_text())
    tiktoken_tokens, n_documents = map(int, row["tiktoken"][2].split())
    row["documents"] = n_documents
    row["token_check"] = (tiktoken_tokens + n_documents, meta["tokens"]["train"] + meta["tokens"]["val"])
    text = held_out.read_text(encoding="utf-8")
    row["bpt"] = (bytes_per_token(tok, text), bytes_per_token(hf_tok, text))
    row["clean_bytes"] = clean.stat().st_size
    if args.families:
        row["families"] = run_families(clean, work, args)
    return row


def report(rows: list[dict], args) -> None:
    print(f"\nvocab_size {args.vocab_size}, {args.threads} threads (ours and HF), tiktoken 1 thread; "
          "time in s, memory = peak PSS of the process tree in MB; ratio = ours / peer (time, memory)")
    print(f"{'MB':>5} {'stage':10} {'time':>7} {'mem':>7} | {'peer':10} {'time':>7} {'mem':>7} | {'t ratio':>7} "
          f"{'m ratio':>7} | notes")
    for r in rows:
        for stage in ("download", "clean"):
            s, m, _, _ = r[stage]
            print(f"{r['mb']:>5g} {stage:10} {s:7.1f} {m:7.0f} | {'':10} {'':>7} {'':>7} | {'':>7} {'':>7} |")
        s, m, _, cpu = r["train_bpe"]
        hs, hm, _, hf_cpu = r["hf"]
        ours_bpt, hf_bpt = r["bpt"]
        print(f"{r['mb']:>5g} {'train_bpe':10} {s:7.1f} {m:7.0f} | {'HF BPE':10} {hs:7.1f} {hm:7.0f} | {s / hs:7.2f} "
              f"{m / hm:7.2f} | held-out bytes/token {ours_bpt:.3f} vs HF {hf_bpt:.3f} ({ours_bpt / hf_bpt:.3f}x); "
              f"CPU s {cpu:.1f} vs {hf_cpu:.1f}")
        s, m, _, cpu = r["encode"]
        ts, tm, _, tt_cpu = r["tiktoken"]
        mb_s, tt_mb_s = r["clean_bytes"] / MB / s, r["clean_bytes"] / MB / ts
        expected, ours_count = r["token_check"]
        # (`regex` knows newer Unicode than tiktoken's Rust regex: a character assigned since, e.g. the letter
        # U+A7CF, splits differently there, so a few ids may differ on text that has one)
        check = "= tiktoken's" if ours_count == expected else f"differ from tiktoken's by {ours_count - expected:+,}"
        print(f"{r['mb']:>5g} {'encode':10} {s:7.1f} {m:7.0f} | {'tiktoken':10} {ts:7.1f} {tm:7.0f} | {s / ts:7.2f} "
              f"{m / tm:7.2f} | {mb_s:.2f} vs {tt_mb_s:.2f} MB/s = {mb_s / tt_mb_s:.2f}x tiktoken; CPU s {cpu:.1f} vs "
              f"{tt_cpu:.1f} ({tt_cpu / cpu:.2f}x per core); {r['documents']:,} documents, {ours_count:,} tokens "
              f"{check} + one <|endoftext|> each")
    for r in rows:
        if "families" in r:
            report_families(r, args)
    if len(rows) >= 2:
        a, b = sorted(rows, key=lambda r: r["mb"])[-2:]
        print(f"\nextrapolated linearly from {a['mb']:g} and {b['mb']:g} MB to a {TWO_GB_MB / 1000:g} GB corpus "
              f"(8 GB laptop):")
        for stage in ("clean", "train_bpe", "hf", "encode"):
            (sa, ma, _, _), (sb, mb, _, _) = a[stage], b[stage]
            slope_s, slope_m = (sb - sa) / (b["mb"] - a["mb"]), (mb - ma) / (b["mb"] - a["mb"])
            s2, m2 = sb + slope_s * (TWO_GB_MB - b["mb"]), mb + max(0.0, slope_m) * (TWO_GB_MB - b["mb"])
            verdict = "fits" if m2 < LAPTOP_RAM_MB / 2 else "tight" if m2 < LAPTOP_RAM_MB else "does NOT fit"
            print(f"  {stage:10} ~{s2 / 60:5.1f} min, peak ~{m2:6.0f} MB: {verdict} in {LAPTOP_RAM_MB / 1000:g} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[25, 50], help="corpus sizes in MB (25 50 100 200)")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--split", default="auto", help="clean --split (auto: documents end at <|endoftext|>, as "
                                                          "the joined site-packages sources have; a text without one "
                                                          "is one document)")
    parser.add_argument("--work_dir", help="the disk to work on (default: the system temporary folder; made if missing)")
    parser.add_argument("--families", nargs="*", default=[], choices=sorted(FAMILY_SPECIALS),
                        help="also encode with these families' tokenizers (see the module docstring)")
    parser.add_argument("--family_vocab", type=int, default=128_256, help="ids of the families' tokenizers "
                                                                           "(default 128,256: Llama 3's)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of ours and tiktoken per family")
    parser.add_argument("--peer", choices=["hf", "tiktoken"], help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer == "hf":
        return peer_hf(Path(args.corpus), args.vocab_size, Path(args.out))
    if args.peer == "tiktoken":
        return peer_tiktoken(Path(args.corpus), Path(args.tokenizer), args.family)
    paths = python_sources()
    total = sum(p.stat().st_size for p in paths) / MB
    print(f"{len(paths)} .py files under 2 MB in site-packages, {total:.0f} MB; sizes {args.mb} MB")
    rows = []
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for n_mb in args.mb:
            if n_mb * 1.1 > total:
                print(f"skipping {n_mb:g} MB: site-packages holds only {total:.0f} MB of sources")
                continue
            work = Path(tmp) / f"{n_mb:g}mb"
            work.mkdir()
            rows.append(run_size(n_mb, paths, work, args))
            report(rows[-1:], args)
            for f in work.rglob("*"):  # free the disk before the next size
                if f.is_file():
                    f.unlink()
    print("\nall sizes:")
    report(rows, args)


if __name__ == "__main__":
    main()
