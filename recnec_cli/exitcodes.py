"""The exit codes of every ``recnec`` command, in one place (README "Exit codes and errors").

Importing this module costs nothing: the CLI reads it at start-up, the library
(:mod:`recnec_cli.orchestration.scan`) when it ends a run.
"""

#: every study succeeded (a DEFERRED study is not a failure)
EXIT_OK = 0
#: at least one study failed; its row says why and the batch still ran to the end
EXIT_STUDY_FAILED = 1
#: usage or environment error (bad option, missing weights, broken installation): nothing scanned
EXIT_USAGE = 2
#: ``scan`` only: another run holds the state's lock (sysexits.h EX_TEMPFAIL: "try again later")
EXIT_LOCKED = 75
#: ``scan`` stopped by SIGINT / SIGTERM (128 + the signal number); finished studies are in the report
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
