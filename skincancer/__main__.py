"""`python -m skincancer`: the command line."""

from .cli import main

raise SystemExit(main())
