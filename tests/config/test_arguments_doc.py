"""configs/neox_arguments.md is generated from the schema and must be up to date."""
from tools.gen_neox_arguments_doc import DOC_PATH, render


def test_committed_doc_matches_schema():
    with open(DOC_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == render(), "run: python tools/gen_neox_arguments_doc.py"


def test_doc_lists_every_pythia_key():
    text = render()
    for key in ("`num_layers`", "`bias_gelu_fusion`", "`data_preshuffled`", "`rate`",
                "`partition_activations`", "`moe_num_experts`"):
        assert key in text
