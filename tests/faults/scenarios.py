"""Scenarios run in child processes (see ``harness.write_script``).

Each scenario is a function ``f(params) -> exit status`` registered with
:func:`scenario`. It talks to the test through :func:`faultlib.notify` (events) and
:func:`faultlib.wait_command` (commands), and reports what it observed with
:func:`faultlib.write_result`. Judging what is on disk is the test's job.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import faultlib
import torch
from faultlib import describe_error, make_writer, notify, outcome_of, payload, write_result

import snapwriter

_SCENARIOS: dict[str, Callable[[dict[str, Any]], int | None]] = {}


def scenario(fn: Callable[[dict[str, Any]], int | None]) -> Callable[[dict[str, Any]], int | None]:
    _SCENARIOS[fn.__name__] = fn
    return fn


def main(name: str, params: dict[str, Any]) -> int:
    status = _SCENARIOS[name](params)
    return 0 if status is None else status


def _wait_handle(handle: Any) -> dict[str, Any]:
    """Wait for a handle; describe the failure (observing it) or None."""
    exc = handle.exception()
    return {"ok": exc is None, "error": describe_error(exc)}


def _save(w: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call the writer and wait: the failure, raised by the call (SimpleWriter) or by
    the handle, described; ``phase`` says which."""
    try:
        handle = w(*args, **kwargs)
    except BaseException as exc:
        return {"ok": False, "phase": "call", "error": describe_error(exc)}
    out = _wait_handle(handle)
    out["phase"] = "handle"
    return out


def _writer(p: dict[str, Any], **extra: Any) -> Any:
    kwargs = dict(p.get("writer_kwargs", {}))
    kwargs.update(extra)
    return make_writer(p["kind"], p.get("ctor_out_dir", p["out_dir"]), **kwargs)


# -- 1. crashes -------------------------------------------------------------------------


@scenario
def crash_timed(p: dict[str, Any]) -> None:
    """Save ``prev`` (and wait), build ``new``, say GO, save ``new``; the test kills us."""
    w = _writer(p)
    name = p.get("name", "snap.pt")
    w(name, p["out_dir"], payload(*p["prev"])).result()
    notify("CLEAN", temps=faultlib_temps(p["out_dir"]))
    big = payload(*p["new"])
    notify("GO")
    t0 = time.perf_counter()
    handle = w(name, p["out_dir"], big)
    staged = time.perf_counter()
    out = _wait_handle(handle)
    done = time.perf_counter()
    notify("SAVED", ok=out["ok"])
    fin = outcome_of(w.finalize)
    write_result({"save": out, "finalize": fin, "stage_s": staged - t0, "save_s": done - t0})


def faultlib_temps(out_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if snapwriter.is_temp_name(n))


@scenario
def crash_strace(p: dict[str, Any]) -> None:
    """Like crash_timed, with predictable temporary names and a GO command from the test.

    The test attaches strace between READY and GO. With ``recover`` the scenario saves
    once more after a failed save (error injection: the writer must keep working).
    """
    os.environ["FAULTS_FIXED_TMP_PID"] = str(os.getpid())
    faultlib.child_setup()
    w = _writer(p)
    name = p.get("name", "snap.pt")
    w(name, p["out_dir"], payload(*p["prev"])).result()
    new = payload(*p["new"])
    notify("READY")
    faultlib.wait_command("GO")
    out = _save(w, name, p["out_dir"], new)
    result: dict[str, Any] = {"save": out}
    if p.get("recover"):
        notify("SAVED", ok=out["ok"])
        faultlib.wait_command("RECOVER")  # strace has detached by now
        result["recover"] = _save(w, name, p["out_dir"], payload(*p["recover"]))
        result["temps_after_recover"] = faultlib_temps(p["out_dir"])
    result["finalize"] = outcome_of(w.finalize)
    write_result(result)


@scenario
def cleanup_probe(p: dict[str, Any]) -> None:
    """A fresh writer opens the directory (``initialize`` or a first save elsewhere)."""
    w = _writer(p)
    before = faultlib_temps(p["out_dir"])
    if p.get("how", "initialize") == "initialize":
        w.initialize(p["out_dir"])
    else:
        w("cleanup-probe.pt", p["out_dir"], payload(*p["probe"])).result()
    after = faultlib_temps(p["out_dir"])
    fin = outcome_of(w.finalize)
    write_result({"before": before, "after": after, "finalize": fin})


@scenario
def kill_saving_child(p: dict[str, Any]) -> None:
    """A process writer whose saving child the test kills: the parent must survive it.

    Saves ``prev``; says GO (the test kills the saving child at a random time); saves
    ``new``; then saves ``after`` with the same writer to show it keeps working.
    """
    w = _writer(p)
    name = "snap.pt"
    w(name, p["out_dir"], payload(*p["prev"])).result()
    big = payload(*p["new"])
    notify("GO")
    out = _save(w, name, p["out_dir"], big)
    notify("SAVED")
    faultlib.wait_command("CONTINUE")  # the test has killed the child by now
    after = _save(w, "after.pt", p["out_dir"], payload(*p["after"]))
    fin = outcome_of(w.finalize)
    write_result({"save": out, "after": after, "finalize": fin})


# -- 2. disk full and I/O errors --------------------------------------------------------


@scenario
def io_fault(p: dict[str, Any]) -> None:
    """v1 ok; arm the fault; v2 must fail cleanly; disarm; v3 ok with the same writer.

    Faults: ``enospc`` (a filler file fills a small tmpfs; removing it frees space),
    ``efbig`` (RLIMIT_FSIZE), ``fs:<op>`` (FaultyFS raising at open/write/flush/close/
    rename/makedirs while ``control`` exists). With ``unobserved`` the failure is not
    looked at through the handle: the next call must raise it.
    """
    fault = p["fault"]
    out_dir = p["out_dir"]
    extra: dict[str, Any] = {}
    if fault.startswith("fs:"):
        extra["fs"] = faultlib.FaultyFS(
            p["control"], fault[3:], getattr(errno, p.get("errno", "EIO")), p.get("after_bytes", 0)
        )
    if fault == "efbig":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (p["fsize_limit"], hard))
    w = _writer(p, **extra)
    result: dict[str, Any] = {}
    result["v1"] = _save(w, "snap.pt", out_dir, payload(*p["v1"]))
    # arm
    if fault == "enospc":
        fd = os.open(p["filler"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            chunk = b"\0" * 4096
            while True:
                os.write(fd, chunk)
        except OSError as exc:
            result["filler_errno"] = exc.errno
        finally:
            os.close(fd)
    elif fault.startswith("fs:"):
        open(p["control"], "w").close()
    v2 = payload(*p["v2"])
    if p.get("torch_save_path"):
        # a Parameter: snapwriter's fast writer hands the whole save to torch.save
        v2["param"] = torch.nn.Parameter(torch.zeros(3))
    if p.get("unobserved") and p["kind"] != "simple":
        handle = w("snap.pt", out_dir, v2)
        done = threading.Event()
        handle.add_done_callback(lambda _h: done.set())
        done.wait(60)
        result["v2_done"] = handle.done()
        # disarm, then the next call must raise the unreported failure
        _disarm(p)
        try:
            h3 = w("other.pt", out_dir, payload(*p["v3"]))
        except BaseException as exc:
            result["next_call"] = {"ok": False, "error": describe_error(exc)}
        else:
            result["next_call"] = {"ok": True}
            h3.result()
    else:
        result["v2"] = _save(w, "snap.pt", out_dir, v2)
        result["temps_after_failure"] = faultlib_temps(out_dir)
        result["after_failure"] = _version_at(os.path.join(out_dir, "snap.pt"), [p["v1"], p["v2"]])
        _disarm(p)
    result["v3"] = _save(w, "snap.pt", out_dir, payload(*p["v3"]))
    result["finalize"] = outcome_of(w.finalize)
    result["finalize_again"] = outcome_of(w.finalize)
    write_result(result)


def _version_at(path: str, candidates: list[list[int]]) -> Any:
    """The candidate ``path`` holds now, or why it holds none (for the result)."""
    try:
        return list(faultlib.which_version(path, [tuple(c) for c in candidates]))
    except AssertionError as exc:
        return str(exc)


@scenario
def fs_faults(p: dict[str, Any]) -> None:
    """One writer over a FaultyFS; for each operation in ``ops``: arm it, a save must
    fail cleanly, disarm, a save must succeed."""
    out_dir = p["out_dir"]
    control = p["control"]
    fs = faultlib.FaultyFS(control, "", errno.EIO, p.get("after_bytes", 1000))
    w = _writer(p, fs=fs)
    path = os.path.join(out_dir, "snap.pt")
    results: dict[str, Any] = {"v1": _save(w, "snap.pt", out_dir, payload(*p["v1"]))}
    good = p["v1"]
    for k, op in enumerate(p["ops"]):
        with open(control, "w") as f:
            f.write(op)
        bad = [1000 + k, p["v2"][1]]
        r: dict[str, Any] = {"v2": _save(w, "snap.pt", out_dir, payload(*bad))}
        r["temps_after_failure"] = faultlib_temps(out_dir)
        r["after_failure"] = _version_at(path, [good, bad])
        os.remove(control)
        again = [2000 + k, p["v1"][1]]
        r["v3"] = _save(w, "snap.pt", out_dir, payload(*again))
        if r["v3"]["ok"]:
            good = again
        results[op] = r
        write_result(results)  # so far: the test learns where a crash happened
    results["last_good"] = good
    results["finalize"] = outcome_of(w.finalize)
    results["finalize_again"] = outcome_of(w.finalize)
    write_result(results)


@scenario
def arena_reuse(p: dict[str, Any]) -> None:
    """A big snapshot, then a small one through the same writer: sizes on disk."""
    w = _writer(p)
    out_dir = p["out_dir"]
    r = {"big": _save(w, "big.pt", out_dir, payload(*p["big"]))}
    r["small"] = _save(w, "small.pt", out_dir, payload(*p["small"]))
    r["finalize"] = outcome_of(w.finalize)
    for name in ("big.pt", "small.pt"):
        path = os.path.join(out_dir, name)
        r[name] = os.path.getsize(path) if os.path.exists(path) else None
    write_result(r)


def _disarm(p: dict[str, Any]) -> None:
    fault = p["fault"]
    if fault == "enospc":
        os.remove(p["filler"])
    elif fault == "efbig":
        # Space "returns": a save under the limit must work (a process writer's child
        # keeps the limit it inherited, so raising it here would not reach it).
        pass
    elif fault.startswith("fs:"):
        os.remove(p["control"])


# -- 3. bad input -----------------------------------------------------------------------


def _probe(fn: Callable[[], Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        value = fn()
        if hasattr(value, "exception"):  # a handle: wait for it
            exc = value.exception(60)
            if exc is not None:
                return {"ok": False, "phase": "background", "error": describe_error(exc)}
    except BaseException as exc:
        return {
            "ok": False,
            "phase": "call",
            "error": describe_error(exc),
            "seconds": time.perf_counter() - t0,
        }
    return {"ok": True}


@scenario
def bad_filenames(p: dict[str, Any]) -> None:
    if p.get("chdir"):  # a writer without out_dir writes into the current directory
        os.chdir(p["chdir"])
    w = _writer(p)
    out_dir = p["out_dir"]
    target = payload(5)
    results = {}
    for label, filename in p["filenames"].items():
        if isinstance(filename, dict):  # JSON cannot carry bytes/None/ints: decode
            filename = {"bytes": lambda v: v.encode(), "int": int, "none": lambda v: None}[
                filename["type"]
            ](filename["value"])
        results[label] = _probe(lambda filename=filename: w(filename, out_dir, target))
    results["_finalize"] = outcome_of(w.finalize)
    write_result(results)


@scenario
def bad_targets(p: dict[str, Any]) -> None:
    out_dir = p["out_dir"]
    sock = socket.socket()
    fobj = open(os.devnull, "rb")  # noqa: SIM115
    targets: dict[str, Callable[[], Any]] = {
        "lambda": lambda: {"fn": lambda x: x},
        "socket": lambda: {"sock": sock},
        "open_file": lambda: {"file": fobj},
        "lock": lambda: {"lock": threading.Lock()},
        "generator": lambda: {"gen": (i for i in range(3))},
        "nested_lambda_in_list": lambda: [payload(7), {"deep": [lambda: 1]}],
    }
    results = {}
    for label in p["targets"]:
        w = _writer(p)
        results[label] = _probe(lambda label=label, w=w: w("snap.pt", out_dir, targets[label]()))
        results[label]["finalize"] = outcome_of(w.finalize)
    sock.close()
    fobj.close()
    write_result(results)


@scenario
def bad_savefuns(p: dict[str, Any]) -> None:
    out_dir = p["out_dir"]
    results = {}
    for label in p["savefuns"]:
        fun = getattr(faultlib, label)
        w = _writer(p, savefun=fun)
        results[label] = _probe(lambda w=w: w("snap.pt", out_dir, payload(9)))
        results[label]["temps"] = faultlib_temps(out_dir)
        results[label]["finalize"] = outcome_of(w.finalize)
    write_result(results)


@scenario
def bad_arguments(p: dict[str, Any]) -> None:
    """Wrong argument types to the constructor and to the call."""
    kind = p["kind"]
    out_dir = p["out_dir"]
    cls = faultlib.writer_class(kind)
    ctor_cases: dict[str, dict[str, Any]] = {
        "savefun_int": {"savefun": 123},
        "out_dir_int": {"out_dir": 123},
        "durable_str": {"durable": "yes"},
    }
    if kind != "simple":
        ctor_cases.update(
            {
                "max_pending_0": {"max_pending": 0},
                "max_pending_neg": {"max_pending": -1},
                "max_pending_float": {"max_pending": 1.5},
                "max_pending_bool": {"max_pending": True},
                "stage_str": {"stage": "no"},
            }
        )
    if faultlib.supports_keep_last():
        ctor_cases.update({"keep_last_0": {"keep_last": 0}, "keep_last_str": {"keep_last": "3"}})
    if kind in faultlib.PROCESS_KINDS:
        ctor_cases["mp_context_bogus"] = {"mp_context": "bogus"}
    results: dict[str, Any] = {}
    for label, kw in ctor_cases.items():
        kw = dict(kw)
        savefun = kw.pop("savefun", torch.save)
        od = kw.pop("out_dir", out_dir)
        if "mp_context" not in kw and faultlib.ALL_WRITERS[kind][1] is not None:
            kw["mp_context"] = faultlib.ALL_WRITERS[kind][1]
        for key, value in faultlib.WRITER_OPTIONS.get(kind, {}).items():
            kw.setdefault(key, value)

        def construct(savefun: Any = savefun, od: Any = od, kw: dict[str, Any] = kw) -> Any:
            w = cls(savefun, None, od, **kw)
            # a constructor that accepted it: the first call must fail, before writing
            try:
                return w("ctor-probe.pt", out_dir, payload(1))
            finally:
                outcome_of(w.finalize)

        results["ctor:" + label] = _probe(construct)
    w = make_writer(kind, "")
    call_cases: dict[str, Callable[[], Any]] = {
        "out_dir_int": lambda: w("x.pt", 123, payload(1)),
        "append_str": lambda: w("x.pt", out_dir, payload(1), append="yes"),
        "savefun_int": lambda: w("x.pt", out_dir, payload(1), savefun=123),
    }
    if kind != "simple":
        call_cases["stage_str"] = lambda: w("x.pt", out_dir, payload(1), stage="x")
    for label, fn in call_cases.items():
        results["call:" + label] = _probe(fn)
    results["_finalize"] = outcome_of(w.finalize)
    write_result(results)


# -- 4. misuse and concurrency -------------------------------------------------------------


@scenario
def misuse(p: dict[str, Any]) -> None:
    out_dir = p["out_dir"]
    r: dict[str, Any] = {}
    # finalize with nothing pending, twice
    w = _writer(p)
    r["finalize_empty"] = outcome_of(w.finalize)
    r["finalize_empty_again"] = outcome_of(w.finalize)
    r["call_after_finalize"] = _probe(lambda: w("a.pt", out_dir, payload(1)))
    r["save_after_finalize"] = _probe(
        lambda: w.save("b.pt", out_dir, payload(1), torch.save, False)
    )
    r["b_exists"] = os.path.exists(os.path.join(out_dir, "b.pt"))
    # finalize with a save pending, twice, then call
    w = _writer(p)
    h = w("c.pt", out_dir, payload(3, 200_000))
    r["finalize_pending"] = outcome_of(w.finalize)
    r["handle_after_finalize"] = _wait_handle(h)
    r["finalize_pending_again"] = outcome_of(w.finalize)
    r["call_after_finalize2"] = _probe(lambda: w("d.pt", out_dir, payload(4)))
    # with-block, then call
    with _writer(p) as w2:
        w2("e.pt", out_dir, payload(5))
    r["call_after_with"] = _probe(lambda: w2("f.pt", out_dir, payload(6)))

    # aclose twice and call after aclose
    async def aclose_twice() -> dict[str, Any]:
        w3 = _writer(p)
        w3("g.pt", out_dir, payload(7))
        out = {"aclose": "ok", "aclose_again": "ok"}
        await w3.aclose()
        await w3.aclose()
        out["call"] = _probe(lambda: w3("h.pt", out_dir, payload(8)))
        return out

    r["aclose"] = asyncio.run(aclose_twice())
    # finalize from another thread while the main thread keeps calling
    w4 = _writer(p)
    errors: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        i = 0
        while not stop.is_set():
            try:
                w4(f"race{i % 3}.pt", out_dir, payload(100 + i))
            except snapwriter.WriterClosedError:
                return
            except BaseException as exc:
                errors.append(repr(exc))
                return
            i += 1

    t = threading.Thread(target=caller)
    t.start()
    time.sleep(0.05)  # let the caller get going; the point is to race it
    r["finalize_racing"] = outcome_of(w4.finalize)
    stop.set()
    t.join(30)
    r["racing_thread_alive"] = t.is_alive()
    r["racing_errors"] = errors
    r["pending_after_finalize"] = w4.pending() if hasattr(w4, "pending") else None
    write_result(r)


@scenario
def finalize_race(p: dict[str, Any]) -> None:
    """finalize() while another thread keeps calling: no save may escape finalize."""
    out_dir = p["out_dir"]
    numel = p.get("numel", 16)  # bigger: longer staging, a wider window for the race
    rng = random.Random(p["seed"])
    rounds = []
    for _round in range(p["rounds"]):
        w = _writer(p)
        handles: list[Any] = []
        errors: list[str] = []
        stop = threading.Event()
        started = threading.Event()

        def caller(
            w: Any = w,
            handles: list[Any] = handles,
            errors: list[str] = errors,
            stop: threading.Event = stop,
            started: threading.Event = started,
        ) -> None:
            i = 0
            while not stop.is_set():
                try:
                    handles.append(w(f"race{i % 3}.pt", out_dir, payload(100 + i, numel)))
                except snapwriter.WriterClosedError:
                    started.set()
                    return
                except BaseException as exc:
                    errors.append(repr(exc))
                    started.set()
                    return
                started.set()
                i += 1

        t = threading.Thread(target=caller)
        t.start()
        started.wait(30)
        time.sleep(rng.random() * 0.02)  # finalize at a random point of the calls
        fin = outcome_of(w.finalize)
        escaped_now = sum(1 for h in handles if not h.done())
        stop.set()
        t.join(30)
        time.sleep(0.05)
        escaped = [repr(h) for h in handles if not h.done()]
        portals = [
            th.name for th in threading.enumerate() if th.name.startswith("snapwriter-portal")
        ]
        for h in handles:
            h.exception(30)
        rounds.append(
            {
                "finalize": fin,
                "errors": errors,
                "calls": len(handles),
                "escaped_at_finalize_return": escaped_now,
                "escaped": escaped,
                "thread_alive": t.is_alive(),
                "portal_threads_after": portals,
            }
        )
    write_result({"rounds": rounds})


@scenario
def finalize_during_call(p: dict[str, Any]) -> None:
    """finalize() lands while a call is between its closed-check and its submit.

    The call is held there deterministically: by a target object whose pickling (the
    staging copy) waits for a gate, or, for SimpleWriter (no staging), by an ``out_dir``
    whose ``__fspath__`` waits. Once finalize() has marked the writer closing, the gate
    opens. Acceptable: the call raises WriterClosedError, or its save is finished when
    finalize() returns. Not acceptable: a save finalize() did not wait for, another
    exception, a loop thread running again.
    """
    out_dir = p["out_dir"]
    gate = threading.Event()
    entered = threading.Event()

    class Blocker:
        def __reduce__(self) -> Any:
            entered.set()
            gate.wait(30)
            return (dict, ())

    class BlockingDir(os.PathLike):  # type: ignore[type-arg]
        def __fspath__(self) -> str:
            entered.set()
            gate.wait(30)
            return out_dir

    w = make_writer(p["kind"], "")  # empty: the call's out_dir is used
    w("warm.pt", out_dir, payload(1)).result()  # loop running, directory initialised
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            if p["kind"] == "simple":
                box["handle"] = w("race.pt", BlockingDir(), payload(2))
            else:
                box["handle"] = w("race.pt", out_dir, {"p": payload(2), "b": Blocker()})
        except BaseException as exc:
            box["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    entered.wait(30)
    fin: dict[str, Any] = {}
    finalizer = threading.Thread(target=lambda: fin.update(outcome_of(w.finalize)))
    finalizer.start()
    faultlib.wait_until(lambda: w.closed, 30, "finalize() to mark the writer closing")
    gate.set()
    finalizer.join(60)
    handle = box.get("handle")
    done_when_finalized = handle.done() if handle is not None else None
    caller.join(60)
    handle = box.get("handle")
    time.sleep(0.2)  # let a restarted loop thread show up, if any
    portals = [t.name for t in threading.enumerate() if t.name.startswith("snapwriter-portal")]
    result = {
        "finalize": fin,
        "finalizer_alive": finalizer.is_alive(),
        "caller_alive": caller.is_alive(),
        "call_error": describe_error(box.get("error")),
        "accepted": handle is not None,
        "done_when_finalize_returned": done_when_finalized,
        "portal_threads_after": portals,
    }
    if handle is not None:
        result["handle"] = _wait_handle(handle)
    write_result(result)


@scenario
def reentrant(p: dict[str, Any]) -> None:
    """A savefun that calls back into its writer (finalize, or another save)."""
    out_dir = p["out_dir"]
    box: dict[str, Any] = {}

    def savefun(target: Any, f: Any) -> None:
        torch.save(target, f)
        if p["what"] == "finalize":
            box["inner"] = outcome_of(box["w"].finalize)
        else:  # call without waiting for the inner save (that would be our deadlock)
            try:
                box["inner_handle"] = box["w"]("inner.pt", out_dir, payload(2))
                box["inner"] = {"ok": True}
            except BaseException as exc:
                box["inner"] = {"ok": False, "error": describe_error(exc)}

    w = _writer(p, savefun=savefun)
    box["w"] = w
    notify("CALLING")
    out = _probe(lambda: w("outer.pt", out_dir, payload(1)))
    notify("RETURNED")
    write_result({"outer": out, "inner": box.get("inner"), "finalize": outcome_of(w.finalize)})


def _concurrency_plan(seed: int, n_threads: int, n_saves: int) -> list[list[str]]:
    rng = random.Random(seed)
    plan = []
    for t in range(n_threads):
        names = []
        for j in range(n_saves):
            if rng.random() < 0.5:
                names.append(f"shared{rng.randrange(4)}.pt")
            else:
                names.append(f"t{t}_{j}.pt")
        plan.append(names)
    return plan


@scenario
def concurrency_threads(p: dict[str, Any]) -> None:
    """n_threads x n_saves on one writer; shared names are issued under a lock."""
    w = _writer(p)
    out_dir = p["out_dir"]
    plan = _concurrency_plan(p["seed"], p["threads"], p["saves"])
    lock = threading.Lock()
    seq = [0]
    last: dict[str, int] = {}
    handles: list[Any] = []
    errors: list[str] = []
    barrier = threading.Barrier(p["threads"])

    def next_seq() -> int:
        seq[0] += 1
        return seq[0] * 10 + 1  # a distinct version per save

    def worker(t: int) -> None:
        barrier.wait()
        for name in plan[t]:
            try:
                if name.startswith("shared"):
                    with lock:  # issue order of same-name saves is the call order
                        v = next_seq()
                        h = w(name, out_dir, payload(v, 16))
                        last[name] = v
                else:
                    with lock:
                        v = next_seq()
                    h = w(name, out_dir, payload(v, 16))  # unlocked: true concurrency
                    with lock:
                        last[name] = v
                handles.append(h)
            except BaseException as exc:
                errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(p["threads"])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    fin = outcome_of(w.finalize)
    failed = [describe_error(h.exception()) for h in handles if h.exception() is not None]
    write_result(
        {
            "last": last,
            "errors": errors,
            "failed": failed,
            "finalize": fin,
            "n_handles": len(handles),
        }
    )


@scenario
def concurrency_async(p: dict[str, Any]) -> None:
    """n coroutines saving through one writer on one asyncio loop."""
    out_dir = p["out_dir"]
    rng = random.Random(p["seed"])
    names = [
        f"shared{rng.randrange(4)}.pt" if rng.random() < 0.5 else f"c{i}.pt"
        for i in range(p["coroutines"])
    ]
    last: dict[str, int] = {}
    errors: list[str] = []
    seq = [0]

    async def one(i: int, w: Any) -> None:
        await asyncio.sleep(rng.random() * 0.01)
        try:
            if hasattr(w, "wait_for_room"):
                await w.wait_for_room()
            seq[0] += 1
            v = seq[0] * 10 + 3
            h = w(names[i], out_dir, payload(v, 16))  # no await between room and call
            last[names[i]] = v
            await h
        except BaseException as exc:
            errors.append(f"{names[i]}: {exc!r}")

    async def go() -> dict[str, Any]:
        async with _writer(p) as w:
            await asyncio.gather(*(one(i, w) for i in range(p["coroutines"])))
        return {"closed": w.closed}

    out = outcome_of(lambda: asyncio.run(go()))
    write_result({"last": last, "errors": errors, "run": out})


# -- 5. process life ----------------------------------------------------------------------


@scenario
def exit_inflight(p: dict[str, Any]) -> int | None:
    """Issue saves and leave without finalize (falling off the end, or raising)."""
    w = _writer(p)
    out_dir = p["out_dir"]
    for i, (v, n) in enumerate(p["saves"]):
        w(f"inflight{i}.pt", out_dir, payload(v, n))
    notify("ISSUED", pending=w.pending() if hasattr(w, "pending") else None)
    globals()["_keep_alive"] = w
    if p.get("how") == "raise":
        raise RuntimeError("uncaught error with saves in flight")
    if p.get("how") == "sys.exit":
        sys.exit(3)
    return None


@scenario
def exit_blocked(p: dict[str, Any]) -> None:
    """A save that never finishes and no finalize: exit must give up after the timeout."""
    w = _writer(p, savefun=faultlib.block_forever)
    w("stuck.pt", p["out_dir"], payload(1))
    globals()["_keep_alive"] = w
    notify("ISSUED")


@scenario
def sigterm(p: dict[str, Any]) -> None:
    """Save prev, then a big save during which the test sends SIGTERM."""
    if p.get("handler"):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    w = _writer(p)
    out_dir = p["out_dir"]
    w("snap.pt", out_dir, payload(*p["prev"])).result()
    big = payload(*p["new"])
    notify("GO")
    h = w("snap.pt", out_dir, big)
    notify("ISSUED")
    globals()["_keep_alive"] = (w, h)
    if p.get("handler"):
        faultlib.wait_command("NEVER", timeout=120)  # the signal arrives while we wait
    out = _wait_handle(h)
    write_result({"save": out, "finalize": outcome_of(w.finalize)})


@scenario
def user_fork(p: dict[str, Any]) -> None:
    """fork() in the user's program while the writer saves in the background."""
    out_dir = p["out_dir"]
    w = _writer(p)
    stop = threading.Event()
    bg_errors: list[str] = []
    count = [0]

    def background() -> None:
        i = 0
        while not stop.is_set():
            try:
                w(f"bg{i % 2}.pt", out_dir, payload(1000 + i, p["numel"])).result()
                count[0] += 1
            except BaseException as exc:
                bg_errors.append(repr(exc))
                return
            i += 1

    bg = threading.Thread(target=background)
    bg.start()
    children = []
    rng = random.Random(p["seed"])
    for k in range(p["forks"]):
        time.sleep(rng.random() * 0.05)  # fork at varied points of the background saves
        pid = os.fork()
        if pid == 0:
            import faulthandler

            # a hung child dumps every thread's stack to stderr, then exits
            faulthandler.dump_traceback_later(p["child_timeout"] * 0.5, exit=True)
            code = 0
            try:
                try:
                    w(f"child{k}-inherited.pt", out_dir, payload(1))
                    code |= 1  # inherited writer must refuse
                except snapwriter.WriterClosedError:
                    pass
                w.finalize()  # no-op on an inherited writer
                w2 = make_writer(p["kind"], out_dir)
                w2(f"child{k}.pt", out_dir, payload(2000 + k)).result()
                w2.finalize()
            except BaseException:
                import traceback

                traceback.print_exc()
                code |= 2
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children.append(pid)
    statuses = {}
    deadline = time.monotonic() + p["child_timeout"]
    for k, pid in enumerate(children):
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                statuses[k] = status
                break
            if time.monotonic() > deadline:
                statuses[k] = "HUNG"
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    stop.set()
    bg.join(60)
    after = _save(w, "parent-after.pt", out_dir, payload(3000))
    write_result(
        {
            "statuses": statuses,
            "bg_errors": bg_errors,
            "bg_saves": count[0],
            "after": after,
            "finalize": outcome_of(w.finalize),
        }
    )


@scenario
def background_imports(p: dict[str, Any]) -> None:
    """Which modules (and lazily computed stdlib state) a writer's background threads
    initialise during its first saves: a fork() in the program at that moment leaves
    the child with a half-imported module or a module lock held forever."""
    import importlib.abc
    import tempfile

    seen: list[list[str]] = []

    class Recorder(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            thread = threading.current_thread()
            if thread is not threading.main_thread():
                seen.append([name, thread.name])
            return None

    tempdir_before = tempfile.tempdir
    sys.meta_path.insert(0, Recorder())
    w = _writer(p)
    out_dir = p["out_dir"]
    r = {"first": _save(w, "a.pt", out_dir, payload(1, 1000))}
    r["second"] = _save(w, "b.pt", out_dir, payload(2, 1000))
    r["finalize"] = outcome_of(w.finalize)
    r["imports"] = seen
    r["tempdir_computed_in_background"] = tempdir_before is None and tempfile.tempdir is not None
    write_result(r)


@scenario
def user_fork_exit(p: dict[str, Any]) -> None:
    """A forked child that leaves through the normal interpreter exit (not os._exit)."""
    out_dir = p["out_dir"]
    w = _writer(p)
    h = w("parent.pt", out_dir, payload(1, p["numel"]))
    pid = os.fork()
    if pid == 0:
        w2 = make_writer(p["kind"], out_dir)
        w2("child.pt", out_dir, payload(2))
        globals()["_keep_alive"] = (w, w2)
        sys.exit(0)  # interpreter exit: w is inherited (refuses), w2 completes at exit
    deadline = time.monotonic() + p["child_timeout"]
    status: Any = None
    while status is None:
        got, st = os.waitpid(pid, os.WNOHANG)
        if got:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "HUNG"
        else:
            time.sleep(0.01)
    write_result({"status": status, "parent": _wait_handle(h), "finalize": outcome_of(w.finalize)})


@scenario
def mp_contexts(p: dict[str, Any]) -> None:
    """A process writer under one start method: saves, failures crossing the boundary."""
    out_dir = p["out_dir"]
    w = _writer(p)
    r: dict[str, Any] = {}
    r["ok1"] = _save(w, "one.pt", out_dir, payload(1, 1000))
    r["raises"] = _save(w, "two.pt", out_dir, payload(2), savefun=faultlib.raising_savefun)
    r["unpicklable_error"] = _save(
        w, "three.pt", out_dir, payload(3), savefun=faultlib.unpicklable_error_savefun
    )

    def local_savefun(target: Any, f: Any) -> None:  # a closure: does not pickle
        torch.save(target, f)

    try:
        h = w("four.pt", out_dir, payload(4), savefun=local_savefun)
    except BaseException as exc:
        r["closure"] = {"ok": False, "phase": "call", "error": describe_error(exc)}
    else:
        r["closure"] = _wait_handle(h)
    r["ok2"] = _save(w, "five.pt", out_dir, payload(5, 1000))
    r["finalize"] = outcome_of(w.finalize)
    write_result(r)


# -- 6. retention -------------------------------------------------------------------------


@scenario
def retention_loop(p: dict[str, Any]) -> None:
    """Save iter_1, iter_2, ... with retention on until killed (or ``count`` saves).

    ``fail_every``: every n-th save uses a failing savefun (retention must not run).
    ``mode``: ``keep_last`` (snapwriter's option) or ``ppe`` (ppe's snapshot extension
    with ``n_retains`` through ``_add_cleanup_hook``).
    """
    out_dir = p["out_dir"]
    keep = p["keep"]
    numel = p["numel"]
    start = p.get("start", 1)
    count = p.get("count", 10**9)
    if p["mode"] == "keep_last":
        w = _writer(p, keep_last=keep)

        def save(i: int, fail: bool) -> dict[str, Any]:
            fun = faultlib.raising_savefun if fail else None
            return _save(w, f"iter_{i}.pt", out_dir, payload(i, numel), savefun=fun)

    else:
        import pytorch_pfn_extras as ppe

        w = _writer(p)

        class Target:
            def __init__(self) -> None:
                self.i = 0

            def state_dict(self) -> dict[str, Any]:
                return payload(self.i, numel)

            def load_state_dict(self, state: dict[str, Any]) -> None:
                pass

        target = Target()
        ext = ppe.training.extensions.snapshot_object(
            target, "iter_{.iteration}.pt", writer=w, n_retains=keep
        )

        class Manager:
            iteration = 0
            out = out_dir
            writer = w

        manager = Manager()
        ext.initialize(manager)

        def save(i: int, fail: bool) -> dict[str, Any]:
            target.i = i
            manager.iteration = i
            if fail:
                fun = faultlib.raising_savefun
                return _save(w, f"iter_{i}.pt", out_dir, payload(i, numel), savefun=fun)
            ext(manager)
            # wait for it: ppe does not hand the handle out; finalize-free wait
            faultlib.wait_until(lambda: w.pending() == 0, 120, "pending saves")
            return {"ok": True}

    outcomes = {}
    for i in range(start, start + count):
        if i == p.get("pause_before"):
            notify("READY")
            faultlib.wait_command("GO")
        fail = bool(p.get("fail_every")) and i % p["fail_every"] == 0
        out = save(i, fail)
        outcomes[i] = out
        notify("SAVED", i=i, ok=out["ok"], failed_on_purpose=fail)
    write_result({"outcomes": outcomes, "finalize": outcome_of(w.finalize)})


# -- 7. permissions -----------------------------------------------------------------------


@scenario
def permission(p: dict[str, Any]) -> None:
    """Drop to nobody, then save where nobody may not write."""
    # Python may live where nobody cannot read (here: under /root): import now what
    # the writers import lazily.
    import importlib

    for mod in (
        "multiprocessing.popen_fork",
        "multiprocessing.popen_spawn_posix",
        "multiprocessing.popen_forkserver",
        "multiprocessing.connection",
        "multiprocessing.synchronize",
        "multiprocessing.resource_sharer",
        "anyio._backends._asyncio",
        "torch.utils.serialization.config",
    ):
        importlib.import_module(mod)
    faultlib.drop_privileges()
    r: dict[str, Any] = {"uid": os.getuid()}
    for label, (out_dir, name) in p["cases"].items():
        w = make_writer(p["kind"], out_dir)  # ppe's rule: the writer's out_dir is used
        r[label] = _probe(lambda w=w, out_dir=out_dir, name=name: w(name, out_dir, payload(2)))
        r[label]["finalize"] = outcome_of(w.finalize)
    w = make_writer(p["kind"], p["writable"])
    r["writable"] = _probe(lambda: w("ok.pt", p["writable"], payload(3)))
    r["writable_finalize"] = outcome_of(w.finalize)
    write_result(r)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run through harness.write_script")
