import sys

from largelm.evaluate.cli import main

sys.exit(main())
