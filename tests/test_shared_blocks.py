"""Code shared between scripts is shared by copying; the copies must stay identical."""

import glob
import os
import re

from helpers import ROOT

BLOCK = re.compile(r"^# --- shared: (?P<name>[\w-]+) ---\n(?P<body>.*?)^# --- end shared: (?P=name) ---$", re.S | re.M)
MARKER = re.compile(r"^# --- (end )?shared: ", re.M)

# Scripts of the PQN family: each computes its targets with the shared q_lambda_returns.
Q_LAMBDA_SCRIPTS = ["pqn.py", "pqn_atari_envpool.py", "pqn_atari_envpool_lstm.py", "pdqn_minatar.py"]


def shared_blocks(text):
    """{name: body} of the shared blocks in a script's text; a block may appear only once."""
    blocks = {}
    for m in BLOCK.finditer(text):
        assert m["name"] not in blocks, f"shared block {m['name']} appears twice"
        blocks[m["name"]] = m["body"]
    assert len(MARKER.findall(text)) == 2 * len(blocks), "unpaired shared-block marker"
    return blocks


def differing_blocks(texts):
    """Names of the blocks whose copies differ between the given {script: text}."""
    copies = {}
    for script, text in texts.items():
        for name, body in shared_blocks(text).items():
            copies.setdefault(name, {})[script] = body
    return sorted(name for name, by_script in copies.items() if len(set(by_script.values())) > 1)


def scripts():
    return {os.path.basename(p): open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(ROOT, "*.py")))}


def test_checker_finds_a_differing_copy():
    a = "x = 1\n# --- shared: f ---\ndef f():\n    return 1\n# --- end shared: f ---\n"
    assert differing_blocks({"a.py": a, "b.py": a}) == []
    assert differing_blocks({"a.py": a, "b.py": a.replace("return 1", "return 2")}) == ["f"]
    assert shared_blocks(a) == {"f": "def f():\n    return 1\n"}


def test_shared_blocks_are_identical_across_scripts():
    assert differing_blocks(scripts()) == []


def test_every_pqn_family_script_carries_q_lambda_returns():
    texts = scripts()
    present = [s for s in Q_LAMBDA_SCRIPTS if s in texts]
    assert "pqn.py" in present
    for script in present:
        assert "q_lambda_returns" in shared_blocks(texts[script]), script
