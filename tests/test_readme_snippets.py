"""The README's "Use a model" snippets run as a newcomer would run them: from the repository's root, on the shipped
sample image, in a fresh process with no terminal to answer a prompt (stdin closed), with a tiny bundle in place of
`runs/demo/model`. Nothing may ask a question, and no warning may reach stderr."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "photo.jpg"
PROGRESS_BAR = re.compile(r"^[\w ]+:\s+\d+%\|")  # a tqdm line: "Loading weights:  50%|█████     | 32/64 ..."


def use_a_model_snippets():
    """The Python code blocks of the README's "Use a model" section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Use a model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_sample_image_is_shipped_and_used():
    from PIL import Image

    with Image.open(SAMPLE) as image:
        image.verify()
    assert SAMPLE.stat().st_size < 100_000  # small: it lives in the repository
    snippets = "\n".join(use_a_model_snippets())
    assert "examples/photo.jpg" in snippets and '"photo.jpg"' not in snippets


def test_use_a_model_snippets_run_without_prompt_or_warning(tiny_bundle_dir, tmp_path):
    snippets = use_a_model_snippets()
    assert len(snippets) >= 3 and all("runs/demo/model" in s or "classify(" in s for s in snippets)
    program = "\n".join(s.replace("runs/demo/model", str(tiny_bundle_dir)) for s in snippets)
    program += "\nprint('LABELS', [entry['label'] for entry in classify('examples/photo.jpg', top_k=3)])"
    program += "\nprint('ANSWERS', answers.generated_text)"
    script = tmp_path / "snippets.py"
    script.write_text(program, encoding="utf-8")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LABELS [" in result.stdout and "ANSWERS [" in result.stdout
    assert "custom code" not in result.stdout + result.stderr  # transformers' trust_remote_code question
    # transformers' own progress bars ("Loading weights: 100%|...") are expected on stderr; nothing else is
    other = [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip() and not PROGRESS_BAR.match(line)]
    assert other == [], result.stderr[-3000:]
