"""bench.py's own judgements (its timings are figures for the README, not tests)."""
import bench


def test_hellaswag_methods_may_differ_by_bf16_rounding_but_not_in_float32():
    assert not bench.methods_disagree([60, 60, 61], "bfloat16", 200)  # the H200's bf16 run: one tie broken
    assert bench.methods_disagree([60, 60, 63], "bfloat16", 200)  # more than 1% is a real difference
    assert bench.methods_disagree([60, 60, 61], "float32", 200)
    assert not bench.methods_disagree([60, None, 60], "float32", 200)  # a row that ran out of memory
