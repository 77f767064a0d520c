"""
tools/mutate.py: a small mutation tester. It plants one bug at a time in a copy of the repository
and runs the test file(s) that cover the mutated module; a mutant the tests do not fail "survived".

    python tools/mutate.py                                  # every module below, 12 sampled mutants each
    python tools/mutate.py --files=distill.py,runtime.py --per_file=30 --seed=2
    python tools/mutate.py --files=sample.py:5,data.py:20   # per-file sample sizes
    python tools/mutate.py --files=runtime.py --grep="math.cos" --per_file=99   # points on matching lines
    python tools/mutate.py --files=distill.py --grep="bos_id] = -100" --tests=tests/test_distill.py::test_windows_never_target_the_next_documents_bos
    python tools/mutate.py --list --files=runtime.py        # the mutation points, nothing run

Mutations (textual, so a surviving mutant prints as a one-line diff):
    arithmetic  + <-> -, * <-> /, // -> /, % -> //        comparison  < <-> <=, > <-> >=, == <-> !=,
    boolean     and <-> or, `not x` -> x                               in <-> not in, is <-> is not
    constants   int n -> n + 1, float x -> 2x (0.0 -> 1.0), True <-> False
    statements  a one-line assignment or call statement inside a function -> pass
Only code inside functions is mutated, never strings (messages), and never `raise` lines or the
lines of docstrings. Sampling: --per_file mutants drawn with --seed from each module's points.
Each mutant runs `python -m pytest -x -q -p no:cacheprovider TESTS` with OMP_NUM_THREADS=1 (the
tests in the order of their clean-run durations, fastest first, so -x stops early); a run
past --timeout_factor x the clean run's time counts as killed (timeout), as mutation tools do.
Writes --out (JSON: every mutant, its outcome and diff) and prints the per-file table.
"""
import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = {   # module -> the test files that exercise it
    "model.py": ["tests/test_model.py", "tests/test_sample.py::test_top_p_threshold_and_exponential_race",
                 "tests/test_sample.py::test_stream_and_nonfinite_logits"],
    "data.py": ["tests/test_data.py"],
    "runtime.py": ["tests/test_runtime.py", "tests/test_distill.py"],
    "distill.py": ["tests/test_distill.py"],
    "sample.py": ["tests/test_sample.py"],
    "evaluate.py": ["tests/test_sample.py"],
    "ranker_eval.py": ["tests/test_ranker_eval.py"],
}
BINOP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
         ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "//")}
CMPOP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
         ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in"),
         ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is")}


def _offsets(src):
    starts, pos = [0], 0
    for line in src.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def mutation_points(src):
    """[(start, end, old_text, new_text, kind, line)] character spans of the source."""
    tree = ast.parse(src)
    starts = _offsets(src)
    at = lambda line, col: starts[line - 1] + col
    skip_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
                skip_lines.update(range(first.lineno, first.end_lineno + 1))   # docstrings
        if isinstance(node, (ast.Raise, ast.JoinedStr)):
            skip_lines.update(range(node.lineno, node.end_lineno + 1))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in ast.walk(node):
                in_function.add(id(sub))
    points = []

    def gap_op(left, right, old, new, kind, node):
        a, b = at(left.end_lineno, left.end_col_offset), at(right.lineno, right.col_offset)
        gap = src[a:b]
        i = gap.find(old)
        while i >= 0:   # the operator token itself, not part of a longer one (// vs /, <= vs <)
            before, after = gap[i - 1:i] if i else "", gap[i + len(old):i + len(old) + 1]
            if (before + after).strip(" ()\n\\") == "" or (old.isalpha() and before in " (" and after in " ("):
                points.append((a + i, a + i + len(old), old, new, kind, node.lineno))
                return
            i = gap.find(old, i + 1)

    for node in ast.walk(tree):
        if id(node) not in in_function or getattr(node, "lineno", None) in skip_lines:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP:
            old, new = BINOP[type(node.op)]
            gap_op(node.left, node.right, old, new, "arithmetic", node)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMPOP:
            old, new = CMPOP[type(node.ops[0])]
            gap_op(node.left, node.comparators[0], old, new, "comparison", node)
        elif isinstance(node, ast.BoolOp) and len(node.values) == 2:
            old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            gap_op(node.values[0], node.values[1], old, new, "boolean", node)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            a, b = at(node.lineno, node.col_offset), at(node.operand.lineno, node.operand.col_offset)
            points.append((a, b, src[a:b], "", "boolean", node.lineno))
        elif isinstance(node, ast.Constant) and node.lineno == node.end_lineno:
            a, b = at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
            v = node.value
            if isinstance(v, bool):
                new = str(not v)
            elif isinstance(v, int):
                new = str(v + 1)
            elif isinstance(v, float):
                new = repr(v * 2 if v else 1.0)
            else:
                continue
            points.append((a, b, src[a:b], new, "constant", node.lineno))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Expr)) and node.lineno == node.end_lineno:
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call):
                continue
            a, b = at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
            points.append((a, b, src[a:b], "pass", "statement", node.lineno))
    return sorted(set(points))


def run_tests(workdir, tests, timeout, extra=()):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        return ("survived" if r.returncode == 0 else "killed"), time.time() - t0, r.stdout
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""


def fastest_first(stdout, tests):
    """Test ids of the clean run ordered by duration (from --durations=0), so that a mutant is
    usually killed by a fast test and -x stops there. Tests without a reported time go first."""
    took = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith("s") and parts[1] in ("setup", "call", "teardown"):
            try:
                took[parts[2]] = took.get(parts[2], 0.0) + float(parts[0][:-1])
            except ValueError:
                pass
    if not took:
        return tests
    return sorted(took, key=took.get)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default=",".join(TESTS))
    ap.add_argument("--per_file", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout_factor", type=float, default=3.0)
    ap.add_argument("--out", default="out/mutation.json")
    ap.add_argument("--grep", default="", help="only points on source lines containing this text")
    ap.add_argument("--tests", default="", help="comma list of test ids to run instead of the file's TESTS")
    ap.add_argument("--deselect", default="", help="comma list of test ids to leave out (pytest --deselect)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    files = {}
    for item in filter(None, args.files.split(",")):
        name, _, n = item.partition(":")
        if name not in TESTS:
            sys.exit(f"error: --files: {name} has no test files in TESTS ({', '.join(TESTS)})")
        files[name] = int(n) if n else args.per_file
    rng = random.Random(args.seed)
    plan = {}
    if args.tests:
        for f in files:
            TESTS[f] = args.tests.split(",")
    for f, n in files.items():
        src = open(os.path.join(ROOT, f)).read()
        lines = src.splitlines()
        pts = [p for p in mutation_points(src) if args.grep in lines[p[5] - 1]]
        plan[f] = (src, pts, sorted(rng.sample(range(len(pts)), min(n, len(pts)))))
        if args.list:
            for a, b, old, new, kind, line in pts:
                print(f"{f}:{line}: {kind}: {old!r} -> {new!r}")
    if args.list:
        return
    work = tempfile.mkdtemp(prefix="mutate-")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for p in tracked:
        os.makedirs(os.path.join(work, os.path.dirname(p)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, p), os.path.join(work, p))
    results, table = [], []
    try:
        for f, (src, pts, chosen) in plan.items():
            deselect = [a for t in filter(None, args.deselect.split(",")) for a in ("--deselect", t)]
            outcome, clean_s, out = run_tests(work, TESTS[f], None, ["--durations=0", "--durations-min=0", *deselect])
            if outcome != "survived":
                print(f"skipped {f}: its clean tests fail here (a loaded machine times out subprocess tests?):\n"
                      f"{out[-1500:]}", flush=True)
                table.append(dict(file=f, points=len(pts), tried=0, clean_s=round(clean_s, 1), killed=0,
                                  timeout=0, survived=0, note="clean tests failed"))
                continue
            order = [t for t in fastest_first(out, TESTS[f]) if t not in args.deselect.split(",")]
            timeout = max(240.0, args.timeout_factor * clean_s)   # a loaded shared machine is slow to start torch
            counts = {"killed": 0, "timeout": 0, "survived": 0}
            for j in chosen:
                a, b, old, new, kind, line = pts[j]
                with open(os.path.join(work, f), "w") as fh:
                    fh.write(src[:a] + new + src[b:])
                outcome, secs, _ = run_tests(work, order, timeout)
                counts[outcome] += 1
                text = src.splitlines()[line - 1].strip()
                results.append(dict(file=f, line=line, kind=kind, old=old, new=new, code=text, outcome=outcome,
                                    seconds=round(secs, 1)))
                print(f"{outcome:8s} {f}:{line} {kind}: {old!r} -> {new!r}   | {text[:90]}", flush=True)
            with open(os.path.join(work, f), "w") as fh:
                fh.write(src)
            table.append(dict(file=f, points=len(pts), tried=len(chosen), clean_s=round(clean_s, 1), **counts))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"seed": args.seed, "per_file": args.per_file, "table": table, "mutants": results}, fh, indent=1)
    print("\n| file | mutation points | tried | killed | timeout | survived | tests |\n|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['file']} | {r['points']} | {r['tried']} | {r['killed']} | {r['timeout']} | {r['survived']} | "
              f"{' '.join(TESTS[r['file']])} |")


if __name__ == "__main__":
    main()
