"""`python -m fedsb.ops.deploy {local,certs}`: see fedsb.ops.deploy.cli."""

from fedsb.ops.deploy.cli import main

raise SystemExit(main())
