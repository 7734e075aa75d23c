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


if __name__ == "__main__":
    unittest.main()
