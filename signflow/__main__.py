import sys

from signflow.cli import main

sys.exit(main())
