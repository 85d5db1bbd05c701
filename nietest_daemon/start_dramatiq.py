"""`python -m nietest_daemon.start_dramatiq {master|subtask|subtask_ops|all} [-p N] [-t M]`.

The name is the seed's (its workers were started this way, and scripts/start_dramatiq_workers.sh
still runs it): a contract kept as is, although what it starts is the nietest daemon
(supervisord), not Dramatiq. The program is nietest_daemon/programs/seed_compat.py.
"""

import sys

from nietest_daemon.programs.seed_compat import main

if __name__ == "__main__":
    sys.exit(main())
