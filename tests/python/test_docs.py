"""The documentation's code is the code that runs: the quick start in include/moas.h
is examples/simple.c line for line, and every public function is documented."""
import os
import re
import unittest

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(path):
    with open(os.path.join(TOP, path), encoding="utf-8") as f:
        return f.read()


class HeaderDocs(unittest.TestCase):
    def test_quick_start_is_examples_simple_c(self):
        header = read("include/moas.h")
        start = header.index(" *     #include <moas.h>")
        end = header.index(" * THREADING.")
        lines = []
        for line in header[start:end].rstrip().split("\n"):
            line = line[3:] if line.startswith(" * ") else line[2:]
            lines.append(line[4:] if line.startswith("    ") else line)
        quick = "\n".join(lines).rstrip() + "\n"
        example = read("examples/simple.c")
        body = example[example.index("#include <moas.h>"):]
        self.assertEqual(quick, body)

    def test_every_public_function_has_a_doc_block(self):
        header = read("include/moas.h")
        names = re.findall(r"MOAS_API\s+[^;(]*?\b(moas_\w+)\s*\(", header)
        self.assertGreater(len(names), 50)
        for name in names:
            # documented by its own block ("name() - ...") or a trailing comment on
            # the declaration line (trivial getters)
            own = re.search(r"\* " + name + r"\(\) - ", header)
            decl = re.search(r"\b" + name + r"\(.*\);\s*/\*", header)
            self.assertTrue(own or decl, name + " has no documentation")


class FormatDocs(unittest.TestCase):
    def test_limits_are_the_loaders(self):
        """docs/FORMAT.md's limits are the bounds src/model.c and src/gguf.h enforce (a
        file written from the page alone must not meet an unwritten one)."""
        defines = {}
        for path in ("src/model.c", "src/model.h", "src/gguf.h"):
            for name, value in re.findall(r"#define (\w+) \(?(\d+u?(?: << \d+)?)\)?",
                                          read(path)):
                base, _, shift = value.partition(" << ")
                defines[name] = int(base.rstrip("u")) << int(shift or 0)
        want = {"moas.context_length": "MAX_CTX", "moas.embedding_length": "MAX_EMBD",
                "moas.block_count": "MAX_LAYERS", "moas.feed_forward_length": "MAX_FF",
                "moas.attention.head_count": "MOAS_MAX_HEADS",
                "moas.router.hidden_length": "MAX_EMBD",
                "tokenizer.ggml.tokens": "MAX_VOCAB"}
        doc = read("docs/FORMAT.md")
        table = dict(re.findall(r"^\| `([\w.]+)`[^|]* \| (\d+) \|$", doc, re.M))
        self.assertEqual({k: int(v) for k, v in table.items()},
                         {k: defines[d] for k, d in want.items()})
        model_c = read("src/model.c")
        for key, define in want.items():     # each is the limit of its own key
            if key != "tokenizer.ggml.tokens":
                self.assertIn('"%s", %s,' % (key, define), model_c)
        self.assertIn("A key or tensor name is 1 to %d bytes, a string value at most %d "
                      "bytes." % (defines["MOAS_GGUF_MAX_NAME"],
                                  defines["MOAS_GGUF_MAX_STRING"]), " ".join(doc.split()))


if __name__ == "__main__":
    unittest.main()
