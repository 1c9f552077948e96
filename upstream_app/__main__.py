"""``python -m upstream_app ...`` runs the ``restaurant-api`` command line."""

from upstream_app.cli import main

raise SystemExit(main())
