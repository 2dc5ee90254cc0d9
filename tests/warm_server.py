"""The tests' scripts started as a suite starts them: forked from a process whose imports are paid
(tunebench/warm.py), instead of paying 8 s of imports in each of some hundred cold starts.

conftest.run_script starts one server per test process, lazily, with the environment every test shares,
and sends it one command at a time; a command whose environment differs in anything (a variable read at
import time would be wrong in the forked child) starts cold, as does every command where warm.py would
not fork. tests/test_warm.py shows a forked run writing what a cold run writes, to the last digit.

Protocol, one JSON line each way: {"command", "env", "cwd", "stdout", "stderr"} (the last two: files the
child writes) is answered by {"pid"} when the child starts, then {"code"} (its exit status) when it ends.
The server ends with its stdin: when the test process ends.
"""
import json
import os
import sys

from tunebench import warm


def serve() -> None:
    warm.prepare()
    answer = sys.stdout
    ready = warm.can_fork([sys.executable, __file__], dict(os.environ))
    print(json.dumps({"ready": ready, "set_by_imports": sorted(warm.set_by_imports())}), file=answer, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        pid = warm.fork(request["command"], request["env"], stdout, stderr, cwd=request["cwd"])
        os.close(stdout)
        os.close(stderr)
        print(json.dumps({"pid": pid}), file=answer, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=answer, flush=True)


if __name__ == "__main__":
    serve()
