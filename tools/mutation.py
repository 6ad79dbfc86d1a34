"""Mutation testing of the modules where a silent bug costs most (a slow check run by hand, not in CI).

    pip install -e .[test,mutation]
    nice python tools/mutation.py                              # every group, every mutant: hours on 2 cores
    nice python tools/mutation.py quants --sample 120          # 120 of quants.py's mutants, drawn at random (seeded)
    nice -n 15 python tools/mutation.py model --sample 70 --seed 19 --whole tinygpt/model/optim.py \
        --workdir /tmp/tinygpt-mutation                         # all of optim.py, 70 of train.py's mutants

Each group mutates its modules with mutmut in a snapshot of the committed tree (`git archive HEAD`, so edits in
progress neither disturb the run nor get mutated) and runs only the tests that cover each mutated function, from
the test files named below. The shared settings are `[tool.mutmut]` in pyproject.toml; this script adds each
group's modules and tests. `--sample N` draws N mutants of each module (all of a module that has N or fewer),
with `random.Random(seed).sample` over the sorted mutant names. One mutmut worker by default (`--workers`).
It prints, per module, the mutants killed (a timeout counts as killed), survived and not covered, and writes
the survivors' names to <workdir>/<group>.survivors.txt (`mutmut show NAME` in <workdir>/<group> shows the diff).
See docs/testing.md#mutation-testing for the scores and what the survivors are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GAPS = "tests/test_mutation_gaps.py"  # the tests that closed survivors, for every group
# group: (modules, test files, extra pytest arguments)
GROUPS = {
    "quants": (["tinygpt/export/quants.py"],
               ["tests/test_quants.py", "tests/test_quantize.py", "tests/test_imatrix_quants.py", GAPS], []),
    "clean": (["tinygpt/data/clean.py"], ["tests/test_clean.py", GAPS], []),
    # test_hf_tokenizers: the only tests of tokenizer.json settings our own tokenizers never write (added tokens
    # with lstrip only, pre-tokenizers with no known cut points)
    "bpe": (["tinygpt/tokenizer/bpe.py"],
            ["tests/test_tokenizer.py", "tests/test_train_bpe.py", "tests/test_hf_tokenizers.py", GAPS], []),
    # Every training run in these tests measures a matmul peak, ~10 s on 2 cores: mutation_fast_peak.py makes it
    # a constant (`--amp auto` is then fp32). Left out: the runs in subprocesses (SIGKILL/resume, DDP, torchrun,
    # stop signal), which take minutes per mutant and do not see the mutant when run under torchrun, and the
    # snakemake rerun test of init_from.
    "model": (["tinygpt/model/train.py", "tinygpt/model/optim.py"],
              ["tests/test_train.py", "tests/test_checkpoint.py", "tests/test_init_from.py", "tests/test_lora.py",
               "tests/test_chat_train.py", GAPS],
              ["-p", "mutation_fast_peak", "-k", "not killed and not ddp and not stop_signal and not ranks_take "
               "and not reruns_what_depends"]),
}
KILLED = {1, 3, 36, 24, -24, 152, 255}  # mutmut's exit codes: a test failed, pytest's internal error, timeouts
NO_TESTS = {5, 33}


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def snapshot(group: str, workdir: Path) -> Path:
    """The committed tree in workdir/group, its [tool.mutmut] extended with the group's modules and tests."""
    modules, tests, extra = GROUPS[group]
    where = workdir / group
    if not where.exists():
        where.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
        pyproject = where / "pyproject.toml"
        text = pyproject.read_text()
        head, sep, rest = text.partition("[tool.mutmut]\n")
        if not sep:
            raise SystemExit("pyproject.toml has no [tool.mutmut] section")
        added = (f"only_mutate = {toml_list(modules)}\npytest_add_cli_args_test_selection = {toml_list(tests)}\n"
                 f"pytest_add_cli_args = {toml_list(extra)}\n")
        pyproject.write_text(head + sep + added + rest)
    return where


def results(where: Path) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for meta in (where / "mutants").rglob("*.meta"):
        found.update(json.loads(meta.read_text())["exit_code_by_key"])
    return found


def module_prefix(module: str) -> str:
    """The start of the names mutmut gives the mutants of `module` ("tinygpt.model.optim.x_cosine_lr__mutmut_1")."""
    return module.removesuffix(".py").replace("/", ".") + "."


def sampled(names: list[str], modules: list[str], sample: int, seed: int, whole: list[str] = ()) -> list[str]:
    """`sample` mutants of each module (all of a module in `whole` or with no more), the same ones for the same
    seed and tree."""
    chosen: list[str] = []
    for module in modules:
        own = sorted(n for n in names if n.startswith(module_prefix(module)))
        take_all = not sample or module in whole or len(own) <= sample
        chosen += own if take_all else random.Random(seed).sample(own, sample)
    return sorted(chosen)


def run_group(group: str, workdir: Path, sample: int, seed: int, workers: int, whole: list[str]) -> None:
    where = snapshot(group, workdir)
    log = open(workdir / f"{group}.log", "a")
    mutmut = ["mutmut", "run", "--max-children", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(where / "tools")}  # the model group's pytest plugin
    if not list((where / "mutants").rglob("*.meta")):  # generate the mutants and map tests to functions
        # a name that matches no mutant runs none: mutmut then stops with an AssertionError, after the mapping
        subprocess.run(mutmut + ["no-mutant-has-this-name"], cwd=where, env=env, stdout=log, stderr=log)
        if not (where / "mutants" / "mutmut-stats.json").exists():
            raise SystemExit(f"mutmut could not generate the mutants or run the tests; see {workdir / group}.log")
    names = sampled(list(results(where)), GROUPS[group][0], sample, seed, whole)
    todo = [n for n in names if results(where)[n] is None]
    if todo:
        subprocess.run(mutmut + todo, cwd=where, env=env, stdout=log, stderr=log)
    done = results(where)
    survivors = [n for n in names if done[n] == 0]
    (workdir / f"{group}.survivors.txt").write_text("".join(n + "\n" for n in survivors))
    for module in GROUPS[group][0]:
        prefix = module_prefix(module)
        codes = Counter("killed" if done[n] in KILLED else "survived" if done[n] == 0 else
                        "no tests" if done[n] in NO_TESTS else "other" for n in names if n.startswith(prefix))
        tested = codes["killed"] + codes["survived"]
        score = f"{100 * codes['killed'] / tested:.0f}%" if tested else "-"
        print(f"{module}: {score} killed ({codes['killed']} of {tested} covered mutants, timeouts counted as killed; "
              f"{codes['no tests']} not covered by the group's tests, {codes['other']} not run or crashed)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="*", help=f"some of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--sample", type=int, default=0, help="mutants per module, drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=19, help="of the sample")
    parser.add_argument("--whole", nargs="*", default=[], metavar="MODULE",
                        help="modules to test every mutant of, whatever --sample says (e.g. tinygpt/model/optim.py)")
    parser.add_argument("--workers", type=int, default=1, help="mutants tested at once (mutmut's --max-children)")
    parser.add_argument("--workdir", type=Path, help="where the snapshots live (reused: results are cached)")
    args = parser.parse_args(argv)
    if set(args.groups) - set(GROUPS):
        parser.error(f"unknown group {sorted(set(args.groups) - set(GROUPS))}; choose from {', '.join(GROUPS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tinygpt-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"snapshots and logs in {workdir}")
    for group in args.groups or GROUPS:
        run_group(group, workdir.resolve(), args.sample, args.seed, args.workers, args.whole)


if __name__ == "__main__":
    main()
