"""Running the apps as Flower processes.

    launch.py      `fedsb run`: a private simulation SuperLink, `flwr run`, the final status, clean-up
    deploy/        `fedsb deploy-local`: SuperLink + N SuperNodes with TLS and authentication, and
                   the deployment's credentials (scripts/gen-certs.sh)
    processes.py   free ports, starting, waiting for and stopping process groups (shared)
    flwr_cli.py    the `flwr` CLI's environment, connection config and JSON replies (shared)
"""
