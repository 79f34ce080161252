"""`python -m relufy ...` (what `accelerate launch -m relufy train ...` runs)."""

from .cli import main

raise SystemExit(main())
