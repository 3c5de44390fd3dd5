"""Fuzzing harnesses (atheris); ``make fuzz`` runs them. See fuzz/fuzz_codec.py."""
