import sys

from pgsidecar.cli import main

sys.exit(main())
