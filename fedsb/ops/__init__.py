"""Running the apps as Flower processes.

    launch.py      `fedsb run`: a private simulation SuperLink, `flwr run`, the final status, clean-up
    deploy/        `fedsb deploy-local`: SuperLink + N SuperNodes with TLS and authentication, and
                   the deployment's credentials (scripts/gen-certs.sh)
    processes.py   free ports, starting, waiting for and stopping process groups, and finding the
                   processes that leave them by a tag in their environment (shared)
    interrupts.py  Ctrl-C and SIGTERM as an exception, so that the clean-up runs (shared)
    flwr_cli.py    the `flwr` CLI's environment, connection config and JSON replies (shared)
"""
