"""Reference implementations that saljax is checked and timed against (not imported by saljax)."""
