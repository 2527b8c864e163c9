"""ramp-board's cached leaderboards, computed and written without pandas or
ramp-database, byte for byte as ramp-database 0.10.1 writes them.

- :mod:`.data`: the statements that read the rows (event or one team);
- :mod:`.tables`: the numbers and order of each table;
- :mod:`.html`: pandas' ``to_html`` output, reproduced;
- :mod:`.update`: compute and write the event's and the teams' columns;
- :mod:`.refresher`: the daemon's thread that keeps them current.
"""
