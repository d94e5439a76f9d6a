"""Settings: every field declared once, the value checks, config files, the preflight."""
