"""Recipe loading: built-ins, user files, and one clear error per bad key or value."""
import pytest

from qcompile.errors import RecipeError
from qcompile.recipes import list_recipes, load_recipe

INT8_RULE = """
name = "mine"
[[rules]]
ops = ["MatMul"]
weight = { format = "int8", granularity = "channel" }
activation = { format = "int8" }
"""


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_builtins_are_listed_and_valid():
    names = [r.name for r in list_recipes()]
    assert {"fp16", "int8", "fp8"} <= set(names)
    int8 = load_recipe("int8")
    rule = int8.rule_for("MatMul", "node_1", "layers.0.mlp.up_proj")
    assert rule.weight.format == "int8" and rule.weight.granularity == "channel"
    assert rule.activation.granularity == "tensor" and rule.activation.mode == "static"
    assert int8.placement.for_op("Add").residual_add == "keep"
    assert not load_recipe("fp16").quantizes
    assert load_recipe("fp8").rule_for("Gemm", "g").weight.format == "fp8"


def test_user_file_with_globs_exclusions_and_per_op_placement(tmp_path):
    path = write(tmp_path, INT8_RULE.replace('ops = ["MatMul"]', 'ops = ["MatMul"]\nmodules = ["layers.*"]\n'
                                             'exclude = ["*lm_head*"]')
                 + "[placement]\nmin_k = 32\n[placement.op.Conv]\nmin_k = 8\nresidual_add = \"quantize\"\n")
    r = load_recipe(path)
    assert r.rule_for("MatMul", "n", "layers.1.attn.q_proj") is not None
    assert r.rule_for("MatMul", "n", "lm_head") is None            # module glob does not match
    assert r.rule_for("MatMul", "lm_head_matmul", "layers.9.lm_head") is None  # excluded
    assert r.rule_for("Gemm", "n", "layers.0") is None              # op type not selected
    assert r.placement.for_op("MatMul").min_k == 32
    assert r.placement.for_op("Conv").min_k == 8 and r.placement.for_op("Conv").residual_add == "quantize"


def test_schema_carries_group_block_and_dynamic(tmp_path):
    text = """
name = "future"
[[rules]]
ops = ["MatMul"]
weight = { format = "int4", granularity = "group", group_size = 128 }
[[rules]]
ops = ["Gemm"]
weight = { format = "fp8", granularity = "block", block = [128, 128] }
activation = { format = "fp8", granularity = "token", mode = "dynamic" }
"""
    r = load_recipe(write(tmp_path, text))
    assert r.rules[0].weight.group_size == 128 and r.rules[0].activation is None
    assert r.rules[1].weight.block == (128, 128) and r.rules[1].activation.mode == "dynamic"
    assert not r.needs_calibration


@pytest.mark.parametrize("text, needle", [
    ("colour = 1\n" + INT8_RULE, "unknown key recipe.colour"),
    (INT8_RULE + "colour = 1\n", "unknown key rules[0].colour"),
    (INT8_RULE.replace('activation = { format = "int8" }', 'activation = { format = "int8", gran = "x" }'),
     "unknown key rules[0].activation.gran"),
    (INT8_RULE.replace('format = "int8", granularity', 'format = "int9", granularity'), "rules[0].weight.format"),
    (INT8_RULE.replace('activation = { format = "int8" }', 'activation = { format = "int8", granularity = "channel" }'),
     "activations cannot be quantized per channel"),
    (INT8_RULE + "[placement]\nmin_k = -3\n", "placement.min_k"),
    (INT8_RULE + "[placement]\nresidual_add = \"maybe\"\n", "placement.residual_add"),
    (INT8_RULE + "[calibration]\npercentile = 120\n", "calibration.percentile"),
    (INT8_RULE.replace('granularity = "channel"', 'granularity = "group"'), "group_size"),
    ("name = \"x\"\nopset = 17\n", "recipe.opset"),
    ("name = \"x\"\n[[rules]]\nops = [\"MatMul\"]\n", "quantizes nothing"),
    ("name = [broken", "not valid TOML"),
])
def test_bad_recipes_name_the_key(tmp_path, text, needle):
    with pytest.raises(RecipeError, match=None) as info:
        load_recipe(write(tmp_path, text))
    assert needle in str(info.value)
    assert "r.toml" in str(info.value)


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError) as info:
        load_recipe("int3")
    assert "int3" in str(info.value) and "int8" in str(info.value) and "fp8" in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_threshold_override_keeps_the_recipe_limits_it_does_not_name():
    from qcompile.recipes.schema import ValidationThresholds

    base = load_recipe("w4a16_awq").validation
    assert base.min_cosine == 0.98
    same = base.override(min_cosine=None, min_sqnr_db=None, min_top1=None)
    assert same == base
    assert base.override(min_top1=0.5) == ValidationThresholds(0.98, None, 0.5)
    with pytest.raises(RecipeError, match="min_cosine"):
        base.override(min_cosine=1.5)
