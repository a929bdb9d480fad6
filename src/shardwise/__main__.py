"""`python -m shardwise` is the `shardwise` command (and what `torchrun -m shardwise` runs)."""

from shardwise.cli import main

raise SystemExit(main())
