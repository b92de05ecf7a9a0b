"""The README opens with exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands():
    commands = readme_commands()
    assert commands == ["bash scripts/run_default.sh", "bash scripts/test.sh"]
    for command in commands:
        assert (REPO / command.split()[1]).is_file()


def test_ci_runs_the_readme_test_command():
    ci_lines = [
        line.strip()
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert readme_commands()[1] in ci_lines


def test_test_script_treats_no_tests_as_failure():
    script = (REPO / "scripts/test.sh").read_text()
    assert "set -euo pipefail" in script and 'exit "$status"' in script
