"""`python -m client ...` is `magi-client ...`."""

from client.cli import main

raise SystemExit(main())
