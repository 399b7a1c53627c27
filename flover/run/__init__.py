"""`flover run`: replay an INI workload against the engine, with a live view and a report."""
