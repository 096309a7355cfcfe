"""The fuzz directory's report: examples run per test (profile: GRAPHTUNE_FUZZ_PROFILE, see fuzz_support.py)."""
from fuzz_support import EXAMPLES, PROFILE, SCALE


def pytest_terminal_summary(terminalreporter):
    if not EXAMPLES:
        return
    tr = terminalreporter
    total = sum(EXAMPLES.values())
    scale = f", scale {SCALE}" if PROFILE == "long" else ""
    tr.write_sep("-", f"graphtune fuzz: {total} examples run (profile {PROFILE}{scale})")
    if PROFILE == "long" or tr.config.option.verbose > 0:
        for name, n in sorted(EXAMPLES.items()):
            tr.write_line(f"{n:7d}  {name}")
