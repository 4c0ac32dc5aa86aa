"""fedsb on Flower's deployment engine: a SuperLink, SuperExecs and N SuperNodes with TLS and
SuperNode authentication (docs/multinode.md).

Read it in this order:
    credentials.py   the CA, the SuperLink's TLS certificate and the SuperNode key pairs (also
                     what scripts/gen-certs.sh writes for docker-compose.yml)
    local.py         LocalDeployment and deploy_local(): the whole topology as processes on 127.0.0.1
    cli.py           `fedsb deploy-local` and `python -m fedsb.ops.deploy {local,certs}`
The process and `flwr` plumbing it shares with `fedsb run` is in fedsb.ops.processes and
fedsb.ops.flwr_cli.
"""
