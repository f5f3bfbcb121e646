import sys

from backbone_server.server import main

sys.exit(main())
