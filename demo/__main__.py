"""`python -m demo`: the end-to-end demo (demo/run.py; `make demo` runs it)."""

from demo.run import main

raise SystemExit(main())
