"""The classifier recipe's files agree: make_synthetic.py writes what the configs and README read,
and .gitignore covers what README's commands write.

    python -m pytest -q tests/test_classify_recipe.py
"""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("finetune_classify_*.py"))


def _load_make_synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "data" / "classify" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ms = _load_make_synthetic()
# the files `python data/classify/make_synthetic.py` writes, relative to the repository root
WRITTEN = {f"{ms.SyntheticConfig().out_dir}/{split}.jsonl" for split in ("train", "val", "test")}


def test_make_synthetic_writes_the_three_splits(tmp_path):
    out = tmp_path / "classify"
    cfg = ms.SyntheticConfig(out_dir=str(out), n_train=30, n_val=5, n_test=7)
    ms.main(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]
    for split, n in (("train", 30), ("val", 5), ("test", 7)):
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        assert all(r["prompt"].endswith("\nLabel:") and r["completion"] in (" weather", " sport", " food")
                   for r in rows)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    ms.main(cfg)  # the same seed writes the same bytes: a rerun is not "other data"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_make_synthetic_never_replaces_other_data_silently(tmp_path):
    out = tmp_path / "classify"
    out.mkdir()
    real = '{"prompt": "Classify the message as hate, offensive or neutral.\\nMessage: hi\\nLabel:", "completion": " neutral"}\n'
    (out / "train.jsonl").write_text(real)
    cfg = ms.SyntheticConfig(out_dir=str(out), n_train=3, n_val=3, n_test=3)
    with pytest.raises(ValueError, match=r"train\.jsonl already hold other data.*--overwrite=True"):
        ms.main(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"] and (out / "train.jsonl").read_text() == real
    ms.main(ms.SyntheticConfig(out_dir=str(out), n_train=3, n_val=3, n_test=3, overwrite=True))
    assert (out / "train.jsonl").read_text() != real


def test_configs_read_the_files_make_synthetic_writes():
    assert len(CONFIGS) == 3  # lora (with --lora_targets=all, the all-layer way), 1d, fewshot
    for config in CONFIGS:
        ns = {}
        exec(config.read_text(), ns)
        files = {k: ns[k] for k in ("sft_train_file", "sft_val_file", "data_file", "shots_file") if k in ns}
        assert files, f"{config.name} names no data file"
        assert set(files.values()) <= WRITTEN, f"{config.name}: {files}"


def test_readme_and_recipe_commands_name_only_those_files():
    texts = {p.name: p.read_text() for p in [ROOT / "README.md", ROOT / "data" / "classify" / "make_synthetic.py",
                                             *CONFIGS]}
    for name, text in texts.items():
        for braces in re.findall(r"data/classify/\{([a-z,]+)\}\.jsonl", text):
            assert {f"data/classify/{s}.jsonl" for s in braces.split(",")} <= WRITTEN, name
        named = set(re.findall(r"data/classify/[\w.-]+\.jsonl", text))
        assert named <= WRITTEN, f"{name} names {named - WRITTEN}"
    assert "synthetic_" not in "".join(texts.values())
    assert "python data/classify/make_synthetic.py" in texts["README.md"]


def _readme_outputs():
    """Paths (relative to the root) that README's commands and the configs they run write."""
    readme = (ROOT / "README.md").read_text()
    paths = {f"{d}/x" for d in re.findall(r"--hf_dir=(\S+)", readme)}
    paths |= {f"{d}/x" for d in re.findall(r"--out_dir=(out[\w-]*)", readme)}
    for config in sorted((ROOT / "config").glob("*.py")):
        ns = {}
        exec(config.read_text(), ns)
        if "out_file" in ns:
            paths.add(ns["out_file"])
        if "out_dir" in ns:
            paths.add(f"{ns['out_dir']}/x")
    import bench
    import eval as eval_script
    paths.add(eval_script.EvalConfig().out_file)
    paths.add(bench.PlanConfig().plan_file)  # bench.py --plan
    return paths | WRITTEN | {"out-shakespeare-hf/x", "gpt2-hf/x"}  # export_hf's default, the offline hint's copy


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout")
def test_gitignore_covers_what_the_commands_write():
    paths = sorted(_readme_outputs())
    assert {"hf-shakespeare/x", "eval_classify_fewshot.json", "eval_results.json"} <= set(paths)
    r = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(paths), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    ignored = set(r.stdout.split())
    assert not set(paths) - ignored, f"not ignored: {sorted(set(paths) - ignored)}"
