import sys

from fastserve.cli import main

sys.exit(main())
