"""The README's LoRA example runs as written, and prints and writes what its comments say."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_lora_library_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The LoRA library"):]
    start = section.index("```python\n") + len("```python\n")
    example = section[start:section.index("```\n", start)]
    merged = tmp_path / "vit_merged.safetensors"
    try:
        result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                                timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr
        printed = re.search(r"print_trainable_parameters\(model\)\s+# (.+)\n", example).group(1)
        assert result.stdout.splitlines() == [printed]
        size = float(re.search(r'save_adapter\(model, "adapter.safetensors"\)\s+# ([\d.]+) MB', example).group(1))
        assert round((tmp_path / "adapter.safetensors").stat().st_size / 1e6, 1) == size
        assert merged.is_file()
    finally:
        merged.unlink(missing_ok=True)  # 346 MB, failed or not: pytest keeps the last three sessions' folders
