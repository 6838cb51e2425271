"""Rich rendering of command results: tables, terminal charts, progress. No numerics here."""
