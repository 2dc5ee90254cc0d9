"""Warm starts: `python SCRIPT ARGS` run in a child forked from this process, whose imports are paid.

A suite starts many short processes (search trials, runs, evaluations), and each cold one pays for
importing torch, transformers, peft, accelerate and datasets before it does anything: 8 s on an idle
2-core machine, twice that on a loaded one. Here the suite's process imports them once, then forks
a child per command; the child runs the script as `python SCRIPT ARGS` would (runpy, sys.argv, its
environment, PyTorch's default thread count) and exits. Every child starts from the same untouched
parent, so no run sees another's state, and a child dies with its parent (PR_SET_PDEATHSIG), so a
killed worker leaves no trial running behind it.

Forking is safe only before any thread or accelerator exists in the parent: can_fork() allows it on
Linux, in a process with one Python thread, on a machine without a CUDA device (a process forked
after CUDA is initialized cannot use it), where the command is `python SCRIPT ...` with this
interpreter and the child's environment differs from this process's only in PYTHONPATH. The parent
never runs a PyTorch kernel: it keeps one thread (an OpenMP pool started before a fork hangs the
child's). Anything else, and TUNEBENCH_COLD=1, starts a new process as before.
"""
import atexit
import ctypes
import importlib
import os
import runpy
import signal
import sys
import threading
import traceback
from pathlib import Path

# What train.py and evaluate.py import, in the order they do; a module missing here is imported by the child.
PRELOADED = ("torch", "transformers", "peft", "accelerate", "datasets", "tqdm.auto", "safetensors.torch",
             "transformers.models.auto.modeling_auto", "tunebench.data", "tunebench.models", "tunebench.methods",
             "tunebench.plan", "tunebench.fused_loss", "tunebench.activations", "tunebench.distributed",
             "tunebench.measure", "tunebench.packing", "tunebench.metrics", "tunebench.chat", "tunebench.judge",
             "tunebench.report", "sacrebleu", "rouge_score.rouge_scorer", "nltk.translate.meteor_score",
             "deepspeed")  # accelerate imports it on the first unwrap_model (every save) where it is installed: 2 s
SAME_ENV_BUT = {"PYTHONPATH"}  # the project on the path: already imported here
_default_threads = None  # PyTorch's thread count in a fresh process, restored in each child
_tqdm_interval = None  # tqdm's monitor interval, restored in each child
_set_by_imports = set()  # environment variables the preloaded imports set (or removed) in this process
# The environment before them: torch may already be imported by can_fork, before prepare() runs.
_environ_before_imports = dict(os.environ)


def can_fork(command: list, env: dict) -> bool:
    """Whether `command` may run as a child forked from this process (see the module's docstring)."""
    return why_cold(command, env) is None


def why_cold(command: list, env: dict):
    """Why `command` must start as a new process, or None where it may be forked from this one."""
    if sys.platform != "linux":
        return "not Linux"
    if os.environ.get("TUNEBENCH_COLD") or env.get("TUNEBENCH_COLD"):
        return "TUNEBENCH_COLD is set"
    if len(command) < 2 or command[0] != sys.executable or not command[1].endswith(".py") or not Path(command[1]).is_file():
        return "not `python SCRIPT.py` with this interpreter"
    _stop_tqdm_monitor()
    if threading.active_count() > 1:
        return f"threads running: {sorted(t.name for t in threading.enumerate())}"
    changed = {k for k in env.keys() | os.environ.keys() if env.get(k) != os.environ.get(k)}
    if changed - SAME_ENV_BUT - _set_by_imports:
        return f"environment differs in {sorted(changed - SAME_ENV_BUT - _set_by_imports)}"
    try:
        import torch
    except ImportError:
        return "no torch"
    return "a CUDA device" if torch.cuda.is_available() else None


def _stop_tqdm_monitor() -> None:
    """tqdm starts a thread with the first progress bar (datasets shows one while it loads a file) that
    only tunes how often bars redraw. Stop it for good in this process: a fork beside a thread is unsafe.
    Each child starts its own again."""
    try:
        from tqdm import TMonitor, tqdm
    except ImportError:
        return
    global _tqdm_interval
    if _tqdm_interval is None:
        _tqdm_interval = tqdm.monitor_interval
    tqdm.monitor_interval = 0  # every tqdm class (datasets', tqdm.auto's) inherits it
    for thread in threading.enumerate():
        if isinstance(thread, TMonitor):
            thread.exit()


def prepare() -> None:
    """Import what every child needs, once, on one thread."""
    global _default_threads
    import torch

    first = _default_threads is None
    if first:
        _default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # again in a forked child that forks children of its own (a suite started warm)
    if not first:
        return
    # deepspeed imports mlflow where it is installed, and mlflow's import starts a thread that asks a server for
    # its telemetry settings: a thread here would stop every fork, and a suite has no business calling out.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional library: the child imports it or goes without, as a cold start would
    # What an import sets for itself (torch's TORCHINDUCTOR_CACHE_DIR) is not a difference: a cold child sets it too.
    before = _environ_before_imports
    _set_by_imports.update(k for k in before.keys() | os.environ.keys() if os.environ.get(k) != before.get(k))


def set_by_imports() -> set:
    """The environment variables the preloaded imports set in this process (they are no difference in a child's)."""
    return set(_set_by_imports)


class Forked:
    """A forked child as subprocess.Popen shows one: its output on .stdout, its exit status from .wait()."""

    def __init__(self, pid: int, stdout):
        self.pid, self.stdout = pid, stdout

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.stdout.close()
        return os.waitstatus_to_exitcode(status)  # negative for a signal, as Popen's returncode


def start(command: list, env: dict) -> Forked:
    """Fork a child that runs `python SCRIPT ARGS` (command) with env; its stdout and stderr on one pipe."""
    read_fd, write_fd = os.pipe()
    pid = fork(command, env, write_fd, write_fd, close=(read_fd,))
    os.close(write_fd)
    return Forked(pid, os.fdopen(read_fd, "rb", buffering=0))


def fork(command: list, env: dict, stdout_fd: int, stderr_fd: int, cwd=None, close=()) -> int:
    """Fork a child that runs `python SCRIPT ARGS` or `python -m MODULE ARGS` (command) with env, in cwd, its
    stdout and stderr on these descriptors, its stdin empty; the child closes `close`. Returns its pid."""
    prepare()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        for fd in close:
            os.close(fd)
        _run_in_child(command[1:], env, stdout_fd, stderr_fd, parent, cwd)
    return pid


def _run_in_child(argv: list, env: dict, stdout_fd: int, stderr_fd: int, parent: int, cwd) -> None:
    """As `python SCRIPT ARGS` (or `python -m MODULE ARGS`) would: never returns."""
    code = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
        if os.getppid() != parent:
            os._exit(1)  # the parent died before prctl took effect
        if cwd is not None:
            os.chdir(cwd)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        for fd in {stdin, stdout_fd, stderr_fd} - {0, 1, 2}:
            os.close(fd)
        atexit._clear()  # the parent's exit handlers are the parent's: a child runs only its own
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import torch

        torch.set_num_threads(_default_threads)
        if _tqdm_interval is not None:
            from tqdm import tqdm

            tqdm.monitor_interval = _tqdm_interval
        if argv[0] == "-m":
            sys.argv = argv[1:]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
