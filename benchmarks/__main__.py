"""``python -m benchmarks``: the runjournal benchmark suite; see benchmarks/run.py."""

from benchmarks.run import main

raise SystemExit(main())
