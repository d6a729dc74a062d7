"""``python -m smartprune`` runs the command line."""

from smartprune.cli.main import main

raise SystemExit(main())
