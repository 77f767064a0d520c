"""Run `python SCRIPT ARGS` for many (script, args) pairs in one interpreter, as the interpreter
itself would run each: the script as __main__ (runpy), sys.argv set, and the exit status and stderr
that `python SCRIPT ARGS` gives: SystemExit(n) -> n (a message -> printed, status 1), an uncaught
exception -> its traceback on stderr and status 1. Reads [[script, [args]], ...] as JSON on stdin,
prints [{"rc", "stderr", "stdout"}, ...] as JSON on the last line of stdout. Used by tests/test_bad_input.py so
that torch is imported once per batch of cases, not once per case."""
import contextlib
import io
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(script, args):
    err, out = io.StringIO(), io.StringIO()
    sys.argv = [script, *args]
    rc = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        except SystemExit as e:
            if e.code is None:
                rc = 0
            elif isinstance(e.code, int):
                rc = e.code
            else:
                print(e.code, file=sys.stderr)
                rc = 1
        except BaseException:   # what the interpreter does with an uncaught exception
            traceback.print_exc()
            rc = 1
    return {"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()[-4000:]}


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    results = [run(script, args) for script, args in cases]
    sys.stdout = sys.__stdout__
    print(json.dumps(results))
