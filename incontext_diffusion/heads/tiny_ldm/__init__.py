"""The embedded tiny text-to-image backbone's head: `head.py` trains it, `commands.py` runs `icd infer` / `icd eval`."""
