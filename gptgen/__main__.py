import sys

from gptgen.cli import main

sys.exit(main())
