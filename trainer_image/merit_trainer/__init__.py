"""merit_trainer."""
