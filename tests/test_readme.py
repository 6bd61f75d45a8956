"""The README's everyday loop runs as written: its bash block, in a fresh folder and a fresh
shell (no PREFECT_HOME, no PREFECT_API_URL), with the project's venv on PATH."""

import os
import re
import subprocess
import sys
from pathlib import Path

from builders import write_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- everyday-loop: tests/test_readme.py runs the next block -->"


def _loop_block() -> str:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, "the README lost its everyday-loop block"
    match = re.match(r"\s*```bash\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert match, "the marker must be followed by a ```bash block"
    return match.group(1)


def test_the_readme_everyday_loop_runs_as_written(tmp_path):
    block = _loop_block()
    write_image_folder(tmp_path / "data" / "datasets" / "pets", ["cat", "dog", "rabbit"], 16,
                       seed=3)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME", "RESIDUAL_DATA_ROOT")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]

    assert '"name": "smoke"' in out  # grid show prints the template
    assert re.search(r"pets\.json: a valid grid 'pets': 1 cells", out), out
    runs = re.findall(r"grid pets: 1 cells; (\d+) stage runs: (\d+) computed", out)
    assert [computed for _, computed in runs] == [runs[0][0], "0"], runs  # then all cached
    groups = {line.split()[0]: line.split()[1:] for line in out.splitlines()
              if line.split()[:1] and line.split()[0] in ("zero-shot", "coarse",
                                                          "residual-star")}
    assert set(groups) == {"zero-shot", "coarse", "residual-star"}, out
    assert all(values[0] == "2" for values in groups.values())  # count: the two seeds
    report = tmp_path / "data" / "reports" / "residual-tiny-random" / "report.md"
    assert "report: data/reports/residual-tiny-random/report.md" in out, out[-2000:]
    assert "residual-star" in report.read_text()
    assert (tmp_path / "data" / "prefect" / "prefect.db").is_file()  # history under the root
