"""The actors of the four queues.

The task pipeline (master expansion, subtask state machine) lands here; until then the queues
have no actors and a message for an unknown actor is dead-lettered by Dramatiq with a log line.
Extra actor modules (tests use this) are listed in NIETEST_ACTOR_MODULES.
"""
