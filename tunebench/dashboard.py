"""optuna-dashboard on a suite's learning-rate search: every method's study, its trials (rate, rung, value,
worker) and its plots, in a browser, while the search runs or after.

    python -m tunebench.dashboard --suite recipes/suites/X.yaml [--host 127.0.0.1] [--port 8080]
    make dashboard SUITE=recipes/suites/X.yaml [PORT=8080]

It serves the suite's `search.storage` (SQLite under the runs folder, or a PostgreSQL URL), so a search on
several machines is watched from any machine that reaches that database. Ctrl-C stops it.
"""
from tunebench import search, suites
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.inputs import positive


@command
def main(argv=None):
    parser = ArgumentParser(usage_hint="python -m tunebench.dashboard --suite SUITE.yaml [--host HOST] [--port PORT]",
                            description="Serve optuna-dashboard on a suite's learning-rate search.")
    parser.add_argument("--suite", required=True, help="the suite file, with a search: section")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=positive, default=8080, help="port to listen on")
    args = parser.parse_args(argv)
    suite = suites.load(args.suite)
    if suite["search_section"] is None:
        raise UserError(f"suite file '{args.suite}' has no search: section; there is no study to show")
    suites.plan(suite)
    plan = search.parse(suite)
    if plan["storage"] == search.default_storage(suite["runs_dir"]) and not search.sqlite_path(plan["storage"]).is_file():
        raise UserError(f"suite '{suite['name']}' has no search yet ({search.sqlite_path(plan['storage'])} is missing); "
                        f"start it with python -m tunebench.compare --suite {args.suite} (or tunebench.search)")
    storage = search.storage_of(plan)
    import signal
    import threading
    from wsgiref.simple_server import make_server

    import optuna_dashboard

    try:
        server = make_server(args.host, args.port, optuna_dashboard.wsgi(storage))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another with --port") from None

    # Ctrl-C (or SIGTERM) asks the server to stop after the request in hand. A KeyboardInterrupt would not do:
    # wsgiref catches every exception a request raises, so one that lands mid-request keeps the server up.
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"optuna-dashboard on {search.shown_url(plan['storage'])}: http://{args.host}:{args.port}/ (Ctrl-C stops it)",
          flush=True)
    with server:
        server.serve_forever()


if __name__ == "__main__":
    main()
