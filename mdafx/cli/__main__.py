"""``python -m mdafx.cli``: the ``mdafx`` command where the console script is not installed."""
from mdafx.cli import main

raise SystemExit(main())
