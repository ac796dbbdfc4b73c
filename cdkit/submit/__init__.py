"""The submission file: building, checking coverage, writing and sending it."""
