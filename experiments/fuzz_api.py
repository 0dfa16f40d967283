"""Fuzz effjax's public API with bad inputs and tabulate what happens (issue 19).

Several hundred seeded cases throw bad inputs at ``effjax.optim`` (optimizer constructors,
``init`` and ``update``: wrong, transposed, missing and extra leaves; integer, complex,
float16 and bfloat16 dtypes; zero-size and odd shapes; NaN / inf / 1e20 / 3e38 gradient
elements; states from another optimizer; bad ``block_size``, ``bits``, codebooks and other
arguments), ``effjax.quant`` (``quantize_blockwise`` / ``dequantize_blockwise``), ``effjax.peft``
(``inject`` with rules matching nothing, wrong methods, bad ranks; ``load_adapters`` on a tree
whose shapes do not match) and ``effjax.compress.fake_quantize_params``, and sorts each
outcome into one class:

* ``a``: the right outcome. Either a clear error, whose message names the leaf or argument
  at fault (its path or name) *and* the bad value, shape or dtype; or, for an input the API
  documents as accepted (a float16 leaf, a NaN gradient element, a zero-size leaf), a result
  that passes the case's check of the documented rule.
* ``b``: an unclear error: an exception whose message does not name both.
* ``c``: a silent wrong result: no error, and the result breaks the documented rule (a
  parameter that blows up after one huge gradient element, a state from another optimizer
  accepted, a codebook that decodes the block maximum to twice its value).
* ``d``: a crash: the process died, ran past the per-case time limit, or ran out of the
  memory limit (``RLIMIT_AS``; an out-of-memory error counts here too).

Each case has a name, the call, the words a clear message must contain (``where``: leaf path
or argument name; ``what``: the bad value, shape or dtype) and, for inputs that must be
accepted, a check that returns what is wrong with the result. Cases run in a child process
(``RLIMIT_AS`` ``--memory-gb``, one device, a per-case ``--timeout``), restarted after a
crash, so an OOM or a hang is classified rather than suffered.

Run:  python -m experiments.fuzz_api            (all cases, a few minutes on 2 CPU cores)
      python -m experiments.fuzz_api --quick    (a fixed subset, seconds; run by the tests)
Writes experiments/results/fuzz_api{,_quick}.{json,md,png} (``--out`` picks another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments._fuzz_case import LR, Case, leaf, val  # noqa: F401 - the case API, re-exported
from experiments._fuzz_optim import optim_cases
from experiments._fuzz_other import compress_cases, peft_cases, quant_cases

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ROOT = Path(__file__).resolve().parent.parent
CLASSES = {
    "a": "clear error naming the leaf/argument and the bad value (or the documented result)",
    "b": "unclear error",
    "c": "silent wrong result",
    "d": "crash (process died, time or memory limit)",
}
AREAS = ("optim", "quant", "peft", "compress")


# ------------------------------------------------------------------ classification

_OOM_WORDS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "std::bad_alloc")


def is_clear(case: Case, message: str) -> bool:
    """The message names the leaf/argument (one of ``where``) and the bad value (``what``)."""
    named = not case.where or any(w in message for w in case.where)
    valued = not case.what or any(w in message for w in case.what)
    return named and valued and bool(case.where or case.what)


def classify(case: Case, outcome: dict) -> str:
    """The class (``a``..``d``) of ``outcome``, a dict with ``kind``:

    * ``"raised"`` with ``type`` and ``message``: ``d`` for an out-of-memory error, ``a`` when
      the message is clear (:func:`is_clear`), else ``b``;
    * ``"returned"`` with ``problem`` (the check's finding, ``None`` if it passed): ``a`` when
      the case accepts the input and the check passed, else ``c`` (a must-raise case returned);
    * ``"died"`` (exit, signal, time or memory limit): ``d``.
    """
    kind = outcome["kind"]
    if kind == "died":
        return "d"
    if kind == "raised":
        msg = outcome.get("message", "")
        if outcome.get("type") == "MemoryError" or any(w in msg for w in _OOM_WORDS):
            return "d"
        return "a" if is_clear(case, msg) else "b"
    if kind == "returned":
        if case.check is None or outcome.get("problem"):
            return "c"
        return "a"
    raise ValueError(f"unknown outcome kind {kind!r}")


def run_in_process(case: Case) -> dict:
    """Run one case here; the outcome dict :func:`classify` reads (never ``died``)."""
    t0 = time.perf_counter()
    try:
        result = case.call()
        if "jax" in sys.modules:  # errors of asynchronous dispatch surface here
            result = sys.modules["jax"].block_until_ready(result)
    except BaseException as e:  # noqa: BLE001 - every failure is an outcome
        if isinstance(e, KeyboardInterrupt):
            raise
        return dict(kind="raised", type=type(e).__name__, message=str(e)[:3000],
                    seconds=time.perf_counter() - t0)
    if case.check is None:
        problem = f"accepted (returned {type(result).__name__}); the input must be refused"
    else:
        try:
            problem = case.check(result)
        except Exception as e:  # noqa: BLE001 - a result the check cannot read is wrong
            problem = f"unexpected result ({type(e).__name__}: {e})"[:3000]
    return dict(kind="returned", problem=problem, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------ suites

QUICK = (
    "optim/adamw_8bit/grad-transposed",
    "optim/adamw_8bit/grad-missing-leaf",
    "optim/adamw_8bit/init-int32-param",
    "optim/adamw_8bit/grad-nan",
    "optim/adamw_8bit/block_size='256'",
    "optim/quantize_state/bits=3",
    "quant/quantize/x-int32",
    "quant/quantize/block_size=0",
    "quant/quantize/codebook=[-2, 0, 2]",
    "quant/dequantize/absmax-wrong-shape",
    "peft/inject/rule-matches-nothing",
    "peft/LoRA/rank=0",
    "compress/FakeQuant/bits=17",
    "compress/fake_quantize_params/int-leaf",
    # one case of each kind of defect the full run found at fddb3e7 (classes b, c, d then)
    "optim/adamw_8bit/grad-1e+20",
    "optim/adamw_8bit/float16-grad-300",
    "optim/state-from-adamw_8bit->adamw_4bit",
    "optim/adamw_8bit/learning_rate=None",
    "optim/stable_spam/float16-params",
    "optim/galore_adamw/grad-1e+20",
    "quant/quantize/codebook=256 with a value 3 times",
    "quant/quantize/x-zero-size",
    "peft/inject/method=the LoRA class",
    "peft/LoRA/rank=10**9",
)


def selftest_cases() -> list[Case]:
    """Hand-made cases whose class is known, for the tests of the runner and classifier."""

    def clear():
        raise ValueError("['w']: shape (2,) does not match the parameter's (3,)")

    def unclear():
        return 1 / 0

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hang():
        time.sleep(3600)

    def hog():
        return np.ones((1 << 30) * 8, np.uint8).sum()  # 8 GB: past the memory limit

    def oom_error():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4000000000 bytes.")

    return [
        Case("self/clear", "optim", clear, leaf("w"), ("(2,)",)),
        Case("self/unclear", "optim", unclear, leaf("w"), ("(2,)",)),
        Case("self/wrong-result", "quant", lambda: 2.0,
             check=lambda r: None if r == 1.0 else f"got {r}, expected 1.0"),
        Case("self/right-result", "quant", lambda: 1.0,
             check=lambda r: None if r == 1.0 else f"got {r}, expected 1.0"),
        Case("self/accepted-bad-input", "peft", lambda: 1.0, ("x",), ("1",)),
        Case("self/dies", "peft", die, ("x",), ("1",)),
        Case("self/hangs", "compress", hang, ("x",), ("1",)),
        Case("self/memory", "compress", hog, ("x",), ("1",)),
        Case("self/oom-error", "compress", oom_error, ("x",), ("1",)),
    ]


def build_cases(suite: str, seed: int, quick: bool) -> list[Case]:
    """The cases of ``suite`` (``main`` or ``selftest``), the same for the same seed."""
    if suite == "selftest":
        return selftest_cases()
    cases = []
    for i, fn in enumerate((optim_cases, quant_cases, peft_cases, compress_cases)):
        cases += fn(np.random.default_rng([seed, i]))
    names = [c.name for c in cases]
    dupes = [n for n, k in Counter(names).items() if k > 1]
    if dupes:
        raise AssertionError(f"duplicate case names: {dupes}")
    if quick:
        by_name = {c.name: c for c in cases}
        missing = [n for n in QUICK if n not in by_name]
        if missing:
            raise AssertionError(f"quick cases not built: {missing}")
        cases = [by_name[n] for n in QUICK]
    return cases


# ------------------------------------------------------------------ the child process


def worker(suite: str, seed: int, quick: bool, memory_gb: float) -> None:
    """Read case indices on stdin, write one JSON outcome per line on the original stdout."""
    limit = int(memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (Python or C) goes to stderr
    sys.stdout = sys.stderr
    cases = build_cases(suite, seed, quick)
    channel.write(json.dumps({"ready": len(cases)}) + "\n")
    for line in sys.stdin:
        i = int(line)
        channel.write(json.dumps({"index": i, **run_in_process(cases[i])}) + "\n")


class _Child:
    def __init__(self, suite, seed, quick, memory_gb, devices, log):
        env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [sys.executable, "-m", "experiments.fuzz_api", "--worker", "--suite", suite,
               "--seed", str(seed), "--memory-gb", str(memory_gb)] + (["--quick"] if quick
                                                                         else [])
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "ab"),
                                     text=True, start_new_session=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def read(self, timeout: float) -> tuple[dict | None, str]:
        """The next JSON line, or ``None`` and why not (the process is then killed)."""
        if self.sel.select(timeout):
            line = self.proc.stdout.readline()
            if line:
                return json.loads(line), ""
            self.kill()
            return None, f"the process ended (exit status {self.proc.returncode})"
        self.kill()
        return None, f"no answer within {timeout:g} s (killed)"

    def send(self, i: int) -> bool:
        try:
            self.proc.stdin.write(f"{i}\n")
            self.proc.stdin.flush()
            return True
        except BrokenPipeError:
            return False

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.sel.close()

    def tail(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")[-800:]
        except OSError:
            return ""


def run_cases(suite: str = "main", *, seed: int = 0, quick: bool = False,
              timeout: float = 30.0, memory_gb: float = 4.0, devices: int = 1,
              startup_timeout: float = 180.0, progress: bool = False) -> list[dict]:
    """Run every case of ``suite`` in child processes; one result dict per case."""
    cases = build_cases(suite, seed, quick)
    results = []
    child = None
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "worker.log")
        try:
            for i, case in enumerate(cases):
                if child is None:
                    child = _Child(suite, seed, quick, memory_gb, devices, log)
                    hello, why = child.read(startup_timeout)
                    if not hello or hello.get("ready") != len(cases):
                        raise RuntimeError(f"the fuzz worker did not start ({why}):\n"
                                           f"{child.tail()}")
                t0 = time.perf_counter()
                out, why = child.read(timeout) if child.send(i) else (None, "stdin closed")
                if out is None:
                    out = dict(kind="died", message=f"{why}; stderr: {child.tail()[-300:]}",
                               seconds=round(time.perf_counter() - t0, 2))
                    child = None
                out.pop("index", None)
                cls = classify(case, out)
                if cls == "d" and child is not None:  # start afresh after an OOM
                    child.kill()
                    child = None
                results.append(dict(name=case.name, area=case.area, cls=cls, doc=case.doc,
                                    **out))
                if progress:
                    print(f"[{i + 1}/{len(cases)}] {cls} {case.name}", file=sys.stderr,
                          flush=True)
        finally:
            if child is not None:
                child.kill()
    return results


# ------------------------------------------------------------------ report


def table(results: Sequence[dict]) -> str:
    """Markdown: class counts per area, then every case outside class ``a``."""
    lines = ["| area | a: clear / right | b: unclear error | c: silent wrong | d: crash | cases |",
             "|---|---:|---:|---:|---:|---:|"]
    for area in AREAS + ("all",):
        rows = [r for r in results if area in ("all", r["area"])]
        if not rows:
            continue
        n = Counter(r["cls"] for r in rows)
        lines.append(f"| {area} | {n['a']} | {n['b']} | {n['c']} | {n['d']} | {len(rows)} |")
    bad = [r for r in results if r["cls"] != "a"]
    if bad:
        lines += ["", "| case | class | outcome |", "|---|---|---|"]
        for r in sorted(bad, key=lambda r: (r["cls"], r["name"])):
            what = r.get("problem") or r.get("message") or ""
            what = (f"{r['type']}: " if r.get("type") else "") + what
            what = " ".join(what.split())[:200].replace("|", "\\|")
            lines.append(f"| `{r['name']}` | {r['cls']} | {what} |")
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"a": "tab:green", "b": "tab:orange", "c": "tab:red", "d": "black"}
    bottom = np.zeros(len(AREAS))
    for cls, color in colors.items():
        counts = np.array([sum(r["area"] == a and r["cls"] == cls for r in results)
                           for a in AREAS])
        ax.bar(AREAS, counts, bottom=bottom, color=color, label=f"{cls}: {CLASSES[cls]}")
        bottom += counts
    ax.set_ylabel("cases")
    ax.set_title("effjax public API under bad inputs (fuzz_api)")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _tree_state() -> str:
    """The commit the code under test is at, and whether effjax / pallas_kernels differ."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "effjax",
                                "pallas_kernels"], cwd=ROOT, text=True, capture_output=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (" + uncommitted changes in effjax/pallas_kernels" if dirty else "")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a fixed subset, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="RLIMIT_AS of the child")
    ap.add_argument("--devices", type=int, default=1, help="CPU devices of the child")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--suite", default="main", choices=("main", "selftest"))
    ap.add_argument("--note", default="", help="recorded with the results (e.g. the tree)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.suite, args.seed, args.quick, args.memory_gb)
        return []
    t0 = time.time()
    results = run_cases(args.suite, seed=args.seed, quick=args.quick, timeout=args.timeout,
                        memory_gb=args.memory_gb, devices=args.devices, progress=not args.quick)
    command = " ".join(["python -m experiments.fuzz_api",
                        *(argv if argv is not None else sys.argv[1:])])
    import jax

    meta = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", jax=jax.__version__,
                command=command, seconds=round(time.time() - t0, 1), seed=args.seed,
                tree=_tree_state(), note=args.note,
                classes=CLASSES, counts=dict(Counter(r["cls"] for r in results)))
    md = table(results)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "fuzz_api" + ("_quick" if args.quick else "")
                        + ("" if args.suite == "main" else f"_{args.suite}"))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"`{command}` ({meta['seconds']} s, {meta['machine']}, jax {meta['jax']}; "
                f"{meta['tree']}{'; ' + args.note if args.note else ''})\n\n" + md + "\n")
    plot(results, stem + ".png")
    return results


if __name__ == "__main__":
    main()
