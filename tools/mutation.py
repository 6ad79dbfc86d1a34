"""Mutation testing of the modules where a silent bug costs most (a slow check run by hand, not in CI).

    pip install -e .[test,mutation]
    nice python tools/mutation.py                       # every group, every mutant: hours on 2 cores
    nice python tools/mutation.py quants --sample 120   # a random sample of quants.py's mutants (seeded)

Each group mutates its modules with mutmut in a snapshot of the committed tree (`git archive HEAD`, so edits in
progress neither disturb the run nor get mutated) and runs only the tests that cover each mutated function, from
the test files named below. The shared settings are `[tool.mutmut]` in pyproject.toml; this script adds each
group's modules and tests. It prints, per module, the mutants killed, survived and not covered, and writes the
survivors' names to <workdir>/<group>.survivors.txt (`mutmut show NAME` in <workdir>/<group> shows the diff).
See docs/testing.md#mutation-testing for the scores and what the survivors are.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# group: (modules, test files, extra pytest arguments)
GROUPS = {
    "quants": (["tinygpt/export/quants.py"],
               ["tests/test_quants.py", "tests/test_quantize.py", "tests/test_imatrix_quants.py"], []),
    "clean": (["tinygpt/data/clean.py"], ["tests/test_clean.py"], []),
    "bpe": (["tinygpt/tokenizer/bpe.py"], ["tests/test_tokenizer.py", "tests/test_train_bpe.py"], []),
    # the kill/resume, DDP and stop-signal runs take minutes per mutant: left out
    "model": (["tinygpt/model/train.py", "tinygpt/model/optim.py"], ["tests/test_train.py", "tests/test_checkpoint.py"],
              ["-k", "not killed_run and not ddp and not stop_signal"]),
}
KILLED = {1, 3}  # mutmut's exit codes: 1 a test failed, 3 pytest's internal error; 0 survived
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


def run_group(group: str, workdir: Path, sample: int, seed: int) -> None:
    where = snapshot(group, workdir)
    log = open(workdir / f"{group}.log", "a")
    mutmut = ["mutmut", "run", "--max-children", "2"]
    if not (where / "mutants").exists():  # generate the mutants and map tests to functions; run none yet
        subprocess.run(mutmut + ["no-mutant-has-this-name"], cwd=where, stdout=log, stderr=log, check=True)
    names = sorted(results(where))
    if sample:
        names = sorted(random.Random(seed).sample(names, min(sample, len(names))))
    todo = [n for n in names if results(where)[n] is None]
    if todo:
        subprocess.run(mutmut + todo, cwd=where, stdout=log, stderr=log)
    done = results(where)
    survivors = [n for n in names if done[n] == 0]
    (workdir / f"{group}.survivors.txt").write_text("".join(n + "\n" for n in survivors))
    for module in GROUPS[group][0]:
        prefix = module.removesuffix(".py").replace("/", ".") + "."
        codes = Counter("killed" if done[n] in KILLED else "survived" if done[n] == 0 else
                        "no tests" if done[n] in NO_TESTS else "other" for n in names if n.startswith(prefix))
        tested = codes["killed"] + codes["survived"]
        score = f"{100 * codes['killed'] / tested:.0f}%" if tested else "-"
        print(f"{module}: {score} killed ({codes['killed']} of {tested} covered mutants; "
              f"{codes['no tests']} not covered by the group's tests, {codes['other']} timeouts or crashes)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="*", help=f"some of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--sample", type=int, default=0, help="mutants per group, drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--workdir", type=Path, help="where the snapshots live (reused: results are cached)")
    args = parser.parse_args(argv)
    if set(args.groups) - set(GROUPS):
        parser.error(f"unknown group {sorted(set(args.groups) - set(GROUPS))}; choose from {', '.join(GROUPS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tinygpt-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"snapshots and logs in {workdir}")
    for group in args.groups or GROUPS:
        run_group(group, workdir.resolve(), args.sample, args.seed)


if __name__ == "__main__":
    main()
