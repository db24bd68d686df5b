import sys

from largelm.checkpoint.convert.cli import main

sys.exit(main())
