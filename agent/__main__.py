"""``python -m agent`` is the ``meta-agent`` command."""

from agent.cli import main

raise SystemExit(main())
