"""tools/layer_shares.py: per-layer shares counted from hand-made routes lines."""
import importlib.util
import json
import os
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = importlib.util.spec_from_file_location(
    "layer_shares", os.path.join(HERE, "..", "..", "tools", "layer_shares.py"))
layer_shares = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(layer_shares)


def route(layer, scheme, kv_heads):
    return json.dumps({"pos": 0, "layer": layer, "scheme": scheme, "kv_heads": kv_heads})


class TestLayerShares(unittest.TestCase):
    def test_counts_and_row(self):
        # layer 0: MHA, MQA, MQA, MQA; layer 1: GQA-2 four times
        lines = [route(0, 0, 6), route(1, 1, 2)] + [route(0, 2, 1), route(1, 1, 2)] * 3
        counts, heads = layer_shares.layer_shares(lines + [""])
        self.assertEqual(counts, {0: [1, 0, 3], 1: [0, 4]})
        self.assertEqual(heads, {0: 9, 1: 8})
        self.assertEqual(layer_shares.markdown_row("m", counts, heads),
                         "| m | 25.0% / 0.0% / 75.0% (2.25) | 0.0% / 100.0% / 0.0% (2.00) |")


if __name__ == "__main__":
    unittest.main()
