"""The docs a user reads agree with the repository and with what the code prints.

- every relative link of README.md and docs/*.md resolves (file, and #anchor to a heading);
- no doc points outside the repository;
- the layer indices the docs quote equal ``L2EConfig.resolve_layers``;
- a make target the docs spell out ("`make demo` is `...`", "`make figures` runs" and a code
  block) is the Makefile's recipe;
- every ``error: ...`` line quoted in a code block is what the code prints for the stated
  input: the ``$ command`` on the line above it is run, or the line has a producer in
  ``ERROR_PRODUCERS`` below (a new quoted error without either fails: add one).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron.config import L2EConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
TINY = REPO / "configs" / "local" / "tiny.yml"
SIZES = {"70M": "70M", "410M": "410M", "2.8B": "2-8B", "2-8B": "2-8B"}


def prose(text: str) -> str:
    """The page without fenced or indented code blocks (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return "\n".join(line for line in text.splitlines() if not line.startswith("    "))


def code_lines(text: str) -> list[list[str]]:
    """The lines of each code block (indented or fenced), stripped of their indent."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
            if not fenced:
                blocks.append(current)
                current = []
            continue
        if fenced or line.startswith("    "):
            current.append(line[4:] if not fenced else line)
        elif line.strip() and current:
            blocks.append(current)
            current = []
    return [b for b in blocks + [current] if b]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())  # formatting marks (an _ inside a word stays)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(page.read_text()).splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    assert "../shared" not in text, f"{page.name} points outside the repository (../shared)"
    broken = []
    for match in LINK.finditer(prose(text)):
        target = match[1] or match[2]
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def num_layers(size: str) -> int:
    return yaml.safe_load((REPO / "configs" / "pythia" / f"{size}.yml").read_text())["num_layers"]


def quoted_layers(text: str) -> list[int]:
    """"2, 3", "8 … 16" or "[15, 16]" -> the indices."""
    span = re.fullmatch(r"\s*(\d+)\s*…\s*(\d+)\s*", text)
    if span:
        return list(range(int(span[1]), int(span[2]) + 1))
    return [int(x) for x in re.findall(r"\d+", text)]


def test_spec_layer_table_matches_resolve_layers():
    text = (REPO / "docs" / "l2e_spec.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| preset | Pythia-"))
    sizes = [SIZES[re.match(r" Pythia-(\S+)", cell)[1]] for cell in header.strip("|").split("|")[1:]]
    rows = [line for line in text.splitlines() if re.match(r"\| `(mid2|mid_third|top_bottom)` \|", line)]
    assert len(rows) == 3
    for row in rows:
        preset, *cells = [c.strip() for c in row.strip("|").split("|")]
        for size, cell in zip(sizes, cells):
            expected = L2EConfig(layers=preset.strip("`")).resolve_layers(num_layers(size))
            assert quoted_layers(cell) == expected, f"l2e_spec.md: {preset} on {size} says {cell}"


def test_layers_quoted_in_prose_and_plans_match_the_code():
    checked = 0
    for page in PAGES:
        text = page.read_text()
        for line in text.splitlines():  # "mid2 ... (Pythia-70M: 2, 3; 410M: 11, 12; 2.8B: 15, 16)"
            if "mid2" in line:
                for size, layers in re.findall(r"(70M|410M|2\.8B): (\d+(?:, \d+)*)", line):
                    expected = L2EConfig(layers="mid2").resolve_layers(num_layers(SIZES[size]))
                    assert quoted_layers(layers) == expected, f"{page.name}: {line.strip()}"
                    checked += 1
        for block in code_lines(text):  # plan_run.py output: "=== 2-8B" ... "L2E layers [15, 16]"
            size = None
            for line in block:
                heading = re.match(r"=== (\S+)$", line)
                size = SIZES.get(heading[1], size) if heading else size
                quoted = re.search(r"L2E layers (\[[\d, ]+\])", line)
                if quoted and size:
                    overlay = yaml.safe_load((REPO / "configs" / "l2e" / size / "l2e.yml").read_text())["l2e"]
                    expected = L2EConfig(layers=overlay.get("layers", "mid2")).resolve_layers(num_layers(size))
                    assert quoted_layers(quoted[1]) == expected, f"{page.name}: === {size}: {line}"
                    checked += 1
    assert checked >= 3  # docs/l2e.md §1 names the mid2 layers of all three sizes


def make_recipe(target: str) -> str:
    """The Makefile's command for ``target`` (continuations joined, ``$(BIN)/`` dropped, and
    the already-trained guard of the demo targets, which runs the command otherwise)."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, flags=re.M)[1]
    recipe = re.sub(r"^\s*@\$\(call TRAINED,[^)]*\)\s*\|\|", "", recipe)
    return " ".join(recipe.replace("$(BIN)/", "").split())


def test_make_targets_quoted_in_docs_are_the_makefiles():
    checked = 0
    for page in PAGES:
        text = page.read_text()
        for target, command in re.findall(r"`make ([\w-]+)` is `([^`]+)`", text):
            assert " ".join(command.split()) == make_recipe(target), f"{page.name}: make {target}"
            checked += 1
        for target, block in re.findall(r"`make ([\w-]+)` runs\n\n((?:    .*\n)+)", text):
            quoted = " ".join(block.replace("\\\n", " ").split())
            assert quoted == make_recipe(target), f"{page.name}: make {target} quotes {quoted!r}"
            checked += 1
    assert checked >= 2  # README's `make demo`, analysis.md's `make figures`


# --- quoted error lines ---------------------------------------------------------------


def _config_error(files: dict[str, str], paths, tmp_path):
    """The one-line error of loading ``paths`` (written from ``files`` under tmp_path)."""
    from megatron.config import NeoXArgs
    from megatron.errors import UserError

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        NeoXArgs.from_ymls(paths)
    except UserError as e:
        return f"error: {e}"
    finally:
        os.chdir(cwd)
    return "(no error)"


def _twice_at_12_and_40(tmp_path):
    lines = ["# filler"] * 40
    lines[11], lines[39] = "seq_length: 128", "seq_length: 256"
    return _config_error({"configs/mine.yml": "\n".join(lines) + "\n"}, ["configs/mine.yml"], tmp_path)


def _offline_task(tmp_path):
    from megatron.eval.harness import _data_error

    offline = ConnectionError("Couldn't reach 'allenai/sciq' on the Hub (OfflineModeIsEnabled)")
    return f"error: {_data_error('sciq', offline)}"


def _watchdog_line(**kw):
    from megatron.training.watchdog import silent_peer_line

    return silent_peer_line(rank=0, **kw)


ERROR_PRODUCERS = {  # the quoted line -> how the code produces it for the input the doc states
    "error: configs/mine.yml: unknown key 'hiden_size' (did you mean 'hidden_size'?)":
        lambda tmp: _config_error({"configs/mine.yml": "hiden_size: 128\n"}, ["configs/mine.yml"], tmp),
    "error: configs/mine.yml: unknown key 'optimizer.params.betaz' (did you mean 'betas'?); remove or fix it":
        lambda tmp: _config_error({"configs/mine.yml": TINY.read_text().replace('"betas"', '"betaz"')},
                                  ["configs/mine.yml"], tmp),
    "error: configs/mine.yml: line 40: key 'seq_length' is set twice (lines 12 and 40); YAML would keep only "
    "the last, remove one": _twice_at_12_and_40,
    "error: eval: task 'sciq' cannot load its dataset without network (Couldn't reach 'allenai/sciq' on the Hub "
    "(OfflineModeIsEnabled)); download it into an HF cache on a machine with internet and set HF_HOME and "
    "HF_DATASETS_OFFLINE=1 here (docs/eval.md, 'Offline evaluation')": _offline_task,
    "error: rank 1 on node2 has not answered for 120 s (stopped, hung or gone; peer_heartbeat_timeout_seconds: 120); "
    "rank 0 exits so that the job ends": lambda tmp: _watchdog_line(peer=1, host="node2", quiet_s=120.2, timeout_s=120),
}


def quoted_errors():
    """(page, quoted error line, the ``$ command`` right above it or None)."""
    found = []
    for page in PAGES:
        for block in code_lines(page.read_text()):
            for i, line in enumerate(block):
                if line.startswith("error: "):
                    above = block[i - 1] if i else ""
                    found.append((page.name, line.rstrip(), above[2:] if above.startswith("$ ") else None))
    return found


@pytest.mark.parametrize("page,line,command", quoted_errors(), ids=lambda v: str(v)[:40])
def test_quoted_error_is_what_the_code_prints(page, line, command, tmp_path):
    if command is not None:
        argv = shlex.split(command)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        env = dict(os.environ, PYTHONPATH=str(REPO), NEOX_L2E_TRACEBACK="")
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
        assert line in result.stderr.splitlines(), f"{page}: `{command}` printed {result.stderr!r}"
        return
    assert line in ERROR_PRODUCERS, f"{page} quotes {line!r}: add a producer to ERROR_PRODUCERS in {__file__}"
    assert ERROR_PRODUCERS[line](tmp_path) == line
