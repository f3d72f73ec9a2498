import sys

from softprompt.serve.launch import main

sys.exit(main())
