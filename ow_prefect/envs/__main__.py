import sys

from ow_prefect.envs import main

sys.exit(main())
