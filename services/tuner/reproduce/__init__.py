"""`mist reproduce vtab|fewshot|dg`: the paper's protocols on the user's own weights and local datasets, through the
real services (layouts.py: what is read; protocols.py: what runs; runner.py: resume, features, ETA; tables.py)."""
