"""The learning-rate search on a real PostgreSQL server (Debian's `postgresql`: initdb and pg_ctl in a
temporary folder, as an unprivileged user when the tests run as root), shared by two workers with
different worker ids as two machines would, one of them killed mid-trial; a server that refuses the login
or is down; and optuna-dashboard serving a search's study over HTTP. Skipped, saying why, where PostgreSQL
is not installed (`make test` installs it as root on Debian)."""
import contextlib
import datetime
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_clear_line, read_log, run_command
from test_search import RECIPES, SEARCH, base_suite, search_results, trials_dir, write
from tunebench import search

PASSWORD = "tunebench-test"
HEARTBEAT, GRACE = 1, 4  # seconds: short, so that a dead worker's trial is taken over within the test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): apt-get install postgresql, "
                "or run make test as root on Debian, which installs it")


@pytest.fixture(scope="module")
def postgres(request):
    """A PostgreSQL server of its own on 127.0.0.1 (password login), stopped and deleted after the module."""
    bin_dir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="tunebench-pg-"))  # not under pytest's root-only tmp: the server user reads it
    as_user = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    (folder / "password").write_text(PASSWORD + "\n")
    if as_user:
        os.chown(folder / "password", nobody.pw_uid, nobody.pw_gid)
    data, port = folder / "data", free_port()

    def run(*command):
        done = subprocess.run([*as_user, *map(str, command)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    run(bin_dir / "initdb", "-D", data, "-U", "tunebench", "--pwfile", folder / "password", "--auth", "scram-sha-256",
        "-E", "UTF8", "--no-sync")

    def stop():
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)

    request.addfinalizer(stop)
    run(bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} -c fsync=off", "start")
    return {"port": port, "url": lambda db: f"postgresql://tunebench:{PASSWORD}@127.0.0.1:{port}/{db}"}


def new_database(postgres, name: str) -> str:
    import psycopg

    with psycopg.connect(postgres["url"]("postgres"), autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres["url"](name)


def lora_suite(assets, **search_keys):
    """One method, 3 rates, 2 rungs: 4 trials. A step of the tiny model takes some 40 ms: rungs of 30 and 90
    steps, so that a trial can be killed in the middle of its training (process starts cost far more)."""
    suite = base_suite(assets, search={**SEARCH, "first_rung": 30, "max_steps": 90, **search_keys})
    suite["recipes"] = RECIPES[1:]
    return suite


def start_worker(suite_path, cwd, worker_id):
    """A worker as a machine of its own would run it, its output collected line by line."""
    worker = subprocess.Popen([sys.executable, "-m", "tunebench.search", "--suite", str(suite_path), "--worker-id", worker_id],
                              cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    worker.lines = []
    worker.reader = threading.Thread(target=lambda: worker.lines.extend(worker.stdout), daemon=True)
    worker.reader.start()
    return worker


def started(worker) -> list:
    return [line.strip() for line in list(worker.lines) if line.startswith("=== search")]


def wait_for(condition, worker, what, seconds=600):
    deadline = time.monotonic() + seconds
    while not condition():
        assert worker.poll() is None and time.monotonic() < deadline, f"{what}: " + "".join(worker.lines)[-2000:]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def sqlite_search(assets, tmp_path_factory):
    """The same search on the default SQLite storage, one worker: the reference, and a study to show."""
    tmp = tmp_path_factory.mktemp("sqlite-search")
    path = write(tmp / "tiny.yaml", lora_suite(assets))
    done = run_command([sys.executable, "-m", "tunebench.search", "--suite", str(path)], cwd=tmp, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return tmp, path


def test_two_machines_share_one_study_on_postgresql_and_a_killed_one_loses_nothing(assets, tmp_path, postgres, sqlite_search):
    """Machine A takes the first trial; once it is on its second, machine B joins; A is killed with SIGKILL
    mid-trial (its training with it). B runs the rest, takes A's trial over once A's heartbeat is older
    than the grace, and the study ends as the SQLite study of the same suite did, to the last digit."""
    import optuna

    url = new_database(postgres, "two_machines")
    path = write(tmp_path / "tiny.yaml", lora_suite(assets, storage=url, heartbeat=HEARTBEAT, grace=GRACE))
    a = start_worker(path, tmp_path, "machine-a")
    wait_for(lambda: len(started(a)) >= 2, a, "machine A never reached its second trial")
    b = start_worker(path, tmp_path, "machine-b")
    killed_lr = float(started(a)[1].split("rate ")[1].split(",")[0])
    log = trials_dir(tmp_path / "runs" / "tiny", "lora_r4") / search.run_name(killed_lr) / "log.jsonl"
    wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 3, a, "machine A's second trial never logged step 2")
    os.kill(a.pid, signal.SIGKILL)
    killed_at = datetime.datetime.now()
    a.wait()
    deadline = time.monotonic() + 30
    while True:  # its training dies with it
        try:
            os.killpg(a.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "machine A's trial went on training without it"
        time.sleep(0.1)
    assert read_log(log.parent)[-1]["step"] < 30  # killed mid-training, before its rung's end
    b.wait(timeout=900)
    b.reader.join(timeout=10)
    assert b.returncode == 0, "".join(b.lines)[-3000:]

    storage = search.open_storage(url)
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    rows = sorted((t.user_attrs["rung"], t.user_attrs["slot"], t.user_attrs["attempt"], t.state.name, t.user_attrs["worker"],
                   t.params["lr"]) for t in trials)
    summary = "\n".join(["trials (rung, slot, attempt, state, worker, rate):", *map(str, rows),
                         f"machine A started: {started(a)}", f"machine B started: {started(b)}"])
    print(summary)
    complete = [r for r in rows if r[3] == "COMPLETE"]
    assert sorted((r[0], r[1]) for r in complete) == [(0, 0), (0, 1), (0, 2), (1, 0)], summary  # each piece once
    (lost,) = [r for r in rows if r[3] != "COMPLETE"]
    assert lost[2:] == (0, "FAIL", "machine-a", killed_lr), summary  # A's trial, killed
    (redone,) = [t for t in trials if t.user_attrs["attempt"] == 1]
    assert (redone.user_attrs["worker"], redone.params["lr"], redone.state.name) == ("machine-b", killed_lr, "COMPLETE")
    # Taken over through the heartbeat (A's id is not B's: no process check), after the grace.
    assert (redone.datetime_start - killed_at).total_seconds() >= GRACE - HEARTBEAT, summary
    workers = [r[4] for r in complete]
    assert workers.count("machine-a") >= 1 and workers.count("machine-b") >= 1, summary  # both took trials
    assert len(started(a)) + len(started(b)) == 4 + 1, summary  # none run twice but the killed one
    steps = [r["step"] for r in read_log(log.parent)]
    assert steps == sorted(set(steps)) and steps[-1] in (30, 90)  # one training of that run, to its rung

    on_postgres, on_sqlite = search_results(path, tmp_path), search_results(sqlite_search[1], sqlite_search[0])
    assert on_postgres["storage"] == url.replace(PASSWORD, "***")  # search.json keeps no password
    mine, reference = on_postgres["methods"]["lora_r4"], on_sqlite["methods"]["lora_r4"]
    assert mine["study"] == reference["study"] == name
    assert mine["best_lr"] == reference["best_lr"] and mine["status"] == "done"
    assert {(t["rung"], t["lr"]): t["value"] for t in mine["trials"]} == \
        {(t["rung"], t["lr"]): t["value"] for t in reference["trials"]}


def test_workers_starting_together_on_a_new_database_all_get_in(postgres):
    """Three machines' first workers at once on an empty database: one makes Optuna's tables, the others
    collide with it (a duplicate key, a table that exists now) and find them made on their next try."""
    url = new_database(postgres, "fresh")
    code = f"from tunebench import search; search.open_storage({url!r}); print('connected')"
    workers = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0] and all("connected" in o for o in outputs), outputs


@pytest.mark.parametrize("problem,module", [("refused login", "tunebench.compare"), ("server down", "tunebench.search")])
def test_a_server_that_refuses_the_login_or_is_down_is_one_line(assets, tmp_path, postgres, problem, module):
    url = postgres["url"]("postgres")
    if problem == "refused login":
        url, expected = url.replace(PASSWORD, "wrong"), 'password authentication failed for user "tunebench"'
    else:
        url, expected = url.replace(f":{postgres['port']}/", f":{free_port()}/"), "Connection refused"
    path = write(tmp_path / "tiny.yaml", lora_suite(assets, storage=url))
    result = run_command([sys.executable, "-m", module, "--suite", str(path)], cwd=tmp_path, timeout=300)
    assert_one_clear_line(result, expected)
    assert "wrong" not in result.stderr and "cannot be reached" in result.stderr  # no password printed
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()  # nothing started


def get(url: str):
    with urllib.request.urlopen(url, timeout=120) as response:  # a loaded machine's first answer can take seconds
        return response.read().decode()


def keep_asking(url, server):
    while server.poll() is None:
        with contextlib.suppress(OSError):
            get(url)


def test_the_dashboard_shows_the_study_and_its_trials(sqlite_search):
    tmp, path = sqlite_search
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tunebench.dashboard", "--suite", str(path), "--port", str(port)],
                              cwd=tmp, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.communicate()
                assert time.monotonic() < deadline, "the dashboard never listened"
                time.sleep(0.2)
        page = get(f"http://127.0.0.1:{port}/dashboard")
        (study,) = json.loads(get(f"http://127.0.0.1:{port}/api/studies"))["study_summaries"]
        detail = json.loads(get(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}"))
    finally:
        # Ctrl-C while a browser keeps asking: a signal that lands in the middle of a request stops it too.
        asking = threading.Thread(target=keep_asking, args=(f"http://127.0.0.1:{port}/api/studies", server), daemon=True)
        asking.start()
        time.sleep(0.5)
        server.send_signal(signal.SIGINT)
        try:
            out, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            out, err = server.communicate()
    found = search_results(path, tmp)["methods"]["lora_r4"]
    print(f"page: {page.strip()[:300]}\nstudy: {json.dumps(study)}\ntrials: "
          + json.dumps([{k: t[k] for k in ("number", "state", "values", "params", "user_attrs")} for t in detail["trials"]]))
    assert "<title>Optuna Dashboard</title>" in page
    assert study["study_name"] == detail["name"] == found["study"]
    trials = sorted((t["state"], float(t["params"][0]["param_external_value"]), t["values"][0]) for t in detail["trials"])
    assert trials == sorted(("Complete", t["lr"], t["value"]) for t in found["trials"])
    assert f"http://127.0.0.1:{port}/" in out and server.returncode == 0, err[-2000:]  # stopped by Ctrl-C


@pytest.mark.parametrize("setup,expected", [
    ("no search", "has no search yet"),
    ("port in use", "cannot listen on 127.0.0.1:PORT"),
])
def test_dashboard_bad_input_is_one_line(assets, tmp_path, sqlite_search, setup, expected):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cwd, path = (tmp_path, write(tmp_path / "tiny.yaml", lora_suite(assets))) if setup == "no search" else sqlite_search
        result = subprocess.run([sys.executable, "-m", "tunebench.dashboard", "--suite", str(path), "--port", str(port)],
                                cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert_one_clear_line(result, expected.replace("PORT", str(port)))
    assert not (tmp_path / "runs").exists()
