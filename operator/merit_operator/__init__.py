"""merit_operator."""
