"""`python -m ow_prefect.testing.fake_runpod [--port N] [--api-key KEY]` (docs/runpod.md, 'Try it on the fake')."""

from ow_prefect.testing.fake_runpod.fake import main

raise SystemExit(main())
