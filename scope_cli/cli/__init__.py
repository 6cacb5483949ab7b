"""The command line (`scope`, app.py) and the commands that drive whole runs: round, compare, report,
status."""
