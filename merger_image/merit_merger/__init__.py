"""merit_merger."""
