"""run_config.differences: the one "fields that differ" comparison behind every resume, tokenizer and
init_from check, against hand-written expectations."""

import dataclasses

from flaxformer_lite.config import ModelConfig
from flaxformer_lite.train.run_config import differences


def test_differences_of_mappings_in_the_new_ones_order():
    old = {"a": 1, "b": 2, "c": 3, "gone": 4}
    new = {"c": 30, "a": 1, "b": 20, "added": 5}
    assert differences(old, new) == [("c", 3, 30), ("b", 2, 20)]


def test_differences_skip_fields_and_compare_values_not_types():
    old = {"a": 1, "b": [1, 2], "c": None}
    new = {"a": 1.0, "b": [1, 3], "c": "x"}
    assert differences(old, new, skip=("c",)) == [("b", [1, 2], [1, 3])]
    assert differences(old, new, skip={"b", "c"}) == []


def test_differences_of_dataclasses_field_by_field():
    @dataclasses.dataclass(frozen=True)
    class Small:
        width: int = 3
        act: str = "relu"
        nested: tuple = (1, 2)

    assert differences(Small(), Small()) == []
    assert differences(Small(width=5, nested=(2,)), Small()) == [("width", 5, 3), ("nested", (2,), (1, 2))]
    assert differences(Small(act="gelu"), {"act": "relu", "other": 1}) == [("act", "gelu", "relu")]


def test_differences_of_model_configs_name_the_architecture_fields():
    ours = ModelConfig(vocab_size=37, d_model=16, num_heads=2, d_ff=48)
    theirs = ours.replace(activation="gelu", d_ff=64, dropout_rate=0.0)
    assert differences(theirs, ours) == [
        ("d_ff", 64, 48),
        ("activation", "gelu", "relu"),
        ("dropout_rate", 0.0, 0.1),
    ]
    assert differences(theirs, ours, skip=("dropout_rate",)) == [
        ("d_ff", 64, 48),
        ("activation", "gelu", "relu"),
    ]
